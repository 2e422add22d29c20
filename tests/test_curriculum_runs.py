"""Every curriculum mode and loss schedule, end to end on 2 ZeRO-3 CPU ranks and the tiny models.

One launch runs the scenarios one after another in the same ranks (a launch costs ~20 s
of imports; a scenario a few seconds), then each test reads its scenario's run directory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from paced_ds.data import arith

from launch import RECIPE, explain, paced_ds, read_jsonl, run, small_overrides

pytestmark = pytest.mark.distributed

SCENARIOS = {
    "paced_weight": ["curriculum.mode=paced", "curriculum.apply=weight"],
    "uniform": ["curriculum.mode=uniform"],
    "hard_filter_sample": ["curriculum.mode=hard_filter", "curriculum.apply=sample"],
    "posterior_sample_every": ["curriculum.posterior=true", "curriculum.apply=sample",
                               "curriculum.refresh=every", "curriculum.refresh_every=2"],
    "batch_mean": ["curriculum.normalize=batch_mean"],
    "reverse_on_policy": ["loss.kind=reverse_kl", "loss.schedule=on_policy"],
    "two_stage": ["loss.schedule=two_stage", "loss.switch_at=2", "curriculum.refresh=on_policy",
                  "curriculum.refresh_every=1", "curriculum.reestimate_at_switch=true"],
    "self_distill": ["teacher.self_distill=true", "loss.kind=reverse_kl", "loss.schedule=on_policy",
                     "rollout.gather=false"],
    "given_competence": ["curriculum.competence={out}/paced_weight/competence.jsonl"],
}

SCRIPT = r"""
import json, sys
from paced_ds.config import load_config
from paced_ds.distill.trainer import train
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out, scenarios, common = args[0], json.loads(args[1]), args[2:]
for name, extra in scenarios.items():
    extra = [e.replace("{out}", out) for e in extra]
    recipe = sys.argv[0].replace("scenarios.py", "recipe.yaml")
    train(load_config(recipe, common + extra + [f"train.output_dir={out}/{name}"]))
from paced_ds.runtime import dist as _dist
_dist.shutdown()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    (out / "scenarios.py").write_text(SCRIPT)
    (out / "recipe.yaml").write_text(RECIPE.read_text())
    overrides = small_overrides(out, **{
        "train.steps": 4, "train.micro_batch_size": 4, "train.grad_accum": 2, "data.eval": "",
        "train.export": "false", "data.arith_train_per_level": 12, "curriculum.rollouts": 4,
        "rollout.max_new_tokens": 16, "train.lr": 1e-3})
    from paced_ds.runtime.dist import free_port

    result = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                  str(free_port()), str(out / "scenarios.py"), str(out), json.dumps(SCENARIOS), *overrides],
                 timeout=900)
    assert result.returncode == 0, explain(result)
    return out, result


def competence(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "competence.jsonl")


def tensorboard_tags(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 4, "histograms": 4})
    accumulator.Reload()
    return accumulator.Tags()


def test_paced_writes_competence_spanning_zero_to_one_and_tensorboard_curriculum(runs):
    out, _ = runs
    rows = competence(out / "paced_weight")
    assert len(rows) == 12 * len(arith.LEVELS) and all(r["trials"] == 4 for r in rows)
    rates = [r["pass_rate"] for r in rows]
    assert min(rates) == 0.0 and max(rates) == 1.0 and any(0 < p < 1 for p in rates)
    # w = p(1-p), normalised to mean 1 over the problems drawn (w > 0): zero at both ends.
    assert all(r["weight"] == 0 for r in rows if r["pass_rate"] in (0.0, 1.0))
    drawn = [r["weight"] for r in rows if r["weight"] > 0]
    assert sum(drawn) / len(drawn) == pytest.approx(1.0, rel=1e-5)
    tags = tensorboard_tags(out / "paced_weight")
    assert {"curriculum/pass_rate", "curriculum/weight"} <= set(tags["histograms"])
    assert "curriculum/pass_rate_over_steps" in tags["images"]
    assert {"curriculum/frontier_weight_share", "curriculum/effective_sample_size",
            "curriculum/pass_rate_L1", "curriculum/weight_share_L1", "train/flops_total"} <= set(tags["scalars"])
    metrics = read_jsonl(out / "paced_weight" / "metrics.jsonl")
    assert metrics[0]["curriculum/frontier_weight_share"] == pytest.approx(1.0)
    assert 0 < metrics[0]["curriculum/zero_pass_share"] < 1


