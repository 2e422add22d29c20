"""tools/compare_curricula.py, its compute accounting (tools/curricula_compute.py) and its report
(tools/curricula_report.py): planning, step budgets at equal compute, resuming and the aggregation
of run directories, on hand-made runs (no launch)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from paced_ds.config import CurriculumConfig
from paced_ds.errors import UserError

import compare_curricula as cc  # noqa: E402
import curricula_compute as compute  # noqa: E402
import curricula_report as report  # noqa: E402

# The hand-made runs: a student of N_S and a teacher of N_T matmul parameters; a step trains 100
# tokens, which the teacher scores: 6 N_S + 2 N_T FLOPs a token, 1e6 a step.
N_S, N_T = 1_000, 2_000
STEP_TOKENS = 100
STEP_FLOPS = (6 * N_S + 2 * N_T) * STEP_TOKENS
PARAMS = {"student": N_S, "teacher": N_T}


def eval_row(step, accuracy, l1, l2, solved, *, rollout=0.0, probe_tokens=0):
    """An eval.jsonl row after ``step`` steps of 100 tokens, ``rollout`` FLOPs of rollouts and
    ``probe_tokens`` tokens of SNR probes (counted by the trainer as student and teacher work)."""
    tokens = STEP_TOKENS * step + probe_tokens
    flops = {"flops_student": 6 * N_S * tokens, "flops_teacher": 2 * N_T * tokens, "flops_rollout": rollout,
             "flops_eval": 500.0 * (step + 1)}
    return {"step": step, "accuracy": accuracy, "by_difficulty": {"L2": l2, "L1": l1}, "count": 4, "solved": solved,
            **flops, "flops_total": sum(flops.values())}


def metrics_row(step, *, on_policy=0, rollout_step=0.0, tokens_step=STEP_TOKENS):
    """A metrics.jsonl row of step ``step``: per-step FLOPs and the cumulative token counts (a
    constant ``tokens_step`` a step, so only the last row's cumulative counts are right)."""
    return {"step": step, "on_policy": on_policy, "tokens_student": tokens_step * step,
            "tokens_teacher": tokens_step * step, "flops_student": 6 * N_S * tokens_step * step,
            "flops_teacher": 2 * N_T * tokens_step * step, "flops_student_step": 6 * N_S * tokens_step,
            "flops_teacher_step": 2 * N_T * tokens_step, "flops_rollout_step": rollout_step}


def run(final_accuracy, final_solved, *, middle=0.5, snr=None):
    """A 20-step run evaluated at 0, 10, 20 whose base student solves a, b (accuracy 0.5)."""
    evals = [eval_row(0, 0.5, 1.0, 0.0, ["a", "b"]), eval_row(10, middle, 0.5, 0.5, ["a", "c"]),
             eval_row(20, final_accuracy, final_accuracy, final_accuracy, final_solved)]
    return {"evals": evals, "snr": snr or [], "flops": compute.training_flops(evals, snr or [], 0.0, PARAMS)}


def snr_row(step, values):
    return {"step": step, "forward_tokens": 0,
            "buckets": {name: None if v is None else
                        {"snr": v[0], "signal": 1.0, "noise": 1.0, "count": 16, "pass_rate": v[1]}
                        for name, v in values.items()}}


def test_mean_std_is_the_sample_std_and_skips_missing_values():
    assert report.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert report.mean_std([4.0, None, math.inf]) == {"mean": 4.0, "std": None, "n": 1}
    assert report.mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_forgetting_is_the_share_of_base_solved_problems_lost():
    assert report.forgetting(run(0.5, ["b", "c"])["evals"]) == 0.5
    assert report.forgetting(run(0.5, ["a", "b", "c"])["evals"]) == 0.0
    no_record = [{k: v for k, v in row.items() if k != "solved"} for row in run(0.5, [])["evals"]]
    assert report.forgetting(no_record) is None


def test_training_compute_of_an_evaluation_by_hand():
    """Student + teacher + rollouts + the shared estimate charged; evaluation and SNR probes left
    out; the step-0 evaluation (the base student) at 0."""
    probes = [{"step": 0, "forward_tokens": 40}, {"step": 10, "forward_tokens": 60}, {"step": 20, "forward_tokens": 50}]
    evals = [eval_row(0, 0.5, 1, 0, []), eval_row(10, 0.6, 1, 0, [], rollout=7e5, probe_tokens=40 + 60)]
    assert compute.training_flops(evals, probes, 3e6, PARAMS) == [0.0, 10 * STEP_FLOPS + 7e5 + 3e6]
    assert compute.probe_flops(probes, 10, PARAMS) == (6 * N_S + 2 * N_T) * 100
    # N as the run's meter counted it, and an estimate's compute: 2 N_S a token.
    assert compute.params_of_run(metrics_row(7)) == {"student": N_S, "teacher": N_T}
    assert compute.estimate_flops(500, PARAMS) == 2 * N_S * 500


def test_accuracy_at_a_budget_is_the_last_evaluation_at_or_below_it():
    r = {"evals": [eval_row(s, a, 0, 0, []) for s, a in ((0, 0.5), (10, 0.6), (20, 0.7), (30, 0.8))],
         "flops": [0.0, 24.0, 51.0, 101.0], "snr": []}
    assert report.at_budget(r, 25.0) == 1
    assert report.at_budget(r, 23.9) == 0  # before any later evaluation: the base student, at compute 0
    assert report.at_budget(r, 102.0) == 3
    assert report.at_budget(r, 100.9) == 2
    # The report reads 25%, 50% and 100% of B with 2% of B of slack: budget 100 -> limits 27, 52, 102.
    runs = {"forward_kl": {0: {**r, "flops": [0.0, 25.0, 50.0, 100.0]}},
            "paced": {0: r}}
    at = report.summarize(runs)["methods"]["paced"]["at_budget"]
    assert [at[key]["accuracy"]["mean"] for key in ("0.25", "0.5", "1")] == [0.6, 0.7, 0.8]
    assert at["1"]["flops_share"]["mean"] == pytest.approx(1.01)
    runs["paced"][0] = {**r, "flops": [0.0, 28.0, 53.0, 103.0]}  # each just past its budget's slack
    at = report.summarize(runs)["methods"]["paced"]["at_budget"]
    assert [at[key]["accuracy"]["mean"] for key in ("0.25", "0.5", "1")] == [0.5, 0.6, 0.7]


def test_first_reaching_takes_the_first_evaluation_and_its_compute():
    r = run(0.75, [], middle=0.6)
    assert report.first_reaching(r, 0.6) == {"step": 10, "flops": 10 * STEP_FLOPS}
    assert report.first_reaching(r, 0.7) == {"step": 20, "flops": 20 * STEP_FLOPS}
    assert report.first_reaching(r, 0.5) == {"step": 0, "flops": 0.0}
    assert report.first_reaching(r, 0.8) is None
    # A mean of k/N accuracies that rounds a hair above one of them still counts as reached.
    assert report.first_reaching(r, (0.6 + 0.6 + 0.6) / 3)["step"] == 10


def test_summarize_base_row_levels_budget_and_reaching():
    runs = {"forward_kl": {0: run(0.6, ["a"]), 1: run(0.7, ["a", "b"])},
            "paced": {0: run(0.75, ["a", "b"], middle=0.7), 1: run(0.5, ["b"])}}
    results = report.summarize(runs)
    assert results["levels"] == ["L1", "L2"] and results["seeds"] == [0, 1]
    assert results["methods"]["paced"]["steps"] == 20 and results["budget_flops"] == 20 * STEP_FLOPS
    assert results["base"]["accuracy"]["all"]["mean"] == 0.5 and results["base"]["accuracy"]["L1"]["mean"] == 1.0
    assert results["base"]["same_in_every_run"]
    assert results["baseline_accuracy"] == pytest.approx(0.65)
    fkl, paced = results["methods"]["forward_kl"], results["methods"]["paced"]
    assert fkl["accuracy"]["all"]["mean"] == pytest.approx(0.65)
    assert fkl["accuracy"]["all"]["std"] == pytest.approx(math.sqrt(0.005))
    assert fkl["forgetting"]["mean"] == pytest.approx(0.25)  # 1/2 lost, then 0/2
    assert fkl["to_baseline"]["reached"] == 1 and fkl["to_baseline"]["flops_share"]["mean"] == 1.0
    reach = paced["to_baseline"]
    assert reach["reached"] == 1 and reach["seeds"] == 2
    assert reach["steps"]["mean"] == 10 and reach["flops_share"]["mean"] == 0.5
    assert paced["curve"] == {"steps": [0, 10, 20], "flops": [0.0, 10 * STEP_FLOPS, 20 * STEP_FLOPS],
                              "mean": [0.5, 0.6, 0.625],
                              "std": [0.0, pytest.approx(math.sqrt(0.02)), pytest.approx(math.sqrt(0.03125))],
                              "start_flops": 0.0}  # synthetic runs: no estimate before the first step


def test_summarize_without_the_baseline_has_no_budget():
    results = report.summarize({"paced": {0: run(0.6, ["a"])}})
    assert results["baseline_accuracy"] is None and results["budget_flops"] is None
    assert "to_baseline" not in results["methods"]["paced"] and "at_budget" not in results["methods"]["paced"]
    assert "forward_kl was not run: no budget" in report.markdown(results)
    with pytest.raises(UserError, match="no finished run"):
        report.summarize({})


def test_snr_at_step_zero_over_seeds_keeps_the_bucket_order_and_skips_empty_buckets():
    seed0 = [snr_row(0, {"p=0": (0.0, 0.0), "(0,0.5]": (0.2, 0.3), "p=1": None}), snr_row(5, {"p=0": (9.0, 0.0)})]
    seed1 = [snr_row(0, {"p=0": (0.0, 0.0), "(0,0.5]": (0.4, 0.35), "p=1": None})]
    runs = {"forward_kl": {0: run(0.6, []), 1: run(0.6, [])},
            "paced": {0: run(0.6, [], snr=seed0), 1: run(0.6, [], snr=seed1)}}
    snr = report.summarize(runs)["snr"]
    assert snr["source"] == "paced" and list(snr["buckets"]) == ["p=0", "(0,0.5]", "p=1"]
    middle = snr["buckets"]["(0,0.5]"]
    assert middle["snr"]["mean"] == pytest.approx(0.3) and middle["snr"]["std"] == pytest.approx(math.sqrt(0.02))
    assert middle["pass_rate"]["mean"] == pytest.approx(0.325) and middle["seeds"] == 2
    assert snr["buckets"]["p=0"]["snr"]["mean"] == 0.0  # the step-5 probe is not the start
    assert snr["buckets"]["p=1"]["seeds"] == 0


def test_markdown_has_the_tables():
    runs = {"forward_kl": {0: run(0.6, ["a"]), 1: run(0.7, ["a", "b"])},
            "paced": {0: run(0.4, ["a"], snr=[snr_row(0, {"p=0": (0.0, 0.0), "(0,1)": (0.5, 0.4)})])}}
    text = report.markdown(report.summarize(runs))
    assert "| base (step 0) | 2 | 50.0 ± 0.0 (0%) | 50.0 ± 0.0 (0%) | 50.0 ± 0.0 (0%) |" in text
    assert "| forward_kl | 2 | 50.0 ± 0.0 (0%) | 50.0 ± 0.0 (50%) | 65.0 ± 7.1 (100%) |" in text
    assert "| base (step 0) | 2 | 100.0 ± 0.0 | 0.0 ± 0.0 | 50.0 ± 0.0 |" in text
    assert "| forward_kl | 20 | 65.0 ± 7.1 | 65.0 ± 7.1 | 65.0 ± 7.1 |" in text
    assert "| paced | not reached |  | 0/1 |" in text and "| forward_kl | 100% | 20 | 1/2 |" in text
    assert "| (0,1) | 0.400 | 16 | 0.5 | 1 |" in text
    assert "No plan (budgets.json)" in text and "are not counted" in text
    # at the budgets, per level, forgetting, reaching, SNR (no plan: no budget table; no seed pairs: no paired one)
    assert text.count("\n|---|") == 5


def test_run_state_done_partial_absent_and_other_settings(tmp_path):
    expected = {"train": {"steps": 20, "output_dir": "x", "seed": 0}, "data": {"responses_dir": "r", "eval": "e"}}
    directory = tmp_path / "paced" / "seed0"
    assert cc.run_state(directory, expected) == "absent"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**expected, "train": {**expected["train"], "output_dir": "y"}}))
    (directory / "eval.jsonl").write_text(json.dumps(eval_row(0, 0.5, 1, 0, [])) + "\n")
    assert cc.run_state(directory, expected) == "partial"
    with open(directory / "eval.jsonl", "a") as f:
        f.write(json.dumps(eval_row(20, 0.5, 1, 0, [])) + "\n")
    assert cc.run_state(directory, expected) == "done"
    with pytest.raises(UserError, match=r"other settings: train.steps \(20 there, 30 now\)"):
        cc.run_state(directory, {**expected, "train": {**expected["train"], "steps": 30}})
    # A pilot evaluates nothing: its last metrics row says whether it finished.
    pilot = {"train": {"steps": 4}, "data": {"eval": ""}}
    directory = tmp_path / "pilot" / "paced"
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(metrics_row(s)) + "\n" for s in (1, 2, 3)))
    assert cc.run_state(directory, pilot) == "partial"
    with open(directory / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics_row(4)) + "\n")
    assert cc.run_state(directory, pilot) == "done"


