"""The teacher's ZeRO-3 partitions on NVMe (teacher.offload=nvme) through DeepSpeed's async_io.

DeepSpeed swaps a partition to disk only from 1 MiB up, and every partition of the shipped
tiny teacher is smaller (it would stay in CPU memory), so the run here uses the tiny
teacher widened (intermediate_size 8192: each MLP matrix 4 MiB, 2 MiB per rank on 2 ranks).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from launch import RECIPE, REPO, explain, paced_ds, read_jsonl, small_overrides, write_problems

sys.path.insert(0, str(REPO / "tools"))
from bench_step import Poller  # noqa: E402 (after tools/ is on the path)
from make_wide_teacher import TINY_TEACHER, save_wide_teacher  # noqa: E402

SWAPPED_PER_RANK = 4 * 3  # 4 layers x (gate, up, down); everything else is under 1 MiB per rank


def async_io_missing() -> str:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return ""
    return "libaio is not installed (apt-get install libaio-dev), so DeepSpeed's async_io op cannot build"


class SwapFileProbe(Poller):
    """The most swap files (and bytes) seen under a folder while a run goes on."""

    def __init__(self, root: Path, interval_s: float = 0.1):
        super().__init__(interval_s)
        self.root = root
        self.most_files, self.most_bytes = 0, 0

    def poll(self) -> bool:
        sizes = []
        for path in self.root.rglob("*.swp"):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:  # removed between listing and stat
                pass
        self.most_files, self.most_bytes = max(self.most_files, len(sizes)), max(self.most_bytes, sum(sizes))
        return True


def test_nvme_buffers_grow_to_the_largest_partition():
    """offload_param.buffer_size is raised to the largest partition (else DeepSpeed asserts)."""
    from paced_ds.models.engines import fit_nvme_buffers

    largest = 128 * 384  # the tiny teacher's MLP matrices; its embedding is 300 x 128
    ds_config = {"zero_optimization": {"offload_param": {"device": "nvme", "buffer_size": 1000}}}
    message = fit_nvme_buffers(ds_config, str(TINY_TEACHER), False, world=2)
    assert ds_config["zero_optimization"]["offload_param"]["buffer_size"] == largest // 2
    assert "raised from 1000 to 24576" in message
    assert fit_nvme_buffers(ds_config, str(TINY_TEACHER), False, world=1) is not None  # one rank: the whole matrix
    assert ds_config["zero_optimization"]["offload_param"]["buffer_size"] == largest
    assert fit_nvme_buffers(ds_config, str(TINY_TEACHER), False, world=1) is None  # already big enough


@pytest.mark.distributed
def test_nvme_offloaded_teacher_trains_like_a_resident_one(tmp_path):
    """2 ZeRO-3 ranks, 4 steps: the teacher on NVMe gives the losses and gradient norms of
    the same teacher resident, its partitions are read back through async_io from swap files
    that DeepSpeed wrote under teacher.nvme_path, and the files are gone after the run."""
    missing = async_io_missing()
    if missing:
        pytest.skip(missing)
    teacher = save_wide_teacher(tmp_path / "wide-teacher")
    data = write_problems(tmp_path / "problems.jsonl", per_level=6, with_response=True)
    # The shipped NVMe config with a buffer too small for the teacher: paced-ds raises it
    # to the largest partition, which also keeps the pinned buffers at 5 x 2 MiB per rank
    # (the shipped 1e8 elements pin 2 GB per rank in fp32).
    ds_config = json.loads((REPO / "ds_configs" / "teacher_zero3_offload_nvme.json").read_text())
    ds_config["zero_optimization"]["offload_param"]["buffer_size"] = 1000
    (tmp_path / "nvme.json").write_text(json.dumps(ds_config))
    nvme = tmp_path / "nvme"

    def train(name: str, *overrides: str):
        return paced_ds("train", "--config", RECIPE, "--nproc", 2, *small_overrides(
            tmp_path / name, **{"data.train": data, "data.eval": "", "model.teacher": teacher,
                                "curriculum.mode": "uniform", "train.export": "false"}), *overrides)

    resident = train("none", "teacher.offload=none")
    assert resident.returncode == 0, explain(resident)
    with SwapFileProbe(nvme) as probe:
        offloaded = train("nvme", "teacher.offload=nvme", f"teacher.nvme_path={nvme}",
                          f"teacher.ds_config={tmp_path / 'nvme.json'}")
    assert offloaded.returncode == 0, explain(offloaded)

    assert "offload_param.buffer_size raised from 1000 to 524288 elements" in offloaded.stdout
    reported = re.search(r"teacher on NVMe: (\d+) partitions, ([\d.]+) MiB of swap files in (\S+);",
                         offloaded.stdout)
    assert reported, offloaded.stdout
    assert int(reported[1]) == SWAPPED_PER_RANK and float(reported[2]) == 2.0 * SWAPPED_PER_RANK
    assert Path(reported[3]).is_relative_to(nvme / "teacher")
    # Seen on the disk while the run went on: every swapped partition of both ranks.
    assert probe.most_files == 2 * SWAPPED_PER_RANK and probe.most_bytes == 2 * 2 * 2**20 * SWAPPED_PER_RANK
    assert not list(nvme.rglob("*.swp"))  # removed when the ranks exit

    baseline = read_jsonl(tmp_path / "none" / "run" / "metrics.jsonl")
    metrics = read_jsonl(tmp_path / "nvme" / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [m["step"] for m in baseline] == [1, 2, 3, 4]
    assert baseline[-1]["loss"] != baseline[0]["loss"]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in metrics] == pytest.approx([m[key] for m in baseline], rel=1e-6), key
