"""Divergences against float64 closed forms, their endpoints, and the chunked trainer loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paced_ds.distill import losses
from paced_ds.distill.losses import (
    DIVERGENCES,
    akl,
    distillation_loss,
    forward_kl,
    get_divergence,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)

NEG_INF = float("-inf")
VOCAB = 13


# ---- float64 references, written from the formulas (numpy, independent of the module) ----

def np_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_v p log(p / q), with 0 log(0 / q) = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def ref_forward_kl(p_s, p_t):
    return np_kl(p_t, p_s)


def ref_reverse_kl(p_s, p_t):
    return np_kl(p_s, p_t)


def ref_jsd(p_s, p_t, beta=0.5):
    """GKD's generalized JSD (Agarwal et al. 2024, eq. 1), unscaled, as TRL computes it."""
    if beta == 0:
        return np_kl(p_t, p_s)
    if beta == 1:
        return np_kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)


def ref_tvd(p_s, p_t):
    return 0.5 * np.abs(p_t - p_s).sum(axis=-1)


def ref_skew_kl(p_s, p_t, alpha=0.1):
    return np_kl(p_t, alpha * p_t + (1 - alpha) * p_s)


def ref_skew_reverse_kl(p_s, p_t, alpha=0.1):
    return np_kl(p_s, alpha * p_s + (1 - alpha) * p_t)


def ref_akl_head_weight(p_s, p_t, mu):
    """Wu et al.: sort the teacher, head = smallest prefix with teacher mass >= mu."""
    weights = []
    for s_row, t_row in zip(p_s.reshape(-1, p_s.shape[-1]), p_t.reshape(-1, p_t.shape[-1])):
        order = np.argsort(-t_row, kind="stable")
        cumulative = np.cumsum(t_row[order])
        head_size = int(np.searchsorted(cumulative, mu, side="left")) + 1 if mu > 0 else 0
        gap = np.abs(t_row - s_row)[order]
        total = gap.sum()
        weights.append(gap[:head_size].sum() / total if total > 0 else 0.0)
    return np.array(weights).reshape(p_s.shape[:-1])


def ref_akl(p_s, p_t, mu=0.5):
    g_head = ref_akl_head_weight(p_s, p_t, mu)
    return g_head * np_kl(p_t, p_s) + (1 - g_head) * np_kl(p_s, p_t)


REFERENCES = {
    "forward_kl": ref_forward_kl,
    "reverse_kl": ref_reverse_kl,
    "jsd": ref_jsd,
    "tvd": ref_tvd,
    "skew_kl": ref_skew_kl,
    "skew_reverse_kl": ref_skew_reverse_kl,
    "akl": ref_akl,
}