def write_run(out: Path, method: str, seed: int, evals: list[dict], *, steps=None, competence="", snr=()):
    directory = out / method / f"seed{seed}"
    directory.mkdir(parents=True)
    config = {"train": {"steps": evals[-1]["step"] if steps is None else steps},
              "curriculum": {"competence": competence}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evals))
    (directory / "metrics.jsonl").write_text(json.dumps(metrics_row(evals[-1]["step"] or 1)) + "\n")
    (directory / "snr.jsonl").write_text("".join(json.dumps(row) + "\n" for row in snr))


def test_load_runs_leaves_out_unfinished_runs_and_refuses_mixed_lengths_within_a_method(tmp_path):
    def evals(last_step):
        return [eval_row(s, 0.5, 1, 0, []) for s in (0, last_step)]

    write_run(tmp_path, "paced", 0, evals(20))
    write_run(tmp_path, "paced", 1, evals(10), steps=20)
    runs = report.load_runs(tmp_path, ["forward_kl", "paced"])
    assert list(runs) == ["paced"] and list(runs["paced"]) == [0]
    assert report.load_runs(tmp_path, ["paced"], seeds=3)["paced"].keys() == {0}
    write_run(tmp_path, "forward_kl", 0, evals(30))  # methods differ in steps: each has its own at equal compute
    assert report.load_runs(tmp_path, ["forward_kl", "paced"]).keys() == {"forward_kl", "paced"}
    write_run(tmp_path, "paced", 2, evals(30))
    with pytest.raises(UserError, match="different lengths"):
        report.load_runs(tmp_path, ["forward_kl", "paced"])
    no_flops = [{k: v for k, v in row.items() if not k.startswith("flops_")} for row in evals(20)]
    write_run(tmp_path, "akl", 0, no_flops)
    with pytest.raises(UserError, match="no flops_"):
        report.load_runs(tmp_path, ["akl"])


