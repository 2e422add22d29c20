"""The SNR-calibrated Beta kernel (``curriculum.kernel=calibrated``; beyond the paper).

The paper derives w(p) = p^alpha (1 - p)^beta from the shape of the cross-problem gradient
SNR as a function of the pass rate p, then fixes alpha = beta = 1. Here the toolkit
measures that SNR per pass-rate bucket and fits alpha and beta to it instead:

    log SNR_b = c + alpha log p_b + beta log(1 - p_b)

by least squares over the buckets b (p_b: the mean pass rate of a bucket's problems).
Only the kernel's *shape* is fitted; the scale exp(c) is reported (``log_scale``) but does
not enter the weights, whose scale is set by ``curriculum.normalize``.

- ``bucket_edges(spec)``: the buckets of ``snr.buckets``; ``assign_bucket(p, buckets)``.
- ``fit_kernel(pass_rates, snr, ...)``: the bounded, smoothed fit, as a ``KernelFit``.

Choices the paper leaves open, made here:

- Only interior buckets (0 < p_b < 1) with a finite SNR_b > 0 enter the fit: log p and
  log(1 - p) are -inf at the ends, where the kernel is 0 anyway (for alpha, beta > 0).
- Each bucket counts once, whatever its number of problems (an unweighted fit).
- alpha and beta are kept in ``bounds`` by solving the box-constrained least squares
  exactly, not by clamping the free solution (see ``_bounded_fit``).
- A fit that cannot be trusted (too few buckets, a degenerate design) changes nothing:
  the previous exponents (or ``default``) are kept, with the reason.
- Successive probes are blended by an exponential moving average (``smoothing``), so one
  noisy probe moves the kernel only part of the way.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass

from paced_ds.errors import UserError

DEFAULT_BUCKETS = "0,0.25,0.5,0.75,1"


# ---- buckets ----

@dataclass(frozen=True)
class Bucket:
    """One pass-rate bucket: ``kind`` "zero" is {0}, "one" is {1}, "interior" is (lo, hi]
    (the last interior bucket is (lo, 1), since p = 1 has its own bucket)."""

    name: str
    lo: float
    hi: float
    kind: str  # "zero" | "interior" | "one"


def _edge_text(x: float) -> str:
    """0.25 -> '0.25', 1.0 -> '1'; the shortest text that reads back as x."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def bucket_edges(spec=DEFAULT_BUCKETS) -> list[Bucket]:
    """The buckets of ``snr.buckets``: comma-separated edges 0 = e_0 < e_1 < ... < e_k = 1.

    Returns {0}, (e_0, e_1], (e_1, e_2], ..., (e_{k-1}, 1), {1}: the exact-0 and exact-1
    buckets always exist (a problem the student never or always solves carries no
    usable SNR), and the interior edges split (0, 1). The default "0,0.25,0.5,0.75,1"
    gives p=0, (0,0.25], (0.25,0.5], (0.5,0.75], (0.75,1), p=1. A list of numbers (a YAML
    list) is accepted too. UserError naming ``snr.buckets`` for anything else.
    """
    def refuse(why: str):
        return UserError(f"snr.buckets {spec!r}: {why}; write increasing pass rates from 0 to 1 "
                         f"separated by commas, e.g. {DEFAULT_BUCKETS!r}")

    tokens = spec.split(",") if isinstance(spec, str) else spec
    try:
        tokens = list(tokens)
    except TypeError:
        raise refuse("not a list of edges") from None
    edges = []
    for token in tokens:
        if isinstance(token, str):
            token = token.strip()
        try:
            edge = math.nan if isinstance(token, bool) else float(token)
        except (TypeError, ValueError):
            raise refuse(f"edge {token!r} is not a number") from None
        if not math.isfinite(edge):
            raise refuse(f"edge {token!r} is not a finite number")
        edges.append(edge)
    if len(edges) < 2:
        raise refuse("needs at least the two edges 0 and 1")
    if edges[0] != 0.0 or edges[-1] != 1.0:
        raise refuse(f"edges must start at 0 and end at 1, got {_edge_text(edges[0])} ... {_edge_text(edges[-1])}")
    for before, after in itertools.pairwise(edges):
        if not after > before:
            raise refuse(f"edges must increase, but {_edge_text(after)} follows {_edge_text(before)}")

    buckets = [Bucket("p=0", 0.0, 0.0, "zero")]
    for lo, hi in itertools.pairwise(edges):
        close = ")" if hi == 1.0 else "]"
        buckets.append(Bucket(f"({_edge_text(lo)},{_edge_text(hi)}{close}", lo, hi, "interior"))
    buckets.append(Bucket("p=1", 1.0, 1.0, "one"))
    return buckets


