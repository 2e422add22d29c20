"""When an adaptive competence estimate stops rolling out a problem.

The adaptive estimate (``distill/estimate.py``, ``curriculum.rollouts_min`` > 0) gives every
problem ``rollouts_min`` rollouts, then more in rounds to the problems still undecided, up to
K = ``curriculum.rollouts``. A problem with c correct of n stops once more rollouts could not
change its weight materially: the root-mean-square change from the plug-in weight it has now,
w(c/n), to the one it would have after all K rollouts,

    rms = sqrt(E[(w((c + X) / K) - w(c / n))^2]),   X ~ BetaBinomial(K - n, a0 + c, b0 + n - c),

is at most ``tol`` times the kernel's peak (w at p = alpha / (alpha + beta); 0.25 for w =
p(1 - p)). X is the number of the K - n rollouts not yet made that would succeed, under the
problem's posterior pass rate; Beta(a0, b0) is an empirical-Bayes prior over pass rates fitted
to the first round's counts of the problem's difficulty level (``fit_priors``). w = p(1 - p) is flat at its peak and
steep at 0 and 1 (one success in 8 takes w from 0 to 0.11), so a problem seen 3/6 stops early,
and one seen 0/6 only when the first round says that such problems stay at 0 (a prior piled up
at the ends).

The change is measured from the weight the run would use now (the plug-in w(c/n), as
``kernel.curriculum_weights`` computes it), not only as the spread of the fixed-K weight: a
problem seen 2/4 has w = 0.25 now while its fixed-K weight is expected lower, and that shift is a
change too. Every input is a merged count, identical on every rank, and the arithmetic is float64
on the CPU, so every rank takes the same decisions.
"""

from __future__ import annotations

import torch

from paced_ds.curriculum.kernel import beta_weight, kernel_peak

PRIOR_MEAN_RANGE = (0.01, 0.99)
# a0 + b0, the prior's worth in rollouts. The first round fits it; the range only catches the degenerate ends:
# a first round unanimous for nearly every problem (the fit goes to 0, an improper prior that would make one
# unanimous round proof of p = 0 or 1) and one with no spread beyond the binomial's (the fit goes to infinity).
PRIOR_STRENGTH_RANGE = (0.1, 1000.0)


def fit_prior(correct: torch.Tensor, trials: torch.Tensor) -> tuple[float, float]:
    """(a0, b0) of a Beta prior over pass rates, fitted to the problems' counts (empirical Bayes) by the method of
    moments with the binomial noise taken out. With r = c/n, E[(r - m)^2] = Var p + (m (1 - m) -
    Var p) / n, so, averaged over the problems,

        m = sum c / sum n,   Var p = (mean (r - m)^2 - m (1 - m) mean(1/n)) / (1 - mean(1/n)),
        a0 + b0 = m (1 - m) / Var p - 1

    which for an equal n is (n Var r - m (1 - m)) / (n - 1). Problems with no trials are left
    out. m is clamped to ``PRIOR_MEAN_RANGE`` and a0 + b0 to ``PRIOR_STRENGTH_RANGE`` (Var p <= 0:
    the largest).
    """
    correct = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    trials = torch.as_tensor(trials, dtype=torch.float64).reshape(-1)
    seen = trials > 0
    correct, trials = correct[seen], trials[seen]
    inverse = (1 / trials).mean().item() if len(trials) else 1.0
    if inverse >= 1:
        raise ValueError("fit_prior needs at least one problem with two or more trials")
    rates = correct / trials
    mean = correct.sum().item() / trials.sum().item()
    mean = min(max(mean, PRIOR_MEAN_RANGE[0]), PRIOR_MEAN_RANGE[1])
    pass_rate_var = (((rates - mean) ** 2).mean().item() - mean * (1 - mean) * inverse) / (1 - inverse)
    strength = mean * (1 - mean) / pass_rate_var - 1 if pass_rate_var > 0 else PRIOR_STRENGTH_RANGE[1]
    strength = min(max(strength, PRIOR_STRENGTH_RANGE[0]), PRIOR_STRENGTH_RANGE[1])
    return mean * strength, (1 - mean) * strength


def fit_priors(correct, trials, groups: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem, (a0, b0) of the prior ``fit_prior`` fits to its group's counts (``groups[i]``
    is problem i's difficulty level): float64 tensors. Pass rates differ most between levels, so
    a problem's level says much about its p before any rollout, and a prior per level lets two
    rollouts settle a problem whose level is nearly always solved or nearly never."""
    correct = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    trials = torch.as_tensor(trials, dtype=torch.float64).reshape(-1)
    if len(groups) != len(trials):
        raise ValueError(f"{len(groups)} groups for {len(trials)} problems")
    a0, b0 = torch.empty_like(trials), torch.empty_like(trials)
    for group in sorted(set(groups)):
        members = torch.tensor([g == group for g in groups])
        try:
            a0[members], b0[members] = fit_prior(correct[members], trials[members])
        except ValueError:  # no problem of the level has two trials yet: nothing to fit, the uniform prior
            a0[members], b0[members] = 1.0, 1.0
    return a0, b0


def weight_change_rms(correct, trials, max_trials: int, prior: tuple[float, float], alpha: float = 1.0,
                      beta: float = 1.0) -> torch.Tensor:
    """Per problem, sqrt(E[(w((c + X) / K) - w(c / n))^2]) with X ~ BetaBinomial(K - n, a0 + c,
    b0 + n - c): how much its plug-in weight would move, root mean square, if it were rolled out
    to K = ``max_trials`` (module doc). Counts: 0 <= c <= n, 1 <= n <= K; float64 result.

    The Beta-binomial pmf: P(X = x) = C(m, x) B(x + a, m - x + b) / B(a, b), m = K - n, from
    log-gamma terms."""
    c = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    n = torch.as_tensor(trials, dtype=torch.float64).reshape(-1)
    if len(n) and not ((n >= 1) & (n <= max_trials) & (c >= 0) & (c <= n)).all():
        raise ValueError(f"weight_change_rms needs 0 <= correct <= trials and 1 <= trials <= {max_trials}")
    a0, b0 = (torch.as_tensor(value, dtype=torch.float64).reshape(-1, 1) for value in prior)
    a, b = a0 + c[:, None], b0 + (n - c)[:, None]
    remaining = (max_trials - n)[:, None]
    x = torch.arange(max_trials + 1, dtype=torch.float64)[None, :]
    x_clamped = torch.minimum(x, remaining)  # the pmf is 0 beyond the rollouts remaining
    log_pmf = (torch.lgamma(remaining + 1) - torch.lgamma(x_clamped + 1) - torch.lgamma(remaining - x_clamped + 1)
               + _log_beta(x_clamped + a, remaining - x_clamped + b) - _log_beta(a, b))
    pmf = torch.where(x <= remaining, log_pmf.exp(), 0.0)
    later = beta_weight((c[:, None] + x_clamped) / max_trials, alpha, beta)
    now = beta_weight(c / n, alpha, beta)
    return (pmf * (later - now[:, None]) ** 2).sum(1).sqrt()


def settled(correct, trials, max_trials: int, prior: tuple[float, float], alpha: float, beta: float,
            tol: float) -> torch.Tensor:
    """Per problem, whether it stops: K = ``max_trials`` trials made, or ``weight_change_rms`` at most
    ``tol`` times the kernel's peak. A bool tensor."""
    peak = kernel_peak(alpha, beta)
    rms = weight_change_rms(correct, trials, max_trials, prior, alpha, beta)
    return (torch.as_tensor(trials).reshape(-1) >= max_trials) | (rms <= tol * peak)


def _log_beta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
