"""The offline top-k teacher cache: the approximation, the round trip, and refused mismatches."""

from __future__ import annotations

import json

import pytest
import torch

from paced_ds.distill import cache
from paced_ds.distill.answers import compress
from paced_ds.distill.losses import TopKRows, forward_kl
from paced_ds.errors import UserError

from launch import RECIPE, explain, paced_ds, read_jsonl, small_overrides


def test_sparse_top_k_approaches_the_full_forward_kl_as_k_grows():
    torch.manual_seed(0)
    teacher = torch.randn(32, 64) * 3
    student = torch.randn(32, 64) * 3
    mask = torch.ones(1, 32, dtype=torch.bool)
    exact = forward_kl(student, teacher)
    errors = []
    for k in (1, 4, 16, 48, 64):
        answer = compress(teacher[None], mask, k)
        assert torch.allclose(answer.logprobs.exp().sum(-1) + answer.tail, torch.ones(32), atol=1e-5)
        sparse = forward_kl(student, TopKRows(answer.ids, answer.logprobs, answer.tail, 64))
        errors.append((sparse - exact).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-5  # k = V: nothing approximated


def test_a_cache_without_its_temperature_is_refused(tmp_path):
    """paced-ds 0.1 stored log-probabilities at loss.temperature, and training tempered them again."""
    (tmp_path / "manifest.json").write_text(json.dumps({"teacher": "t", "tokenizer": "x", "k": 4, "vocab": 9,
                                                        "data": "d", "shards": 0}))
    with pytest.raises(UserError, match=r"made by paced-ds 0\.1.*tempered them twice"):
        cache.TeacherCache(tmp_path, {"teacher": "t", "tokenizer": "x", "k": 4, "vocab": 9, "data": "d",
                                      "temperature": 1.0})


@pytest.mark.distributed
def test_at_temperature_2_cache_pipelined_and_engine_teach_alike_and_another_run_is_refused(tmp_path):
    """The teacher is tempered once, in the loss, whichever backend answers: the full
    distribution from a cache or a pipelined teacher (k = V) trains exactly as the engine,
    and a cached top-16 exactly as a pipelined top-16."""
    common = small_overrides(tmp_path, **{"data.arith_train_per_level": 5, "data.eval": "", "train.steps": 3,
                                          "curriculum.mode": "uniform", "train.export": "false",
                                          "loss.temperature": 2.0})
    vocab = 300
    for k in (0, 16):
        made = paced_ds("cache-teacher", "--config", RECIPE, "--nproc", 2, f"teacher.cache={tmp_path / f'cache{k}'}",
                        f"teacher.topk={k}", *common)
        assert made.returncode == 0, explain(made)
    manifest = json.loads((tmp_path / "cache0" / "manifest.json").read_text())
    assert manifest["k"] == manifest["vocab"] == vocab and manifest["shards"] == 2 and manifest["temperature"] == 1.0

    runs = {"engine": [], "cached": ["teacher.backend=cache", f"teacher.cache={tmp_path / 'cache0'}"],
            "piped": ["teacher.backend=pipelined", f"teacher.topk={vocab}"],
            "cached16": ["teacher.backend=cache", f"teacher.cache={tmp_path / 'cache16'}", "teacher.topk=16"],
            "piped16": ["teacher.backend=pipelined", "teacher.topk=16"]}
    losses = {}
    for name, extra in runs.items():
        done = paced_ds("train", "--config", RECIPE, "--nproc", 2, *common, *extra,
                        f"train.output_dir={tmp_path / name}")
        assert done.returncode == 0, explain(done)
        losses[name] = [m["loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl")]
    assert losses["cached"] == pytest.approx(losses["engine"], rel=1e-5)
    assert losses["piped"] == pytest.approx(losses["engine"], rel=1e-5)
    assert losses["cached16"] == pytest.approx(losses["piped16"], rel=1e-6)
    assert losses["cached16"] != pytest.approx(losses["engine"], rel=1e-5)  # top-16 of 300 is an approximation

    # The same cache for another k (or teacher, tokenizer, problems) is refused, naming what differs.
    expected = {**{key: manifest[key] for key in ("teacher", "tokenizer", "vocab", "data", "temperature")}, "k": 16}
    with pytest.raises(UserError, match=r"made for another run \(k: 300 there, 16 here\)"):
        cache.TeacherCache(tmp_path / "cache0", expected)
    with pytest.raises(UserError, match="no teacher cache"):
        cache.TeacherCache(tmp_path / "nowhere", expected)
