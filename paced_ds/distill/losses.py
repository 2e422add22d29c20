"""Token-level divergences between student and teacher, and the loss the trainer uses.

Two layers:

- Per-token divergences, plain functions
  ``f(student_logits, teacher, *, temperature=1.0, **its_params)`` returning one value
  per token (shape ``student_logits.shape[:-1]``). ``teacher`` is either dense logits
  (same shape as the student's) or sparse top-k rows (``TopKRows``: ids, log-probs at
  temperature 1 and the tail mass of each token). They compute in float32 whatever the
  input dtype (float64 inputs stay float64, for gradient checks). Both distributions are
  tempered by ``temperature`` here, the only place it is applied; no ``temperature**2``
  factor. Masking, weighting and reduction are not their business.
- ``distillation_loss``: picks the response tokens, weights each by its sample's weight,
  sums, and divides once by the token count of the whole optimizer step. It works in
  chunks of tokens and recomputes each chunk in backward, so no full float32
  [tokens, vocab] copy of either distribution ever exists; a sparse teacher stays sparse.

A sparse teacher is the distribution with its top-k probabilities as given and its tail
mass spread evenly over the other V - k tokens. Every divergence here is a sum over the
vocabulary of a term in (p_S,v, p_T,v), so the V - k tail tokens, which share one teacher
probability, are summed in closed form from the student's side: the teacher costs O(k)
per token, not O(V). With k = V nothing is approximated.

Teacher probabilities of exactly 0 and ``-inf`` logits (a masked, padded vocabulary)
give finite results: log-probabilities are floored at ``LOG_PROB_FLOOR``, below which
exp() is exactly 0, so ``0 * log 0`` terms are 0. A consequence: where one distribution
puts mass and the other has exactly none, the KL term is large (about
``1e4 * mass``) instead of ``inf``; mask the padded vocabulary in both logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from paced_ds.distill.answers import DenseAnswer, HiddenAnswer, TopKAnswer

# exp(-1e4) is exactly 0 in float32 and float64, so flooring changes no probability; it
# keeps -inf out of `0 * (log p - log q)` and out of logaddexp's gradient (no NaN).
LOG_PROB_FLOOR = -1.0e4
# The smallest probability a sparse teacher's tail token is given (as when it was expanded).
TAIL_PROBABILITY_FLOOR = 1e-30


@dataclass
class TopKRows:
    """A sparse teacher for a set of tokens: ids, log-probabilities [..., k] at temperature 1,
    and the mass of the other ``vocab - k`` tokens [...]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    vocab: int


def _check_unit_interval(divergence: str, param: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{divergence}: {param} must be in [0, 1], got {value!r}")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (gradient checks)."""
    return torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"loss temperature must be > 0, got {temperature!r}")


class _Dense:
    """The teacher's floored log-probabilities over the whole vocabulary."""

    def __init__(self, log_q: torch.Tensor):
        self.log_q = log_q

    def elementwise(self, term, student: torch.Tensor) -> torch.Tensor:
        """term(student_v, log q_v) for every vocabulary entry v."""
        return term(student, self.log_q)

    def sum(self, term, student: torch.Tensor) -> torch.Tensor:
        return term(student, self.log_q).sum(dim=-1)


class _Sparse:
    """The teacher's floored, tempered log-probabilities of its top-k tokens (``log_q_top``)
    and the one log-probability every other token shares (``log_q_rest``)."""

    def __init__(self, rows: TopKRows, temperature: float, dtype: torch.dtype):
        self.ids = rows.ids.long()
        k = self.ids.shape[-1]
        self.rest = rows.vocab - k  # tokens outside the top-k
        top = rows.logprobs.to(dtype)
        if self.rest > 0:
            rest = torch.log((rows.tail.to(dtype) / self.rest).clamp(min=TAIL_PROBABILITY_FLOOR))
        else:
            rest = torch.full(top.shape[:-1], LOG_PROB_FLOOR, dtype=dtype, device=top.device)
        if temperature != 1.0:
            top, rest = top / temperature, rest / temperature
        # log Z over the k top tokens and the `rest` tail tokens (each at `rest`): softmax in closed form.
        terms = [top] if self.rest == 0 else [top, (rest + math.log(self.rest))[..., None]]
        log_z = torch.cat(terms, dim=-1).logsumexp(dim=-1)
        self.log_q_top = (top - log_z[..., None]).clamp_min(LOG_PROB_FLOOR)
        self.log_q_rest = (rest - log_z).clamp_min(LOG_PROB_FLOOR)

    def elementwise(self, term, student: torch.Tensor) -> torch.Tensor:
        out = term(student, self.log_q_rest[..., None])
        return out.scatter(-1, self.ids, term(student.gather(-1, self.ids), self.log_q_top))

    def sum(self, term, student: torch.Tensor) -> torch.Tensor:
        return self.elementwise(term, student).sum(dim=-1)


