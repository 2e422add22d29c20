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


class Tokenizer:
    """Decodes a rollout [problem, index] to a response: right for the first problem % 5 of
    each problem's K rollouts."""

    def decode(self, ids, skip_special_tokens=True):
        problem, index = ids
        return f"rev 1 = {problem if index % K < problem % 5 else problem + 1}"


@pytest.fixture
def rollouts(monkeypatch):
    monkeypatch.setattr(generation, "prompt_ids", lambda tokenizer, records, data: [[i] for i in range(len(records))])
    monkeypatch.setattr(generation, "plain_copy", lambda engine: engine)
    monkeypatch.setattr(generation, "copy_fits", lambda engine: True)
    monkeypatch.setattr(generation, "generate", lambda model, tokenizer, prompts, **kwargs:
                        [[prompt[0], i] for i, prompt in enumerate(prompts)])
    records = [{"id": f"p{i}", "answer": str(i)} for i in range(PROBLEMS)]
    cfg = load_config(RECIPE, [f"curriculum.rollouts={K}", "rollout.gather=true"])
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
    result = estimate.estimate(None, Tokenizer(), records, table, cfg, seed=0)

    assert len(calls) == 1 and len(calls[0][0]) == PROBLEMS * K  # every answer in one call
    assert calls[0][1] == result["verify_workers"] == 3
    assert table.trials.tolist() == [K] * PROBLEMS
    assert table.correct.tolist() == [min(p % 5, K) for p in range(PROBLEMS)]
    assert result["verify_s"] >= CHECK_S > result["generate_s"]
    assert result["generate_s"] + result["verify_s"] <= result["seconds"]
    assert re.fullmatch(r"\d+\.\d s \(generation \d+\.\d s, answer checks 0\.[3-9] s\)",
                        estimate.describe_time(result))


def test_the_checker_workers_are_capped_and_at_least_one(rollouts, monkeypatch):
    records, cfg = rollouts
    seen = []
    real_many = verify.is_correct_many
    monkeypatch.setattr(verify, "is_correct_many", lambda pairs, workers=None:
                        seen.append(workers) or real_many(pairs, workers))
    table = CompetenceTable([r["id"] for r in records])
    for cpus, ranks_here in ((64, "1"), (2, "8")):
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setenv("LOCAL_SIZE", ranks_here)
        estimate.estimate(None, Tokenizer(), records, table, cfg, seed=0)
    assert seen == [verify.MAX_WORKERS, 1]


def test_the_counts_are_those_of_checking_one_at_a_time(rollouts):
    records, cfg = rollouts
    table = CompetenceTable([r["id"] for r in records])
    estimate.estimate(None, Tokenizer(), records, table, cfg, seed=0)
    one_at_a_time = torch.tensor([sum(verify.is_correct(Tokenizer().decode([p, p * K + k]), str(p)) for k in range(K))
                                  for p in range(PROBLEMS)], dtype=table.correct.dtype)
    assert torch.equal(table.correct, one_at_a_time)
