"""Curriculum weights from pass rates: the Beta kernel, its posterior expectation, the modes.

PACED weights the distillation loss of problem x by w(p) = p^alpha (1 - p)^beta, where p is
the student's pass rate on x; alpha = beta = 1 (w = p(1 - p)) is the paper's default.

- ``beta_weight(p)``: the kernel at a known pass rate.
- ``expected_beta_weight(correct, trials)``: its expectation over what the K rollouts
  say about p (uniform prior, Beta posterior), in closed form.
- ``curriculum_weights(correct, trials, mode=...)``: one weight per problem, for each
  curriculum mode (``paced``, ``uniform``, ``hard_filter``).
- ``normalize_to_dataset_mean(weights, dataset_weights)``: the loss scale of weighted batches
  (the paper leaves it open; ``curriculum.normalize=batch_mean`` is applied by the step,
  ``distill/step.py``, over every rank's weights).
- ``weight_summary(pass_rates, weights)``: scalars for tracking where the weight mass sits.

Conventions: 0^0 = 1 (alpha = 0 makes p^alpha = 1 for every p, p = 0 included); pass
rates outside [0, 1] and negative exponents are errors, never clipped.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

MODES = ("paced", "uniform", "hard_filter")


# ---- input checks and kinds ----

def _exponent(name: str, value) -> float:
    """``alpha`` / ``beta`` as a float; they must be finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"curriculum.{name} must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"curriculum.{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _kind(*values) -> str:
    """'tensor' if any input is a tensor, else 'numpy' if any is a numpy array or scalar, else 'float'."""
    if any(isinstance(v, torch.Tensor) for v in values):
        return "tensor"
    if any(isinstance(v, (np.ndarray, np.generic)) for v in values):
        return "numpy"
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"expected a float, a numpy array or a torch tensor, got {type(v).__name__}")
    return "float"


def _where(mask: torch.Tensor) -> str:
    """' at index i' for the first True entry of ``mask`` ('' for a 0-d mask)."""
    if mask.dim() == 0:
        return ""
    index = tuple(int(i) for i in mask.nonzero()[0])
    return f" at index {index[0] if len(index) == 1 else index}"


def _check_pass_rates(p: torch.Tensor) -> None:
    bad = ~((p >= 0) & (p <= 1))  # NaN is bad too
    if bool(bad.any()):
        value = p[bad][0].item() if p.dim() else p.item()
        raise ValueError(f"pass rate {value!r}{_where(bad)} is outside [0, 1]")


def _check_counts(correct: torch.Tensor, trials: torch.Tensor) -> None:
    bad = ~(torch.isfinite(correct) & torch.isfinite(trials) & (correct >= 0) & (correct <= trials))
    if bool(bad.any()):
        c = correct[bad][0].item() if bad.dim() else correct.item()
        n = trials[bad][0].item() if bad.dim() else trials.item()
        raise ValueError(f"competence counts{_where(bad)}: correct={c:g}, trials={n:g}; "
                         "need 0 <= correct <= trials")


def _as_float_tensor(value, dtype=torch.float64, device=None) -> torch.Tensor:
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        value = np.asarray(value, dtype=np.float64)
    return torch.as_tensor(value, dtype=dtype, device=device)


# ---- the kernel ----

def beta_weight(p, alpha=1.0, beta=1.0):
    """The Beta kernel w(p) = p^alpha (1 - p)^beta, elementwise.

    ``p`` is a Python float, a numpy array (or scalar) or a torch tensor, and the result is
    of the same kind: a float, a numpy array in p's floating dtype (float64 for integer
    input), or a tensor on p's device in p's floating dtype (the default dtype for integer
    input). 0^0 = 1, so alpha = 0 gives p^alpha = 1 at p = 0 too; for alpha, beta > 0 the
    kernel is 0 at both ends and peaks at p = alpha / (alpha + beta) (0.25 at p = 0.5 for
    alpha = beta = 1). ValueError for a p outside [0, 1] (or NaN) and for alpha or beta
    below 0.
    """
    alpha, beta = _exponent("alpha", alpha), _exponent("beta", beta)
    kind = _kind(p)
    if kind == "float":
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"pass rate {p!r} is outside [0, 1]")
        return p ** alpha * (1.0 - p) ** beta  # Python's 0.0 ** 0.0 is 1.0
    if kind == "numpy":
        p = np.asarray(p)
        if not np.issubdtype(p.dtype, np.floating):
            p = p.astype(np.float64)
        _check_pass_rates(torch.from_numpy(np.ascontiguousarray(p, dtype=np.float64)))
        return (np.power(p, alpha) * np.power(1 - p, beta))[()]  # [()] : 0-d in, numpy scalar out
    if not p.is_floating_point():
        p = p.to(torch.get_default_dtype())
    _check_pass_rates(p)
    return p.pow(alpha) * (1 - p).pow(beta)  # torch.pow(0., 0.) is 1