def logits_pair(case: str, shape=(4, VOCAB), seed=0):
    """(student, teacher) float32 logits for a named case."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator) * 2
    teacher = torch.randn(shape, generator=generator) * 2
    if case == "peaked":
        student, teacher = student * 8, teacher * 8
    elif case == "near_uniform":
        student, teacher = student * 0.01, teacher * 0.01
    elif case == "teacher_zeros":  # teacher gives some tokens exactly 0
        teacher[..., ::3] = NEG_INF
    elif case == "padded_vocab":  # both mask the same padded tail of the vocabulary
        student[..., -4:] = NEG_INF
        teacher[..., -4:] = NEG_INF
    return student, teacher


# Reverse KL (and AKL, which contains it) are +inf where only the teacher has zeros.
FINITE_WITH_TEACHER_ZEROS = ["forward_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
CASES = [(kind, case) for kind in DIVERGENCES for case in ("random", "peaked", "near_uniform", "padded_vocab")]
CASES += [(kind, "teacher_zeros") for kind in FINITE_WITH_TEACHER_ZEROS]


@pytest.mark.parametrize("kind, case", CASES)
def test_divergence_matches_float64_formula(kind, case):
    student, teacher = logits_pair(case)
    got = DIVERGENCES[kind](student, teacher)
    expected = REFERENCES[kind](np_softmax(student.numpy()), np_softmax(teacher.numpy()))
    assert got.dtype == torch.float32 and got.shape == student.shape[:-1]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_divergence_with_temperature(kind):
    student, teacher = logits_pair("random")
    got = DIVERGENCES[kind](student, teacher, temperature=2.5)
    expected = REFERENCES[kind](np_softmax(student.numpy(), 2.5), np_softmax(teacher.numpy(), 2.5))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, DIVERGENCES[kind](student / 2.5, teacher / 2.5))


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_divergence_of_identical_distributions_is_zero(kind):
    student, _ = logits_pair("random")
    shifted = student + 3.0  # a constant shift is the same distribution
    torch.testing.assert_close(DIVERGENCES[kind](student, shifted), torch.zeros(4), atol=1e-6, rtol=0)


def test_reverse_kl_where_only_the_teacher_has_zeros_is_large_not_nan():
    student, teacher = logits_pair("teacher_zeros")
    value = reverse_kl(student, teacher)
    student_mass_on_zeros = torch.softmax(student, -1)[..., ::3].sum(-1)
    assert torch.isfinite(value).all()
    assert (value > 0.5e4 * student_mass_on_zeros).all()


# ---- endpoints ----

def test_jsd_endpoints_are_the_two_kls():
    student, teacher = logits_pair("random")
    torch.testing.assert_close(jsd(student, teacher, beta=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(jsd(student, teacher, beta=1.0), reverse_kl(student, teacher))


def test_jsd_vanishes_towards_its_endpoints_which_are_defined_as_the_kls():
    """The generalized JSD tends to 0 as beta -> 0 or 1 (linearly); TRL defines the
    endpoints themselves as the two KLs, and so do we."""
    student, teacher = (x.double() for x in logits_pair("random"))
    for endpoint in (0.0, 1.0):
        values = [jsd(student, teacher, beta=abs(endpoint - step)).max().item() for step in (1e-3, 1e-5)]
        assert values[1] < values[0] / 50 and values[1] < 1e-4
    torch.testing.assert_close(jsd(student, teacher, beta=0.0), forward_kl(student, teacher))


def test_jsd_at_half_is_the_textbook_jsd():
    student, teacher = logits_pair("random")
    p_s, p_t = np_softmax(student.numpy()), np_softmax(teacher.numpy())
    m = 0.5 * (p_s + p_t)
    textbook = 0.5 * np_kl(p_t, m) + 0.5 * np_kl(p_s, m)
    np.testing.assert_allclose(jsd(student, teacher, beta=0.5).numpy(), textbook, rtol=1e-4)
    assert (jsd(student, teacher).numpy() <= np.log(2) + 1e-6).all()


def test_skew_kl_endpoints():
    student, teacher = logits_pair("random")
    torch.testing.assert_close(skew_kl(student, teacher, alpha=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=0.0), reverse_kl(student, teacher))
    torch.testing.assert_close(skew_kl(student, teacher, alpha=1.0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=1.0), torch.zeros(4), atol=1e-6, rtol=0)
    # bounded by -log(alpha) where forward KL is not
    student, teacher = logits_pair("teacher_zeros")
    assert (skew_kl(teacher, student, alpha=0.1) <= -np.log(0.1) + 1e-5).all()


def test_tvd_is_in_zero_one_and_one_for_disjoint_supports():
    for case in ("random", "peaked", "near_uniform", "teacher_zeros"):
        value = tvd(*logits_pair(case))
        assert ((value >= 0) & (value <= 1)).all()
    student = torch.tensor([[0.0, NEG_INF, NEG_INF], [NEG_INF, 1.0, 2.0]])
    teacher = torch.tensor([[NEG_INF, 0.0, 3.0], [5.0, NEG_INF, NEG_INF]])
    torch.testing.assert_close(tvd(student, teacher), torch.ones(2))


@pytest.mark.parametrize("kind, param", [("jsd", "beta"), ("skew_kl", "alpha"), ("skew_reverse_kl", "alpha"),
                                         ("akl", "mu")])
def test_parameter_outside_unit_interval_is_an_error(kind, param):
    student, teacher = logits_pair("random")
    with pytest.raises(ValueError, match=f"{kind}: {param} must be in \\[0, 1\\], got 1.5"):
        DIVERGENCES[kind](student, teacher, **{param: 1.5})


# ---- AKL ----

@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("case", ["random", "peaked", "near_uniform", "padded_vocab"])
def test_akl_mixing_matches_direct_sort(mu, case):
    student, teacher = logits_pair(case)
    p_s, p_t = np_softmax(student.numpy()), np_softmax(teacher.numpy())
    np.testing.assert_allclose(akl(student, teacher, mu=mu).numpy(), ref_akl(p_s, p_t, mu), rtol=1e-4, atol=1e-5)


def test_akl_head_longer_than_the_first_search():
    # near-uniform over 1000 tokens: the head holds ~500 tokens, past the first top-64 look
    student, teacher = logits_pair("near_uniform", shape=(6, 1000))
    teacher[:3] *= 100  # some tokens with short heads in the same batch
    p_s, p_t = np_softmax(student.numpy()), np_softmax(teacher.numpy())
    np.testing.assert_allclose(akl(student, teacher, mu=0.5).numpy(), ref_akl(p_s, p_t, 0.5), rtol=1e-4, atol=1e-7)


def test_akl_endpoints():
    student, teacher = logits_pair("random")
    torch.testing.assert_close(akl(student, teacher, mu=1.0), forward_kl(student, teacher))
    torch.testing.assert_close(akl(student, teacher, mu=0.0), reverse_kl(student, teacher))


def test_akl_ties_with_the_last_head_token_join_the_head():
    # uniform teacher: the head of mass 0.3 is 3 tokens by position, all 8 with ties,
    # so g_head = 1 and AKL is the forward KL
    student = torch.randn(2, 8)
    teacher = torch.zeros(2, 8)
    torch.testing.assert_close(akl(student, teacher, mu=0.3), forward_kl(student, teacher))


def test_akl_gradient_treats_the_weights_as_constants():
    student, teacher = logits_pair("random")
    student.requires_grad_(True)
    akl(student, teacher, mu=0.5).sum().backward()
    g_head = torch.as_tensor(
        ref_akl_head_weight(np_softmax(student.detach().numpy()), np_softmax(teacher.numpy()), 0.5),
        dtype=torch.float32,
    )
    fixed = student.detach().clone().requires_grad_(True)
    (g_head * forward_kl(fixed, teacher) + (1 - g_head) * reverse_kl(fixed, teacher)).sum().backward()
    torch.testing.assert_close(student.grad, fixed.grad)


# ---- gradients ----

SMOOTH_KINDS = [kind for kind in DIVERGENCES if kind != "akl"]  # AKL's weights are detached on purpose


@pytest.mark.parametrize("kind", SMOOTH_KINDS)
@pytest.mark.parametrize("case", ["random", "padded_vocab"])
def test_divergence_gradcheck(kind, case):
    student, teacher = (x.double() for x in logits_pair(case, shape=(2, 5)))
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: DIVERGENCES[kind](s, teacher, temperature=1.5), (student,))


@pytest.mark.parametrize("kind", SMOOTH_KINDS)
def test_distillation_loss_gradcheck(kind):
    student, teacher = (x.double() for x in logits_pair("random", shape=(2, 3, 5)))
    student.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def loss(s):
        return distillation_loss(s, teacher, mask, weights, kind=kind, chunk_tokens=2, temperature=1.5)[0]

    assert torch.autograd.gradcheck(loss, (student,))


# ---- the trainer's loss ----

def direct_loss(student, teacher, mask, weights, kind, normalizer=None, **params):
    """The same loss written the obvious way: full tensors, autograd."""
    div = DIVERGENCES[kind](student, teacher, **params)
    total = (div * mask * weights[:, None]).sum()
    return total / (mask.sum().clamp_min(1) if normalizer is None else normalizer)


def batch(seed=0, batch_size=3, tokens=7, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch_size, tokens, vocab, generator=generator) * 2).requires_grad_(True)
    teacher = torch.randn(batch_size, tokens, vocab, generator=generator) * 2
    mask = torch.rand(batch_size, tokens, generator=generator) > 0.3
    weights = torch.rand(batch_size, generator=generator) + 0.1
    return student, teacher, mask, weights


@pytest.mark.parametrize("kind", list(DIVERGENCES))
@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 1000, None])
def test_chunked_loss_and_gradient_equal_unchunked(kind, chunk_tokens):
    student, teacher, mask, weights = batch()
    loss, stats = distillation_loss(student, teacher, mask, weights, kind=kind, chunk_tokens=chunk_tokens)
    (grad,) = torch.autograd.grad(loss, student)
    expected = direct_loss(student, teacher, mask.float(), weights, kind)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert stats["tokens"].item() == mask.sum().item()
    torch.testing.assert_close(stats["weighted_divergence_sum"], expected.detach() * mask.sum())


def test_loss_parameters_reach_the_divergence():
    student, teacher, mask, weights = batch()
    loss, _ = distillation_loss(student, teacher, mask, weights, kind="jsd", beta=0.2, temperature=2.0)
    expected = direct_loss(student, teacher, mask.float(), weights, "jsd", beta=0.2, temperature=2.0)
    torch.testing.assert_close(loss, expected)


def test_mask_and_sample_weights():
    student, teacher, mask, _ = batch()
    weights = torch.tensor([1.0, 0.0, 3.0])
    loss, stats = distillation_loss(student, teacher, mask, weights, normalizer=10.0)
    loss.backward()
    div = forward_kl(student.detach(), teacher)
    expected = sum(weights[b] * div[b, t] for b in range(3) for t in range(7) if mask[b, t]) / 10.0
    torch.testing.assert_close(loss, expected)
    assert (student.grad[~mask] == 0).all()  # masked-out positions get no gradient
    assert (student.grad[1] == 0).all()  # a sample of weight 0 gets none either
    assert (student.grad[mask & (torch.arange(3)[:, None] != 1)].abs().sum(-1) > 0).all()
    torch.testing.assert_close(stats["divergence_sum"], div[mask].sum())
    torch.testing.assert_close(stats["weight_sum"], (weights[:, None] * mask).sum())


def test_float_mask_and_default_weights_and_normalizer():
    student, teacher, mask, _ = batch()
    loss, stats = distillation_loss(student, teacher, mask.float(), None)
    torch.testing.assert_close(loss, forward_kl(student, teacher)[mask].mean())
    assert stats["tokens"].item() == mask.sum().item()


def test_gradient_accumulation_4x1_equals_1x4():
    """A global normaliser: 4 micro-batches of 1 sample accumulate the 1 x 4 gradient."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, 8, generator=generator)
    teacher = torch.randn(4, 6, VOCAB, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]).bool()
    weights = torch.tensor([0.2, 1.0, 0.7, 0.0])
    head = torch.randn(8, VOCAB, generator=generator)
    global_tokens = float(mask.sum())  # the trainer all-reduces this over micro-batches and ranks

    accumulated = head.clone().requires_grad_(True)
    micro_losses = []
    for i in range(4):
        loss, _ = distillation_loss(hidden[i : i + 1] @ accumulated, teacher[i : i + 1], mask[i : i + 1],
                                    weights[i : i + 1], kind="jsd", normalizer=global_tokens)
        loss.backward()
        micro_losses.append(loss.detach())

    whole = head.clone().requires_grad_(True)
    loss, _ = distillation_loss(hidden @ whole, teacher, mask, weights, kind="jsd")
    loss.backward()
    torch.testing.assert_close(accumulated.grad, whole.grad)
    torch.testing.assert_close(sum(micro_losses), loss.detach())


