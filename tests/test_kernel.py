"""The Beta kernel, its posterior expectation, curriculum modes, dataset-mean normalisation and the summary."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from paced_ds.curriculum.kernel import (
    MODES,
    beta_weight,
    curriculum_weights,
    expected_beta_weight,
    normalize_to_dataset_mean,
    weight_summary,
)


def exact_expected_p_one_minus_p(correct: int, trials: int) -> Fraction:
    """E[p(1 - p)] for p ~ Beta(a, b) is ab / ((a + b)(a + b + 1)), with a = c + 1, b = n - c + 1."""
    a, b = correct + 1, trials - correct + 1
    return Fraction(a * b, (a + b) * (a + b + 1))


# ---- beta_weight ----

@pytest.mark.parametrize("p, alpha, beta, expected", [
    (0.5, 1, 1, 0.25),
    (0.2, 1, 1, 0.16),
    (0.5, 2, 1, 0.125),
    (0.3, 2, 1, 0.063),
    (0.25, 0.5, 2, 0.28125),  # sqrt(0.25) * 0.75^2
    (0.64, 0.5, 0.5, 0.48),   # sqrt(0.64 * 0.36)
])
def test_kernel_at_hand_computed_points(p, alpha, beta, expected):
    assert beta_weight(p, alpha, beta) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("alpha, beta", [(1, 1), (2, 1), (1, 3), (0.5, 0.5), (0.1, 4)])
def test_kernel_vanishes_at_both_ends(alpha, beta):
    assert beta_weight(0.0, alpha, beta) == 0.0
    assert beta_weight(1.0, alpha, beta) == 0.0
    assert beta_weight(torch.tensor([0.0, 1.0]), alpha, beta).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("alpha, beta", [(1, 1), (2, 1), (1, 3), (0.5, 2), (3, 3)])
def test_kernel_peaks_at_alpha_over_alpha_plus_beta(alpha, beta):
    grid = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    weights = beta_weight(grid, alpha, beta)
    peak = alpha / (alpha + beta)
    assert grid[weights.argmax()].item() == pytest.approx(peak, abs=1e-4)
    assert weights.max().item() == pytest.approx(peak ** alpha * (1 - peak) ** beta, rel=1e-6)
    if alpha == beta == 1:
        assert weights.max().item() == 0.25


def test_zero_to_the_zero_is_one():
    assert beta_weight(0.0, alpha=0, beta=1) == 1.0  # p^0 = 1 at p = 0 as well
    assert beta_weight(1.0, alpha=1, beta=0) == 1.0
    assert beta_weight(0.0, alpha=0, beta=2) == 1.0
    p = [0.0, 0.3, 1.0]
    assert beta_weight(torch.tensor(p), 0, 0).tolist() == [1.0, 1.0, 1.0]
    assert beta_weight(np.array(p), 0, 0).tolist() == [1.0, 1.0, 1.0]
    assert beta_weight(torch.tensor(p, dtype=torch.float64), 0, 1).tolist() == pytest.approx([1.0, 0.7, 0.0])


def test_float_numpy_and_tensor_inputs_give_the_same_numbers_and_keep_their_kind():
    p = [0.0, 0.125, 0.5, 0.9, 1.0]
    alpha, beta = 1.5, 0.5
    floats = [beta_weight(x, alpha, beta) for x in p]
    assert all(type(w) is float for w in floats)

    as_f64 = beta_weight(np.array(p), alpha, beta)
    assert isinstance(as_f64, np.ndarray) and as_f64.dtype == np.float64
    assert as_f64.tolist() == floats
    as_f32 = beta_weight(np.array(p, dtype=np.float32), alpha, beta)
    assert as_f32.dtype == np.float32
    np.testing.assert_allclose(as_f32, floats, rtol=1e-6)
    assert beta_weight(np.array([0, 1]), alpha, beta).dtype == np.float64  # integer arrays -> float64
    scalar = beta_weight(np.float32(0.5), alpha, beta)
    assert isinstance(scalar, np.float32) and scalar == pytest.approx(0.25)

    t64 = beta_weight(torch.tensor(p, dtype=torch.float64), alpha, beta)
    assert t64.dtype == torch.float64 and t64.tolist() == pytest.approx(floats, rel=1e-15)
    t32 = beta_weight(torch.tensor(p, dtype=torch.float32), alpha, beta)
    assert t32.dtype == torch.float32 and t32.device == torch.device("cpu")
    assert t32.tolist() == pytest.approx(floats, rel=1e-6)
    t16 = beta_weight(torch.tensor(p, dtype=torch.bfloat16), alpha, beta)
    assert t16.dtype == torch.bfloat16
    assert beta_weight(torch.tensor([0, 1]), alpha, beta).dtype == torch.get_default_dtype()
    assert beta_weight(torch.tensor(0.5), 1, 1).shape == ()


def test_kernel_keeps_the_tensor_shape():
    p = torch.tensor([[0.1, 0.5], [0.9, 1.0]])
    weights = beta_weight(p)
    assert weights.shape == (2, 2)
    assert weights[0, 1].item() == 0.25


@pytest.mark.parametrize("bad_p", [1.2, -0.1, float("nan"), float("inf")])
def test_pass_rate_outside_unit_interval_raises_naming_it(bad_p):
    with pytest.raises(ValueError, match=f"pass rate {bad_p!r}"):
        beta_weight(bad_p)
    with pytest.raises(ValueError, match=r"pass rate .* at index 2"):
        beta_weight(np.array([0.0, 0.5, bad_p]))
    with pytest.raises(ValueError, match=r"pass rate .* at index 1"):
        beta_weight(torch.tensor([0.5, bad_p]))


@pytest.mark.parametrize("alpha, beta", [(-1, 1), (1, -0.5), (float("nan"), 1), (1, float("inf")), ("1", 1), (True, 1)])
def test_invalid_exponents_raise(alpha, beta):
    with pytest.raises(ValueError, match=r"curriculum\.(alpha|beta)"):
        beta_weight(0.5, alpha, beta)
    with pytest.raises(ValueError, match=r"curriculum\.(alpha|beta)"):
        expected_beta_weight(1, 4, alpha, beta)


def test_non_numeric_pass_rate_is_a_type_error():
    with pytest.raises(TypeError, match="list"):
        beta_weight([0.5])


# ---- expected_beta_weight ----

@pytest.mark.parametrize("correct, trials, alpha, beta", [
    (0, 8, 1, 1), (8, 8, 1, 1), (3, 8, 1, 1), (0, 4, 2, 1), (4, 4, 0.5, 2), (1, 6, 3, 0.5), (0, 0, 1, 1), (5, 8, 0, 2),
])
def test_posterior_expectation_matches_monte_carlo(correct, trials, alpha, beta):
    samples = 200_000
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        posterior = torch.distributions.Beta(torch.tensor(correct + 1.0, dtype=torch.float64),
                                             torch.tensor(trials - correct + 1.0, dtype=torch.float64))
        p = posterior.sample((samples,)).clamp(0.0, 1.0)
    w = p.pow(alpha) * (1 - p).pow(beta)
    standard_error = w.std().item() / math.sqrt(samples)
    closed_form = expected_beta_weight(correct, trials, alpha, beta)
    assert abs(closed_form - w.mean().item()) < 3 * standard_error


def test_posterior_expectation_is_exact_for_alpha_beta_one():
    for trials in (0, 1, 4, 8, 16):
        for correct in range(trials + 1):
            exact = float(exact_expected_p_one_minus_p(correct, trials))
            assert expected_beta_weight(correct, trials) == pytest.approx(exact, rel=1e-12), (correct, trials)
    correct = torch.arange(9)
    exact = [float(exact_expected_p_one_minus_p(c, 8)) for c in range(9)]
    got = expected_beta_weight(correct.to(torch.float64), 8)
    assert got.tolist() == pytest.approx(exact, rel=1e-12)


def test_never_rolled_out_gets_the_prior_mean():
    assert expected_beta_weight(0, 0) == pytest.approx(1 / 6, rel=1e-12)  # int_0^1 p(1-p) dp
    assert expected_beta_weight(0, 0, 2, 1) == pytest.approx(1 / 12, rel=1e-12)  # B(3, 2) = 2! 1! / 4!
    assert expected_beta_weight(0, 0, 0, 0) == pytest.approx(1.0, rel=1e-12)


def test_all_wrong_or_all_right_still_gets_a_small_positive_weight():
    assert beta_weight(0 / 8) == 0.0 and beta_weight(8 / 8) == 0.0
    for correct in (0, 8):
        weight = expected_beta_weight(correct, 8)
        assert 0.0 < weight < 0.1
        assert weight == pytest.approx(float(exact_expected_p_one_minus_p(correct, 8)), rel=1e-12)  # 9/110
    # Symmetric kernel, symmetric counts.
    assert expected_beta_weight(0, 8) == pytest.approx(expected_beta_weight(8, 8), rel=1e-12)
    # The posterior expectation is below the plug-in at the middle (p(1-p) is concave).
    assert expected_beta_weight(4, 8) < beta_weight(0.5)


def test_posterior_approaches_the_plug_in_for_many_trials():
    gaps = []
    for trials in (10, 100, 1_000, 100_000):
        correct = 3 * trials // 10
        plug_in = beta_weight(correct / trials, 2, 1)
        gaps.append(abs(expected_beta_weight(correct, trials, 2, 1) - plug_in))
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-5
    # Huge counts neither overflow nor lose the answer to cancellation.
    assert expected_beta_weight(3_000_000, 10_000_000) == pytest.approx(0.21, rel=1e-6)


def test_posterior_expectation_kinds_and_broadcasting():
    assert type(expected_beta_weight(1, 4)) is float
    from_ints = expected_beta_weight(torch.tensor([0, 2, 4]), 4)
    assert from_ints.dtype == torch.get_default_dtype() and from_ints.shape == (3,)
    from_f64 = expected_beta_weight(torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64),
                                    torch.tensor(4.0, dtype=torch.float64))
    assert from_f64.dtype == torch.float64
    floats = [expected_beta_weight(c, 4) for c in (0, 2, 4)]
    assert from_f64.tolist() == pytest.approx(floats, rel=1e-12)
    assert from_ints.tolist() == pytest.approx(floats, rel=1e-6)
    from_numpy = expected_beta_weight(np.array([0, 2, 4]), np.array([4, 4, 4]))
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float64
    assert from_numpy.tolist() == pytest.approx(floats, rel=1e-12)
    assert expected_beta_weight(np.array([0, 2], dtype=np.float32), 4).dtype == np.float32
    # Asymmetric exponents: the vectorised paths agree with the scalar one.
    skewed = [expected_beta_weight(c, 6, 2, 0.5) for c in range(7)]
    from_tensor = expected_beta_weight(torch.arange(7, dtype=torch.float64), 6, 2, 0.5)
    assert from_tensor.tolist() == pytest.approx(skewed, rel=1e-12)
    assert expected_beta_weight(np.arange(7), 6, 2, 0.5).tolist() == pytest.approx(skewed, rel=1e-12)
    assert skewed[0] < skewed[6]  # alpha > beta favours the problems the student solves
    # Fractional (decayed) counts are fine.
    assert expected_beta_weight(1.5, 3.0) == pytest.approx(float(Fraction(25, 4) / 5 / 6), rel=1e-12)


@pytest.mark.parametrize("correct, trials", [(5, 4), (-1, 4), (0, -1), (float("nan"), 4)])
def test_invalid_counts_raise(correct, trials):
    with pytest.raises(ValueError, match="need 0 <= correct <= trials"):
        expected_beta_weight(correct, trials)
    with pytest.raises(ValueError, match="at index 1"):
        expected_beta_weight(torch.tensor([0.0, correct]), torch.tensor([4.0, trials]))


# ---- curriculum_weights ----

CORRECT = torch.tensor([0, 1, 2, 3, 4, 0, 8])
TRIALS = torch.tensor([4, 4, 4, 4, 4, 0, 8])


def test_uniform_mode_is_all_ones():
    weights = curriculum_weights(CORRECT, TRIALS, mode="uniform")
    assert weights.dtype == torch.float32
    assert weights.tolist() == [1.0] * 7


def test_paced_mode_is_the_kernel_at_the_pass_rate():
    weights = curriculum_weights(CORRECT, TRIALS)
    assert weights.dtype == torch.float32 and weights.shape == (7,)
    expected = [0.0, 0.1875, 0.25, 0.1875, 0.0, 1 / 6, 0.0]  # trials == 0: prior mean B(2, 2) = 1/6
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    skewed = curriculum_weights(CORRECT, TRIALS, alpha=2, beta=1)
    assert skewed.tolist() == pytest.approx([0.0, 3 / 64, 1 / 8, 9 / 64, 0.0, 1 / 12, 0.0], rel=1e-6)


def test_paced_posterior_mode_is_the_posterior_expectation():
    weights = curriculum_weights(CORRECT, TRIALS, posterior=True)
    expected = [expected_beta_weight(int(c), int(n)) for c, n in zip(CORRECT, TRIALS)]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert (weights > 0).all()  # 0/4, 4/4 and 8/8 keep a small weight
    # The never-rolled-out problem gets the same prior mean in both paced variants.
    assert weights[5].item() == curriculum_weights(CORRECT, TRIALS)[5].item()


def test_hard_filter_keeps_the_open_band_by_default():
    weights = curriculum_weights(CORRECT, TRIALS, mode="hard_filter")
    # 0/4 and 4/4 and 8/8 dropped; the never-rolled-out problem gets P(0 < p < 1) = 1.
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    inclusive = curriculum_weights(CORRECT, TRIALS, mode="hard_filter", band_inclusive=True)
    assert inclusive.tolist() == [1.0] * 7


def test_hard_filter_band_edges():
    band = (0.25, 0.75)
    exclusive = curriculum_weights(CORRECT, TRIALS, mode="hard_filter", band=band)
    assert exclusive.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0]  # edges 1/4, 3/4 out; unrolled: hi - lo
    inclusive = curriculum_weights(CORRECT, TRIALS, mode="hard_filter", band=band, band_inclusive=True)
    assert inclusive.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.0]
    # 3/10 and 7/10 meet edges written 0.3 and 0.7 exactly (pass rates are float64).
    tenths = curriculum_weights(torch.tensor([2, 3, 5, 7, 8]), torch.full((5,), 10), mode="hard_filter",
                                band=(0.3, 0.7), band_inclusive=True)
    assert tenths.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_curriculum_weights_take_lists_and_numpy():
    from_lists = curriculum_weights([1, 2], [4, 4])
    from_numpy = curriculum_weights(np.array([1, 2]), np.array([4, 4]))
    assert from_lists.tolist() == from_numpy.tolist() == [0.1875, 0.25]
    assert isinstance(from_numpy, torch.Tensor) and from_numpy.dtype == torch.float32


def test_curriculum_weights_reject_bad_input():
    with pytest.raises(ValueError, match="not one of paced, uniform, hard_filter"):
        curriculum_weights(CORRECT, TRIALS, mode="zpd")
    with pytest.raises(ValueError, match=r"shape \(2,\) but trials has shape \(3,\)"):
        curriculum_weights([1, 2], [4, 4, 4])
    with pytest.raises(ValueError, match="at index 1"):
        curriculum_weights([1, 5], [4, 4], mode="uniform")
    for band in [(0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.2,), "ab"]:
        with pytest.raises(ValueError, match="curriculum band"):
            curriculum_weights(CORRECT, TRIALS, mode="hard_filter", band=band)
    with pytest.raises(ValueError, match=r"curriculum\.beta"):
        curriculum_weights(CORRECT, TRIALS, beta=-1)
    assert MODES == ("paced", "uniform", "hard_filter")


# ---- normalize_to_dataset_mean (curriculum.normalize=batch_mean is the step's: tests/test_step.py) ----

def test_normalize_to_dataset_mean_keeps_relative_weights_across_batches():
    dataset = torch.tensor([0.0, 0.25, 0.5, 0.25, 0.0, 0.0, 0.25, 0.25])  # mean 0.1875
    first, second = dataset[:4], dataset[4:]
    a = normalize_to_dataset_mean(first, dataset)
    b = normalize_to_dataset_mean(second, dataset)
    assert a.tolist() == pytest.approx([0.0, 4 / 3, 8 / 3, 4 / 3])
    assert b.tolist() == pytest.approx([0.0, 0.0, 4 / 3, 4 / 3])
    assert torch.cat([a, b]).mean().item() == pytest.approx(1.0)  # the average step has unit scale
    assert a.sum().item() / b.sum().item() == pytest.approx(first.sum().item() / second.sum().item())
    # An all-zero batch is fine when the dataset is not.
    assert normalize_to_dataset_mean(torch.zeros(2), dataset).tolist() == [0.0, 0.0]
    assert normalize_to_dataset_mean(torch.tensor([0, 2]), torch.tensor([0, 2])).dtype == torch.float32


def test_normalize_to_dataset_mean_errors():
    with pytest.raises(ValueError, match="no problem would ever be trained"):
        normalize_to_dataset_mean(torch.zeros(2), torch.zeros(5))
    with pytest.raises(ValueError, match=r"-0\.5 at index 1 must be finite and >= 0"):
        normalize_to_dataset_mean(torch.tensor([1.0, -0.5]), torch.ones(2))
    with pytest.raises(ValueError, match="nan"):
        normalize_to_dataset_mean(torch.tensor([1.0, 1.0]), torch.tensor([1.0, float("nan")]))


# ---- weight_summary ----

def test_weight_summary_on_a_hand_computed_example():
    pass_rates = torch.tensor([0.0, 0.5, 1.0, 0.25])
    weights = torch.tensor([1.0, 2.0, 1.0, 0.0])  # total 4, sum of squares 6
    summary = weight_summary(pass_rates, weights)
    assert summary == {
        "frontier_weight_share": 0.5,
        "zero_pass_share": 0.25,
        "full_pass_share": 0.25,
        "weight_share_p0": 0.25,
        "weight_share_p1": 0.25,
        "effective_sample_size": 16 / 6,
        "effective_sample_share": 16 / 6 / 4,
        "weight_mean": 1.0,
        "pass_rate_mean": 0.4375,
    }
    assert all(type(value) is float for value in summary.values())


def test_weight_summary_extremes():
    equal = weight_summary([0.0, 0.5, 1.0], [2.0, 2.0, 2.0])
    assert equal["effective_sample_size"] == pytest.approx(3.0)
    assert equal["effective_sample_share"] == pytest.approx(1.0)
    one_holds_all = weight_summary(np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.7, 0.0]))
    assert one_holds_all["effective_sample_size"] == pytest.approx(1.0)
    assert one_holds_all["frontier_weight_share"] == 1.0
    zeros = weight_summary([0.0, 1.0], [0.0, 0.0])
    assert zeros["effective_sample_size"] == 0.0 and zeros["effective_sample_share"] == 0.0
    assert zeros["frontier_weight_share"] == zeros["weight_share_p0"] == zeros["weight_share_p1"] == 0.0
    assert zeros["zero_pass_share"] == zeros["full_pass_share"] == 0.5


def test_weight_summary_of_the_paced_weights():
    correct, trials = torch.tensor([0, 2, 4, 4]), torch.tensor([4, 4, 4, 8])
    pass_rates = correct / trials
    summary = weight_summary(pass_rates, curriculum_weights(correct, trials))
    assert summary["frontier_weight_share"] == 1.0  # the kernel puts no mass at p = 0 or 1
    assert summary["weight_share_p0"] == summary["weight_share_p1"] == 0.0
    posterior = weight_summary(pass_rates, curriculum_weights(correct, trials, posterior=True))
    assert 0.0 < posterior["weight_share_p0"] < 0.25 and posterior["frontier_weight_share"] < 1.0


def test_weight_summary_rejects_bad_input():
    with pytest.raises(ValueError, match="3 pass rates but 2 weights"):
        weight_summary([0.0, 0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="pass rate 1.5 at index 0"):
        weight_summary([1.5], [1.0])
    with pytest.raises(ValueError, match="at least one problem"):
        weight_summary([], [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensors_stay_on_their_device():
    p = torch.tensor([0.0, 0.5, 1.0], device="cuda")
    assert beta_weight(p).device == p.device
    correct, trials = torch.tensor([0, 2, 4], device="cuda"), torch.tensor([4, 4, 4], device="cuda")
    assert expected_beta_weight(correct, trials).device == p.device
    weights = curriculum_weights(correct, trials, posterior=True)
    assert weights.device == p.device and weights.dtype == torch.float32
    assert weights.cpu().tolist() == curriculum_weights(correct.cpu(), trials.cpu(), posterior=True).tolist()
    assert normalize_to_dataset_mean(weights, weights).device == p.device