def _log_probs(student_logits: torch.Tensor, teacher, temperature: float):
    """(log p_S, teacher) at ``temperature``, floored, in float32 (float64 if an input is):
    log p_S a tensor, the teacher a ``_Dense`` or ``_Sparse``."""
    sparse = isinstance(teacher, TopKRows)
    teacher_vocab = teacher.vocab if sparse else teacher.shape[-1]
    if student_logits.shape[-1] != teacher_vocab:
        raise ValueError(
            f"student vocabulary ({student_logits.shape[-1]}) != teacher vocabulary "
            f"({teacher_vocab}): slice the logits to the shared tokenizer's size"
        )
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits, teacher.logprobs if sparse else teacher)
    log_probs = []
    for logits in (student_logits,) if sparse else (student_logits, teacher):
        logits = logits.to(dtype)
        if temperature != 1.0:
            logits = logits / temperature
        log_probs.append(torch.log_softmax(logits, dim=-1).clamp_min(LOG_PROB_FLOOR))
    return log_probs[0], (_Sparse(teacher, temperature, dtype) if sparse else _Dense(log_probs[1]))


# The per-vocabulary-entry terms the divergences sum, in (log p, log q) of two distributions.
def _kl_term(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q): KL(p || q) summed over the vocabulary."""
    return log_p.exp() * (log_p - log_q)


def _reverse_kl_term(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return _kl_term(log_p, log_q)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed in log space."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(student_logits, teacher, *, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, KL(p_T || p_S) = sum_v p_T (log p_T - log p_S), per token.

    Mass-covering: the student pays for every token the teacher likes. 0 iff the two
    distributions are equal; gradient w.r.t. the student logits is (p_S - p_T) / T.
    """
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    return t.sum(_reverse_kl_term, log_p_s)