def test_no_compute_on_weight_zero_and_every_flop_counted(runs):
    """Weight mode draws only problems of weight > 0: no step trains on a weight-0 problem and
    the teacher answers exactly the tokens the student trains on. The cumulative FLOP fields
    are the sums of the per-step ones, and the step-0 estimate is in the first row."""
    out, result = runs
    rows = competence(out / "paced_weight")
    assert any(r["weight"] == 0 for r in rows)  # there were problems to skip
    support = sum(r["weight"] > 0 for r in rows)
    said = f"only {support} problems have weight > 0, fewer than a step's global batch of 16" in result.stdout
    assert said == (support < 16)  # 2 ranks x 4 x 2
    metrics = read_jsonl(out / "paced_weight" / "metrics.jsonl")
    assert [m["zero_weight_problems"] for m in metrics] == [0] * len(metrics)
    assert metrics[-1]["tokens_teacher"] == metrics[-1]["tokens_student"] > 0
    assert metrics[0]["flops_rollout_step"] > 0 and metrics[-1]["flops_rollout_step"] == 0
    for key in ("flops_student", "flops_teacher", "flops_rollout", "flops_eval", "flops_total"):
        assert sum(m[f"{key}_step"] for m in metrics) == pytest.approx(metrics[-1][key], rel=1e-12), key
    assert metrics[-1]["flops_total"] == pytest.approx(sum(metrics[-1][f"flops_{phase}"] for phase in
                                                           ("student", "teacher", "rollout", "eval")))
    # plain distillation draws every problem, weight 0 or not, and rolls nothing out
    uniform = read_jsonl(out / "uniform" / "metrics.jsonl")
    assert uniform[-1]["flops_rollout"] == 0 and uniform[-1]["tokens_teacher"] == uniform[-1]["tokens_student"]


def test_uniform_needs_no_rollouts(runs):
    out, _ = runs
    assert not (out / "uniform" / "competence.jsonl").exists()
    metrics = read_jsonl(out / "uniform" / "metrics.jsonl")
    assert all(m["weight_mean"] == 1.0 for m in metrics)
    assert not any(k.startswith("curriculum/") for k in metrics[0])


def test_hard_filter_in_sample_mode_keeps_the_band(runs):
    out, _ = runs
    rows = competence(out / "hard_filter_sample")
    assert {r["weight"] for r in rows} <= {0.0, 1.0}
    assert all((r["weight"] == 1.0) == (0 < r["pass_rate"] < 1) for r in rows)
    assert all(m["weight_mean"] == 1.0 for m in read_jsonl(out / "hard_filter_sample" / "metrics.jsonl"))


def test_posterior_weights_and_periodic_refresh(runs):
    out, _ = runs
    rows = competence(out / "posterior_sample_every")
    assert all(r["weight"] > 0 for r in rows)  # 0/4 and 4/4 keep posterior mass inside (0, 1)
    metrics = read_jsonl(out / "posterior_sample_every" / "metrics.jsonl")
    # Each row is logged before that step's refresh: estimated at 0, then after steps 2 (and 4, the end: no).
    assert [m["curriculum/estimates"] for m in metrics] == [1, 1, 2, 2]


def test_batch_mean_makes_each_step_average_one(runs):
    out, _ = runs
    assert all(m["weight_mean"] == pytest.approx(1.0) for m in read_jsonl(out / "batch_mean" / "metrics.jsonl"))


def test_reverse_kl_on_student_rollouts(runs):
    out, _ = runs
    metrics = read_jsonl(out / "reverse_on_policy" / "metrics.jsonl")
    assert all(m["on_policy"] == 1 and m["rollout_time_s"] > 0 for m in metrics)
    assert all(m["loss"] >= 0 for m in metrics)


def test_two_stage_switches_and_refreshes_from_its_rollouts(runs):
    out, result = runs
    metrics = read_jsonl(out / "two_stage" / "metrics.jsonl")
    assert [m["on_policy"] for m in metrics] == [0, 0, 1, 1]
    # Estimated before training, re-estimated at the switch (before step 3), then refreshed
    # from the on-policy outcomes after each on-policy step (rows are logged before that).
    assert [m["curriculum/estimates"] for m in metrics] == [1, 1, 2, 3]
    assert "switching to on-policy reverse_kl" in result.stdout


def test_self_distillation_runs_with_the_privileged_teacher(runs):
    out, result = runs
    metrics = read_jsonl(out / "self_distill" / "metrics.jsonl")
    assert len(metrics) == 4 and all(m["on_policy"] == 1 for m in metrics)
    assert "self-distillation" in result.stdout
    # The teacher (the initial student reading the answer) disagrees with the student: loss > 0.
    assert all(m["loss"] > 0 for m in metrics)


def test_given_competence_file_replaces_estimation(runs):
    out, result = runs
    given = competence(out / "paced_weight")
    used = competence(out / "given_competence")
    assert [(r["id"], r["correct"], r["trials"]) for r in used] == [(r["id"], r["correct"], r["trials"]) for r in given]
    assert "competence read from" in result.stdout


def test_estimate_command_writes_competence(tmp_path):
    result = paced_ds("estimate", "--config", RECIPE, "--nproc", 2,
                      *small_overrides(tmp_path, **{"data.arith_train_per_level": 5, "curriculum.rollouts": 4,
                                                    "rollout.max_new_tokens": 16}))
    assert result.returncode == 0, explain(result)
    rows = read_jsonl(tmp_path / "run" / "competence.jsonl")
    assert len(rows) == 5 * len(arith.LEVELS) and all(r["trials"] == 4 for r in rows)
    assert "mean pass rate" in result.stdout
    assert re.search(r"\d+ rollouts \(K=4\), \d+k? generated tokens, \d+\.\d s \(generation \d+\.\d s, answer checks "
                     r"\d+\.\d s[,)]", result.stdout)