def test_the_estimate_is_charged_to_the_methods_that_read_it_and_not_to_forward_kl(tmp_path):
    estimate_dir = tmp_path / "competence" / "seed0"
    estimate_dir.mkdir(parents=True)
    (estimate_dir / "estimate.json").write_text(json.dumps({"forward_tokens": 500}))
    evals = [eval_row(0, 0.5, 1, 0, []), eval_row(10, 0.7, 1, 0, []), eval_row(20, 0.7, 1, 0, [])]
    write_run(tmp_path, "forward_kl", 0, evals)
    write_run(tmp_path, "paced", 0, evals, competence=str(estimate_dir / "competence.jsonl"))
    # paced_refresh rolls out itself: its estimates are in its own flops_rollout, nothing is charged.
    write_run(tmp_path, "paced_refresh", 0, [evals[0], *(dict(row, flops_rollout=4e5) for row in evals[1:])])
    runs = report.load_runs(tmp_path, ["forward_kl", "paced", "paced_refresh"])
    estimate = 2 * N_S * 500
    assert runs["forward_kl"][0]["flops"] == [0.0, 10 * STEP_FLOPS, 20 * STEP_FLOPS]
    assert runs["paced"][0]["flops"] == [0.0, 10 * STEP_FLOPS + estimate, 20 * STEP_FLOPS + estimate]
    assert runs["paced_refresh"][0]["flops"] == [0.0, 10 * STEP_FLOPS + 4e5, 20 * STEP_FLOPS + 4e5]
    reach = report.summarize(runs)["methods"]["paced"]["to_baseline"]
    assert reach["steps"]["mean"] == 10 and reach["flops_share"]["mean"] == (10 * STEP_FLOPS + estimate) / (
        20 * STEP_FLOPS)
    (estimate_dir / "estimate.json").unlink()  # an uncharged estimate would flatter the method: an error
    with pytest.raises(UserError, match="estimate.json: missing"):
        report.load_runs(tmp_path, ["paced"])


