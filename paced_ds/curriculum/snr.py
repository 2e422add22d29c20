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

This module holds the statistics; the probe that computes the gradients is
``paced_ds.distill.probe``.
"""

from __future__ import annotations

import math

import torch

from paced_ds.curriculum.calibrate import assign_bucket
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


def ratio(sum_vector: torch.Tensor, sum_sq: float, count: int) -> dict | None:
    """SNR and its parts from one bucket's sums; None below 2 problems."""
    if count < 2:
        return None
    mean_sq = float((sum_vector / count).pow(2).sum())
    noise = (sum_sq - count * mean_sq) / (count - 1)
    signal = max(mean_sq - noise / count, 0.0)
    snr = signal / noise if noise > 0 else math.inf
    return {"snr": snr, "signal": signal, "noise": noise, "count": count}


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