def test_strided_logits_need_no_copy_and_give_the_same_loss():
    student, teacher, mask, weights = batch(tokens=8)
    expected, _ = distillation_loss(student[:, :-1].contiguous(), teacher[:, 1:].contiguous(), mask[:, 1:], weights)
    (expected_grad,) = torch.autograd.grad(expected, student)
    for student_view, teacher_view in [
        (student[:, :-1], teacher[:, 1:]),  # the next-token shift
        (student.transpose(0, 1).contiguous().transpose(0, 1)[:, :-1], teacher[:, 1:]),  # batch stride < token stride
    ]:
        loss, _ = distillation_loss(student_view, teacher_view, mask[:, 1:], weights, chunk_tokens=3)
        (grad,) = torch.autograd.grad(loss, student)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)


def test_backward_saves_only_the_inputs():
    student, teacher, mask, weights = batch(tokens=50, vocab=100)
    loss, _ = distillation_loss(student, teacher, mask, weights, chunk_tokens=4)
    chunked_node = loss.grad_fn.next_functions[0][0]
    saved = chunked_node.saved_tensors
    assert any(tensor is student or tensor.data_ptr() == student.data_ptr() for tensor in saved)
    assert sum(tensor.numel() for tensor in saved) <= 2 * student.numel() + 3 * mask.numel()


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_padded_vocabulary_gives_finite_loss_and_gradient(kind):
    student, teacher, mask, weights = batch()
    with torch.no_grad():
        student[..., -3:] = NEG_INF
    teacher[..., -3:] = NEG_INF
    loss, _ = distillation_loss(student, teacher, mask, weights, kind=kind, chunk_tokens=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert (student.grad[..., -3:] == 0).all()


def test_empty_mask_gives_zero_loss_and_gradient():
    student, teacher, mask, weights = batch()
    loss, stats = distillation_loss(student, teacher, torch.zeros_like(mask), weights)
    loss.backward()
    assert loss.item() == 0.0 and stats["tokens"].item() == 0
    assert (student.grad == 0).all()


def test_teacher_gets_no_gradient():
    student, teacher, mask, weights = batch()
    teacher.requires_grad_(True)
    loss, _ = distillation_loss(student, teacher, mask, weights, kind="reverse_kl")
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_no_grad_evaluation():
    student, teacher, mask, weights = batch()
    with torch.no_grad():
        loss, _ = distillation_loss(student, teacher, mask, weights, kind="akl")
    torch.testing.assert_close(loss, direct_loss(student, teacher, mask.float(), weights, "akl").detach())


# ---- dtypes ----

@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_bf16_inputs_give_float32(kind):
    student, teacher = (x.bfloat16() for x in logits_pair("random"))
    value = DIVERGENCES[kind](student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, DIVERGENCES[kind](student.float(), teacher.float()))


def test_bf16_distillation_loss():
    student, teacher, mask, weights = batch()
    student_bf16 = student.detach().bfloat16().requires_grad_(True)
    loss, stats = distillation_loss(student_bf16, teacher.bfloat16(), mask, weights, kind="tvd", chunk_tokens=5)
    loss.backward()
    assert loss.dtype == torch.float32 and stats["divergence_sum"].dtype == torch.float32
    assert student_bf16.grad.dtype == torch.bfloat16
    expected = direct_loss(student_bf16.detach().float().requires_grad_(True), teacher.bfloat16().float(),
                           mask.float(), weights, "tvd")
    torch.testing.assert_close(loss, expected)


# ---- errors ----

def test_unknown_kind_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="loss.kind='kl' is not a divergence; choose one of: forward_kl, "):
        get_divergence("kl")
    student, teacher, mask, weights = batch()
    with pytest.raises(ValueError, match="akl"):
        distillation_loss(student, teacher, mask, weights, kind="klx")


