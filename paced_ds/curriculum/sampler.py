"""The rank-aware ZPD sampler: one global plan per epoch, identical on every rank, sharded by rank.

The plan is drawn from ``(seed, epoch, weights version)`` and the weights alone, so every
rank that holds the same competence table derives the same plan without communicating,
and a restart that restores ``(epoch, position, version)`` and the table continues exactly.
Each optimizer step takes the next ``world * micro_batch * grad_accum`` problems of the
plan; rank r takes its contiguous slice of each micro-batch.

``apply="weight"`` (the paper's form): the plan is a uniform permutation of the
*support*, the problems whose weight is > 0, and each problem's loss is multiplied by its
weight. Drawing uniformly from the support and weighting by w has the same expected update
as drawing uniformly from every problem and weighting by w, up to the factor
N / |support| (which weights normalised over the support absorb), yet a problem of weight 0
costs no teacher answer, forward or backward. ``apply="sample"``: the plan draws problems
with replacement in proportion to their weights and the loss is unweighted.

Either way a weight change (a refresh) starts a new pass, drawn from ``(seed, epoch,
version)`` and the new weights, so the plan stays a pure function of the saved state.
"""

from __future__ import annotations

import copy
import hashlib

import torch

APPLY_MODES = ("weight", "sample")


class ProblemSampler:
    def __init__(self, num_problems: int, *, seed: int, world_size: int, rank: int,
                 micro_batch_size: int, grad_accum: int, weights: torch.Tensor | None = None,
                 apply: str = "weight"):
        if num_problems <= 0:
            raise ValueError("the sampler needs at least one problem")
        if apply not in APPLY_MODES:
            raise ValueError(f"apply must be one of {APPLY_MODES}, got {apply!r}")
        self.num_problems = num_problems
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.apply = apply
        self.weights = torch.ones(num_problems)
        self.epoch = 0
        self.position = 0  # index into the current epoch's plan
        self.version = 0  # how many times the weights changed; keys the plan
        self.last_batch: list[int] = []  # every rank's problems of the last step, in plan order
        if weights is not None:
            self._check(weights)
            self.weights = weights.detach().to(torch.float32).cpu()
        self._plan = self._make_plan()

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    def _check(self, weights: torch.Tensor) -> None:
        if weights.shape != (self.num_problems,):
            raise ValueError(f"weights have shape {tuple(weights.shape)}, expected ({self.num_problems},)")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and >= 0")
        if not weights.sum() > 0:
            raise ValueError("every weight is 0: the sampler has no problem to draw")

    @property
    def support(self) -> int:
        """How many problems can be drawn: those whose weight is > 0."""
        return int((self.weights > 0).sum())

    def _make_plan(self) -> torch.Tensor:
        # Keyed by the weights' version too, so a refresh draws afresh yet reproducibly.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919 * self.version)
        if self.apply == "weight":
            support = (self.weights > 0).nonzero().flatten()
            return support[torch.randperm(len(support), generator=generator)]
        return torch.multinomial(self.weights.double(), self.num_problems, replacement=True, generator=generator)

    def set_weights(self, weights: torch.Tensor) -> None:
        """New weights (after a competence refresh): a new pass over their support starts
        (weight mode), or a new draw in proportion to them (sample mode)."""
        self._check(weights)
        self.weights = weights.detach().to(torch.float32).cpu()
        self.version += 1
        self.position = 0
        self._plan = self._make_plan()

    def loss_weights(self, indices: list[int]) -> torch.Tensor:
        """The per-problem loss weights of ``indices`` (1 in sample mode: the draw did the weighting)."""
        if self.apply == "sample":
            return torch.ones(len(indices))
        return self.weights[indices]

    def plan_digest(self) -> str:
        """A short hash of the current epoch's plan (ranks compare it to detect disagreement)."""
        return hashlib.sha256(self._plan.numpy().tobytes()).hexdigest()[:16]

    def batch_digest(self) -> str:
        """A short hash of the last step's problems (logged, so that two runs can be shown to
        have trained on the same problems in the same order, e.g. across a resume)."""
        return hashlib.sha256(torch.tensor(self.last_batch, dtype=torch.int64).numpy().tobytes()).hexdigest()[:12]

    def _take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= len(self._plan):
                self.epoch += 1
                self.position = 0
                self._plan = self._make_plan()
            step = min(count - len(taken), len(self._plan) - self.position)
            taken += self._plan[self.position:self.position + step].tolist()
            self.position += step
        return taken

    def next_step(self) -> list[list[int]]:
        """This rank's problem indices for the next optimizer step, one list per micro-batch."""
        global_indices = self._take(self.global_batch)
        self.last_batch = global_indices
        per_micro = self.world_size * self.micro_batch_size
        micro_batches = []
        for m in range(self.grad_accum):
            block = global_indices[m * per_micro:(m + 1) * per_micro]
            start = self.rank * self.micro_batch_size
            micro_batches.append(block[start:start + self.micro_batch_size])
        return micro_batches

    def peek_step(self) -> list[list[int]]:
        """What ``next_step`` will return, without moving (the plan is deterministic)."""
        return copy.copy(self).next_step()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_problems": self.num_problems, "version": self.version, "apply": self.apply}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; set the weights first (they are recomputed from the
        competence table the checkpoint holds), so the plan is redrawn exactly."""
        if state["num_problems"] != self.num_problems:
            raise ValueError(f"checkpoint sampler covers {state['num_problems']} problems, this run has "
                             f"{self.num_problems}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self.version = state.get("version", 0)
        self._plan = self._make_plan()