def test_the_probes_of_the_paced_runs_are_not_charged(tmp_path):
    probes = [{"step": 0, "forward_tokens": 30, "buckets": {}}, {"step": 10, "forward_tokens": 30, "buckets": {}},
              {"step": 20, "forward_tokens": 30, "buckets": {}}]
    evals = [eval_row(0, 0.5, 1, 0, []), eval_row(10, 0.7, 1, 0, [], probe_tokens=60),
             eval_row(20, 0.7, 1, 0, [], probe_tokens=90)]
    write_run(tmp_path, "paced", 0, evals, snr=probes)
    assert report.load_runs(tmp_path, ["paced"])["paced"][0]["flops"] == [0.0, 10 * STEP_FLOPS, 20 * STEP_FLOPS]


def pilot_metrics(off: int, on: int = 0, *, tokens=STEP_TOKENS, estimate=0.0, on_rollout=0.0):
    """A pilot's metrics.jsonl: ``off`` off-policy steps of ``tokens`` tokens (an in-run estimate of
    ``estimate`` FLOPs before step 1), then ``on`` on-policy steps of 100 tokens and ``on_rollout``
    FLOPs of rollouts each."""
    rows = [metrics_row(s, tokens_step=tokens, rollout_step=estimate if s == 1 else 0.0) for s in range(1, off + 1)]
    rows += [metrics_row(s, on_policy=1, rollout_step=on_rollout) for s in range(off + 1, off + on + 1)]
    return rows


