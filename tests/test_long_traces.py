"""A long reasoning trace on this machine: a random-weight Qwen3-architecture student and teacher
with Qwen3's 151,936-token vocabulary, one 16,384-token response split over 2 CPU ranks
(train.sequence_parallel=2, fused output layers), two optimizer steps, within 24 GB
(tools/bench_long.py's worker, so the benchmark and the test run the same step)."""

from __future__ import annotations

import math
import sys

import pytest

from launch import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_long  # noqa: E402 (after tools/ is on the path)

GIB = 2**30


@pytest.mark.distributed
def test_two_ranks_train_a_16k_token_response_with_the_real_vocabulary(tmp_path):
    # Half the benchmark's width (the 151,936-row output layers are most of the work): 2 minutes -> 1.
    teacher, student = bench_long.make_models(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16)
    length = 16_384
    job = {"path": "fused_s2", "length": length, "steps": 1, "result": str(tmp_path / "result.json"),
           "overrides": bench_long.overrides(student, teacher, length, "fused_s2", checkpointing=False)}
    ranks = bench_long.launch(job, tmp_path)
    assert not isinstance(ranks, str), ranks
    assert len(ranks) == 2
    for rank in ranks:  # a warm-up step and a measured one, each rank on its 8,192 positions
        assert len(rank["losses"]) == 1 and math.isfinite(rank["losses"][0]) and rank["losses"][0] > 0
        # what a rank holds at its peak: the models, optimizer state and buffers, and the step's extra
        assert rank["resident_before"] + rank["peak_extra"] < 11 * GIB, rank
    # Both ranks report the step's one global loss.
    assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"], rel=1e-6)
