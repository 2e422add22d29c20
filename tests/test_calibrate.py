"""The SNR-calibrated Beta kernel: the bounded, smoothed fit and the snr.buckets buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paced_ds.curriculum.calibrate import (
    Bucket,
    KernelFit,
    assign_bucket,
    bucket_edges,
    fit_kernel,
)
from paced_ds.errors import UserError


def snr_curve(pass_rates, alpha, beta, scale=1.0):
    return [scale * p ** alpha * (1 - p) ** beta for p in pass_rates]


def sse(pass_rates, snr, alpha, beta) -> float:
    """Sum of squared log residuals at (alpha, beta), with the best scale c for them."""
    r = np.log(snr) - alpha * np.log(pass_rates) - beta * np.log1p(-np.asarray(pass_rates))
    return float(((r - r.mean()) ** 2).sum())


def profiled_beta(pass_rates, snr, alpha) -> float:
    """The least-squares beta with alpha fixed and c free: a 1-D regression on centred data."""
    log_q = np.log1p(-np.asarray(pass_rates))
    r = np.log(snr) - alpha * np.log(pass_rates)
    return float(((r - r.mean()) * (log_q - log_q.mean())).sum() / ((log_q - log_q.mean()) ** 2).sum())


# ---- recovery ----

@pytest.mark.parametrize("pass_rates", [
    [0.125, 0.375, 0.625, 0.875],
    [0.1, 0.3, 0.5, 0.7, 0.9],
    [0.05, 0.2, 0.35, 0.5, 0.65, 0.95],
])
@pytest.mark.parametrize("alpha, beta", [(1, 1), (2, 0.5), (0.5, 3), (3.5, 0.2), (1.7, 1.7), (0, 1.5), (2.5, 4)])
def test_recovers_exponents_from_a_noiseless_curve(pass_rates, alpha, beta):
    fit = fit_kernel(pass_rates, snr_curve(pass_rates, alpha, beta, scale=0.3))
    assert fit.fitted and fit.reason.startswith("fitted")
    assert fit.alpha == pytest.approx(alpha, abs=1e-9)
    assert fit.beta == pytest.approx(beta, abs=1e-9)
    assert fit.log_scale == pytest.approx(math.log(0.3), abs=1e-9)
    assert fit.residual < 1e-9
    assert fit.buckets_used == len(pass_rates)


def test_recovers_exponents_under_multiplicative_noise():
    rng = np.random.default_rng(0)
    pass_rates = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85]
    noisy = [s * math.exp(rng.normal(0, 0.05)) for s in snr_curve(pass_rates, 2.0, 0.5, scale=0.7)]
    fit = fit_kernel(pass_rates, noisy)
    # Over 200 seeds the exponents' spread is about 0.06; 0.2 is more than 3 of those.
    assert fit.fitted
    assert fit.alpha == pytest.approx(2.0, abs=0.2)
    assert fit.beta == pytest.approx(0.5, abs=0.2)
    assert 0 < fit.residual < 0.1


def test_boundary_buckets_and_missing_snr_are_left_out():
    pass_rates = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.3, float("nan")]
    snr = snr_curve([0.2, 0.4, 0.6, 0.8], 1.5, 2.0)
    fit = fit_kernel(pass_rates, [5.0, *snr, 5.0, None, -1.0, 7.0])
    assert fit.fitted and fit.buckets_used == 4
    assert (fit.alpha, fit.beta) == pytest.approx((1.5, 2.0), abs=1e-9)


# ---- bounds ----

def test_alpha_above_the_bound_is_clamped_and_beta_refitted():
    pass_rates = [0.2, 0.35, 0.5, 0.65, 0.8]
    snr = snr_curve(pass_rates, 6.0, 2.0, scale=5.0)
    fit = fit_kernel(pass_rates, snr, bounds=(0.0, 4.0))
    assert fit.fitted and fit.alpha == 4.0 and "alpha at the upper bound 4" in fit.reason
    # beta is the least-squares beta given alpha = 4, not the true 2: log p and log(1 - p)
    # are correlated, so beta drops to shift the peak back towards where the SNR peaks.
    assert fit.beta == pytest.approx(profiled_beta(pass_rates, snr, 4.0), abs=1e-9)
    assert 0 < fit.beta < 2.0
    assert sse(pass_rates, snr, 4.0, fit.beta) < sse(pass_rates, snr, 4.0, 2.0)  # beats clamping alone
    assert fit.residual == pytest.approx(math.sqrt(sse(pass_rates, snr, 4.0, fit.beta) / 5), rel=1e-9)


def test_slightly_out_of_bounds_alpha_keeps_beta_close():
    pass_rates = [0.1, 0.3, 0.5, 0.7, 0.9]
    snr = snr_curve(pass_rates, 4.2, 1.5)
    fit = fit_kernel(pass_rates, snr)
    assert fit.alpha == 4.0
    assert fit.beta == pytest.approx(profiled_beta(pass_rates, snr, 4.0), abs=1e-9)
    assert fit.beta == pytest.approx(1.5, abs=0.2)


@pytest.mark.parametrize("alpha, beta, bounds", [(6.0, 2.0, (0.0, 4.0)), (0.5, 6.0, (0.0, 4.0)),
                                                 (6.0, 0.5, (1.0, 3.0)), (-1.0, 2.0, (0.0, 4.0))])
def test_bounded_fit_is_the_box_constrained_optimum(alpha, beta, bounds):
    """Checked against a brute-force grid over the box (step 0.005) with c profiled out."""
    pass_rates = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85]
    snr = snr_curve(pass_rates, alpha, beta)
    fit = fit_kernel(pass_rates, snr, bounds=bounds)
    assert bounds[0] <= fit.alpha <= bounds[1] and bounds[0] <= fit.beta <= bounds[1]
    grid = np.linspace(bounds[0], bounds[1], round((bounds[1] - bounds[0]) / 0.005) + 1)
    y, log_p, log_q = np.log(snr), np.log(pass_rates), np.log1p(-np.asarray(pass_rates))
    r = y[None, None, :] - grid[:, None, None] * log_p - grid[None, :, None] * log_q
    grid_sse = ((r - r.mean(axis=2, keepdims=True)) ** 2).sum(axis=2)
    i, j = np.unravel_index(grid_sse.argmin(), grid_sse.shape)
    assert sse(pass_rates, snr, fit.alpha, fit.beta) <= grid_sse.min() + 1e-12
    assert (fit.alpha, fit.beta) == pytest.approx((grid[i], grid[j]), abs=0.01)


# ---- not fitted ----

@pytest.mark.parametrize("pass_rates, snr, why", [
    ([0.2, 0.5], [1.0, 2.0], "only 2 usable buckets (need 3)"),
    ([0.0, 0.2, 0.5, 1.0], [1.0, 1.0, 2.0, 1.0], "2 at p=0, p=1 or empty"),
    ([0.2, 0.5, 0.8], [1.0, None, 2.0], "1 without an SNR"),
    ([0.2, 0.5, 0.8], [1.0, float("nan"), 2.0], "1 without an SNR"),
    ([0.2, 0.5, 0.8], [1.0, 0.0, -2.0], "2 with SNR <= 0"),
    ([], [], "only 0 usable buckets"),
    ([0.4, 0.4, 0.4, 0.4], [1.0, 2.0, 3.0, 4.0], "degenerate design: 4 buckets at 1 distinct pass rate"),
    ([0.3, 0.3, 0.3], [1.0, 2.0, 3.0], "degenerate design: 3 buckets at 1 distinct pass rate"),
    ([0.1, 0.1, 0.1, 0.1, 0.1], [1.0, 2.0, 3.0, 4.0, 5.0], "degenerate design: 5 buckets at 1 distinct"),
    ([0.3, 0.7, 0.3, 0.7], [1.0, 2.0, 1.5, 2.5], "degenerate design: 4 buckets at 2 distinct pass rates"),
])
def test_unusable_input_keeps_previous_or_default(pass_rates, snr, why):
    fit = fit_kernel(pass_rates, snr)
    assert not fit.fitted and why in fit.reason
    assert (fit.alpha, fit.beta) == (1.0, 1.0)
    assert math.isnan(fit.log_scale) and math.isnan(fit.residual)
    kept = fit_kernel(pass_rates, snr, previous=(2.5, 0.75), smoothing=0.3, default=(3.0, 3.0))
    assert not kept.fitted and (kept.alpha, kept.beta) == (2.5, 0.75)  # kept as is, not blended
    assert fit_kernel(pass_rates, snr, default=(0.5, 2.0)).alpha == 0.5


def test_one_or_two_buckets_are_degenerate_even_with_min_buckets_lowered():
    for pass_rates in ([0.5], [0.25, 0.75]):
        fit = fit_kernel(pass_rates, snr_curve(pass_rates, 1, 1), min_buckets=1)
        assert not fit.fitted and "degenerate design" in fit.reason
    assert "degenerate design: 1 bucket at 1 distinct pass rate;" in fit_kernel([0.5], [1.0], min_buckets=1).reason


def test_min_buckets_raises_the_bar():
    pass_rates = [0.2, 0.4, 0.6, 0.8]
    fit = fit_kernel(pass_rates, snr_curve(pass_rates, 1, 1), min_buckets=5)
    assert not fit.fitted and "only 4 usable buckets (need 5)" in fit.reason and fit.buckets_used == 4


# ---- smoothing ----

def test_smoothing_is_an_exponential_moving_average():
    pass_rates = [0.1, 0.3, 0.5, 0.7, 0.9]
    snr = snr_curve(pass_rates, 3.0, 0.5)
    raw = fit_kernel(pass_rates, snr)
    previous = (1.0, 2.0)
    for smoothing in (0.0, 0.25, 0.5, 0.9, 1.0):
        fit = fit_kernel(pass_rates, snr, previous=previous, smoothing=smoothing)
        assert fit.fitted
        assert fit.alpha == smoothing * previous[0] + (1 - smoothing) * raw.alpha
        assert fit.beta == smoothing * previous[1] + (1 - smoothing) * raw.beta
        assert (fit.log_scale, fit.residual) == (raw.log_scale, raw.residual)  # of the raw fit
    assert fit_kernel(pass_rates, snr, previous=previous, smoothing=0.25).alpha == pytest.approx(0.25 * 1 + 0.75 * 3)
    assert fit_kernel(pass_rates, snr, previous=previous, smoothing=0.0).alpha == raw.alpha
    assert fit_kernel(pass_rates, snr, previous=previous, smoothing=1.0).beta == 2.0


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="3 bucket pass rates but 2"):
        fit_kernel([0.2, 0.5, 0.8], [1.0, 2.0])
    with pytest.raises(ValueError, match="outside"):
        fit_kernel([0.2, 1.5, 0.8], [1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="smoothing"):
        fit_kernel([0.2, 0.5, 0.8], [1.0, 2.0, 1.0], smoothing=1.5)
    with pytest.raises(ValueError, match="bounds"):
        fit_kernel([0.2, 0.5, 0.8], [1.0, 2.0, 1.0], bounds=(3.0, 1.0))
    with pytest.raises(ValueError, match="bounds"):
        fit_kernel([0.2, 0.5, 0.8], [1.0, 2.0, 1.0], bounds=(-1.0, 4.0))
    with pytest.raises(ValueError, match="previous"):
        fit_kernel([0.2, 0.5, 0.8], [1.0, 2.0, 1.0], previous=(1.0,))


# ---- buckets ----

def test_default_buckets():
    buckets = bucket_edges("0,0.25,0.5,0.75,1")
    assert bucket_edges() == buckets
    assert [b.name for b in buckets] == ["p=0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "p=1"]
    assert [b.kind for b in buckets] == ["zero", "interior", "interior", "interior", "interior", "one"]
    assert buckets[0] == Bucket("p=0", 0.0, 0.0, "zero") and buckets[-1] == Bucket("p=1", 1.0, 1.0, "one")
    assert [(b.lo, b.hi) for b in buckets[1:-1]] == [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]


def test_custom_buckets():
    assert [b.name for b in bucket_edges(" 0 , 0.1,0.9 ,1")] == ["p=0", "(0,0.1]", "(0.1,0.9]", "(0.9,1)", "p=1"]
    assert [b.name for b in bucket_edges("0,1")] == ["p=0", "(0,1)", "p=1"]
    assert [b.name for b in bucket_edges([0, 0.5, 1])] == ["p=0", "(0,0.5]", "(0.5,1)", "p=1"]
    third = bucket_edges(f"0,{1 / 3!r},1")
    assert third[1].hi == 1 / 3 and float(third[1].name[3:-1]) == 1 / 3  # the name reads back exactly


@pytest.mark.parametrize("p, name", [(0, "p=0"), (0.0, "p=0"), (1e-9, "(0,0.25]"), (0.25, "(0,0.25]"),
                                     (2 / 8, "(0,0.25]"), (0.2500001, "(0.25,0.5]"), (0.5, "(0.25,0.5]"),
                                     (0.75, "(0.5,0.75]"), (0.999, "(0.75,1)"), (1, "p=1"), (1.0, "p=1")])
def test_assign_bucket_at_the_edges(p, name):
    buckets = bucket_edges()
    assert buckets[assign_bucket(p, buckets)].name == name


def test_assign_bucket_untried_and_out_of_range():
    buckets = bucket_edges()
    assert assign_bucket(float("nan"), buckets) is None
    assert assign_bucket(None, buckets) is None
    assert assign_bucket(np.float32(0.5), buckets) == 2
    with pytest.raises(ValueError, match="outside"):
        assign_bucket(1.5, buckets)


@pytest.mark.parametrize("spec, why", [
    ("0.1,0.5,1", "start at 0"),
    ("0,0.5,0.9", "end at 1"),
    ("0,0.6,0.4,1", "must increase, but 0.4 follows 0.6"),
    ("0,0.5,0.5,1", "must increase"),
    ("0,x,1", "'x' is not a number"),
    ("0,,1", "'' is not a number"),
    ("0,nan,1", "not a finite number"),
    ("", "is not a number"),
    ("0", "at least the two edges"),
    (5, "not a list of edges"),
])
def test_bad_bucket_specs_are_user_errors(spec, why):
    with pytest.raises(UserError) as caught:
        bucket_edges(spec)
    message = str(caught.value)
    assert message.startswith(f"snr.buckets {spec!r}: ") and why in message and "\n" not in message


def test_fit_result_type():
    fit = fit_kernel([0.2, 0.5, 0.8], [1.0, 2.0, 1.0])
    assert isinstance(fit, KernelFit) and fit.buckets_used == 3 and fit.residual < 1e-12  # 3 points: exact


def test_fit_is_bit_for_bit_reproducible():
    pass_rates = [0.1, 0.3, 0.5, 0.7, 0.9]
    snr = snr_curve(pass_rates, 3.0, 0.5)
    fits = [fit_kernel(pass_rates, snr) for _ in range(20)]
    assert len({(f.alpha, f.beta, f.log_scale, f.residual) for f in fits}) == 1