def test_unknown_parameter_is_an_error():
    student, teacher, mask, weights = batch()
    with pytest.raises(ValueError, match="loss.kind=jsd has no parameter 'alpha'; its parameters: beta"):
        distillation_loss(student, teacher, mask, weights, kind="jsd", alpha=0.1)


def test_bad_arguments_are_programming_errors_not_user_errors():
    student, teacher, mask, weights = batch()
    with pytest.raises(ValueError, match="vocabulary"):
        forward_kl(student[..., :-1], teacher)
    with pytest.raises(ValueError, match="must both be"):
        distillation_loss(student, teacher[..., :-1], mask, weights)
    with pytest.raises(ValueError, match="response_mask"):
        distillation_loss(student, teacher, mask[:, :-1], weights)
    with pytest.raises(ValueError, match="sample_weights"):
        distillation_loss(student, teacher, mask, weights[:-1])
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, mask, weights, temperature=0.0)
    with pytest.raises(ValueError, match="normalizer"):
        distillation_loss(student, teacher, mask, weights, normalizer=0)


def test_default_chunk_tokens_scales_with_the_vocabulary():
    assert losses.default_chunk_tokens(32000, "cpu") == losses.CPU_CHUNK_ELEMENTS // 32000
    assert losses.default_chunk_tokens(10**9, "cpu") == 1
    assert losses.default_chunk_tokens(32768, "cuda") == 1024