def expected_beta_weight(correct, trials, alpha=1.0, beta=1.0, prior=(1.0, 1.0)):
    """E[w(p)] for p ~ Beta(c + 1, n - c + 1): the kernel averaged over the pass-rate posterior.

    With c = ``correct`` successes in n = ``trials`` rollouts and a uniform prior on p,
    p's posterior is Beta(c + 1, n - c + 1), and

        E[p^alpha (1 - p)^beta] = B(c + 1 + alpha, n - c + 1 + beta) / B(c + 1, n - c + 1),

    computed as exp of a sum of log-gamma terms (B(x, y) = G(x) G(y) / G(x + y)) in float64,
    so large n neither overflows nor cancels. n = 0 gives the prior mean of w,
    B(1 + alpha, 1 + beta) (1/6 for alpha = beta = 1). Counts may be fractional
    (e.g. decayed), with 0 <= correct <= trials.

    Why with K = 4..8 rollouts: the plug-in w(c/n) is 0 for every problem seen 0/8 or 8/8,
    yet such a problem still has posterior mass on 0 < p < 1 (0/8 is entirely compatible
    with p = 0.05), so it gets a small nonzero weight instead of exactly 0; and p(1 - p) at
    c/n is a biased estimate of E[p(1 - p)] (by a factor (n - 1)/n for the binomial), which
    the closed form avoids. For large n the two agree.

    ``prior = (a0, b0)`` replaces the uniform prior Beta(1, 1) with Beta(a0, b0) (numbers, or
    tensors that broadcast with the counts: one prior per problem, e.g. fitted per difficulty
    level by ``stopping.fit_priors``); the posterior is then Beta(c + a0, n - c + b0).

    Elementwise with broadcasting; the result's kind follows ``beta_weight``: a float for
    Python numbers, numpy if either input is numpy, a tensor (on the input's device) if
    either is a tensor, in the inputs' floating dtype or the default one for integer counts.
    """
    alpha, beta = _exponent("alpha", alpha), _exponent("beta", beta)
    kind = _kind(correct, trials)
    a0, b0 = prior
    if kind == "float":
        c, n, a0, b0 = float(correct), float(trials), float(a0), float(b0)
        if not (math.isfinite(c) and math.isfinite(n) and 0 <= c <= n):
            raise ValueError(f"competence counts: correct={c:g}, trials={n:g}; need 0 <= correct <= trials")
        if not (a0 > 0 and b0 > 0):
            raise ValueError(f"a Beta prior needs a0, b0 > 0, got ({a0:g}, {b0:g})")
        log_ratio = (math.lgamma(c + a0 + alpha) + math.lgamma(n - c + b0 + beta)
                     - math.lgamma(n + a0 + b0 + alpha + beta)
                     - math.lgamma(c + a0) - math.lgamma(n - c + b0) + math.lgamma(n + a0 + b0))
        return math.exp(log_ratio)

    if kind == "tensor":
        device = next(v.device for v in (correct, trials) if isinstance(v, torch.Tensor))
        out_dtype = torch.result_type(correct, trials)
        if not out_dtype.is_floating_point:
            out_dtype = torch.get_default_dtype()
    else:
        device = None
        out_dtype = np.result_type(correct, trials)
        if not np.issubdtype(out_dtype, np.floating):
            out_dtype = np.dtype(np.float64)
    c, n = torch.broadcast_tensors(_as_float_tensor(correct, device=device),
                                   _as_float_tensor(trials, device=device))
    _check_counts(c, n)
    a0 = torch.as_tensor(a0, dtype=torch.float64, device=c.device)
    b0 = torch.as_tensor(b0, dtype=torch.float64, device=c.device)
    if not ((a0 > 0).all() and (b0 > 0).all()):
        raise ValueError("a Beta prior needs a0, b0 > 0")
    log_ratio = (torch.lgamma(c + a0 + alpha) + torch.lgamma(n - c + b0 + beta)
                 - torch.lgamma(n + a0 + b0 + alpha + beta)
                 - torch.lgamma(c + a0) - torch.lgamma(n - c + b0) + torch.lgamma(n + a0 + b0))
    expected = torch.exp(log_ratio)
    if kind == "tensor":
        return expected.to(out_dtype)
    return expected.numpy().astype(out_dtype)[()]


