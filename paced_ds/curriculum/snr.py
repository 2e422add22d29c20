"""The gradient signal-to-noise ratio per pass-rate bucket, PACED's central measurement.

For the problems x of one bucket, with g(x) the gradient of x's distillation loss (its
token-mean divergence from the teacher, on the teacher's response), over the parameters
``snr.params`` selects (a regular expression on parameter names; empty = all):

    SNR = ||E g||^2 / tr(Cov g)

estimated from n >= 2 problems by  noise = (sum ||g_i||^2 - n ||g_mean||^2) / (n - 1)  and
signal = max(||g_mean||^2 - noise / n, 0)  (||g_mean||^2 over-estimates ||E g||^2 by
tr(Cov)/n; the estimate is clamped at 0 when noise dominates). A bucket with fewer than
2 problems reports no value.

Distributed: each rank takes its share of the probe's problems, computes their gradients
on a full copy of the student gathered from its ZeRO-3 partitions (as ``rollout.gather``
does), and accumulates per bucket the sum vector sum_i g_i, the sum of squared norms
sum_i ||g_i||^2 and the count; one all-reduce adds every rank's partial sums, so every
rank ends with the same SNR. Cost: one forward and backward per probed problem, one
batched teacher forward, one gather of the student and one all-reduce of
buckets x |params| floats (use ``snr.params`` to cover a subset, e.g. the last layers,
when the student is large).
"""

from __future__ import annotations

import math
import re
import time

import torch

from paced_ds.curriculum.calibrate import assign_bucket
from paced_ds.curriculum.estimate import plain_copy
from paced_ds.data.collate import collate_train
from paced_ds.distill.losses import distillation_loss
from paced_ds.errors import UserError
from paced_ds.runtime import dist
from paced_ds.runtime.tracking import figure_rgb, new_figure


def choose_problems(pass_rates: torch.Tensor, buckets, per_bucket: int, seed: int) -> list[tuple[int, int]]:
    """(bucket, problem index) pairs: up to ``per_bucket`` problems of each bucket, drawn
    from (seed) alone so that every rank picks the same ones."""
    generator = torch.Generator().manual_seed(seed)
    members: list[list[int]] = [[] for _ in buckets]
    for index, p in enumerate(pass_rates.tolist()):
        bucket = assign_bucket(p, buckets)
        if bucket is not None:
            members[bucket].append(index)
    chosen = []
    for bucket, indices in enumerate(members):
        order = torch.randperm(len(indices), generator=generator)[:per_bucket].tolist()
        chosen += [(bucket, indices[i]) for i in sorted(order)]
    return chosen


def selected_parameters(model, pattern: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters the probe covers (``snr.params``; empty = all)."""
    regex = re.compile(pattern) if pattern else None
    named = [(name, p) for name, p in model.named_parameters() if regex is None or regex.search(name)]
    if not named:
        raise UserError(f"config key snr.params: {pattern!r} matches no parameter of the student")
    return named


def per_problem_gradient(model, params, example: dict, teacher_logits: torch.Tensor, *, pad_id: int,
                         vocab: int, kind: str, temperature: float, loss_params: dict) -> torch.Tensor:
    """The flattened gradient of one problem's token-mean distillation loss (float64)."""
    batch = {k: v.to(teacher_logits.device) for k, v in collate_train([example], pad_id).items()}
    width = batch["input_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]
    loss, _ = distillation_loss(logits, teacher_logits[None, :width], batch["loss_mask"], None, kind=kind,
                                temperature=temperature, normalizer=None, **loss_params)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def ratio(sum_vector: torch.Tensor, sum_sq: float, count: int) -> dict | None:
    """SNR and its parts from one bucket's sums; None below 2 problems."""
    if count < 2:
        return None
    mean_sq = float((sum_vector / count).pow(2).sum())
    noise = (sum_sq - count * mean_sq) / (count - 1)
    signal = max(mean_sq - noise / count, 0.0)
    snr = signal / noise if noise > 0 else math.inf
    return {"snr": snr, "signal": signal, "noise": noise, "count": count}


def probe(student_engine, teacher_forward, tokenizer, examples: list[dict], pass_rates: torch.Tensor, buckets,
          cfg, *, vocab: int, seed: int, loss_params: dict) -> dict:
    """Collective: SNR per bucket ``{bucket name: {"snr", "signal", "noise", "count", "pass_rate"} | None}``.
    ``teacher_forward(batch)`` gives the teacher's logits over the shared vocabulary."""
    started = time.time()
    chosen = choose_problems(pass_rates, buckets, cfg.snr.per_bucket, seed)
    mine = chosen[dist.rank()::dist.world_size()]
    # One batched teacher forward per rank (a ZeRO-3 forward is collective: every rank
    # makes it, a rank with no problem on a stand-in it then ignores).
    stand_in = [examples[chosen[0][1]]] if chosen else [examples[0]]
    batch = {k: v.to(dist.device()) for k, v in
             collate_train([examples[i] for _, i in mine] or stand_in, tokenizer.pad_token_id).items()}
    teacher_logits = teacher_forward(batch)
    model = plain_copy(student_engine)
    named = selected_parameters(model, cfg.snr.params)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p.requires_grad_(True) for _, p in named]
    size = sum(p.numel() for p in params)
    sums = torch.zeros(len(buckets), size + 3, dtype=torch.float64)  # [sum g | sum ||g||^2, count, sum p]
    for row, (bucket, index) in enumerate(mine):
        g = per_problem_gradient(model, params, examples[index], teacher_logits[row], pad_id=tokenizer.pad_token_id,
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


def picture(result: dict):
    """An RGB array: SNR against pass rate, one point per bucket with a value."""
    points = [(v["pass_rate"], v["snr"]) for v in result["buckets"].values() if v and math.isfinite(v["snr"])]
    fig, ax = new_figure(4.5, 3.2)
    if points:
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "o-")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("pass rate p (bucket mean)")
    ax.set_ylabel("gradient SNR")
    ax.set_title("SNR = ||E g||^2 / tr Cov g per bucket", fontsize=9)
    return figure_rgb(fig)