def test_step_budgets_give_every_method_forward_kls_compute_by_hand(tmp_path):
    args = cc.parse_args(["--out", str(tmp_path), "--steps", "100", "--methods", "forward_kl", "paced",
                          "paced_refresh", "paced_adaptive", "paced_two_stage"])
    shared = 2 * N_S * 15_000  # the seed's estimate: 15,000 rollout tokens = 30e6 FLOPs, 30% of B
    costs = {"forward_kl": compute.pilot_costs(pilot_metrics(4), 0.0),
             # paced draws the frontier, 90 tokens a step: 0.9e6 a step
             "paced": compute.pilot_costs(pilot_metrics(4, tokens=90), shared),
             # its own estimate, in step 1's row; the plan adds its refreshes
             "paced_refresh": compute.pilot_costs(pilot_metrics(4, tokens=90, estimate=shared), 0.0),
             "paced_adaptive": compute.pilot_costs(pilot_metrics(4, tokens=90, estimate=101e6), 0.0),
             # 2 off-policy steps (0.9e6), 2 on-policy ones: 100 tokens trained + 2e5 of rollouts (1.2e6)
             "paced_two_stage": compute.pilot_costs(pilot_metrics(2, 2, tokens=90, on_rollout=2e5), shared)}
    assert costs["paced"] == {"estimate": 30e6, "off_policy_step": 0.9e6, "on_policy_step": 0.0}
    assert costs["paced_refresh"] == costs["paced"] and costs["forward_kl"]["estimate"] == 0.0
    assert costs["paced_two_stage"]["on_policy_step"] == 1.2e6
    budgets = cc.step_budgets(args, costs)
    assert budgets["budget_flops"] == 100 * STEP_FLOPS == 100e6
    plan = budgets["methods"]
    assert plan["forward_kl"]["steps"] == 100 and plan["forward_kl"]["planned_flops"] == 100e6
    # paced: 30e6 + 77 x 0.9e6 = 99.3e6 <= B < 30e6 + 78 x 0.9e6 = 100.2e6
    assert plan["paced"]["steps"] == 77 and plan["paced"]["planned_flops"] == pytest.approx(99.3e6)
    assert plan["paced"]["fixed_flops"] == 30e6 and plan["paced"]["estimates"] == 1
    # paced_refresh refreshes once, after step ceil(S/2): 2 x 30e6 + 44 x 0.9e6 = 99.6e6 <= B, and 45 steps
    # would need 100.5e6, so 44 steps, re-estimating after step 22.
    assert plan["paced_refresh"]["steps"] == 44 and plan["paced_refresh"]["estimates"] == 2
    assert plan["paced_refresh"]["planned_flops"] == pytest.approx(99.6e6)
    assert plan["paced_adaptive"]["steps"] is None and plan["paced_adaptive"]["planned_flops"] == 101.9e6
    # two-stage switches at round(S / 2): 66 steps = 30e6 + 33 x 0.9e6 + 33 x 1.2e6 = 99.3e6; 67 steps
    # switch at 34 (round half to even), 30e6 + 34 x 0.9e6 + 33 x 1.2e6 = 100.2e6 > B
    assert plan["paced_two_stage"]["steps"] == 66 and plan["paced_two_stage"]["on_policy_steps"] == 33
    assert plan["paced_two_stage"]["planned_flops"] == pytest.approx(99.3e6)
    assert cc.method_steps(budgets, args.methods) == {"forward_kl": 100, "paced": 77, "paced_refresh": 44,
                                                       "paced_two_stage": 66}
    assert "curriculum.refresh_every=22" in cc.run_overrides(args, "paced_refresh", 0, 1e-3, 44, "comparison")
    results = report.summarize({"forward_kl": {0: run(0.6, [])}}, budgets)
    assert results["not_run"] == {"paced_adaptive": pytest.approx(1.019)}
    text = report.markdown(results)
    assert "| paced | 77 | 30% | 0.90% | 99% | n/a |" in text
    assert "| paced_adaptive | not run | 101% | 0.90% | 102% (its fewest steps) |  |" in text
    # A pilot too short to run one of a schedule's stages cannot price it.
    costs["paced_two_stage"] = compute.pilot_costs(pilot_metrics(1, tokens=90), shared)
    with pytest.raises(UserError, match="paced_two_stage: its 16-step pilot made no on-policy step"):
        cc.step_budgets(args, costs)


