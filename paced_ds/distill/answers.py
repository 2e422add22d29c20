"""What a teacher answers for a batch: dense logits or a sparse top-k distribution.

Both are at temperature 1; the loss applies ``loss.temperature`` once, to both models.

- ``DenseAnswer``: logits over the shared vocabulary, laid out like the teacher's batch
  ([B, T, V]), with the positions that score (``mask``, [B, T]). Log-probabilities are
  valid logits (softmax gives back the same distribution), so a cache may answer densely.
- ``TopKAnswer``: for each scored position, in row-major order of the batch's loss mask,
  the teacher's k most likely token ids and their log-probabilities, and the mass of the
  other V - k tokens (the tail). The divergences spread the tail evenly over those
  tokens, in closed form; no [tokens, V] teacher tensor is ever built.

``samples(rows)`` selects whole samples (the micro-batches of a teacher batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DenseAnswer:
    logits: torch.Tensor  # [B, T, V], any float dtype
    mask: torch.Tensor  # [B, T], the scored positions

    def samples(self, rows: slice) -> DenseAnswer:
        return DenseAnswer(self.logits[rows], self.mask[rows])

    def to(self, device) -> DenseAnswer:
        return DenseAnswer(self.logits.to(device), self.mask.to(device))

    def counts(self) -> torch.Tensor:
        """Scored positions per sample."""
        return (self.mask != 0).sum(1)


@dataclass
class TopKAnswer:
    ids: torch.Tensor  # [N, k] token ids (int32 or int64)
    logprobs: torch.Tensor  # [N, k] log-probabilities at temperature 1
    tail: torch.Tensor  # [N] probability mass outside the top-k
    per_sample: torch.Tensor  # [B] scored positions per sample (int64, on the CPU); they sum to N
    vocab: int

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def samples(self, rows: slice) -> TopKAnswer:
        start, stop = _scored_rows(self.per_sample, rows)
        return TopKAnswer(self.ids[start:stop], self.logprobs[start:stop], self.tail[start:stop],
                          self.per_sample[rows], self.vocab)

    def to(self, device) -> TopKAnswer:
        return TopKAnswer(self.ids.to(device), self.logprobs.to(device), self.tail.to(device), self.per_sample,
                          self.vocab)  # per_sample stays on the CPU: it slices, it is not computed with

    def counts(self) -> torch.Tensor:
        return self.per_sample

    @staticmethod
    def concat(parts: list[TopKAnswer]) -> TopKAnswer:
        """One answer for the samples of ``parts``, in order."""
        return TopKAnswer(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                          torch.cat([p.tail for p in parts]), torch.cat([p.per_sample for p in parts]),
                          parts[0].vocab)


@dataclass
class HiddenAnswer:
    """A dense answer the loss computes a tile at a time: the teacher's final hidden states at
    its scored positions (rows in row-major order of the batch's loss mask, as a
    ``TopKAnswer``'s) and its output layer cut to the shared vocabulary. The logits of rows
    ``start:end`` are ``linear(hidden[start:end], weight, bias)``; no [tokens, V] teacher tensor
    is ever built (``distill/fused.py``'s ``teacher_answer`` makes it)."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H], V = the shared vocabulary
    bias: torch.Tensor | None  # [V] or None
    per_sample: torch.Tensor  # [B] scored positions per sample (int64, on the CPU); they sum to N

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def samples(self, rows: slice) -> HiddenAnswer:
        start, stop = _scored_rows(self.per_sample, rows)
        return HiddenAnswer(self.hidden[start:stop], self.weight, self.bias, self.per_sample[rows])

    def to(self, device) -> HiddenAnswer:
        return HiddenAnswer(self.hidden.to(device), self.weight.to(device),
                            None if self.bias is None else self.bias.to(device), self.per_sample)

    def counts(self) -> torch.Tensor:
        return self.per_sample


def _scored_rows(per_sample: torch.Tensor, rows: slice) -> tuple[int, int]:
    """The [start, stop) of the scored rows of samples ``rows`` (each sample ``per_sample[i]``)."""
    offsets = torch.cat([per_sample.new_zeros(1), per_sample.cumsum(0)]).tolist()
    first, last, _ = rows.indices(len(per_sample))
    return offsets[first], offsets[max(first, last)]


def top_k(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32, log-probs, tail mass) of the k most likely tokens of each row of ``log_probs``."""
    top_logp, top_ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    return top_ids.to(torch.int32), top_logp, (1.0 - top_logp.exp().sum(-1)).clamp(min=0.0)


def compress(logits: torch.Tensor, mask: torch.Tensor, k: int) -> TopKAnswer:
    """The top-k answer of dense teacher ``logits`` [B, T, V] at the ``mask`` positions
    (temperature 1; k >= V keeps the whole distribution)."""
    ids, logprobs, tail = top_k(torch.log_softmax(logits[mask.bool()].float(), dim=-1), k)
    return TopKAnswer(ids, logprobs, tail, mask.bool().sum(1).to(torch.int64).cpu(), logits.shape[-1])
