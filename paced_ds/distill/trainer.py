"""The training loop: problems -> teacher logits -> student -> weighted divergence -> step.

Read it top to bottom: ``train(cfg)`` sets up (process group, tokenizer, problems,
teacher responses, engines, sampler), evaluates the student, then runs one plain loop
over optimizer steps, then evaluates, checkpoints and exports.

Loss normalisation: the divergence of every response token is multiplied by its
problem's weight and summed, then divided once by the global number of response tokens
of the optimizer step (all micro-batches, all ranks). DeepSpeed averages gradients over
ranks and, by default, divides the loss by the accumulation steps; we multiply by the
world size and pass ``scale_wrt_gas=False`` so that neither changes the normalisation.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from paced_ds import __version__
from paced_ds.config import RunConfig
from paced_ds.curriculum import estimate, snr
from paced_ds.curriculum.calibrate import bucket_edges
from paced_ds.curriculum.curriculum import Curriculum
from paced_ds.curriculum.sampler import ProblemSampler
from paced_ds.data import sources
from paced_ds.data.collate import collate_train, encode
from paced_ds.data.prompts import privileged_prompt
from paced_ds.distill import cache, engines, generation, onpolicy, pipeline
from paced_ds.distill.losses import distillation_loss
from paced_ds.distill.retention import Retention
from paced_ds.errors import UserError
from paced_ds.runtime import checkpoint, dist, faults
from paced_ds.runtime.tracking import Tracker


def say(message: str) -> None:
    if dist.is_main():
        print(f"paced-ds: {message}", flush=True)


def divergence_params(cfg: RunConfig, kind: str) -> dict:
    return {"jsd": {"beta": cfg.loss.jsd_beta}, "skew_kl": {"alpha": cfg.loss.skew_alpha},
            "skew_reverse_kl": {"alpha": cfg.loss.skew_alpha}, "akl": {"mu": cfg.loss.akl_mu}}.get(kind, {})


def open_cache(cfg: RunConfig, tokenizer, vocab: int, records: list[dict], examples: list[dict]):
    """The teacher cache, checked against this run's teacher, tokenizer, k and problems."""
    expected = cache.expected_manifest(teacher=sources.teacher_identity(teacher_path(cfg)), tokenizer=tokenizer,
                                       topk=cfg.teacher.topk, vocab=vocab, records=records, examples=examples)
    return cache.TeacherCache(cfg.teacher.cache, expected)


def teacher_path(cfg: RunConfig) -> str:
    """model.teacher, or model.student when the student distils into itself."""
    if cfg.teacher.self_distill:
        return engines.resolve_model(cfg.model.student, "model.student")
    return engines.resolve_model(cfg.model.teacher, "model.teacher")


def schedule_switch(cfg: RunConfig) -> int | None:
    """The first on-policy step: 0 for on_policy, loss.switch_at for two_stage, None for off_policy."""
    if cfg.loss.schedule == "off_policy":
        return None
    if cfg.loss.schedule == "on_policy":
        return 0
    at = cfg.loss.switch_at
    return int(round(at * cfg.train.steps)) if at < 1 else int(at)


def privileged_prompt_ids(cfg: RunConfig, tokenizer, records: list[dict]) -> list[list[int]]:
    """Self-distillation: each problem's prompt with its reference answer shown to the teacher."""
    shown = [{**r, "prompt": privileged_prompt(r["prompt"], r["answer"], cfg.teacher.privileged_template)}
             for r in records]
    return generation.prompt_ids(tokenizer, shown, cfg.data)


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def preflight(cfg: RunConfig):
    """Everything that can be checked before a process group exists: tokenizer, the two
    models' vocabularies, and the problems. Bad input fails here, on every rank alike."""
    existing = Path(cfg.train.output_dir) / "checkpoints" / "latest"
    if cfg.train.resume == "never" and existing.is_file():
        raise UserError(f"config key train.output_dir: {cfg.train.output_dir} already holds a run with "
                        "checkpoints; continue it with train.resume=auto or choose another train.output_dir")
    resume_from = checkpoint.find_resume(cfg.train.output_dir, cfg.train.resume)
    if resume_from is not None:
        checkpoint.check_resumable(*resume_from, cfg)
    faults.active()  # a malformed PACED_DS_FAULT fails here too
    if cfg.curriculum.competence and not Path(cfg.curriculum.competence).is_file():
        raise UserError(f"config key curriculum.competence: no file {cfg.curriculum.competence}")
    engines.student_ds_config(cfg)  # the DeepSpeed JSONs exist and parse
    engines.teacher_ds_config(cfg)
    tokenizer = engines.load_tokenizer(cfg)
    vocab = engines.shared_vocab_size(cfg, tokenizer, teacher=teacher_path(cfg))
    train_records = sources.load_train(cfg.data)
    eval_records = sources.limit_per_level(sources.load_eval(cfg.data), cfg.eval.limit_per_level)
    return tokenizer, vocab, train_records, eval_records