def test_pilot_sweep_and_comparison_runs_score_differently(tmp_path):
    args = cc.parse_args(["--out", str(tmp_path), "--steps", "40"])
    pilot = cc.run_overrides(args, "paced_refresh", 0, 1e-3, 16, "pilot")
    sweep = cc.run_overrides(args, "paced", 0, 1e-3, 30, "sweep")
    final = cc.run_overrides(args, "paced", 3, 3e-3, 30, "comparison")
    assert "data.eval=" in pilot and "logging.log_every=1" in pilot and "train.steps=16" in pilot
    assert f"train.output_dir={tmp_path}/pilot/paced_refresh" in pilot
    assert "curriculum.refresh_every=16" in pilot  # a pilot never refreshes
    assert "curriculum.refresh_every=15" in cc.run_overrides(args, "paced_refresh", 0, 1e-3, 30, "sweep")  # after 15
    assert "data.eval=arith:val" in sweep and "data.retain=" in sweep and "eval.every=0" in sweep
    assert "data.eval=arith:eval" in final and "data.retain=arith:retain" in final and "eval.every=10" in final
    assert "train.lr=0.001" in sweep and "train.lr=0.003" in final and "train.seed=3" in final
    assert "train.steps=30" in sweep and "train.steps=30" in final
    assert f"train.output_dir={tmp_path}/sweep/paced/lr0.001/seed0" in sweep
    assert f"train.output_dir={tmp_path}/paced/seed3" in final
    # paced probes the SNR at 0, S/2 and S only in the comparison.
    assert "snr.every=0" in sweep and "snr.every=15" in final
    assert "curriculum.apply=sample" in cc.run_overrides(args, "paced_sample", 0, 1e-3, 30, "comparison")


def test_default_methods_are_those_this_config_can_express():
    methods = cc.default_methods()
    assert {"forward_kl", "hard_filter", "akl", "paced", "paced_sample", "paced_refresh",
            "paced_two_stage"} <= set(methods)
    assert "paced_posterior" not in methods  # optional: only when named
    has_adaptive = "rollouts_min" in {f.name for f in dataclasses.fields(CurriculumConfig)}
    assert ("paced_adaptive" in methods) == has_adaptive


