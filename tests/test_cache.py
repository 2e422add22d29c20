"""The offline top-k teacher cache: the approximation, the round trip, and refused mismatches."""

from __future__ import annotations

import json

import pytest
import torch

from launch import RECIPE, explain, paced_ds, read_jsonl, small_overrides
from paced_ds.distill import cache
from paced_ds.distill.losses import forward_kl
from paced_ds.errors import UserError


def test_expanded_top_k_approaches_the_full_forward_kl_as_k_grows():
    torch.manual_seed(0)
    teacher = torch.randn(32, 64) * 3
    student = torch.randn(32, 64) * 3
    mask = torch.ones(1, 32, dtype=torch.bool)
    exact = forward_kl(student, teacher)
    errors = []
    for k in (1, 4, 16, 48, 64):
        top_ids, top_logp, tail = cache.compress(teacher[None], mask, k)
        rebuilt = cache.expand(top_ids, top_logp, tail, 64)
        assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(32), atol=1e-5)  # still a distribution
        errors.append((forward_kl(student, rebuilt) - exact).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-5  # k = V: nothing approximated


@pytest.mark.distributed
def test_cached_teacher_trains_like_the_engine_and_refuses_another_run(tmp_path):
    common = small_overrides(tmp_path, **{"data.arith_train_per_level": 5, "data.eval": "", "train.steps": 3,
                                          "curriculum.mode": "uniform", "train.export": "false"})
    store = tmp_path / "cache"
    made = paced_ds("cache-teacher", "--config", RECIPE, "--nproc", 2, f"teacher.cache={store}", *common)
    assert made.returncode == 0, explain(made)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["k"] == manifest["vocab"] and manifest["shards"] == 2

    engine = paced_ds("train", "--config", RECIPE, "--nproc", 2, *common,
                      f"train.output_dir={tmp_path / 'engine'}")
    cached = paced_ds("train", "--config", RECIPE, "--nproc", 2, *common, f"train.output_dir={tmp_path / 'cached'}",
                      "teacher.backend=cache", f"teacher.cache={store}")
    assert engine.returncode == 0, explain(engine)
    assert cached.returncode == 0, explain(cached)
    losses = {name: [m["loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl")] for name in ("engine", "cached")}
    assert losses["cached"] == pytest.approx(losses["engine"], rel=1e-5)

    # The same cache for another k (or teacher, tokenizer, problems) is refused, naming what differs.
    expected = {**{key: manifest[key] for key in ("teacher", "tokenizer", "vocab", "data")}, "k": 16}
    with pytest.raises(UserError, match=r"made for another run \(k: 300 there, 16 here\)"):
        cache.TeacherCache(store, expected)
    with pytest.raises(UserError, match="no teacher cache"):
        cache.TeacherCache(tmp_path / "nowhere", expected)
