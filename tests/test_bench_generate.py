"""The matmul ceiling of tools/bench_generate.py: the bound every engine's row is read against."""

from __future__ import annotations

import sys

import pytest
import torch

from launch import REPO

sys.path.insert(0, str(REPO / "tools"))
from bench_generate import matmul_ceiling  # noqa: E402 (after tools/ is on the path)


class Tied(torch.nn.Module):
    """Embedding and head share one weight, as SmolLM2's do; the embedding is a lookup."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.up, self.down = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(40, 16, bias=False)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight


def test_the_ceiling_counts_every_linear_product_of_a_token_once():
    tokens_per_s, gflop = matmul_ceiling(Tied(), rows=8, dtype=torch.float32)
    assert gflop == pytest.approx(2 * (16 * 40 + 40 * 16 + 16 * 50) / 1e9)
    assert 0 < tokens_per_s < float("inf")


def test_the_ceiling_reads_zero3_shapes_not_the_empty_partitions():
    model = Tied()
    for module in (model.up, model.down, model.head):  # what ZeRO-3 leaves on a rank: no data, ds_shape
        shape = tuple(module.weight.shape)
        module.weight = torch.nn.Parameter(torch.empty(0))
        module.weight.ds_shape = torch.Size(shape)
    _, gflop = matmul_ceiling(model, rows=8, dtype=torch.float32)
    assert gflop == pytest.approx(2 * (16 * 40 + 40 * 16 + 16 * 50) / 1e9)


def test_the_on_policy_bench_leaves_out_the_first_step_and_compares_with_hf(tmp_path):
    import json

    from bench_onpolicy import step_means, table

    for engine, (generate_s, sync_s) in {"hf": (4.0, 0.0), "vllm": (1.0, 0.5)}.items():
        rows = [{"step": 1, "on_policy": 1, "rollout_time_s": 99.0, "rollout_sync_s": 99.0, "train_time_s": 99.0,
                 "step_time_s": 297.0}]
        rows += [{"step": s, "on_policy": 1, "rollout_time_s": generate_s + s, "rollout_sync_s": sync_s,
                  "train_time_s": 2.0, "step_time_s": generate_s + s + sync_s + 2.0} for s in (2, 3)]
        (tmp_path / engine).mkdir()
        (tmp_path / engine / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = {engine: step_means(tmp_path / engine) for engine in ("hf", "vllm")}
    assert means["hf"]["rollout_time_s"] == 6.5 and means["vllm"]["rollout_sync_s"] == 0.5
    assert means["vllm"]["step_time_s"] == 6.0 and means["hf"]["steps"] == 2
    assert table(means).splitlines()[-1] == "| vllm | 3.50 | 0.50 | 2.00 | 6.00 | 1.42x |"
