"""The student's output projection fused with the divergence: logits one tile at a time.

The unfused step runs the whole student, keeps [tokens, V] logits for every position, prompt
included, and ``losses.distillation_loss`` reads them chunk by chunk. At a 152k vocabulary that
tensor and its gradient are 2.3 GiB per 8,192-token sequence, more than the rest of a small
student's activations. Here the student stops at its final hidden states, and only the response
positions go through the output projection, ``chunk_tokens`` rows at a time: each tile's logits,
divergence and gradient are computed and freed before the next, so neither [tokens, V] logits
nor their gradient ever exist whole.

The gradients are computed in the forward pass, tile by tile, and the backward pass only scales
them by the incoming gradient (the step's ``world / normalizer`` and any fp16 loss scale): the
projection costs three matmuls per tile, as unfused, and nothing is recomputed. The weight's
gradient is accumulated in float32 for a half-precision weight (one [V, H] buffer) and returned
by ``backward``, so ZeRO-3's gradient hooks reduce it as they would a Linear's.

DeepSpeed ships the pattern as ``TiledFusedLogitsLoss`` (``runtime/sequence_parallel/ulysses_sp``):
it also runs the backward inside the forward, but it applies the incoming gradient to the
hidden states' gradient only, not to the parameters' (it assumes 1.0: a ``loss.backward()``).
Our step backpropagates ``loss * world_size`` with ``scale_wrt_gas=False``, and fp16 scales
the loss, so the weight's gradient would be wrong by that factor; and its ``fn`` returns a loss
per tile, while a distillation tile also needs the teacher's rows of that tile (dense or top-k)
and each row's curriculum weight. Hence this module: the same idea, written once for the seven
divergences, dense and sparse teachers (``losses.LossStep`` and ``losses.chunk_gradient``).

``student_loss`` runs a Hugging Face causal LM this way without changing its code: for one call
the output layer's ``forward`` is the fused loss. Under ZeRO-3 the layer's own hooks gather its
weight once for the call (tied embeddings included: the gathered weight is the shared one) and
again for the backward, as for any layer; the model's other layers run as always.
"""

from __future__ import annotations

import contextlib

import torch

from paced_ds.distill.answers import HiddenAnswer, TopKAnswer, top_k
from paced_ds.distill.losses import LossStep, _TeacherRows, chunk_gradient
from paced_ds.errors import UserError

# Rows per tile when loss.chunk_tokens is 0: about this many logits (float32: 32 MiB on the CPU, 128 MiB on a
# GPU). Larger than the unfused chunk, because each tile also adds its [V, H] weight-gradient product, which
# wants many rows to be efficient; tools/bench_long.py measures it.
CPU_TILE_ELEMENTS = 2**23
GPU_TILE_ELEMENTS = 2**25