# Step budgets of the default comparison, as its pilot planned them here (`--plan-only`): the K = 8
# estimate costs 45% of B (paced_refresh: 15 steps between two adaptive estimates, as planned from the
# adaptive estimate's 95% of fixed K's rollouts).
DEFAULT_STEPS = {"forward_kl": 100, "hard_filter": 56, "akl": 100, "paced": 56, "paced_sample": 56,
                 "paced_refresh": 15, "paced_adaptive": 57, "paced_two_stage": 51}


def test_the_default_comparison_fits_the_hour_budget(tmp_path):
    """The estimate (COST_S, measured here) of the pilot, the sweep (every method at every rate),
    the seeds' step-0 estimates and the comparison (every method at one rate, every seed) is
    under an hour."""
    args = cc.parse_args(["--out", str(tmp_path)])
    assert len(args.lrs) >= 3 and args.seeds >= 5
    methods = cc.pilot_methods(args)
    pilot = cc.plan_runs(args, "pilot", {m: args.lrs[:1] for m in methods}, 1, {m: args.pilot_steps for m in methods})
    steps = {m: s for m, s in DEFAULT_STEPS.items() if m in args.methods}
    sweep = cc.plan_runs(args, "sweep", {m: args.lrs for m in args.methods}, args.sweep_seeds, steps)
    comparison = cc.plan_runs(args, "comparison", {m: [1e-3] for m in args.methods}, args.seeds, steps)
    assert len(pilot) == len(methods) + 1  # and seed 0's estimate
    assert len(sweep) == len(steps) * len(args.lrs) * args.sweep_seeds + args.sweep_seeds
    assert len(comparison) == len(steps) * args.seeds + args.seeds  # no estimate is done yet
    total_s = sum(r["estimate_s"] for r in pilot + sweep + comparison) + 3 * cc.COST_S["launch"]
    assert total_s < 60 * 60


def test_best_lrs_take_the_highest_validation_accuracy_and_the_smaller_rate_on_a_tie():
    sweep = {"forward_kl": {"0.0003": {"mean": 0.5}, "0.001": {"mean": 0.7}, "0.003": {"mean": 0.6}},
             "paced": {"0.003": {"mean": 0.8}, "0.0003": {"mean": 0.8}, "0.001": {"mean": 0.1}}}
    assert report.best_lrs(sweep) == {"forward_kl": 0.001, "paced": 0.0003}


def test_sweep_results_read_the_final_validation_accuracy(tmp_path):
    for lr, accuracy in ((1e-3, 0.4), (3e-3, 0.6)):
        directory = report.sweep_dir(tmp_path, "paced", lr, 0)
        directory.mkdir(parents=True)
        (directory / "eval.jsonl").write_text(json.dumps(eval_row(0, 0.2, 0, 0, [])) + "\n"
                                              + json.dumps(eval_row(20, accuracy, 0, 0, [])) + "\n")
    result = report.sweep_results(tmp_path, ["paced"], [1e-3, 3e-3], 1)
    assert result["paced"]["0.001"]["mean"] == 0.4 and result["paced"]["0.003"]["mean"] == 0.6
    with pytest.raises(UserError, match="no evaluation"):
        report.sweep_results(tmp_path, ["paced"], [1e-3, 3e-3], 2)


def test_paired_difference_by_seed_with_a_bootstrap_interval():
    baseline = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.40, 4: 0.70}
    better = {seed: value + 0.10 for seed, value in baseline.items()}
    d = report.paired_difference(better, baseline)
    assert d["mean"] == pytest.approx(0.10) and d["low"] == pytest.approx(0.10) and d["high"] == pytest.approx(0.10)
    assert (d["wins"], d["ties"], d["losses"]) == (5, 0, 0)
    mixed = {0: 0.52, 1: 0.58, 2: 0.55, 3: 0.45, 4: 0.66}  # -0.02..+0.05 around the baseline
    d = report.paired_difference(mixed, baseline)
    assert d["low"] < 0 < d["high"] and d["low"] >= -0.04 and d["high"] <= 0.05
    assert (d["wins"], d["ties"], d["losses"]) == (2, 1, 2)
    assert report.paired_difference({0: 0.5}, {0: 0.4}) is None


