"""The problem sampler: one global plan per epoch, identical on every rank, sharded by rank.

The plan is a permutation of the problem indices drawn from ``(seed, epoch)`` alone, so
every rank derives the same plan without communicating, and a restart that restores
``(epoch, position)`` continues exactly where it stopped. Each optimizer step takes the
next ``world * micro_batch * grad_accum`` problems of the plan; rank r takes its
contiguous slice of each micro-batch.

Per-problem weights are the curriculum's hook: ``weights`` maps a problem index to its
loss weight (1.0 for every problem until a curriculum sets them).
"""

from __future__ import annotations

import hashlib

import torch


class ProblemSampler:
    def __init__(self, num_problems: int, *, seed: int, world_size: int, rank: int,
                 micro_batch_size: int, grad_accum: int, weights: torch.Tensor | None = None):
        if num_problems <= 0:
            raise ValueError("the sampler needs at least one problem")
        self.num_problems = num_problems
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.weights = torch.ones(num_problems) if weights is None else weights.to(torch.float32)
        self.epoch = 0
        self.position = 0  # index into the current epoch's plan
        self._plan = self._make_plan(self.epoch)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    def _make_plan(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_problems, generator=generator)

    def plan_digest(self) -> str:
        """A short hash of the current epoch's plan (ranks compare it to detect disagreement)."""
        return hashlib.sha256(self._plan.numpy().tobytes()).hexdigest()[:16]

    def _take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= self.num_problems:
                self.epoch += 1
                self.position = 0
                self._plan = self._make_plan(self.epoch)
            step = min(count - len(taken), self.num_problems - self.position)
            taken += self._plan[self.position:self.position + step].tolist()
            self.position += step
        return taken

    def next_step(self) -> list[list[int]]:
        """This rank's problem indices for the next optimizer step, one list per micro-batch."""
        global_indices = self._take(self.global_batch)
        per_micro = self.world_size * self.micro_batch_size
        micro_batches = []
        for m in range(self.grad_accum):
            block = global_indices[m * per_micro:(m + 1) * per_micro]
            start = self.rank * self.micro_batch_size
            micro_batches.append(block[start:start + self.micro_batch_size])
        return micro_batches

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_problems": self.num_problems}

    def load_state_dict(self, state: dict) -> None:
        if state["num_problems"] != self.num_problems:
            raise ValueError(f"checkpoint sampler covers {state['num_problems']} problems, this run has "
                             f"{self.num_problems}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._plan = self._make_plan(self.epoch)