def reverse_kl(student_logits, teacher, *, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL, KL(p_S || p_T) = sum_v p_S (log p_S - log p_T), per token.

    Mode-seeking: the student pays for mass where the teacher has little. 0 iff equal.
    """
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    return t.sum(_kl_term, log_p_s)


def jsd(student_logits, teacher, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024), as TRL's
    ``generalized_jsd_loss`` computes it per token.

    With the mixture m = beta * p_T + (1 - beta) * p_S::

        jsd = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

    At beta = 0.5 this is the textbook JSD (at most ln 2). The bracket vanishes at both
    ends of [0, 1], so, as in TRL, the endpoints are defined as the two KLs:

        beta = 0: KL(p_T || p_S)  (forward_kl)
        beta = 1: KL(p_S || p_T)  (reverse_kl)

    (paced-ds 0.1 divided the middle by beta * (1 - beta): 4x this at beta = 0.5.)
    """
    _check_unit_interval("jsd", "beta", beta)
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    if beta == 0.0:
        return t.sum(_reverse_kl_term, log_p_s)
    if beta == 1.0:
        return t.sum(_kl_term, log_p_s)

    def term(log_p, log_q):
        log_m = _log_mixture(log_q, log_p, beta)
        return beta * _kl_term(log_q, log_m) + (1.0 - beta) * _kl_term(log_p, log_m)

    return t.sum(term, log_p_s)


def tvd(student_logits, teacher, *, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance, 0.5 * sum_v |p_T - p_S|, per token.

    In [0, 1]: 0 iff the distributions are equal, 1 iff their supports are disjoint.
    """
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    return 0.5 * t.sum(lambda log_p, log_q: (log_q.exp() - log_p.exp()).abs(), log_p_s)


def skew_kl(student_logits, teacher, *, temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024), KL(p_T || alpha * p_T + (1 - alpha) * p_S).

    alpha = 0 is forward_kl; alpha = 1 is 0. For alpha > 0 it is at most -log(alpha),
    so a student that misses a teacher token gets a bounded, smoother signal.
    """
    _check_unit_interval("skew_kl", "alpha", alpha)
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    return t.sum(lambda log_p, log_q: _kl_term(log_q, _log_mixture(log_q, log_p, alpha)), log_p_s)


def skew_reverse_kl(student_logits, teacher, *, temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM), KL(p_S || alpha * p_S + (1 - alpha) * p_T).

    alpha = 0 is reverse_kl; alpha = 1 is 0; at most -log(alpha) for alpha > 0.
    """
    _check_unit_interval("skew_reverse_kl", "alpha", alpha)
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    return t.sum(lambda log_p, log_q: _kl_term(log_p, _log_mixture(log_p, log_q, alpha)), log_p_s)


def _akl_head_weight(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL's forward-KL weight g_head = gap_head / (gap_head + gap_tail), per token.

    The head is the smallest set of the teacher's most likely tokens whose teacher mass
    reaches ``mu`` (tokens tied with its last one join it, so the order of ties does not
    matter); mu = 0 gives an empty head, mu = 1 the whole vocabulary. The gaps are
    sum |p_T - p_S| over the head and over the rest; g_head is 0 when both are 0.
    """
    gap = (teacher_probs - student_probs).abs()
    if mu <= 0.0:
        in_head = torch.zeros_like(gap, dtype=torch.bool)
    elif mu >= 1.0:
        in_head = torch.ones_like(gap, dtype=torch.bool)
    else:
        in_head = teacher_probs >= _head_threshold(teacher_probs, mu)
    return _share(((gap * in_head).sum(dim=-1)), gap.sum(dim=-1))


def _share(part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.where(total > 0, part / total, torch.zeros_like(total))


def _head_threshold(teacher_probs: torch.Tensor, mu: float) -> torch.Tensor:
    """The smallest teacher probability in the head (mass mu, 0 < mu < 1), shape [..., 1].

    Sorting the whole vocabulary is slow (about 40x a softmax on CPU) and heads are
    usually short, so this looks at each token's top 64 and widens the search, for the
    tokens that need it only, while their head has not ended inside it.
    """
    vocab = teacher_probs.shape[-1]
    probs = teacher_probs.reshape(-1, vocab)
    threshold = torch.empty(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    pending = torch.arange(probs.shape[0], device=probs.device)
    k = min(vocab, 64)
    while pending.numel() > 0:
        top = probs.index_select(0, pending).topk(k, dim=-1).values  # sorted, largest first
        mass_before = top.cumsum(dim=-1) - top
        head_size = (mass_before < mu).sum(dim=-1, keepdim=True)  # >= 1 since mu > 0
        done = (head_size < k).squeeze(-1) | (k == vocab)
        threshold[pending[done]] = top.gather(-1, head_size - 1)[done]
        pending = pending[~done]
        k = min(vocab, 8 * k)
    return threshold.reshape(*teacher_probs.shape[:-1], 1)


def _akl_head_weight_sparse(student_probs: torch.Tensor, t: _Sparse, mu: float) -> torch.Tensor:
    """``_akl_head_weight`` for a sparse teacher: its values are the k top probabilities
    and one tail probability shared by ``t.rest`` tokens (all in the head or none, as ties)."""
    q_top, q_rest = t.log_q_top.exp(), t.log_q_rest.exp()
    gap_top = (q_top - student_probs.gather(-1, t.ids)).abs()
    gap_rest = t.elementwise(lambda p, log_q: (log_q.exp() - p).abs(), student_probs)
    gap_rest = gap_rest.scatter(-1, t.ids, 0.0).sum(dim=-1)  # the tail tokens only
    gap_total = gap_top.sum(dim=-1) + gap_rest
    if mu <= 0.0:
        return torch.zeros_like(gap_total)
    if mu >= 1.0:
        return _share(gap_total, gap_total)
    values = torch.cat([q_top, q_rest[..., None]], dim=-1)
    counts = torch.ones_like(values)
    counts[..., -1] = t.rest
    values, order = values.sort(dim=-1, descending=True)
    mass = values * counts.gather(-1, order)
    mass_before = mass.cumsum(dim=-1) - mass
    head_size = (mass_before < mu).sum(dim=-1, keepdim=True)
    threshold = values.gather(-1, head_size - 1)
    gap_head = (gap_top * (q_top >= threshold)).sum(dim=-1)
    if t.rest > 0:
        gap_head = gap_head + gap_rest * (q_rest >= threshold.squeeze(-1))
    return _share(gap_head, gap_total)


def akl(student_logits, teacher, *, temperature: float = 1.0, mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024), g_head * KL(p_T || p_S) + (1 - g_head) * KL(p_S || p_T).

    g_head (see ``_akl_head_weight``) is the share of the total gap sum_v |p_T - p_S| that
    lies in the teacher's head (its top tokens holding mass mu): a student wrong about
    the head gets mostly forward KL, one wrong about the tail mostly reverse KL.
    Endpoints: mu = 0 is reverse_kl, mu = 1 is forward_kl (where the gap is not 0).
    The weights are treated as constants for the gradient (computed without grad).
    """
    _check_unit_interval("akl", "mu", mu)
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    with torch.no_grad():
        if isinstance(t, _Sparse):
            g_head = _akl_head_weight_sparse(log_p_s.exp(), t, mu)
        else:
            g_head = _akl_head_weight(log_p_s.exp(), t.log_q.exp(), mu)
    return g_head * t.sum(_reverse_kl_term, log_p_s) + (1.0 - g_head) * t.sum(_kl_term, log_p_s)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "akl": akl,
}


def get_divergence(name: str):
    """The per-token divergence called ``name`` (a ``loss.kind``); ValueError if unknown."""
    if not isinstance(name, str) or name not in DIVERGENCES:
        raise ValueError(f"loss.kind={name!r} is not a divergence; choose one of: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def _forward_kl_student_grad(student_logits, teacher, *, temperature: float = 1.0):
    """d forward_kl / d student_logits = (p_S - p_T) / T, per token."""
    if isinstance(teacher, TopKRows):
        log_p_s, t = _log_probs(student_logits, teacher, temperature)
        p_s = torch.softmax(student_logits.to(log_p_s.dtype) / temperature, dim=-1)
        return t.elementwise(lambda p, log_q: p - log_q.exp(), p_s) / temperature
    dtype = _compute_dtype(student_logits, teacher)
    p_s = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    p_t = torch.softmax(teacher.to(dtype) / temperature, dim=-1)
    return (p_s - p_t) / temperature


def _reverse_kl_student_grad(student_logits, teacher, *, temperature: float = 1.0):
    """d reverse_kl / d student_logits = p_S (log p_S - log p_T - KL(p_S || p_T)) / T."""
    log_p_s, t = _log_probs(student_logits, teacher, temperature)
    p_s, log_ratio = log_p_s.exp(), t.elementwise(torch.sub, log_p_s)
    kl = (p_s * log_ratio).sum(dim=-1, keepdim=True)
    return p_s * (log_ratio - kl) / temperature


# Closed-form gradients where they are short: fewer passes over the chunk than autograd
# on the recomputed chunk (measured 15-30% faster forward + backward on CPU). The other
# divergences are differentiated by autograd.
_STUDENT_GRADS = {forward_kl: _forward_kl_student_grad, reverse_kl: _reverse_kl_student_grad}


def _row_view(logits: torch.Tensor, rows_b: torch.Tensor, rows_t: torch.Tensor):
    """[B, T, V] logits as a [rows, V] view, and the row of each (b, t), without a copy.

    Row-wise index_select is several times faster than logits[b, t]. The view needs unit
    stride over the vocabulary and a batch stride that is a multiple of the token
    stride: true of contiguous logits and of their slices along T (logits[:, :-1]);
    other layouts are copied once.
    """
    batch_stride, token_stride, vocab_stride = logits.stride()
    if logits.shape[0] == 1:
        batch_stride = 0
    if vocab_stride != 1 or token_stride < 1 or batch_stride % token_stride != 0:
        logits = logits.contiguous()
        batch_stride, token_stride, _ = logits.stride()
    rows_per_sample = batch_stride // token_stride
    n_rows = (logits.shape[0] - 1) * rows_per_sample + logits.shape[1]
    view = logits.as_strided((n_rows, logits.shape[2]), (token_stride, 1), logits.storage_offset())
    return view, rows_b * rows_per_sample + rows_t


class _TeacherRows:
    """The teacher's side of the selected tokens, chunk by chunk, by the answer's ``form``:
    "dense", rows of dense logits (their own rows, or the student's when the two share a
    layout); "sparse", slices of a top-k answer (ids, log-probs, tail); "hidden", the logits of
    a ``HiddenAnswer``'s rows, computed for the chunk (hidden states, output weight, bias)."""

    def __init__(self, form: str, tensors: tuple, vocab: int, rows_b, rows_t):
        self.form, self.tensors, self.vocab = form, tensors, vocab
        if form == "dense":
            self.view, self.row_ids = _row_view(tensors[0], *(tensors[1:] or (rows_b, rows_t)))

    def chunk(self, start: int, end: int):
        if self.form == "dense":
            return self.view.index_select(0, self.row_ids[start:end])
        if self.form == "hidden":
            hidden, weight, *bias = self.tensors
            return torch.nn.functional.linear(hidden[start:end], weight, *bias)
        ids, logprobs, tail = self.tensors
        return TopKRows(ids[start:end], logprobs[start:end], tail[start:end], self.vocab)


def chunk_gradient(divergence, params: dict, student_chunk: torch.Tensor, teacher_chunk, chunk_weights: torch.Tensor,
                   with_divergence: bool = False):
    """(div, d sum_i w_i div_i / d student_chunk) for one chunk of student logits [rows, V]: the
    closed form where ``_STUDENT_GRADS`` has one, autograd on the chunk otherwise. ``div`` (the
    per-row divergence, detached) only ``with_divergence`` or when autograd computes it anyway,
    else None."""
    closed_form_grad = _STUDENT_GRADS.get(divergence)
    if closed_form_grad is not None:
        grad = closed_form_grad(student_chunk, teacher_chunk, **params)
        grad *= chunk_weights.to(grad.dtype)[:, None]
        div = divergence(student_chunk, teacher_chunk, **params) if with_divergence else None
        return div, grad
    with torch.enable_grad():
        student_chunk = student_chunk.detach().to(_compute_dtype(student_chunk)).requires_grad_(True)
        div = divergence(student_chunk, teacher_chunk, **params)
        (grad,) = torch.autograd.grad(div, student_chunk, grad_outputs=chunk_weights.to(div.dtype))
    return div.detach(), grad


class _ChunkedDivergenceSum(torch.autograd.Function):
    """(sum_i w_i * div(row_i), sum_i div(row_i)) over the selected rows, chunk by chunk.

    Forward keeps no per-chunk state; backward recomputes each chunk and its gradient
    (closed form or autograd), so at most one chunk's float32 buffers are alive at a
    time and the only saved tensors are the inputs. No gradient flows to the teacher,
    given as dense logits (with its own rows, or none: the student's) or a sparse top-k.
    """

    @staticmethod
    def forward(ctx, student_logits, rows_b, rows_t, row_weights, divergence, params, chunk_tokens, form,
                *teacher_tensors):
        ctx.save_for_backward(student_logits, rows_b, rows_t, row_weights, *teacher_tensors)
        ctx.divergence, ctx.params, ctx.chunk_tokens, ctx.form = divergence, params, chunk_tokens, form
        student_rows, student_row_ids = _row_view(student_logits, rows_b, rows_t)
        teacher = _TeacherRows(form, teacher_tensors, student_logits.shape[-1], rows_b, rows_t)
        weighted_sum = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        plain_sum = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        for start in range(0, rows_b.numel(), chunk_tokens):
            end = start + chunk_tokens
            div = divergence(student_rows.index_select(0, student_row_ids[start:end]), teacher.chunk(start, end),
                             **params)
            weighted_sum += (div * row_weights[start:end]).sum()
            plain_sum += div.sum()
        dtype = _compute_dtype(student_logits, teacher_tensors[1 if form == "sparse" else 0])
        plain_sum = plain_sum.to(dtype)
        ctx.mark_non_differentiable(plain_sum)
        return weighted_sum.to(dtype), plain_sum

    @staticmethod
    def backward(ctx, grad_weighted_sum, _grad_plain_sum):
        n_inputs = 8 + len(ctx.saved_tensors) - 4
        if not ctx.needs_input_grad[0]:
            return (None,) * n_inputs
        student_logits, rows_b, rows_t, row_weights, *teacher_tensors = ctx.saved_tensors
        student_rows, student_row_ids = _row_view(student_logits, rows_b, rows_t)
        teacher = _TeacherRows(ctx.form, tuple(teacher_tensors), student_logits.shape[-1], rows_b, rows_t)
        batch_size, tokens, vocab = student_logits.shape
        grad_student = torch.zeros(
            (batch_size * tokens, vocab), dtype=student_logits.dtype, device=student_logits.device
        )
        grad_row_ids = rows_b * tokens + rows_t
        for start in range(0, rows_b.numel(), ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            student_chunk = student_rows.index_select(0, student_row_ids[start:end])
            _, grad_chunk = chunk_gradient(ctx.divergence, ctx.params, student_chunk, teacher.chunk(start, end),
                                           row_weights[start:end] * grad_weighted_sum)
            grad_student.index_copy_(0, grad_row_ids[start:end], grad_chunk.to(grad_student.dtype))
        return (grad_student.view(batch_size, tokens, vocab),) + (None,) * (n_inputs - 1)


# Logits per chunk when chunk_tokens is None. CPU: measured (tools/bench_losses.py) that
# chunks of about 1 MiB of float32 per buffer, which stay in cache, are the fastest,
# faster than full materialisation; larger ones fall out of cache and page-fault.
# GPU: kernels need big chunks to be efficient (1024 tokens at a 32k vocabulary, a few
# hundred MiB per buffer); a guess, not measured here.
CPU_CHUNK_ELEMENTS = 2**18
GPU_CHUNK_ELEMENTS = 2**25


def default_chunk_tokens(vocab_size: int, device: torch.device | str) -> int:
    """Tokens per chunk for ``distillation_loss``: about *_CHUNK_ELEMENTS logits, at least 1."""
    elements = CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, elements // vocab_size)


def _teacher_tensors(teacher, response_mask: torch.Tensor, student_shape) -> tuple[bool, tuple]:
    """(form, the teacher's tensors) for ``_TeacherRows``, its rows paired with the student's
    response tokens (in order, sample by sample)."""
    student_counts = (response_mask != 0).sum(1).cpu()
    if isinstance(teacher, torch.Tensor):
        if teacher.shape != student_shape:
            raise ValueError(f"distillation_loss: student logits {tuple(student_shape)} and teacher logits "
                            f"{tuple(teacher.shape)} must both be [batch, tokens, vocab]")
        return "dense", (teacher.detach(),)
    if not torch.equal(teacher.counts().cpu(), student_counts):
        raise ValueError(f"distillation_loss: the teacher scores {teacher.counts().tolist()} tokens per sample, the "
                        f"student {student_counts.tolist()}: they must score the same response tokens")
    if isinstance(teacher, DenseAnswer):
        if teacher.logits.dim() != 3 or teacher.logits.shape[-1] != student_shape[-1]:
            raise ValueError(f"distillation_loss: teacher logits {tuple(teacher.logits.shape)} must be "
                            f"[batch, tokens, {student_shape[-1]}]")
        teacher_b, teacher_t = (teacher.mask != 0).nonzero(as_tuple=True)
        return "dense", (teacher.logits.detach(), teacher_b, teacher_t)
    if isinstance(teacher, TopKAnswer):
        if teacher.vocab != student_shape[-1]:
            raise ValueError(f"student vocabulary ({student_shape[-1]}) != teacher vocabulary ({teacher.vocab}): "
                            "slice the logits to the shared tokenizer's size")
        return "sparse", (teacher.ids.detach(), teacher.logprobs.detach(), teacher.tail.detach())
    if isinstance(teacher, HiddenAnswer):
        if teacher.vocab != student_shape[-1]:
            raise ValueError(f"student vocabulary ({student_shape[-1]}) != teacher vocabulary ({teacher.vocab}): "
                            "slice the logits to the shared tokenizer's size")
        bias = () if teacher.bias is None else (teacher.bias.detach(),)
        return "hidden", (teacher.hidden.detach(), teacher.weight.detach(), *bias)
    raise TypeError(f"distillation_loss: unknown teacher answer {type(teacher).__name__}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher,
    response_mask: torch.Tensor,
    sample_weights: torch.Tensor | None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    normalizer: float | None = None,
    chunk_tokens: int | None = None,
    **params,
):
    """The trainer's loss: sum_{b,t} mask[b,t] * w[b] * div(b, t) / normalizer.

    student_logits: [B, T, V], any float dtype; may be a strided view, e.g. logits[:, :-1].
    teacher: a constant (no gradient reaches it), at temperature 1, either
        - dense logits [B, T, V] laid out like the student's (same response_mask);
        - a ``DenseAnswer`` (logits and its own mask) or a ``TopKAnswer`` (sparse rows):
          their scored tokens are paired with the student's response tokens in order,
          sample by sample (self-distillation's teacher sees other prompts).
    response_mask: [B, T], bool or 0/1; the student positions that count.
    sample_weights: [B], each sample's weight (e.g. PACED's w(p)) for all its tokens;
        None means 1. Treated as a constant.
    kind, temperature, params: the per-token divergence (``DIVERGENCES``) and its
        parameters, e.g. ``kind="jsd", beta=0.5``.
    normalizer: the number of response tokens in the whole optimizer step, over all
        micro-batches and ranks (the trainer all-reduces it); None means this call's own
        count (at least 1). The loss is divided by it once, here.
    chunk_tokens: tokens per chunk; None picks ``default_chunk_tokens(V, device)``. Only
        masked-in tokens are computed; beyond the gradient itself, peak extra memory is
        a few float32 [chunk_tokens, V] buffers, in forward and in backward.

    Returns (loss, stats): loss is a float32 scalar; stats holds detached tensors:
    ``weighted_divergence_sum`` (the numerator), ``divergence_sum`` (unweighted),
    ``tokens`` (masked-in tokens here) and ``weight_sum`` (sum of their weights).
    """
    if student_logits.dim() != 3:
        raise ValueError(f"distillation_loss: student logits {tuple(student_logits.shape)} must be "
                        "[batch, tokens, vocab]")
    step = LossStep(student_logits.shape, student_logits.dtype, student_logits.device, teacher, response_mask,
                    sample_weights, kind, temperature, normalizer, chunk_tokens, params)
    weighted_sum, plain_sum = _ChunkedDivergenceSum.apply(
        student_logits, step.rows_b, step.rows_t, step.row_weights, step.divergence, step.params, step.chunk_tokens,
        step.form, *step.teacher_tensors
    )
    return step.result(weighted_sum, plain_sum)


class LossStep:
    """What ``distillation_loss`` and ``fused_distillation_loss`` (``distill/fused.py``) share:
    their arguments checked, the response tokens as (rows_b, rows_t), each one's weight, the
    teacher's tensors and the divergence; ``result`` turns the two sums into (loss, stats)."""

    def __init__(self, shape, dtype, device, teacher, response_mask, sample_weights, kind, temperature,
                 normalizer, chunk_tokens, params):
        self.divergence = get_divergence(kind)
        accepted = [name for name, param in inspect.signature(self.divergence).parameters.items()
                    if param.kind is param.KEYWORD_ONLY and name != "temperature"]
        for name in params:
            if name not in accepted:
                raise ValueError(f"loss.kind={kind} has no parameter {name!r}; its parameters: "
                                f"{', '.join(accepted) or 'none'}")
        if response_mask.shape != shape[:2]:
            raise ValueError(f"distillation_loss: response_mask {tuple(response_mask.shape)} must be "
                            f"{tuple(shape[:2])}, the logits' [batch, tokens]")
        _check_temperature(temperature)
        batch_size = shape[0]
        if sample_weights is None:
            sample_weights = torch.ones(batch_size, device=device)
        if sample_weights.shape != (batch_size,):
            raise ValueError(f"distillation_loss: sample_weights {tuple(sample_weights.shape)} must be ({batch_size},)")
        self.chunk_tokens = default_chunk_tokens(shape[-1], device) if chunk_tokens is None else chunk_tokens
        if self.chunk_tokens < 1:
            raise ValueError(f"distillation_loss: chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if isinstance(normalizer, (int, float)) and not normalizer > 0:
            raise ValueError(f"distillation_loss: normalizer must be > 0 (a token count), got {normalizer}")
        self.normalizer, self.device = normalizer, device
        self.rows_b, self.rows_t = (response_mask != 0).nonzero(as_tuple=True)
        self.form, self.teacher_tensors = _teacher_tensors(teacher, response_mask, shape)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        self.row_weights = sample_weights.detach().to(compute)[self.rows_b]
        self.params = dict(params, temperature=temperature)

    def result(self, weighted_sum: torch.Tensor, plain_sum: torch.Tensor):
        tokens = self.rows_b.numel()
        loss = weighted_sum / (max(tokens, 1) if self.normalizer is None else self.normalizer)
        stats = {
            "weighted_divergence_sum": weighted_sum.detach(),
            "divergence_sum": plain_sum,
            "tokens": torch.tensor(float(tokens), device=self.device),
            "weight_sum": self.row_weights.sum(),
        }
        return loss, stats
