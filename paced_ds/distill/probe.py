"""The gradient-SNR probe: per-problem distillation gradients, summed per pass-rate bucket.

What it measures and how the sums become an SNR: ``paced_ds.curriculum.snr``. Each rank
takes its share of the probe's problems, asks the teacher once for all of them, and
computes their gradients on a full copy of the student gathered from its ZeRO-3
partitions; one all-reduce adds every rank's sums, so every rank ends with the same SNR.
"""

from __future__ import annotations

import re
import time

import torch

from paced_ds.curriculum.snr import choose_problems, ratio
from paced_ds.data.collate import collate_train
from paced_ds.distill.losses import distillation_loss
from paced_ds.distill.teachers import requests_for
from paced_ds.errors import UserError
from paced_ds.models.generation import plain_copy
from paced_ds.runtime import dist


def selected_parameters(model, pattern: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters the probe covers (``snr.params``; empty = all)."""
    regex = re.compile(pattern) if pattern else None
    named = [(name, p) for name, p in model.named_parameters() if regex is None or regex.search(name)]
    if not named:
        raise UserError(f"config key snr.params: {pattern!r} matches no parameter of the student")
    return named


def per_problem_gradient(model, params, example: dict, answer, *, pad_id: int, vocab: int, kind: str,
                         temperature: float, loss_params: dict) -> torch.Tensor:
    """The flattened gradient of one problem's token-mean distillation loss (float64);
    ``answer`` is the teacher's answer for that problem alone."""
    batch = {k: v.to(dist.device()) for k, v in collate_train([example], pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]
    loss, _ = distillation_loss(logits, answer, batch["loss_mask"], None, kind=kind,
                                temperature=temperature, normalizer=None, **loss_params)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])




def probe(student_engine, teacher, tokenizer, examples: list[dict], pass_rates: torch.Tensor, buckets,
          cfg, *, vocab: int, seed: int, loss_params: dict) -> dict:
    """Collective: SNR per bucket ``{bucket name: {"snr", "signal", "noise", "count", "pass_rate"} | None}``.
    ``teacher`` answers one request of this rank's probed problems (``teachers.Teacher``)."""
    started = time.time()
    chosen = choose_problems(pass_rates, buckets, cfg.snr.per_bucket, seed)
    mine = chosen[dist.rank()::dist.world_size()]
    # One batched teacher forward per rank (a ZeRO-3 forward is collective: every rank
    # makes it, a rank with no problem on a stand-in it then ignores).
    problems = [i for _, i in mine] or [chosen[0][1] if chosen else 0]
    request = requests_for([examples[i] for i in problems], problems, len(problems), tokenizer.pad_token_id)[0]
    answer = next(iter(teacher.answers([request])))
    model = plain_copy(student_engine)
    named = selected_parameters(model, cfg.snr.params)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p.requires_grad_(True) for _, p in named]
    size = sum(p.numel() for p in params)
    sums = torch.zeros(len(buckets), size + 3, dtype=torch.float64)  # [sum g | sum ||g||^2, count, sum p]
    for row, (bucket, index) in enumerate(mine):
        g = per_problem_gradient(model, params, examples[index], answer.samples(slice(row, row + 1)),
                                 pad_id=tokenizer.pad_token_id,
                                 vocab=vocab, kind=cfg.loss.kind, temperature=cfg.loss.temperature,
                                 loss_params=loss_params)
        sums[bucket, :size] += g
        sums[bucket, size] += float(g @ g)
        sums[bucket, size + 1] += 1
        sums[bucket, size + 2] += float(pass_rates[index])
    del model
    sums = dist.all_reduce_sum(sums)
    result = {}
    for b, bucket in enumerate(buckets):
        count = int(sums[b, size + 1])
        parts = ratio(sums[b, :size], float(sums[b, size]), count)
        if parts is not None:
            parts["pass_rate"] = float(sums[b, size + 2]) / count
        result[bucket.name] = parts
    forward_tokens = sum(len(examples[i]["input_ids"]) for _, i in chosen)  # all ranks' probed sequences
    return {"buckets": result, "seconds": time.time() - started, "params": size, "problems": len(chosen),
            "forward_tokens": forward_tokens}
