"""The fused output projection (distill/fused.py) against the whole-logits path it replaces:
the same losses and gradients for every divergence, dense and sparse teachers, temperatures 1
and 2, a vocabulary padded past the tokenizer's, a bias, tied and untied embeddings, frozen
embeddings; and a clear error for a model that changes its output layer's result."""

from __future__ import annotations

import pytest
import torch

from paced_ds.distill.answers import compress
from paced_ds.distill.fused import fused_distillation_loss, student_loss, teacher_answer
from paced_ds.distill.losses import DIVERGENCES, distillation_loss
from paced_ds.errors import UserError

BATCH, TOKENS, WIDTH, VOCAB, PADDED = 3, 9, 16, 40, 48  # rows VOCAB..PADDED-1: padding the tokenizer never uses
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}, "akl": {"mu": 0.4}}


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, TOKENS, WIDTH, generator=generator, requires_grad=True)
    weight = (torch.randn(PADDED, WIDTH, generator=generator) / WIDTH ** 0.5).requires_grad_(True)
    bias = (torch.randn(PADDED, generator=generator) * 0.1).requires_grad_(True)
    teacher = torch.randn(BATCH, TOKENS, VOCAB, generator=generator) * 2
    mask = torch.rand(BATCH, TOKENS, generator=generator) > 0.35
    mask[:, 0] = False  # a prompt position
    weights = torch.rand(BATCH, generator=generator) + 0.25
    return hidden, weight, bias, teacher, mask, weights


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_fused_equals_whole_logits(kind, temperature, sparse):
    hidden, weight, bias, teacher, mask, weights = inputs()
    answer = compress(teacher, mask, k=5) if sparse else teacher
    args = dict(kind=kind, temperature=temperature, normalizer=17.0, **PARAMS.get(kind, {}))
    logits = torch.nn.functional.linear(hidden, weight, bias)[..., :VOCAB]
    want, want_stats = distillation_loss(logits, answer, mask, weights, **args)
    want_grads = torch.autograd.grad(want * 3, (hidden, weight, bias))
    for tile in (1, 4, None):  # tiles of one row, of a few, and the default (every row at once here)
        got, stats = fused_distillation_loss(hidden, weight, answer, mask, weights, bias=bias, vocab=VOCAB,
                                             chunk_tokens=tile, **args)
        grads = torch.autograd.grad(got * 3, (hidden, weight, bias))  # an incoming gradient of 3 scales them all
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for key in want_stats:
            torch.testing.assert_close(stats[key].float(), want_stats[key].float(), rtol=1e-5, atol=1e-6)
        for name, grad, want_grad in zip(("hidden", "weight", "bias"), grads, want_grads):
            torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6, msg=f"{name}, tile {tile}")
        assert not grads[1][VOCAB:].any() and not grads[0][~mask].any()  # padding rows, prompt positions


def test_under_no_grad_the_loss_is_the_same_and_carries_no_graph():
    hidden, weight, _, teacher, mask, weights = inputs()
    with torch.no_grad():
        got, _ = fused_distillation_loss(hidden, weight, teacher, mask, weights, vocab=VOCAB)
    want, _ = distillation_loss((hidden @ weight.T)[..., :VOCAB], teacher, mask, weights)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)


def tiny_llama(tied: bool, vocab: int = PADDED, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=TOKENS,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("frozen_embeddings", [False, True], ids=["", "frozen_embeddings"])
def test_a_hugging_face_model_trains_the_same_fused(tied, frozen_embeddings):
    """Every parameter's gradient through ``student_loss`` equals the one through whole logits,
    for tied and untied output layers, a padded vocabulary and frozen embeddings."""
    _, _, _, teacher, mask, weights = inputs(1)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(2))
    attention = torch.ones(BATCH, TOKENS, dtype=torch.long)
    attention[0, -2:] = 0  # right padding in one row
    mask = mask & attention.bool()
    grads = []
    for fused in (False, True):
        model = tiny_llama(tied)
        if frozen_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        args = dict(kind="jsd", temperature=2.0, normalizer=11.0, beta=0.3)
        if fused:
            loss, _ = student_loss(model, ids, attention, teacher, mask, weights, vocab=VOCAB, chunk_tokens=5, **args)
        else:
            logits = model(input_ids=ids, attention_mask=attention).logits[..., :VOCAB]
            loss, _ = distillation_loss(logits, teacher, mask, weights, **args)
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert ("model.embed_tokens.weight" in grads[0]) is not frozen_embeddings
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_that_changes_its_logits_is_refused():
    model = tiny_llama(tied=False)
    forward = type(model).forward

    def scaled(self, *args, **kwargs):  # soft-capping, as Gemma 2 does after its output layer
        output = forward(self, *args, **kwargs)
        output.logits = 30 * torch.tanh(output.logits / 30)
        return output

    model.forward = scaled.__get__(model)
    _, _, _, teacher, mask, weights = inputs()
    ids = torch.zeros(BATCH, TOKENS, dtype=torch.long)
    with pytest.raises(UserError, match="loss.fused=false"):
        student_loss(model, ids, torch.ones_like(ids), teacher, mask, weights, vocab=VOCAB)
    assert "forward" not in model.lm_head.__dict__  # the output layer is itself again


def scored_batch(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    attention = torch.ones(BATCH, TOKENS, dtype=torch.long)
    attention[1, -3:] = 0
    loss_mask = (torch.arange(TOKENS) >= 4) & attention.bool()
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def test_teacher_top_k_from_tiles_is_top_k_of_the_whole_logits():
    teacher, batch = tiny_llama(tied=False, seed=1).eval(), scored_batch()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :VOCAB]
    want = compress(logits, batch["loss_mask"], 6)
    got = teacher_answer(teacher, batch, vocab=VOCAB, topk=6, tile_tokens=4)
    assert torch.equal(got.per_sample, want.per_sample) and torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.tail, want.tail, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_student", "whole_student_logits"])
def test_a_dense_teacher_answered_from_hidden_states_is_the_dense_teacher(fused):
    """The ``HiddenAnswer`` (logits computed a tile at a time in the loss) gives the loss and the
    student's gradient of the whole teacher logits, micro-batch by micro-batch (``samples``)."""
    teacher, student, batch = tiny_llama(tied=True, seed=1).eval(), tiny_llama(tied=False, seed=2), scored_batch()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :VOCAB]
    answer = teacher_answer(teacher, batch, vocab=VOCAB)
    assert answer.hidden.shape == (int(batch["loss_mask"].sum()), WIDTH) and answer.vocab == VOCAB
    weights = torch.tensor([1.0, 0.5, 2.0])
    for rows in (slice(0, 1), slice(1, 3)):
        results = []
        for given in (logits[rows], answer.samples(rows)):
            student.zero_grad()
            args = dict(kind="akl", temperature=2.0, normalizer=9.0, chunk_tokens=2)
            sub = {key: value[rows] for key, value in batch.items()}
            if fused:
                loss, _ = student_loss(student, sub["input_ids"], sub["attention_mask"], given, sub["loss_mask"],
                                       weights[rows], vocab=VOCAB, **args)
            else:
                out = student(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits[..., :VOCAB]
                loss, _ = distillation_loss(out, given, sub["loss_mask"], weights[rows], **args)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
        for got, want in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