def kernel_peak(alpha=1.0, beta=1.0) -> float:
    """The kernel's largest value, w at p = alpha / (alpha + beta) (0.25 for w = p(1 - p)); 1 for
    alpha = beta = 0, where w is 1 everywhere."""
    alpha, beta = _exponent("alpha", alpha), _exponent("beta", beta)
    return beta_weight(alpha / (alpha + beta), alpha, beta) if alpha + beta > 0 else 1.0


def prior_beta_weight(alpha=1.0, beta=1.0) -> float:
    """E[w(p)] for p ~ Uniform(0, 1) = B(1 + alpha, 1 + beta): the weight of a problem never rolled out."""
    return expected_beta_weight(0, 0, alpha, beta)


# ---- per-problem weights ----

def curriculum_weights(correct, trials, *, mode="paced", alpha=1.0, beta=1.0, posterior=False, prior=(1.0, 1.0),
                       floor=0.0, band=(0.0, 1.0), band_inclusive=False) -> torch.Tensor:
    """One loss weight per problem (float32 tensor, on the counts' device) from its competence counts.

    ``correct`` and ``trials`` are tensors (or arrays / sequences) of the same shape;
    p = correct / trials.

    - ``uniform``: 1 for every problem (plain distillation).
    - ``paced``: w(p) = p^alpha (1 - p)^beta (``beta_weight``); with ``posterior=True`` the
      posterior expectation E[w(p) | correct, trials] (``expected_beta_weight``), which
      gives problems seen 0/K or K/K a small nonzero weight instead of 0; ``prior = (a0, b0)``
      (numbers or per-problem tensors) is the Beta prior of that posterior, uniform by default.
      A weight below ``floor`` times the kernel's peak (``kernel_peak``) is 0: a problem
      the run would draw for almost no signal is not drawn at all.
    - ``hard_filter``: 1 if lo < p < hi for ``band = (lo, hi)`` (lo <= p <= hi with
      ``band_inclusive``), else 0. The default band (0, 1) keeps the problems the student
      solves sometimes but not always, the paper's "keep mid pass rates" baseline.
      Pass rates are computed in float64, so 3/10 meets a band edge written 0.3 exactly.

    Problems with trials == 0 (never rolled out) have no pass rate. Each gets the
    expectation of its mode's weight under the uniform prior on p: B(1 + alpha, 1 + beta)
    for ``paced`` (1/6 at alpha = beta = 1; the same value ``posterior=True`` yields), hi - lo
    for ``hard_filter`` (the prior probability that p lies in the band: 1 for the default
    band), 1 for ``uniform``. An unknown problem is thus neither dropped (weight 0) nor made
    to outweigh every estimated one (weight 1 is four times the kernel's peak).
    """
    if mode not in MODES:
        raise ValueError(f"curriculum mode {mode!r} is not one of {', '.join(MODES)}")
    alpha, beta = _exponent("alpha", alpha), _exponent("beta", beta)
    lo, hi = _band(band)
    device = next((v.device for v in (correct, trials) if isinstance(v, torch.Tensor)), None)
    correct = _as_float_tensor(correct, device=device)
    trials = _as_float_tensor(trials, device=device)
    if correct.shape != trials.shape:
        raise ValueError(f"correct has shape {tuple(correct.shape)} but trials has shape {tuple(trials.shape)}")
    _check_counts(correct, trials)

    if mode == "uniform":
        return torch.ones(correct.shape, dtype=torch.float32, device=device)
    estimated = trials > 0
    pass_rate = torch.where(estimated, correct / torch.where(estimated, trials, 1.0), 0.0)
    if mode == "paced":
        if posterior:
            weights = expected_beta_weight(correct, trials, alpha, beta, prior=prior)
        else:
            weights = torch.where(estimated, beta_weight(pass_rate, alpha, beta), prior_beta_weight(alpha, beta))
        if floor > 0:
            weights = torch.where(weights < floor * kernel_peak(alpha, beta), 0.0, weights)
    else:  # hard_filter
        if band_inclusive:
            inside = (pass_rate >= lo) & (pass_rate <= hi)
        else:
            inside = (pass_rate > lo) & (pass_rate < hi)
        weights = torch.where(estimated, inside.to(torch.float64), hi - lo)
    return weights.to(torch.float32)