def default_tile_tokens(vocab_size: int, device: torch.device | str) -> int:
    """Rows per tile of ``fused_distillation_loss``: about *_TILE_ELEMENTS logits, at least 1."""
    elements = CPU_TILE_ELEMENTS if torch.device(device).type == "cpu" else GPU_TILE_ELEMENTS
    return max(1, elements // vocab_size)


class _FusedDivergenceSum(torch.autograd.Function):
    """(sum_i w_i div(h_i W^T + b), sum_i div(h_i W^T + b)) over the selected rows of the hidden
    states, tile by tile, with the gradients of the first sum computed on the way (module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows_b, rows_t, row_weights, divergence, params, tile_tokens, form,
                vocab, *teacher_tensors):
        batch_size, tokens, width = hidden.shape
        flat = hidden.reshape(batch_size * tokens, width)
        row_ids = rows_b * tokens + rows_t
        full_weight, full_bias = weight, bias  # the padded vocabulary's rows: the gradients' shape
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
        teacher = _TeacherRows(form, teacher_tensors, vocab, rows_b, rows_t)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        accumulate = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_flat = torch.zeros_like(flat) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if want_bias else None
        weighted_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        plain_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, row_ids.numel(), tile_tokens):
            end = start + tile_tokens
            rows = flat.index_select(0, row_ids[start:end]).detach()
            logits = torch.nn.functional.linear(rows, weight.detach(), None if bias is None else bias.detach())
            if want_hidden or want_weight or want_bias:
                div, grad = chunk_gradient(divergence, params, logits, teacher.chunk(start, end),
                                           row_weights[start:end], with_divergence=True)
                grad = grad.to(weight.dtype)
                if want_hidden:
                    grad_flat.index_copy_(0, row_ids[start:end], grad @ weight.detach())
                if want_weight and accumulate == weight.dtype:
                    grad_weight.addmm_(grad.T, rows)
                elif want_weight:
                    grad_weight += (grad.T @ rows).to(accumulate)
                if want_bias:
                    grad_bias += grad.sum(0, dtype=accumulate)
            else:
                div = divergence(logits, teacher.chunk(start, end), **params)
            weighted_sum += (div.detach() * row_weights[start:end]).sum()
            plain_sum += div.detach().sum()
            del logits
        ctx.grads = (None if grad_flat is None else grad_flat.view_as(hidden), grad_weight, grad_bias)
        ctx.full = [None if full is None else (full.shape[0], full.dtype) for full in (full_weight, full_bias)]
        ctx.teacher_inputs = len(teacher_tensors)
        dtype = torch.float64 if torch.float64 in (hidden.dtype, row_weights.dtype) else torch.float32
        plain_sum = plain_sum.to(dtype)
        ctx.mark_non_differentiable(plain_sum)
        return weighted_sum.to(dtype), plain_sum

    @staticmethod
    def backward(ctx, grad_weighted_sum, _grad_plain_sum):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # the buffers go with this call
        outputs = [None] * (11 + ctx.teacher_inputs)
        if grad_hidden is not None and ctx.needs_input_grad[0]:
            outputs[0] = grad_hidden * grad_weighted_sum.to(grad_hidden.dtype)
        for index, grad in ((1, grad_weight), (2, grad_bias)):
            if grad is not None and ctx.needs_input_grad[index]:
                rows, dtype = ctx.full[index - 1]
                outputs[index] = _pad_rows((grad * grad_weighted_sum.to(grad.dtype)).to(dtype), rows)
        return tuple(outputs)


def _pad_rows(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """``grad`` with zero rows appended up to ``rows`` (the output layer's padded vocabulary)."""
    if grad.shape[0] == rows:
        return grad
    return torch.cat([grad, grad.new_zeros((rows - grad.shape[0], *grad.shape[1:]))])


def fused_distillation_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher, response_mask: torch.Tensor,
                            sample_weights: torch.Tensor | None, *, bias: torch.Tensor | None = None,
                            vocab: int | None = None, kind: str = "forward_kl", temperature: float = 1.0,
                            normalizer: float | None = None, chunk_tokens: int | None = None, **params):
    """``losses.distillation_loss`` of the logits ``hidden @ weight[:vocab].T (+ bias[:vocab])``,
    which never exist whole (module doc): the same contract, loss and stats.

    hidden: [B, T, H], the student's final hidden states. weight: [V', H] and bias: [V'] or
        None, its output layer's (V' >= vocab rows: a vocabulary padded past the tokenizer's
        is cut to ``vocab``, default V'). teacher, response_mask, sample_weights, kind,
        temperature, normalizer, params: as ``distillation_loss``'s, the teacher's vocabulary
        ``vocab``.
    chunk_tokens: response rows per tile; None picks ``default_tile_tokens(vocab, device)``.
    """
    if hidden.dim() != 3 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_distillation_loss: hidden states {tuple(hidden.shape)} must be [batch, tokens, H] "
                         f"and the output weight {tuple(weight.shape)} [V, H]")
    vocab = weight.shape[0] if vocab is None else vocab
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"fused_distillation_loss: vocab {vocab} must be in [1, {weight.shape[0]}] (the output rows)")
    if chunk_tokens is None:
        chunk_tokens = default_tile_tokens(vocab, hidden.device)
    step = LossStep((*hidden.shape[:2], vocab), hidden.dtype, hidden.device, teacher, response_mask, sample_weights,
                    kind, temperature, normalizer, chunk_tokens, params)
    weighted_sum, plain_sum = _FusedDivergenceSum.apply(
        hidden, weight, bias, step.rows_b, step.rows_t, step.row_weights, step.divergence, step.params,
        step.chunk_tokens, step.form, vocab, *step.teacher_tensors)
    return step.result(weighted_sum, plain_sum)


