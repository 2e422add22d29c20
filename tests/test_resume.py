"""Resume is exact and crashes are survivable: real 2-rank runs killed by PACED_DS_FAULT.

One straight run is the reference; a run SIGKILLed after a step, one SIGKILLed inside a
save and one whose loss turns NaN are compared with it. The runs are on-policy from step 2
(the student's rollouts draw from the RNGs) with on-policy competence refreshes, so that
the RNG states, the sampler, the curriculum and the counters all have to be restored.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from launch import RECIPE, cpu_env, explain, read_jsonl, run, small_overrides

pytestmark = pytest.mark.distributed

STEPS = 6
RUN = {"train.steps": STEPS, "train.save_every": 2, "train.timeout_s": 60, "train.export": "false",
       "data.eval": "", "data.arith_train_per_level": 6, "curriculum.rollouts": 2, "rollout.max_new_tokens": 12,
       "loss.schedule": "two_stage", "loss.switch_at": 1, "curriculum.refresh": "on_policy",
       "curriculum.refresh_every": 3}


def train(tmp_path, *, fault: str = "", **extra):
    overrides = small_overrides(tmp_path, **{**RUN, **extra})
    env = cpu_env(PACED_DS_FAULT=fault) if fault else cpu_env()
    started = time.monotonic()
    result = run([sys.executable, "-m", "paced_ds.cli", "train", "--config", str(RECIPE), "--nproc", "2",
                  *overrides], env=env, timeout=300)
    result.wall_s = time.monotonic() - started
    return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: STEPS steps in one go."""
    tmp_path = tmp_path_factory.mktemp("straight")
    result = train(tmp_path)
    assert result.returncode == 0, explain(result)
    return tmp_path / "run"


def trajectory(run_dir) -> list[tuple]:
    """Per step: the problems trained on (digest of the global batch), the loss, the learning rate."""
    return [(m["step"], m["batch"], m["loss"], m["lr"]) for m in read_jsonl(run_dir / "metrics.jsonl")]


def assert_same_run(run_dir, reference) -> None:
    assert trajectory(run_dir) == trajectory(reference)  # bit-exact on the CPU
    assert (run_dir / "competence.jsonl").read_text() == (reference / "competence.jsonl").read_text()
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    expected = read_jsonl(reference / "metrics.jsonl")[-1]
    for key in ("tokens", "forward_tokens", "samples", "epoch", "curriculum/pass_rate_mean", "flops_total",
                "flops_rollout", "tokens_generated"):
        assert final[key] == expected[key], key


def checkpoint_names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("zero_to_"))


def test_a_run_killed_after_a_step_resumes_exactly(tmp_path, straight):
    """The acceptance test: rank 1 is SIGKILLed once step 3 is logged (last checkpoint: step 2);
    train.resume=auto then gives the straight run's losses, batches and competence table."""
    killed = train(tmp_path, fault="kill:rank=1:step=3")
    assert killed.returncode != 0, explain(killed)
    assert "rank 1 kills itself after step 3" in killed.stdout
    assert killed.wall_s < 120  # the launcher stops rank 0 at once; nothing waits for a timeout
    assert any("--local_rank=1" in line and "exits with return code = -9" in line  # the dead rank is named
               for line in (killed.stdout + killed.stderr).splitlines())
    run_dir = tmp_path / "run"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2"

    resumed = train(tmp_path, **{"train.resume": "auto"})
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert "newest complete checkpoint" not in resumed.stdout  # step_2 passed its size and hash checks
    assert_same_run(run_dir, straight)  # step 3 logged once, as the straight run logged it
    assert checkpoint_names(run_dir) == ["latest", "step_2", "step_4", "step_6"]


def test_a_rank_killed_inside_a_save_leaves_the_previous_checkpoint(tmp_path, straight):
    """Rank 0 dies inside the save of step 4, after its files are written: `latest` still
    names step 2, which loads; the resumed run (with harmless config changes) neither
    skips nor repeats a problem."""
    killed = train(tmp_path, fault="kill:rank=0:save=4")
    assert killed.returncode != 0, explain(killed)
    assert "rank 0 kills itself inside the save of step 4" in killed.stdout
    assert killed.wall_s < 120
    run_dir = tmp_path / "run"
    assert checkpoint_names(run_dir) == [".tmp-step_4", "latest", "step_2"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2"

    resumed = train(tmp_path, **{"train.resume": "auto", "train.timeout_s": 120, "logging.tensorboard": "false"})
    assert resumed.returncode == 0, explain(resumed)
    assert_same_run(run_dir, straight)
    assert checkpoint_names(run_dir) == ["latest", "step_2", "step_4", "step_6"]  # the partial one is gone
    manifest = json.loads((run_dir / "checkpoints" / "step_6" / "manifest.json").read_text())["files"]
    assert {"rng_rank0.json", "rng_rank1.json", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(manifest)


def test_nonfinite_loss_skips_the_update_and_stops_after_too_many(tmp_path):
    """A NaN loss on rank 1 at step 2: that try is skipped on both ranks (the learning-rate
    schedule does not move) and step 2 is retried on the next problems. Step 3's gradients
    stay NaN under a finite loss (DeepSpeed's norm check catches those): after
    train.max_nonfinite_steps tries the run stops, its last checkpoint (step 2) intact."""
    result = train(tmp_path, fault="nan:step=2:rank=1,nangrad:step=3:times=99", **{
        "train.save_every": 1, "train.max_nonfinite_steps": 3, "curriculum.mode": "uniform",
        "loss.schedule": "off_policy", "curriculum.refresh": "static"})
    assert result.returncode == 2, explain(result)
    assert "step 2: non-finite loss on rank 1; update skipped (1 in a row, 1 in all)" in result.stdout
    said = "step 3: non-finite gradient norm (the loss is finite); update skipped (1 in a row, 2 in all)"
    assert said in result.stdout
    assert "step 3: 3 optimizer steps in a row had a non-finite loss or gradient" in result.stderr
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert [m["skipped_nonfinite"] for m in metrics] == [0, 1]
    assert [m["lr"] for m in metrics] == [5e-4, 1e-3]  # warmup of one step: the skip did not advance it
    assert metrics[1]["samples"] == 2 * 2 * 4  # the skipped try's problems are not counted as trained
    run_dir = tmp_path / "run"
    assert checkpoint_names(run_dir) == ["latest", "step_1", "step_2"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2"