def _band(band) -> tuple[float, float]:
    try:
        lo, hi = (float(edge) for edge in band)
    except (TypeError, ValueError):
        raise ValueError(f"curriculum band must be two pass rates (lo, hi), got {band!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"curriculum band {band!r} needs 0 <= lo < hi <= 1")
    return lo, hi


# ---- loss scale ----

def normalize_to_dataset_mean(weights, dataset_weights) -> torch.Tensor:
    """w / mean(w over ``dataset_weights``), the weights of every problem in the training set
    (``curriculum.normalize=dataset_mean``): the average step has unit scale and batches keep
    their relative weight. ValueError if every problem has weight 0 (nothing would ever be
    trained).

    Returns a floating tensor (float32 for integer input); weights must be finite and >= 0.
    """
    weights = _weights_tensor(weights)
    dataset_weights = _weights_tensor(dataset_weights)
    dataset_mean = float(dataset_weights.to(torch.float64).mean()) if dataset_weights.numel() else 0.0
    if not dataset_mean > 0:
        raise ValueError(f"every one of the {dataset_weights.numel()} problems has curriculum weight 0, so no problem "
                         "would ever be trained (are all pass rates 0 or 1, or outside curriculum.band?): "
                         "widen the band, use the posterior weights, or check the competence counts")
    return weights / dataset_mean


def _weights_tensor(weights) -> torch.Tensor:
    weights = torch.as_tensor(weights)
    if not weights.is_floating_point():
        weights = weights.to(torch.float32)
    bad = ~(torch.isfinite(weights) & (weights >= 0))
    if bool(bad.any()):
        value = weights[bad][0].item() if weights.dim() else weights.item()
        raise ValueError(f"curriculum weight {value!r}{_where(bad)} must be finite and >= 0")
    return weights


# ---- tracking ----

def weight_summary(pass_rates, weights) -> dict:
    """Scalars (plain floats) describing where the weight mass sits, for TensorBoard / metrics.jsonl.

    With N problems, W = sum w:

    - ``frontier_weight_share``: sum of w over 0 < p < 1, / W (the share of the mass at the frontier);
    - ``zero_pass_share`` / ``full_pass_share``: the fraction of problems with p = 0 / p = 1;
    - ``weight_share_p0`` / ``weight_share_p1``: sum of w over p = 0 / p = 1, / W;
    - ``effective_sample_size``: W^2 / sum w^2 (N for equal weights, 1 if one problem holds
      all the mass), and ``effective_sample_share`` = ESS / N;
    - ``weight_mean`` = W / N, ``pass_rate_mean``.

    Shares of the weight mass are 0 when every weight is 0, and so is the ESS.
    """
    pass_rates = _as_float_tensor(pass_rates).detach().cpu().flatten()
    weights = _weights_tensor(weights).detach().cpu().to(torch.float64).flatten()
    if pass_rates.shape != weights.shape:
        raise ValueError(f"{pass_rates.numel()} pass rates but {weights.numel()} weights")
    if pass_rates.numel() == 0:
        raise ValueError("weight_summary needs at least one problem")
    _check_pass_rates(pass_rates)
    count = pass_rates.numel()
    total = float(weights.sum())
    at_zero, at_one = pass_rates == 0, pass_rates == 1
    frontier = ~(at_zero | at_one)

    def mass_share(mask: torch.Tensor) -> float:
        return float(weights[mask].sum()) / total if total > 0 else 0.0

    ess = total ** 2 / float((weights ** 2).sum()) if total > 0 else 0.0
    return {
        "frontier_weight_share": mass_share(frontier),
        "zero_pass_share": float(at_zero.sum()) / count,
        "full_pass_share": float(at_one.sum()) / count,
        "weight_share_p0": mass_share(at_zero),
        "weight_share_p1": mass_share(at_one),
        "effective_sample_size": ess,
        "effective_sample_share": ess / count,
        "weight_mean": total / count,
        "pass_rate_mean": float(pass_rates.mean()),
    }
