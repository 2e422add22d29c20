"""One optimizer step: the step's sequences and weights in, one update (or a counted skip) out.

Normalisation: the divergence of every response token is multiplied by its problem's
weight and summed, then divided once by the global number of response tokens of the
step (all micro-batches, all ranks). DeepSpeed averages gradients over ranks and, by
default, divides the loss by the accumulation steps; we multiply by the world size and
pass ``scale_wrt_gas=False`` so that neither changes the normalisation. So the update
is the same whatever the split into ranks x micro-batches x accumulation steps.

The teacher answers one request per ``teacher.forward_micro_batches`` micro-batches (one
all-gather of a ZeRO-3 teacher for several student micro-batches).

Non-finite rule: a non-finite loss on any rank makes the global gradient norm non-finite
on every rank, and DeepSpeed then skips the update (``engine.skipped_steps``); the step
reports it, with the ranks whose loss was not finite, and the trainer counts it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from paced_ds.config import LossConfig, RunConfig
from paced_ds.distill.fused import student_loss
from paced_ds.distill.losses import distillation_loss
from paced_ds.distill.teachers import Teacher, TeacherBatch, requests_for
from paced_ds.models.ulysses import SequenceParallel
from paced_ds.runtime import dist
from paced_ds.runtime.faults import NONE, Faults


@dataclass
class StepOutcome:
    status: str  # "applied", "zero_weight" (every weight 0: nothing done) or "nonfinite" (update skipped)
    loss: float = float("nan")  # weighted divergence sum / global response tokens
    tokens: int = 0  # global response tokens
    forward_tokens: int = 0  # global tokens through the student (a rollout's generation counted once more)
    student_tokens: int = 0  # global tokens of the sequences trained on (forward and backward), prompts included
    teacher_tokens: int = 0  # global tokens the teacher ran forward to answer the step
    weight_mean: float = float("nan")  # mean weight of the step's problems, as applied
    teacher_s: float = 0.0  # this rank's time waiting for teacher answers
    nonfinite_ranks: list[int] = field(default_factory=list)
    applied_anyway: bool = False  # non-finite, but DeepSpeed updated (it computes no gradient norm)


def divergence_params(loss_cfg: LossConfig, kind: str) -> dict:
    """The parameters of divergence ``kind`` from the loss section."""
    return {"jsd": {"beta": loss_cfg.jsd_beta}, "skew_kl": {"alpha": loss_cfg.skew_alpha},
            "skew_reverse_kl": {"alpha": loss_cfg.skew_alpha}, "akl": {"mu": loss_cfg.akl_mu}}.get(kind, {})


def per_request(cfg: RunConfig) -> int:
    """Sequences per teacher request."""
    return (cfg.teacher.forward_micro_batches or cfg.train.grad_accum) * cfg.train.micro_batch_size


def optimizer_step(cfg: RunConfig, student, teacher: Teacher, examples: list[dict], problems: list[int],
                   weights: torch.Tensor, *, kind: str, vocab: int, pad_id: int, generated: bool = False,
                   ahead: list[TeacherBatch] | None = None, number: int = 0,
                   sequence_parallel: SequenceParallel | None = None, faults: Faults = NONE) -> StepOutcome:
    """Train ``student`` on this rank's share of one optimizer step. Collective.

    examples, problems: this rank's sequences (``input_ids``, ``response_start``) and the
        problem index of each, in micro-batch order (``micro_batch_size`` each).
    weights: [len(examples)], each sequence's curriculum weight (``curriculum.normalize``
        batch_mean rescales them here, over all ranks, to average 1).
    generated: the sequences are the student's own rollouts (their generation cost one
        more forward over them).
    ahead: the next step's requests, for a teacher that looks ahead to start on now.
    number: the step's number (1 for the first), for ``faults`` (what ``PACED_DS_FAULT`` injects; tests).
    sequence_parallel: this rank's group (``train.sequence_parallel`` > 1): its ranks were given
        the same sequences, and each trains on its shard of their positions, the teacher
        answering that shard (``models/ulysses.py``).
    """
    world, rank, device = dist.world_size(), dist.rank(), dist.device()
    mb = cfg.train.micro_batch_size
    if len(examples) != len(problems) or len(examples) != len(weights) or len(examples) % mb:
        raise ValueError(f"optimizer_step: {len(examples)} sequences, {len(problems)} problems, {len(weights)} "
                         f"weights: they must be equal, a multiple of train.micro_batch_size ({mb})")
    sp = sequence_parallel
    split = sp.split if sp is not None else contextlib.nullcontext
    requests = requests_for(examples, problems, per_request(cfg), pad_id)
    if sp is not None:  # this rank's positions of every request, which the teacher answers too
        requests = [TeacherBatch(sp.shard(r.batch), r.examples, r.problems) for r in requests]
        local_tokens = sum(int(request.batch["loss_mask"].sum()) for request in requests)
    else:
        local_tokens = sum(len(e["input_ids"]) - e["response_start"] for e in examples)
    local_sequence = sum(len(e["input_ids"]) for e in examples)
    share = 1.0 / sp.size if sp is not None else 1.0  # a group's ranks hold the same sequences: count them once
    global_tokens, global_weight, global_count, global_sequence, global_teacher = dist.all_reduce_sum(torch.tensor(
        [float(local_tokens), weights.sum().item() * share, len(examples) * share, local_sequence * share,
         teacher.scored_tokens(requests) * share], dtype=torch.float64)).tolist()
    if global_weight == 0:
        return StepOutcome("zero_weight")
    # curriculum.normalize=batch_mean: this step's weights average 1 over all ranks (dataset_mean is the
    # curriculum's: Curriculum.weights).
    scale = global_count / global_weight if cfg.curriculum.normalize == "batch_mean" else 1.0
    loss_args = dict(kind=kind, temperature=cfg.loss.temperature, normalizer=global_tokens,
                     chunk_tokens=cfg.loss.chunk_tokens or None, **divergence_params(cfg.loss, kind))
    spoil = faults.spoil_loss(number) if faults else None

    answers = teacher.answers(requests)
    if ahead is not None:
        teacher.ask_ahead(ahead)
    loss_sum, teacher_s = torch.zeros((), dtype=torch.float64, device=device), 0.0
    finite = torch.ones((), dtype=torch.bool, device=device)  # a tensor: no sync per micro-batch
    skipped_before = student.skipped_steps
    for first, request in zip(range(0, len(examples), per_request(cfg)), requests):
        batch = {key: value.to(device) for key, value in request.batch.items()}
        request_weights = (weights[first:first + len(request.examples)] * scale).to(device)
        started = time.time()
        with split():
            answer = next(answers)
        if device.type == "cuda":  # time the forward, not its kernel launches
            torch.cuda.synchronize(device)
        teacher_s += time.time() - started
        for start in range(0, len(request.examples), mb):
            rows = slice(start, start + mb)
            positions = {"position_ids": batch["position_ids"][rows]} if sp is not None else {}
            with split():  # Ulysses attention in the forward, and in a checkpointed layer's recomputation
                if cfg.loss.fused:
                    loss, stats = student_loss(student, batch["input_ids"][rows], batch["attention_mask"][rows],
                                               answer.samples(rows), batch["loss_mask"][rows], request_weights[rows],
                                               vocab=vocab, **positions, **loss_args)
                else:
                    student_logits = student(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"]
                                             [rows], **positions).logits[..., :vocab]
                    loss, stats = distillation_loss(student_logits, answer.samples(rows), batch["loss_mask"][rows],
                                                    request_weights[rows], **loss_args)
                if spoil is not None:
                    loss = spoil(loss)
                finite &= torch.isfinite(loss.detach())
                student.backward(loss * world, scale_wrt_gas=False)
            student.step()
            loss_sum += stats["weighted_divergence_sum"].double()
        del answer

    sums = torch.zeros(1 + world, dtype=torch.float64)  # the step's loss sum, then each rank's non-finite flag
    sums[0], sums[1 + rank] = loss_sum.item(), float(not finite.item())
    sums = dist.all_reduce_sum(sums)
    nonfinite_ranks = [r for r in range(world) if sums[1 + r] > 0]
    outcome = StepOutcome("applied", loss=sums[0].item() / max(global_tokens, 1.0), tokens=int(global_tokens),
                          forward_tokens=int(global_sequence) * (2 if generated else 1),
                          student_tokens=int(global_sequence), teacher_tokens=int(global_teacher),
                          weight_mean=global_weight * scale / global_count, teacher_s=teacher_s)
    if student.skipped_steps > skipped_before or nonfinite_ranks:
        outcome.status, outcome.nonfinite_ranks = "nonfinite", nonfinite_ranks
        outcome.applied_anyway = student.skipped_steps == skipped_before
    return outcome
