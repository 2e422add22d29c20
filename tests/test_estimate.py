"""The competence estimate in one process (paced_ds.distill.estimate): rollouts stand in for
generation, so what is tested is how the answers are checked, counted and timed."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from paced_ds import verify
from paced_ds.config import load_config
from paced_ds.curriculum.competence import CompetenceTable
from paced_ds.distill import estimate
from paced_ds.models import generation

RECIPE = Path(__file__).resolve().parent.parent / "ds_configs" / "recipes" / "tiny_arith.yaml"
PROBLEMS, K = 6, 4
CHECK_S = 0.3  # the answer checks' stand-in time


def response(problem: int, sample: int) -> str:
    """Rollout ``sample`` of ``problem``: right for the first problem % 5 of its K."""
    return f"rev 1 = {problem if sample < problem % 5 else problem + 1}"


class Rollouts:
    """Stands in for a generator (``generation.HFGenerator``, ``server.ServerGenerator``)."""

    def complete(self, prompts, *, n, **sampling):
        assert not sampling["greedy"] and sampling["top_k"] == 0
        texts = {p * n + k: response(p, k) for p in range(len(prompts)) for k in range(n)}
        return generation.Completions(texts, tokens=len(texts) * 3, generated=len(texts), padded=len(texts) * 4)


@pytest.fixture
def rollouts(monkeypatch):
    monkeypatch.setattr(generation, "prompt_ids", lambda tokenizer, records, data: [[i] for i in range(len(records))])
    records = [{"id": f"p{i}", "answer": str(i)} for i in range(PROBLEMS)]
    cfg = load_config(RECIPE, [f"curriculum.rollouts={K}"])
    return records, cfg


def test_the_answers_are_checked_at_once_in_parallel_and_timed(rollouts, monkeypatch):
    records, cfg = rollouts
    calls = []

    def one_at_a_time(response, reference):
        raise AssertionError("the estimate checks its answers one at a time")

    def many(pairs, workers=None):
        pairs = list(pairs)
        calls.append((pairs, workers))
        time.sleep(CHECK_S)
        return real_many(pairs, workers)

    real_many = verify.is_correct_many
    monkeypatch.setattr(verify, "is_correct", one_at_a_time)
    monkeypatch.setattr(verify, "is_correct_many", many)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # two ranks on this node share its CPUs
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    table = CompetenceTable([r["id"] for r in records])
    result = estimate.estimate(Rollouts(), None, records, table, cfg, seed=0)

    assert len(calls) == 1 and len(calls[0][0]) == PROBLEMS * K  # every answer in one call
    assert calls[0][1] == result["verify_workers"] == 3
    assert table.trials.tolist() == [K] * PROBLEMS
    assert table.correct.tolist() == [min(p % 5, K) for p in range(PROBLEMS)]
    assert result["verify_s"] >= CHECK_S > result["generate_s"]
    assert result["generate_s"] + result["verify_s"] <= result["seconds"]
    assert result["forward_tokens"] == PROBLEMS * K * 3 and result["padding_share"] == pytest.approx(0.25)
    assert re.fullmatch(r"\d+\.\d s \(generation \d+\.\d s, answer checks 0\.[3-9] s, 25% of the generated "
                        r"positions padding\)", estimate.describe_time(result))


def test_the_checker_workers_are_capped_and_at_least_one(rollouts, monkeypatch):
    records, cfg = rollouts
    seen = []
    real_many = verify.is_correct_many
    monkeypatch.setattr(verify, "is_correct_many", lambda pairs, workers=None:
                        seen.append(workers) or real_many(pairs, workers))
    table = CompetenceTable([r["id"] for r in records])
    for cpus, ranks_here in ((64, "1"), (2, "8")):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        monkeypatch.setenv("LOCAL_SIZE", ranks_here)
        estimate.estimate(Rollouts(), None, records, table, cfg, seed=0)
    assert seen == [verify.MAX_WORKERS, 1]


def test_the_counts_are_those_of_checking_one_at_a_time(rollouts):
    records, cfg = rollouts
    table = CompetenceTable([r["id"] for r in records])
    estimate.estimate(Rollouts(), None, records, table, cfg, seed=0)
    one_at_a_time = torch.tensor([sum(verify.is_correct(response(p, k), str(p)) for k in range(K))
                                  for p in range(PROBLEMS)], dtype=table.correct.dtype)
    assert torch.equal(table.correct, one_at_a_time)