def assign_bucket(p, buckets: list[Bucket]) -> int | None:
    """The index in ``buckets`` of the bucket holding pass rate ``p``.

    None for p = None or NaN (a problem never rolled out has no pass rate);
    ValueError for a p outside [0, 1].
    """
    if p is None:
        return None
    p = float(p)
    if math.isnan(p):
        return None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"pass rate {p!r} is outside [0, 1]")
    for index, bucket in enumerate(buckets):
        if bucket.kind == "zero":
            inside = p == 0.0
        elif bucket.kind == "one":
            inside = p == 1.0
        else:
            inside = bucket.lo < p <= bucket.hi and p < 1.0
        if inside:
            return index
    raise ValueError(f"pass rate {p!r} is in none of the buckets {[b.name for b in buckets]}")


# ---- the fit ----

@dataclass
class KernelFit:
    """What ``fit_kernel`` found.

    ``alpha``, ``beta``: the exponents to use (smoothed; the previous / default ones when
    ``fitted`` is False). ``log_scale``: c of the fit, for the unsmoothed exponents (NaN if
    not fitted). ``residual``: RMS of log SNR_b - fit over the buckets used, before
    smoothing (NaN if not fitted). ``buckets_used``: the usable buckets. ``reason``: why not
    fitted, or, when fitted, which exponents sit at a bound.
    """

    alpha: float
    beta: float
    log_scale: float
    residual: float
    buckets_used: int
    fitted: bool
    reason: str


# A design whose centred log p and log(1 - p) have correlation r with 1 - r^2 below this is
# degenerate: fewer than three distinct pass rates, so alpha, beta and c are not determined.
_MIN_DECORRELATION = 1e-10


class _LogFit:
    """Least squares of y_b = c + alpha x_b + beta z_b (x = log p, z = log(1 - p), y = log SNR).

    c is profiled out by centring, which leaves normal equations in at most two unknowns,
    solved in closed form with ``math.fsum``: in plain float64 the fit is bit-for-bit
    reproducible (LAPACK least squares through MKL differs in the last bits between
    identical calls), and the system is tiny.
    """

    def __init__(self, log_p: list[float], log_q: list[float], log_snr: list[float]):
        self.x, self.z, self.y = log_p, log_q, log_snr
        self.xc, self.zc = _centred(log_p), _centred(log_q)
        self.sxx, self.szz = _dot(self.xc, self.xc), _dot(self.zc, self.zc)
        self.sxz = _dot(self.xc, self.zc)

    def degenerate(self) -> bool:
        return (not (self.sxx > 0 and self.szz > 0)
                or self.sxx * self.szz - self.sxz ** 2 <= _MIN_DECORRELATION * self.sxx * self.szz)

    def solve(self, alpha: float | None = None, beta: float | None = None) -> tuple[float, float, float, float]:
        """(c, alpha, beta, sum of squared residuals), holding alpha and/or beta where given."""
        rest = [y - (alpha or 0.0) * x - (beta or 0.0) * z for x, y, z in zip(self.x, self.y, self.z)]
        rc = _centred(rest)
        if alpha is None and beta is None:
            sxr, szr = _dot(self.xc, rc), _dot(self.zc, rc)
            det = self.sxx * self.szz - self.sxz ** 2
            alpha = (sxr * self.szz - szr * self.sxz) / det
            beta = (szr * self.sxx - sxr * self.sxz) / det
        elif alpha is None:
            alpha = _dot(self.xc, rc) / self.sxx
        elif beta is None:
            beta = _dot(self.zc, rc) / self.szz
        residual = [y - alpha * x - beta * z for x, y, z in zip(self.x, self.y, self.z)]
        c = math.fsum(residual) / len(residual)
        return c, alpha, beta, math.fsum((r - c) ** 2 for r in residual)


def _centred(values: list[float]) -> list[float]:
    mean = math.fsum(values) / len(values)
    return [v - mean for v in values]


def _dot(u: list[float], v: list[float]) -> float:
    return math.fsum(a * b for a, b in zip(u, v))


def _bounded_fit(fit: _LogFit, lo: float, hi: float) -> tuple[float, float, float, float]:
    """(c, alpha, beta, sse) of the least squares with alpha, beta in [lo, hi], solved exactly.

    The objective is a convex quadratic, so if the free solution is outside the box the
    constrained one lies on the box's boundary: on one of its four edges (alpha or beta at
    a bound). Along an edge, with c profiled out, the objective is a 1-D convex quadratic
    in the other exponent, whose constrained minimum is its free minimum clamped to
    [lo, hi] (then c is re-fitted). The best of the four edges is the answer. Clamping the
    free solution alone would be wrong: log p and log(1 - p) are correlated, so when one
    exponent hits a bound the other must move to absorb what it can.
    """
    free = fit.solve()
    if lo <= free[1] <= hi and lo <= free[2] <= hi:
        return free
    best = None
    for bound in (lo, hi):
        on_alpha_edge = fit.solve(alpha=bound)
        if not lo <= on_alpha_edge[2] <= hi:
            on_alpha_edge = fit.solve(alpha=bound, beta=min(max(on_alpha_edge[2], lo), hi))
        on_beta_edge = fit.solve(beta=bound)
        if not lo <= on_beta_edge[1] <= hi:
            on_beta_edge = fit.solve(alpha=min(max(on_beta_edge[1], lo), hi), beta=bound)
        for candidate in (on_alpha_edge, on_beta_edge):
            if best is None or candidate[3] < best[3]:
                best = candidate
    return best


