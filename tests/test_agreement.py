"""Ranks that disagree about the plan stop with an error naming the rank, instead of hanging."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as torch_mp

from paced_ds.config import RunConfig, load_config
from paced_ds.curriculum.curriculum import Curriculum
from paced_ds.curriculum.sampler import ProblemSampler
from paced_ds.distill.trainer import check_agreement, check_same_config
from paced_ds.errors import UserError

RECORDS = [{"id": f"p{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]


def agree_on_rank(rank: int, tmp_dir: str, seeds: tuple[int, int], overrides: tuple[list, list] = ([], [])) -> None:
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed  # noqa: F401  (before the process group, as dist.init() does)

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/store", rank=rank, world_size=2)
    try:
        sampler = ProblemSampler(len(RECORDS), seed=seeds[rank], world_size=2, rank=rank, micro_batch_size=2,
                                 grad_accum=1)
        try:
            check_same_config(load_config(None, overrides[rank]))
            check_agreement(sampler, Curriculum(RunConfig(), RECORDS))
            outcome = "agreed"
        except UserError as err:
            outcome = str(err)
        with open(f"{tmp_dir}/rank{rank}.json", "w") as f:
            json.dump(outcome, f)
    finally:
        torch_dist.destroy_process_group()


def run_two_ranks(tmp_path, seeds, overrides=([], [])) -> list[str]:
    context = torch_mp.start_processes(agree_on_rank, args=(str(tmp_path), seeds, overrides), nprocs=2, join=False,
                                       start_method="spawn")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank agreement check did not finish within 60 s")
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_ranks_with_the_same_plan_agree(tmp_path):
    assert run_two_ranks(tmp_path, (5, 5)) == ["agreed", "agreed"]


def test_a_rank_with_another_plan_is_named_on_every_rank(tmp_path):
    outcomes = run_two_ranks(tmp_path, (5, 6))
    for outcome in outcomes:
        assert outcome.startswith("rank 1 disagrees with rank 0 about the epoch-0 plan")


def test_a_rank_with_another_config_is_named_with_the_keys(tmp_path):
    """A node launched with other overrides; a node-local path (teacher.nvme_path) may differ."""
    outcomes = run_two_ranks(tmp_path, (5, 5), (["teacher.nvme_path=/a"], ["train.lr=0.5", "teacher.nvme_path=/b"]))
    for outcome in outcomes:
        assert outcome == ("rank 1 runs another config than rank 0 (train.lr differ): launch every node with the "
                           "same recipe and overrides")