@contextlib.contextmanager
def _output_layer_returns(model, fn):
    """For the duration, ``model``'s output layer returns ``fn(hidden_states, layer)`` instead of
    its logits (an instance attribute shadows the class's ``forward``; hooks still run)."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layer is None or not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise UserError(f"loss.fused=true needs a model with an output layer (get_output_embeddings); "
                        f"{type(model).__name__} has none: set loss.fused=false")
    layer.forward = lambda hidden_states: fn(hidden_states, layer)
    try:
        yield
    finally:
        del layer.forward


def student_loss(student, input_ids: torch.Tensor, attention_mask: torch.Tensor, teacher, response_mask,
                 sample_weights, *, vocab: int, position_ids: torch.Tensor | None = None, **loss_args):
    """Run the student (a DeepSpeed engine or a Hugging Face causal LM) on one micro-batch with
    its output layer fused into the divergence: ``fused_distillation_loss``'s (loss, stats).
    ``loss_args``: kind, temperature, normalizer, chunk_tokens and the divergence's parameters;
    ``position_ids``: the positions of a sequence-parallel shard (``models/ulysses.py``)."""
    model = getattr(student, "module", student)
    result = {}

    def fused(hidden, layer):
        result["value"] = fused_distillation_loss(hidden, layer.weight, teacher, response_mask, sample_weights,
                                                  bias=getattr(layer, "bias", None), vocab=vocab, **loss_args)
        return result["value"][0]

    positions = {} if position_ids is None else {"position_ids": position_ids}
    with _output_layer_returns(model, fused):
        output = student(input_ids=input_ids, attention_mask=attention_mask, **positions)
    loss, stats = result["value"]
    # The model's own result, not `loss`: under ZeRO-3 the layer's hooks wrap its output (a new tensor of the
    # same value) to gather the layer's weight again in backward.
    returned = output.logits
    if not (isinstance(returned, torch.Tensor) and returned.dim() == 0 and torch.equal(returned.detach(),
                                                                                      loss.detach())):
        raise UserError(f"loss.fused=true: {type(model).__name__} changes its output layer's result (scaling or "
                        "soft-capping the logits), which the fused loss cannot follow: set loss.fused=false")
    return returned, stats


def teacher_answer(teacher, batch: dict, *, vocab: int, topk: int = 0, tile_tokens: int | None = None):
    """The teacher's answer for ``batch`` (input_ids, attention_mask, loss_mask), from its final
    hidden states at the scored positions only: the output layer never runs on a prompt position.

    ``topk`` > 0: a ``TopKAnswer`` whose top-k log-probabilities are taken a tile of
    ``tile_tokens`` rows at a time (``default_tile_tokens``), so no dense teacher tensor exists
    beyond a tile. 0: a ``HiddenAnswer``, the loss computing each tile's logits as it consumes
    them; under ZeRO-3 it holds a copy of the output layer's weight (gathered once per answer,
    [V, H]), as a dense answer of more than H positions would take more.
    ``teacher``: a DeepSpeed engine (``.module``) or a Hugging Face causal LM; no gradient.
    ``batch["position_ids"]``, if given, goes to the model (a sequence-parallel shard's positions).
    """
    model = getattr(teacher, "module", teacher)
    device = batch["input_ids"].device
    mask = batch["loss_mask"].to(device).bool()
    per_sample = mask.sum(1).to(torch.int64).cpu()
    tile = tile_tokens or default_tile_tokens(vocab, device)
    result = {}

    def answer(hidden, layer):
        rows = hidden[mask]
        weight, bias = layer.weight[:vocab], None if getattr(layer, "bias", None) is None else layer.bias[:vocab]
        if topk:
            k = min(topk, vocab)
            parts = [top_k(torch.log_softmax(torch.nn.functional.linear(rows[start:start + tile], weight, bias)
                                             .float(), dim=-1), topk) for start in range(0, len(rows), tile)]
            parts = parts or [(torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), torch.zeros(0))]  # none scored
            result["value"] = TopKAnswer(*(torch.cat([part[j] for part in parts]) for j in range(3)), per_sample, vocab)
        else:
            if hasattr(layer.weight, "ds_id"):  # ZeRO-3 releases the gathered weight after this call: keep a copy
                weight, bias = weight.clone(), None if bias is None else bias.clone()
            result["value"] = HiddenAnswer(rows, weight, bias, per_sample)
        return rows.new_zeros(())

    positions = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    with torch.no_grad(), _output_layer_returns(model, answer):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].to(device), **positions)
    return result["value"]
