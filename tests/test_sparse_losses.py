"""A sparse (top-k + tail) teacher through every divergence, against the dense teacher it
stands for, and the generalized JSD against TRL's own implementation."""

from __future__ import annotations

import os

import pytest
import torch

from paced_ds.distill.answers import DenseAnswer, TopKAnswer, compress
from paced_ds.distill.losses import DIVERGENCES, TopKRows, distillation_loss

VOCAB = 37
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}, "akl": {"mu": 0.6}}


def expand(answer_ids, answer_logprobs, tail, vocab):
    """The dense distribution a sparse teacher stands for: its top-k log-probs as given, the
    tail mass spread evenly over the other tokens (what paced-ds 0.5 built before the loss)."""
    rest = vocab - answer_ids.shape[-1]
    fill = torch.log((tail / max(rest, 1)).clamp(min=1e-30)) if rest > 0 else torch.zeros_like(tail)
    full = fill[..., None].expand(*tail.shape, vocab).clone()
    full.scatter_(-1, answer_ids.long(), answer_logprobs)
    return full


def teacher_rows(tokens=6, k=5, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, VOCAB, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(tokens, VOCAB, generator=generator, dtype=torch.float64) * scale
    log_probs = torch.log_softmax(teacher, dim=-1)
    top = log_probs.topk(min(k, VOCAB), dim=-1)
    tail = (1 - top.values.exp().sum(-1)).clamp(min=0)
    return student, teacher, TopKRows(top.indices, top.values, tail, VOCAB)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_equals_expand_then_compute(kind, k, temperature):
    student, _, rows = teacher_rows(k=k)
    divergence = DIVERGENCES[kind]
    sparse = divergence(student, rows, temperature=temperature, **PARAMS.get(kind, {}))
    dense = divergence(student, expand(rows.ids, rows.logprobs, rows.tail, VOCAB), temperature=temperature,
                       **PARAMS.get(kind, {}))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_sparse_at_k_equal_to_the_vocabulary_is_the_full_divergence(kind):
    student, teacher, rows = teacher_rows(k=VOCAB)
    divergence = DIVERGENCES[kind]
    torch.testing.assert_close(divergence(student, rows, temperature=1.5, **PARAMS.get(kind, {})),
                               divergence(student, teacher, temperature=1.5, **PARAMS.get(kind, {})),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mu", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_sparse_akl_head_reaching_into_the_tail(mu):
    """Where the top-k hold less than mu, the head takes in the whole (tied) tail."""
    student, _, rows = teacher_rows(k=3, scale=0.5)  # flat teacher: 3 tokens hold little mass
    dense = expand(rows.ids, rows.logprobs, rows.tail, VOCAB)
    torch.testing.assert_close(DIVERGENCES["akl"](student, rows, mu=mu), DIVERGENCES["akl"](student, dense, mu=mu),
                               rtol=1e-6, atol=1e-9)


def batch_with_answer(k, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 9, VOCAB, generator=generator) * 2).to(dtype)
    teacher = (torch.randn(3, 9, VOCAB, generator=generator) * 2).to(dtype)
    mask = torch.rand(3, 9, generator=generator) > 0.4
    mask[1] = False  # a sample with nothing to score
    weights = torch.tensor([0.5, 2.0, 1.5])
    return student, teacher, mask, weights, compress(teacher, mask, k)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
@pytest.mark.parametrize("chunk_tokens", [1, 4, None])
def test_loss_and_gradient_with_a_topk_answer_equal_the_expanded_teacher(kind, chunk_tokens):
    student, _, mask, weights, answer = batch_with_answer(k=6)
    expanded = torch.zeros(*mask.shape, VOCAB)
    expanded[mask] = expand(answer.ids, answer.logprobs, answer.tail, VOCAB)
    results = []
    for teacher in (answer, expanded):
        logits = student.clone().requires_grad_(True)
        loss, stats = distillation_loss(logits, teacher, mask, weights, kind=kind, temperature=2.0,
                                        normalizer=17.0, chunk_tokens=chunk_tokens, **PARAMS.get(kind, {}))
        loss.backward()
        results.append((loss.detach(), stats["divergence_sum"], logits.grad))
    for sparse, dense in zip(*results):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_topk_answer_micro_batches_slice_whole_samples():
    student, _, mask, weights, answer = batch_with_answer(k=4)
    whole, _ = distillation_loss(student, answer, mask, weights, normalizer=10.0)
    parts = sum(distillation_loss(student[rows], answer.samples(rows), mask[rows], weights[rows], normalizer=10.0)[0]
                for rows in (slice(0, 1), slice(1, 2), slice(2, 3)))
    torch.testing.assert_close(parts, whole)
    assert answer.samples(slice(1, 2)).ids.shape[0] == 0


def test_dense_answer_with_its_own_mask_pairs_tokens_in_order():
    """Self-distillation: the teacher's sequences carry a longer prompt; the response tokens
    pair up in order, sample by sample."""
    student, teacher, mask, weights, _ = batch_with_answer(k=4)
    shift = 3
    shifted = torch.zeros(3, 9 + shift, VOCAB)
    shifted[:, shift:] = teacher
    shifted_mask = torch.zeros(3, 9 + shift, dtype=torch.bool)
    shifted_mask[:, shift:] = mask
    expected, _ = distillation_loss(student, teacher, mask, weights, kind="reverse_kl")
    loss, _ = distillation_loss(student, DenseAnswer(shifted, shifted_mask), mask, weights, kind="reverse_kl")
    torch.testing.assert_close(loss, expected)


def test_teacher_scoring_other_tokens_is_an_error():
    student, _, mask, weights, answer = batch_with_answer(k=4)
    other = mask.clone()
    other[0, 0] = not other[0, 0]
    with pytest.raises(ValueError, match="tokens per sample"):
        distillation_loss(student, answer, other, weights)
    wrong_vocab = TopKAnswer(answer.ids, answer.logprobs, answer.tail, answer.per_sample, VOCAB + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(student, wrong_vocab, mask, weights)


def test_bf16_student_with_topk_answer():
    student, _, mask, weights, answer = batch_with_answer(k=8, dtype=torch.bfloat16)
    logits = student.clone().requires_grad_(True)
    loss, _ = distillation_loss(logits, answer, mask, weights, kind="jsd")
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad).all()


# ---- the generalized JSD, measured against TRL ----

def trl_generalized_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="trl is a test dependency (setup.py extras 'test')")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer  # trl >= 1.0
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trls_generalized_jsd_loss_per_token(beta, temperature):
    trl_jsd = trl_generalized_jsd()
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, VOCAB, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(2, 5, VOCAB, generator=generator, dtype=torch.float64) * 2
    theirs = trl_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none").sum(-1)
    ours = DIVERGENCES["jsd"](student, teacher, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # and the trainer's loss is TRL's "batchmean" over the response tokens
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    labels = torch.where(mask, 1, -100)
    loss, _ = distillation_loss(student, teacher, mask, None, kind="jsd", beta=beta, temperature=temperature)
    torch.testing.assert_close(loss, trl_jsd(student, teacher, labels=labels, beta=beta, temperature=temperature),
                               rtol=1e-10, atol=1e-12)
