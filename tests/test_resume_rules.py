"""The rules behind resume, in one process: which checkpoint is found, which config changes
are allowed, RNG states round-trip, crashed logs are cut back, fault specs parse."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from paced_ds.config import RunConfig, load_config
from paced_ds.errors import UserError
from paced_ds.runtime import checkpoint, faults
from paced_ds.runtime.tracking import drop_rows_after


def make_checkpoint(root, tag: str, *, latest: bool = True):
    (root / tag).mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    if latest:
        (root / "latest").write_text(tag)


def test_auto_finds_only_the_checkpoint_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.find_resume(tmp_path, "auto") is None
    make_checkpoint(root, "step_2")
    make_checkpoint(root, ".tmp-step_4", latest=False)  # a save that crashed before its rename
    assert checkpoint.find_resume(tmp_path, "auto") == (root, "step_2")
    assert checkpoint.find_resume(tmp_path, "never") is None
    assert checkpoint.find_resume(tmp_path, str(root / "step_2")) == (root, "step_2")
    assert checkpoint.find_resume(tmp_path, str(root)) == (root, "step_2")
    with pytest.raises(UserError, match="unfinished"):
        checkpoint.find_resume(tmp_path, str(root / ".tmp-step_4"))
    checkpoint.remove_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]


def test_publish_renames_then_points_latest_and_replaces_an_orphan(tmp_path):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, "step_2")
    make_checkpoint(root, "step_4", latest=False)  # renamed by a run that crashed before `latest`
    make_checkpoint(root, ".tmp-step_4", latest=False)
    (root / ".tmp-step_4" / "new").write_text("x")
    checkpoint.publish(root, root / ".tmp-step_4", "step_4")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_4"]
    assert (root / "step_4" / "new").is_file() and (root / "latest").read_text() == "step_4"


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_harmless_config_changes_are_allowed_on_resume(tmp_path):
    saved = RunConfig().to_dict()
    del saved["train"]["max_nonfinite_steps"]  # a key added since the checkpoint: its default applies
    cfg = load_config(None, ["train.steps=500", "train.save_every=7", "train.timeout_s=60", "logging.progress=false",
                             "eval.every=3", "data.eval=", "train.output_dir=/elsewhere", "train.resume=auto",
                             "teacher.offload=cpu", "data.responses_dir=/tmp/r"])
    checkpoint.check_config(saved, cfg, step=4, where=tmp_path)


def test_run_altering_config_changes_are_refused_with_their_keys(tmp_path):
    saved = RunConfig().to_dict()
    cfg = load_config(None, ["train.lr=5e-4", "curriculum.alpha=2", "train.steps=500"])
    with pytest.raises(UserError) as refused:
        checkpoint.check_config(saved, cfg, step=4, where=tmp_path)
    message = str(refused.value)
    assert "train.lr 0.0001 -> 0.0005" in message and "curriculum.alpha 1.0 -> 2.0" in message
    assert "train.steps" not in message.split("(a resume may change only")[0]
    with pytest.raises(UserError, match="train.steps: 20 is below"):
        checkpoint.check_config(saved, load_config(None, ["train.steps=20"]), step=30, where=tmp_path)


def test_a_resumed_log_is_cut_back_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    drop_rows_after(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_fault_specs_parse_and_bad_ones_are_refused(monkeypatch):
    assert faults.parse("kill:rank=1:step=3, nan:step=2:times=2") == [
        faults.Fault("kill", step=3, rank=1), faults.Fault("nan", step=2, times=2)]
    for bad in ("explode:step=1", "kill:rank=1", "kill:step=1:save=2", "nan:step=x", "nan:save=2"):
        with pytest.raises(UserError, match="PACED_DS_FAULT"):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV, "nan:step=5:rank=0:times=2,nangrad:step=6")
    rank0, rank1 = faults.Faults.from_env(0), faults.Faults.from_env(1)
    monkeypatch.delenv(faults.ENV)  # read once: the objects keep what they read
    one = torch.ones(())
    assert [rank1.spoil_loss(5)(one).item(), rank0.spoil_loss(4)(one).item()] == [1.0, 1.0]
    assert [np.isnan(rank0.spoil_loss(5)(one).item()) for _ in range(3)] == [True, True, False]
    x = torch.ones((), requires_grad=True)
    spoiled = rank1.spoil_loss(6)(x * 2)  # every rank: no rank= given
    spoiled.backward()
    assert spoiled.item() == 2.0 and torch.isnan(x.grad)  # a finite loss, a NaN gradient
    assert rank1.spoil_loss(6)(one) is one  # times=1: the retry is left alone
    assert not faults.Faults.from_env(0) and not faults.NONE  # unset: false, so the loop calls nothing of it
    with pytest.raises(UserError, match="injected after step 2"):
        faults.Faults(faults.parse("error:rank=1:step=2"), rank=1).after_step(2)
    faults.Faults(faults.parse("error:rank=1:step=2"), rank=0).after_step(2)  # another rank's fault


GROUP_TIMEOUT_SCRIPT = """
import torch, torch.distributed as torch_dist
from paced_ds.runtime import dist
dist.init(timeout_s=42)
group = torch_dist.new_group([0])
print(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
dist.shutdown()
"""


def test_every_process_group_gets_the_timeout():
    """Groups DeepSpeed creates later (no timeout given) get train.timeout_s too, not torch's 30 min."""
    import subprocess
    import sys

    from launch import REPO, cpu_env

    result = subprocess.run([sys.executable, "-c", GROUP_TIMEOUT_SCRIPT], capture_output=True, text=True,
                            env=cpu_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "42.0"