def with_teacher_responses(cfg: RunConfig, tokenizer, teacher_engine, train_records: list[dict]) -> list[dict]:
    """Train problems with a response each: their own, stored ones, or generated now by the teacher."""
    teacher_name = sources.teacher_identity(teacher_path(cfg))
    attached = sources.with_stored_responses(train_records, cfg.data, teacher_name)
    if attached is None and teacher_engine is None:
        raise UserError(f"teacher.backend={cfg.teacher.backend}: the teacher's responses are not stored for these "
                        f"problems in data.responses_dir ({cfg.data.responses_dir}); run `paced-ds generate` first")
    if attached is None:
        needed = sources.missing_responses(train_records)
        say(f"generating teacher responses for {len(needed)} problems (stored for later runs)")
        rows = generate_responses(cfg, tokenizer, teacher_engine, needed)
        if dist.is_main():
            path = sources.store_responses(train_records, rows, cfg.data, teacher_name)
            correct = sum(row["correct"] for row in rows)
            say(f"teacher solved {correct}/{len(rows)}; responses stored in {path}")
        dist.barrier()
        attached = sources.with_stored_responses(train_records, cfg.data, teacher_name)
    records, dropped = attached
    if dropped:
        say(f"dropped {dropped} problems whose teacher response failed verification (data.keep_incorrect)")
    records = [r for r in records if r.get("response")]
    if not records:
        raise UserError(f"data.train: no problem has a usable teacher response ({cfg.data.train})")
    return records


def generate_responses(cfg: RunConfig, tokenizer, teacher_engine, records: list[dict]) -> list[dict]:
    progress = progress_bar(len(records), "teacher responses", cfg) if dist.is_main() else None
    rows = generation.teacher_responses(teacher_engine.module, tokenizer, records, cfg.data,
                                        batch_size=cfg.eval.batch_size, progress=progress)
    if progress is not None:
        progress.close()
    return rows


def progress_bar(total: int, desc: str, cfg: RunConfig, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not cfg.logging.progress or not dist.is_main(),
                dynamic_ncols=True)


def tokenize_problems(cfg: RunConfig, tokenizer, records: list[dict]) -> list[dict]:
    texts = generation.prompt_texts(tokenizer, records, cfg.data)
    return [encode(tokenizer, text, record["response"], cfg.data.max_length, problem_id=record["id"])
            for text, record in zip(texts, records)]


def run_eval(cfg, engine, tokenizer, eval_records, retention, tracker, step: int, label: str) -> dict | None:
    if not eval_records:
        return None
    started = time.time()
    result = generation.evaluate(engine.module, tokenizer, eval_records, cfg.data, cfg.eval)
    result.update(retention.measure(engine.module, tokenizer, cfg.data, cfg.eval))
    tracker.log_eval(step, result)
    levels = generation.accuracy_table(result["by_difficulty"])
    forgot = ""
    if "forgotten" in result:
        forgot = (f" | retention set: the {result['retention_set']} retention problems solved now" if step == 0 else
                  f" | forgotten {result['forgotten']:.1%} of the retention set ({result['retention_set']})")
    say(f"eval ({label}, step {step}): accuracy {result['accuracy']:.1%} | "
        + " ".join(f"{k} {v:.0%}" for k, v in levels.items()) + forgot + f" | {time.time() - started:.1f} s")
    return result