def _exponent_pair(name: str, value) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two exponents (alpha, beta), got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0):
        raise ValueError(f"{name} {value!r} must be two finite numbers >= 0")
    return a, b


def fit_kernel(pass_rates, snr, *, bounds=(0.0, 4.0), min_buckets=3, previous=None, smoothing=0.5,
               default=(1.0, 1.0)) -> KernelFit:
    """Fit the Beta kernel's exponents to a measured SNR curve.

    ``pass_rates[b]``: the representative pass rate p_b of bucket b (mean over its problems;
    NaN or None for an empty bucket); ``snr[b]``: its measured SNR, None when the bucket had
    fewer than 2 problems. The buckets with 0 < p_b < 1 and a finite SNR_b > 0 are used; the
    fit is least squares of log SNR_b = c + alpha log p_b + beta log(1 - p_b) in float64
    (normal equations, see ``_LogFit``), with alpha and beta constrained to
    ``bounds = (lo, hi)`` (exactly, see ``_bounded_fit``).

    Not fitted (``fitted=False``, exponents = ``previous``, else ``default``, and a
    ``reason``) when fewer than ``min_buckets`` buckets are usable, or the design is
    degenerate (fewer than three distinct pass rates: the three unknowns are not determined).

    Smoothing: with ``previous = (alpha0, beta0)`` and a successful fit (alpha1, beta1), the
    result is smoothing * (alpha0, beta0) + (1 - smoothing) * (alpha1, beta1), an
    exponential moving average across probes (``smoothing=0``: the new fit alone; 1: never
    move). Without ``previous`` the fit is returned as is. Both ends lie in ``bounds``
    when ``previous`` does, so the blend does too.
    """
    if len(pass_rates) != len(snr):
        raise ValueError(f"{len(pass_rates)} bucket pass rates but {len(snr)} SNR values")
    lo, hi = _exponent_pair("kernel bounds", bounds)
    if lo > hi:
        raise ValueError(f"kernel bounds {bounds!r}: the lower bound is above the upper one")
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"kernel smoothing must be a number in [0, 1], got {smoothing!r}")
    if isinstance(min_buckets, bool) or not isinstance(min_buckets, int) or min_buckets < 1:
        raise ValueError(f"kernel min_buckets must be an integer >= 1, got {min_buckets!r}")
    fallback = _exponent_pair("previous kernel" if previous is not None else "default kernel",
                              previous if previous is not None else default)

    used_p, used_snr = [], []
    at_ends = no_snr = not_positive = 0
    for index, (p, value) in enumerate(zip(pass_rates, snr)):
        p = math.nan if p is None else float(p)
        if p < 0 or p > 1:
            raise ValueError(f"bucket {index}: pass rate {p!r} is outside [0, 1]")
        if not 0 < p < 1:  # p = 0, p = 1, or NaN (an empty bucket)
            at_ends += 1
        elif value is None or not math.isfinite(float(value)):
            no_snr += 1
        elif float(value) <= 0:
            not_positive += 1
        else:
            used_p.append(p)
            used_snr.append(float(value))
    used = len(used_p)

    def not_fitted(why: str) -> KernelFit:
        return KernelFit(fallback[0], fallback[1], math.nan, math.nan, used, False, why)

    if used < min_buckets:
        skipped = [f"{count} {what}" for count, what in ((at_ends, "at p=0, p=1 or empty"),
                                                          (no_snr, "without an SNR (None, NaN or inf)"),
                                                          (not_positive, "with SNR <= 0")) if count]
        return not_fitted(f"only {used} usable bucket{'s' if used != 1 else ''} (need {min_buckets})"
                          + (f"; skipped {', '.join(skipped)}" if skipped else ""))

    fit = _LogFit([math.log(p) for p in used_p], [math.log1p(-p) for p in used_p],
                  [math.log(s) for s in used_snr])
    if used < 3 or fit.degenerate():
        distinct = len(set(used_p))
        return not_fitted(f"degenerate design: {used} bucket{'s' if used != 1 else ''} at {distinct} distinct "
                          f"pass rate{'s' if distinct != 1 else ''}; alpha, beta and the scale need at least 3")

    log_scale, alpha, beta, sse = _bounded_fit(fit, lo, hi)
    rms = math.sqrt(sse / used)
    at_bound = [f"{name} at the {'lower' if value == lo else 'upper'} bound {value:g}"
                for name, value in (("alpha", alpha), ("beta", beta)) if value in (lo, hi)]
    reason = "fitted" + (f"; {', '.join(at_bound)}" if at_bound else "")
    if previous is not None:
        alpha = smoothing * fallback[0] + (1 - smoothing) * alpha
        beta = smoothing * fallback[1] + (1 - smoothing) * beta
        reason += f"; smoothed with the previous ({fallback[0]:g}, {fallback[1]:g}) at {smoothing:g}"
    return KernelFit(alpha, beta, log_scale, rms, used, True, reason)
