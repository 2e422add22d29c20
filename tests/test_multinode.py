"""Two "nodes" on this machine: two torchrun launchers, node ranks 0 and 1, loopback rendezvous."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paced_ds.data import arith

from launch import RECIPE, REPO, cpu_env, read_jsonl, small_overrides

pytestmark = pytest.mark.distributed


def test_two_node_run_shares_one_plan_and_writes_rank0_outputs_once(tmp_path):
    from paced_ds.runtime.dist import free_port

    port = free_port()
    overrides = small_overrides(tmp_path, **{"data.arith_train_per_level": 6, "curriculum.rollouts": 4,
                                             "rollout.max_new_tokens": 16, "train.steps": 3,
                                             "train.export": "false"})
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "paced_ds.train", "--config", str(RECIPE), *overrides]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    node0, node1 = outputs[0][0], outputs[1][0]
    # Global rank 0 lives on node 0 and is the only one that reports and writes.
    assert "2 ranks" in node0 and "paced-ds:" not in node1
    run = tmp_path / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]  # written once, not once per node
    assert metrics[-1]["samples"] == 3 * 2 * 4  # steps x ranks x micro-batch: both nodes' shards
    assert len(read_jsonl(run / "eval.jsonl")) == 2
    # Each node rolled out half of the problems; the all-reduce gave every problem all K trials.
    competence = read_jsonl(run / "competence.jsonl")
    assert len(competence) == 6 * len(arith.LEVELS) and all(row["trials"] == 4 for row in competence)