def test_forgetting_reads_the_retention_set_when_there_is_one():
    evals = [dict(eval_row(0, 0.5, 1, 0, ["a"]), retention_set=10, forgotten=0.0),
             dict(eval_row(20, 0.5, 1, 0, []), retention_set=10, forgotten=0.3)]
    assert report.forgetting(evals) == 0.3  # not the held-out share (1/1 lost)
    one = {"evals": evals, "snr": [], "flops": [0.0, 1.0]}
    results = report.summarize({"forward_kl": {0: one, 1: one}})
    assert results["retention"] and results["methods"]["forward_kl"]["base_solved"]["mean"] == 10
    assert "the retention set" in report.markdown(results)


def test_snr_mid_run_is_the_probe_nearest_half_way():
    rows = [snr_row(0, {"(0,1)": (0.5, 0.4)}), snr_row(10, {"(0,1)": (0.2, 0.5)}), snr_row(20, {"(0,1)": (0.1, 0.6)})]
    runs = {"paced": {0: run(0.6, [], snr=rows), 1: run(0.6, [], snr=rows)}}
    snr = report.summarize(runs)["snr"]
    assert snr["middle_step"] == 10 and snr["middle"]["(0,1)"]["snr"]["mean"] == pytest.approx(0.2)
    assert "at step 10" in report.markdown(report.summarize(runs))


def test_one_step0_estimate_per_seed_serves_every_method_that_shares_it(tmp_path):
    args = cc.parse_args(["--out", str(tmp_path), "--methods", "forward_kl", "paced", "hard_filter", "paced_refresh"])
    competence = tmp_path / "competence" / "seed1" / "competence.jsonl"
    assert f"curriculum.competence={competence}" in cc.run_overrides(args, "paced", 1, 1e-3, 20, "sweep")
    assert f"curriculum.competence={competence}" in cc.run_overrides(args, "hard_filter", 1, 3e-3, 20, "comparison")
    for method in ("forward_kl", "paced_refresh"):  # no pass rates; its own, refreshed ones
        assert not any(o.startswith("curriculum.competence=") for o in cc.run_overrides(args, method, 1, 1e-3, 20,
                                                                                          "comparison"))
    steps = {m: 20 for m in args.methods}
    pending = cc.plan_runs(args, "sweep", {m: [1e-3, 3e-3] for m in args.methods}, 2, steps)
    assert [(r["method"], r["seed"]) for r in pending[:9]] == [
        ("estimate", 0), ("forward_kl", 0), ("forward_kl", 0), ("paced", 0), ("paced", 0), ("hard_filter", 0),
        ("hard_filter", 0), ("paced_refresh", 0), ("paced_refresh", 0)]
    assert pending[9]["method"] == "estimate" and pending[9]["seed"] == 1
    # A finished estimate is not planned again; a method that does not fit in the budget is not planned.
    (tmp_path / "competence" / "seed0").mkdir(parents=True)
    (tmp_path / "competence" / "seed0" / "estimate.json").write_text(json.dumps({"forward_tokens": 500}))
    pending = cc.plan_runs(args, "sweep", {m: [1e-3] for m in args.methods}, 1,
                           {m: s for m, s in steps.items() if m != "paced_refresh"})
    assert [r["method"] for r in pending] == ["forward_kl", "paced", "hard_filter"]


def test_paired_differences_at_the_whole_budget_and_half_of_it():
    runs = {"forward_kl": {0: run(0.6, [], middle=0.5), 1: run(0.7, [], middle=0.6)},
            "paced": {0: run(0.65, [], middle=0.7), 1: run(0.7, [], middle=0.8)}}
    paced = report.summarize(runs)["methods"]["paced"]
    assert paced["vs_baseline"]["mean"] == pytest.approx(0.025) and paced["vs_baseline"]["wins"] == 1
    assert paced["vs_baseline_half"]["mean"] == pytest.approx(0.2) and paced["vs_baseline_half"]["wins"] == 2
    assert "| paced | +2.5 | [+0.0, +5.0] | 1/1/0 | +20.0 | [+20.0, +20.0] | 2/0/0 |" in \
        report.markdown(report.summarize(runs))