def teacher_logits(teacher_engine, batch: dict, vocab: int) -> torch.Tensor:
    """The co-located teacher's logits over the shared vocabulary (a collective ZeRO-3 forward)."""
    with torch.no_grad():
        logits = teacher_engine.module(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits
    return logits[..., :vocab]


def train(cfg: RunConfig) -> dict:
    # ---- set up -------------------------------------------------------------------------
    tokenizer, vocab, train_records, eval_records = preflight(cfg)
    retain_records = sources.limit_per_level(sources.load_retain(cfg.data), cfg.eval.limit_per_level)
    dist.init(cfg.train.timeout_s)
    world, rank = dist.world_size(), dist.rank()
    device = dist.device()
    output_dir = Path(cfg.train.output_dir)
    seed_everything(cfg.train.seed + rank)
    check_same_config(cfg)

    # Self-distillation: the teacher is a frozen copy of the initial student. A cached
    # teacher needs no engine at all; a pipelined one is another job's, reached through the bridge.
    cached, remote = cfg.teacher.backend == "cache", None
    teacher = None if cfg.teacher.backend != "engine" else engines.build_teacher(cfg, name=teacher_path(cfg))
    if cfg.teacher.backend == "pipelined":
        remote = connect_teacher(cfg, tokenizer, vocab)
    teacher_forward = remote.logits if remote else lambda batch: teacher_logits(teacher, batch, vocab)
    examples = None  # off-policy sequences; a purely on-policy run needs no teacher responses
    if cfg.loss.schedule != "on_policy":
        train_records = with_teacher_responses(cfg, tokenizer, teacher, train_records)
        examples = tokenize_problems(cfg, tokenizer, train_records)
    teacher_cache = open_cache(cfg, tokenizer, vocab, train_records, examples) if cached else None
    student, _ = engines.build_student(cfg)
    say(f"{len(train_records)} training problems, {len(eval_records)} held-out; {world} ranks; "
        f"student ZeRO-{cfg.train.zero_stage}, teacher "
        + teacher_description(cfg) + "; "
        f"loss {cfg.loss.kind} ({cfg.loss.schedule})" + (", self-distillation" if cfg.teacher.self_distill else ""))

    curriculum = Curriculum(cfg, train_records)
    sampler = ProblemSampler(len(train_records), seed=cfg.train.seed, world_size=world, rank=rank,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                             apply=cfg.curriculum.apply)
    # tokens: response tokens trained on; forward_tokens: every token through the student,
    # rollouts (competence estimates, on-policy steps) included.
    # skipped_nonfinite: tries of a step whose update was skipped for a non-finite loss or gradient.
    counters = {"step": 0, "tokens": 0, "samples": 0, "skipped_zero_weight": 0, "forward_tokens": 0,
                "skipped_nonfinite": 0, "nonfinite_in_a_row": 0}
    resume_from = checkpoint.find_resume(output_dir, cfg.train.resume)
    resumed_rng = None
    if resume_from is not None:
        client_state = checkpoint.load(student, *resume_from)
        checkpoint.check_config(client_state["config"], cfg, client_state["counters"]["step"],
                                resume_from[0] / resume_from[1])
        curriculum.load_state_dict(client_state["curriculum"])
        if curriculum.active:
            sampler.set_weights(curriculum.weights())
        sampler.load_state_dict(client_state["sampler"])
        counters.update(client_state["counters"])
        resumed_rng = client_state["rng"]
        say(f"resumed from {resume_from[0] / resume_from[1]} at step {counters['step']}")
    elif dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (output_dir / "snr.jsonl").unlink(missing_ok=True)  # appended per probe: a fresh run starts it anew
    start_step = counters["step"]
    tracker = Tracker(output_dir, tensorboard=cfg.logging.tensorboard,
                      resume_step=start_step if resume_from is not None else None)
    retention = Retention(retain_records, output_dir)
    if resume_from is not None:
        retention.resume()

    before = None
    if resume_from is None:
        before = run_eval(cfg, student, tokenizer, eval_records, retention, tracker, 0, "before training")
        if curriculum.active:
            counters["forward_tokens"] += update_curriculum(cfg, curriculum, sampler, student, tokenizer,
                                                            train_records, tracker, step=0)
    curriculum_scalars = curriculum.summary(sampler.weights) if curriculum.active else {}
    buckets = bucket_edges(cfg.snr.buckets) if cfg.snr.every else None
    snr_scalars = {}
    if cfg.snr.every and resume_from is None:
        snr_scalars = run_probe(cfg, curriculum, sampler, student, teacher_forward, tokenizer, examples, buckets,
                                tracker, vocab=vocab, step=0, counters=counters)
        curriculum_scalars = curriculum.summary(sampler.weights)

    group = cfg.teacher.forward_micro_batches or cfg.train.grad_accum
    mb = cfg.train.micro_batch_size
    switch_step = schedule_switch(cfg)
    prompts = generation.prompt_ids(tokenizer, train_records, cfg.data) if switch_step is not None else None
    privileged = privileged_prompt_ids(cfg, tokenizer, train_records) if cfg.teacher.self_distill else None
    progress = progress_bar(cfg.train.steps, "distilling", cfg, initial=counters["step"])
    if resumed_rng is not None:  # restored last, so that none of the set-up above draws from it
        checkpoint.set_rng_state(resumed_rng)

    # ---- the loop -------------------------------------------------------------------------
    while counters["step"] < cfg.train.steps:
        step_started = time.time()
        lr = student.get_lr()[0]  # the rate this step uses
        on_policy = switch_step is not None and counters["step"] >= switch_step
        if on_policy and counters["step"] == switch_step and cfg.loss.schedule == "two_stage":
            say(f"step {switch_step}: switching to on-policy {cfg.loss.stage2_kind}")
            if cfg.curriculum.reestimate_at_switch and curriculum.active:
                counters["forward_tokens"] += update_curriculum(cfg, curriculum, sampler, student, tokenizer,
                                                                train_records, tracker, step=switch_step)
                curriculum_scalars = curriculum.summary(sampler.weights)
        kind = cfg.loss.stage2_kind if on_policy and cfg.loss.schedule == "two_stage" else cfg.loss.kind
        params = divergence_params(cfg, kind)
        epoch_before = sampler.epoch
        micro_batches = sampler.next_step()
        if sampler.epoch != epoch_before or counters["step"] == 0:
            check_agreement(sampler, curriculum)
        step_indices = [i for part in micro_batches for i in part]

        # The sequences this step scores: teacher responses, or the student's own rollouts.
        rollout_s = 0.0
        if on_policy:
            rollout_started = time.time()
            responses = onpolicy.rollouts(student, tokenizer, [prompts[i] for i in step_indices], cfg)
            step_examples = [onpolicy.example(prompts[i], r, tokenizer.eos_token_id, cfg.data.max_length)
                             for i, r in zip(step_indices, responses)]
            if cfg.curriculum.refresh == "on_policy":
                correct = onpolicy.outcomes(tokenizer, responses, [train_records[i]["answer"] for i in step_indices])
                curriculum.observe(step_indices, correct)
            rollout_s = time.time() - rollout_started
        else:
            step_examples = [examples[i] for i in step_indices]
        teacher_examples = ([onpolicy.teacher_example(privileged[i], e) for i, e in zip(step_indices, step_examples)]
                            if privileged is not None else None)  # self-distillation: the teacher's own prompts

        # One teacher forward (one all-gather of the teacher) for every `group` micro-batches.
        chunks = [slice(first, first + group * mb) for first in range(0, len(step_examples), group * mb)]
        batches = [collate_train(step_examples[c], tokenizer.pad_token_id) for c in chunks]
        teacher_batches = batches if teacher_examples is None else [
            collate_train(teacher_examples[c], tokenizer.pad_token_id) for c in chunks]
        stale = float(remote is not None and not remote.asked(teacher_batches))  # a pipelined teacher's look-ahead

        step_weights = sampler.loss_weights(step_indices)
        local_tokens = sum(len(e["input_ids"]) - e["response_start"] for e in step_examples)
        # The student sees every sequence once in training, and once more while it generated it.
        local_forward = sum(len(e["input_ids"]) for e in step_examples) * (2 if on_policy else 1)
        global_tokens, global_weight, global_count, global_forward, global_stale = dist.all_reduce_sum(torch.tensor(
            [float(local_tokens), step_weights.sum().item(), float(len(step_indices)), float(local_forward), stale],
            dtype=torch.float64)).tolist()
        if global_weight == 0:
            # Every problem of this step has weight 0: no step, no division by zero; counted.
            counters["skipped_zero_weight"] += 1
            continue
        # curriculum.normalize=batch_mean: this step's weights average 1 over all ranks.
        weight_scale = global_count / global_weight if cfg.curriculum.normalize == "batch_mean" else 1.0

        if remote is not None:
            answers = remote.answers(teacher_batches, reuse=global_stale == 0)
            if predictable_next(cfg, counters["step"] + 1, switch_step):
                # The plan is deterministic: the teacher computes the next step while we train on this
                # one. Should the plan change meanwhile, `answers` sees other batches and asks anew.
                upcoming = [i for part in sampler.peek_step() for i in part]
                upcoming_examples = [examples[i] if privileged is None else
                                     onpolicy.teacher_example(privileged[i], examples[i]) for i in upcoming]
                remote.ask([collate_train(upcoming_examples[c], tokenizer.pad_token_id) for c in chunks])
        loss_sum, teacher_s = torch.zeros((), dtype=torch.float64, device=device), 0.0
        loss_finite = torch.ones((), dtype=torch.bool, device=device)  # a tensor: no sync per micro-batch
        spoil = faults.loss_fault(counters["step"] + 1, rank)  # the identity, but under PACED_DS_FAULT
        skipped_before = student.skipped_steps
        for positions, batch, teacher_batch in zip(chunks, batches, teacher_batches):
            batch = to_device(batch, device)
            teacher_batch = batch if teacher_examples is None else to_device(teacher_batch, device)
            weights = (step_weights[positions] * weight_scale).to(device)
            teacher_started = time.time()
            if teacher_cache is not None:
                ids = [train_records[i]["id"] for i in step_indices[positions]]
                batch_teacher_logits = teacher_cache.batch_logits(ids, teacher_batch["loss_mask"])
            elif remote is not None:
                batch_teacher_logits = next(answers).to(device)
            else:
                batch_teacher_logits = teacher_logits(teacher, teacher_batch, vocab)
            if device.type == "cuda":  # time the forward, not its kernel launches
                torch.cuda.synchronize(device)
            teacher_s += time.time() - teacher_started
            for start in range(0, len(weights), mb):
                rows = slice(start, start + mb)
                student_logits = student(input_ids=batch["input_ids"][rows],
                                         attention_mask=batch["attention_mask"][rows]).logits[..., :vocab]
                pair = (student_logits, batch_teacher_logits[rows], batch["loss_mask"][rows], weights[rows])
                if teacher_examples is not None:  # different prompts: pair the response tokens
                    pair = onpolicy.aligned(student_logits, batch["loss_mask"][rows], batch_teacher_logits[rows],
                                            teacher_batch["loss_mask"][rows], weights[rows])
                loss, stats = distillation_loss(*pair, kind=kind, temperature=cfg.loss.temperature,
                                                normalizer=global_tokens,
                                                chunk_tokens=cfg.loss.chunk_tokens or None, **params)
                loss = spoil(loss)
                loss_finite &= torch.isfinite(loss.detach())
                student.backward(loss * world, scale_wrt_gas=False)
                student.step()
                loss_sum += stats["weighted_divergence_sum"].double()
            del batch_teacher_logits

        # A non-finite loss on any rank makes the global gradient norm non-finite on every rank,
        # and DeepSpeed then skips the update (counted in student.skipped_steps).
        sums = torch.zeros(1 + world, dtype=torch.float64)  # the step's loss sum, then each rank's non-finite flag
        sums[0], sums[1 + rank] = loss_sum.item(), float(not loss_finite.item())
        sums = dist.all_reduce_sum(sums)
        nonfinite_ranks = [r for r in range(world) if sums[1 + r] > 0]
        if student.skipped_steps > skipped_before or nonfinite_ranks:
            skip_nonfinite(cfg, counters, nonfinite_ranks, applied=student.skipped_steps == skipped_before)
            continue
        counters["nonfinite_in_a_row"] = 0

        counters["step"] += 1
        counters["tokens"] += int(global_tokens)
        counters["forward_tokens"] += int(global_forward)
        counters["samples"] += sampler.global_batch
        step = counters["step"]
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
            loss_value = sums[0].item() / max(global_tokens, 1.0)
            step_s = time.time() - step_started
            grad_norm = student.get_global_grad_norm()
            values = {
                "loss": loss_value, "lr": lr, "tokens": counters["tokens"],
                "forward_tokens": counters["forward_tokens"],
                "samples": counters["samples"],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "weight_mean": global_weight * weight_scale / global_count, "step_time_s": step_s,
                "teacher_time_s": teacher_s, "rollout_time_s": rollout_s, "tokens_per_s": global_tokens / step_s,
                "on_policy": int(on_policy),
                "epoch": sampler.epoch, "batch": sampler.batch_digest(),
                "skipped_zero_weight": counters["skipped_zero_weight"],
                "skipped_nonfinite": counters["skipped_nonfinite"],
                **curriculum_scalars, **snr_scalars}
            if device.type == "cuda":  # this rank's peak since the previous logged step, both engines
                values["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            tracker.log_step(step, values)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
        progress.update(1)
        faults.kill_after_step(step, rank)

        if cfg.curriculum.refresh == "on_policy" and on_policy and step % cfg.curriculum.refresh_every == 0:
            curriculum.merge_observed(cfg.curriculum.decay)
            refresh_weights(cfg, curriculum, sampler, tracker, step)
            curriculum_scalars = curriculum.summary(sampler.weights)
        if curriculum.due(step) and step < cfg.train.steps:
            counters["forward_tokens"] += update_curriculum(cfg, curriculum, sampler, student, tokenizer,
                                                            train_records, tracker, step=step)
            curriculum_scalars = curriculum.summary(sampler.weights)
        if cfg.snr.every and step % cfg.snr.every == 0:
            snr_scalars = run_probe(cfg, curriculum, sampler, student, teacher_forward, tokenizer, examples,
                                    buckets, tracker, vocab=vocab, step=step, counters=counters)
            curriculum_scalars = curriculum.summary(sampler.weights)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            run_eval(cfg, student, tokenizer, eval_records, retention, tracker, step, "during training")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
            save(cfg, student, sampler, counters, curriculum)
    progress.close()

    # ---- finish ---------------------------------------------------------------------------
    after = None
    if counters["step"] > start_step:  # else a finished run was resumed: its last eval and checkpoint stand
        after = run_eval(cfg, student, tokenizer, eval_records, retention, tracker, counters["step"], "after training")
        save(cfg, student, sampler, counters, curriculum)
    if remote is not None:
        remote.close()
        say(f"pipelined teacher: students waited {remote.wait_s:.2f} s for it in all (this rank)")
    exported = None
    if cfg.train.export:
        exported = checkpoint.export_student(student, tokenizer, output_dir / "student")
        say(f"student exported to {exported}")
    tracker.close()
    return {"before": before, "after": after, "steps": counters["step"], "exported": exported,
            "output_dir": output_dir}


def connect_teacher(cfg: RunConfig, tokenizer, vocab: int) -> pipeline.PipelinedTeacher:
    """Join the teacher job at teacher.address (teacher.backend=pipelined)."""
    if not cfg.teacher.address:
        raise UserError("config key teacher.address: teacher.backend=pipelined needs the teacher job's HOST:PORT "
                        "(`paced-ds train` starts a teacher job and sets it; `paced-ds teacher-serve` starts one)")
    say(f"connecting to the teacher job at {cfg.teacher.address}")
    bridge = pipeline.Bridge(cfg.teacher.address, side="student", rank=dist.rank(), ranks=dist.world_size(),
                             contract=teacher_contract(cfg, tokenizer, vocab), timeout_s=cfg.train.timeout_s)
    return pipeline.PipelinedTeacher(bridge, vocab=vocab, topk=cfg.teacher.topk, timeout_s=cfg.train.timeout_s)


def teacher_contract(cfg: RunConfig, tokenizer, vocab: int) -> dict:
    """What the teacher job and the student job of teacher.backend=pipelined must agree on."""
    return {"teacher": sources.teacher_identity(teacher_path(cfg)), "tokenizer": cache.tokenizer_digest(tokenizer),
            "vocab": vocab, "topk": cfg.teacher.topk, "paced_ds": __version__}


def teacher_description(cfg: RunConfig) -> str:
    if cfg.teacher.backend == "cache":
        return f"cache {cfg.teacher.cache}"
    where = f"pipelined at {cfg.teacher.address}, " if cfg.teacher.backend == "pipelined" else ""
    return f"{where}ZeRO-3 offload={cfg.teacher.offload}"


def predictable_next(cfg: RunConfig, next_step: int, switch_step: int | None) -> bool:
    """Whether step ``next_step`` will score teacher responses drawn from the plan as it stands,
    with nothing in between asking the teacher (so it can be sent to a pipelined teacher now)."""
    if next_step >= cfg.train.steps or (switch_step is not None and next_step >= switch_step):
        return False
    return not (cfg.snr.every and next_step % cfg.snr.every == 0)


def update_curriculum(cfg: RunConfig, curriculum: Curriculum, sampler: ProblemSampler, student, tokenizer,
                      records: list[dict], tracker, *, step: int) -> int:
    """(Re-)estimate competence (or read the given file), then reweight the sampler and report.
    Returns the student forward tokens the rollouts cost."""
    forward_tokens = 0
    if cfg.curriculum.competence:
        unmatched = curriculum.load_given(cfg.curriculum.competence)
        say(f"competence read from {cfg.curriculum.competence}"
            + (f" ({unmatched} ids there are not in this run)" if unmatched else ""))
    else:
        total = len(records) * cfg.curriculum.rollouts
        progress = progress_bar(total // dist.world_size(), f"rollouts (K={cfg.curriculum.rollouts})", cfg)
        result = estimate.estimate(student, tokenizer, records, curriculum.table, cfg,
                                   seed=cfg.train.seed + 7 * curriculum.estimates + 1, progress=progress)
        progress.close()
        say(f"competence estimated at step {step}: {result['rollouts']} rollouts, mean pass rate "
            f"{result['pass_rate_mean']:.1%}, {result['seconds']:.1f} s")
        forward_tokens = result["forward_tokens"]
    refresh_weights(cfg, curriculum, sampler, tracker, step)
    return forward_tokens


def refresh_weights(cfg: RunConfig, curriculum: Curriculum, sampler: ProblemSampler, tracker, step: int,
                    new_estimate: bool = True) -> None:
    """New pass rates (or a new kernel): reweight the sampler, write competence.jsonl, report."""
    if new_estimate:
        curriculum.record_estimate(step)
    weights = curriculum.weights()
    sampler.set_weights(weights)
    summary = curriculum.summary(weights)
    say("curriculum: " + ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in summary.items()
                                   if "share" in k or "pass_rate_" in k))
    if dist.is_main():
        curriculum.write(cfg.train.output_dir, weights)
    curriculum.log(tracker, step, weights)


def run_probe(cfg: RunConfig, curriculum: Curriculum, sampler: ProblemSampler, student, teacher_forward, tokenizer,
              examples: list[dict], buckets, tracker, *, vocab: int, step: int, counters: dict) -> dict:
    """The gradient-SNR probe (collective); with curriculum.kernel=calibrated, refit and reweight.
    Its student forward tokens are added to ``counters``; returns the scalars to log."""
    result = snr.probe(student, teacher_forward, tokenizer, examples, curriculum.table.pass_rates(), buckets, cfg,
                       vocab=vocab, seed=cfg.train.seed * 7_919 + step, loss_params=divergence_params(cfg, cfg.loss.kind))
    scalars = {f"snr/{name}": v["snr"] for name, v in result["buckets"].items() if v is not None}
    scalars["snr/probe_time_s"] = result["seconds"]
    counters["forward_tokens"] += result["forward_tokens"]
    say(f"gradient SNR at step {step} ({result['problems']} problems, {result['params']} parameters, "
        f"{result['seconds']:.1f} s): " + ", ".join(f"{name} {v['snr']:.3g} (n={v['count']})" if v else f"{name} -"
                                                  for name, v in result["buckets"].items()))
    tracker.image("snr/snr_vs_pass_rate", snr.picture(result), step)
    if dist.is_main():
        with open(Path(cfg.train.output_dir) / "snr.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
    if cfg.curriculum.kernel == "calibrated":
        fit = curriculum.calibrate(result)
        say(f"calibrated kernel: alpha {curriculum.alpha:.3f}, beta {curriculum.beta:.3f}"
            + ("" if fit.fitted else f" (kept: {fit.reason})"))
        refresh_weights(cfg, curriculum, sampler, tracker, step, new_estimate=False)
    return scalars


def check_agreement(sampler: ProblemSampler, curriculum: Curriculum) -> None:
    """Every rank must hold the same plan and competence table; one that does not is named."""
    mine = (sampler.plan_digest(), curriculum.table.digest())
    everyone = dist.all_gather_objects(mine)
    for other_rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise UserError(f"rank {other_rank} disagrees with rank 0 about the epoch-{sampler.epoch} plan "
                            f"(plan {theirs[0]} vs {everyone[0][0]}, competence {theirs[1]} vs {everyone[0][1]}): "
                            "were the ranks given different data or competence files?")


def check_same_config(cfg: RunConfig) -> None:
    """Every rank must run the same config; one that does not (a node launched with another
    recipe or overrides) is named with the keys, instead of hanging in a collective later."""
    mine = {key: value for key, value in checkpoint.flat(cfg.to_dict()).items() if key not in NODE_LOCAL_KEYS}
    everyone = dist.all_gather_objects(mine)
    for other_rank, theirs in enumerate(everyone):
        differing = sorted(key for key in set(theirs) | set(everyone[0]) if theirs.get(key) != everyone[0].get(key))
        if differing:
            raise UserError(f"rank {other_rank} runs another config than rank 0 ({', '.join(differing)} differ): "
                            "launch every node with the same recipe and overrides")


NODE_LOCAL_KEYS = ("data.responses_dir", "teacher.nvme_path", "teacher.cache")  # paths that may differ per node


def skip_nonfinite(cfg: RunConfig, counters: dict, ranks: list[int], *, applied: bool) -> None:
    """An optimizer step whose loss or gradients were not finite: DeepSpeed made no update; count
    it, and stop after train.max_nonfinite_steps in a row (keeping the last checkpoint)."""
    step = counters["step"] + 1
    what = f"loss on rank {', '.join(map(str, ranks))}" if ranks else "gradient norm (the loss is finite)"
    if applied:  # only when DeepSpeed does not compute the gradient norm (compute_grad_norm=false)
        raise UserError(f"step {step}: non-finite {what} and DeepSpeed applied the update anyway; stopped "
                        "without saving: turn zero_optimization.compute_grad_norm (DeepSpeed's default) back on in "
                        "the DeepSpeed JSON of train.ds_config")
    counters["skipped_nonfinite"] += 1
    counters["nonfinite_in_a_row"] += 1
    say(f"step {step}: non-finite {what}; update skipped "
        f"({counters['nonfinite_in_a_row']} in a row, {counters['skipped_nonfinite']} in all)")
    if counters["nonfinite_in_a_row"] >= cfg.train.max_nonfinite_steps:
        raise UserError(f"step {step}: {counters['nonfinite_in_a_row']} optimizer steps in a row had a non-finite "
                        f"loss or gradient (train.max_nonfinite_steps); stopped without saving, so the last "
                        f"checkpoint in {checkpoint.checkpoint_dir(cfg.train.output_dir)} is intact: check the data "
                        "and train.lr (a lower train.lr is a new run, in another train.output_dir)")


def save(cfg: RunConfig, student, sampler: ProblemSampler, counters: dict, curriculum: Curriculum) -> None:
    client_state = {"sampler": sampler.state_dict(), "counters": dict(counters), "config": cfg.to_dict(),
                    "curriculum": curriculum.state_dict()}
    path = checkpoint.save(student, cfg.train.output_dir, counters["step"], client_state, cfg.to_dict())
    say(f"checkpoint saved: {path}")
