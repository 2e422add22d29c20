"""tools/compare_curricula.py and its report (tools/curricula_report.py): planning, resuming and
the aggregation of run directories, on hand-made runs (no launch)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import compare_curricula as cc  # noqa: E402
import curricula_report as report  # noqa: E402

from paced_ds.errors import UserError


def eval_row(step, accuracy, l1, l2, solved):
    return {"step": step, "accuracy": accuracy, "by_difficulty": {"L2": l2, "L1": l1}, "count": 4, "solved": solved}


def run(final_accuracy, final_solved, *, middle=0.5, snr=None):
    """A 20-step run evaluated at 0, 10, 20 whose base student solves a, b (accuracy 0.5)."""
    evals = [eval_row(0, 0.5, 1.0, 0.0, ["a", "b"]), eval_row(10, middle, 0.5, 0.5, ["a", "c"]),
             eval_row(20, final_accuracy, final_accuracy, final_accuracy, final_solved)]
    metrics = [{"step": s, "forward_tokens": 1000 + 100 * s} for s in range(1, 21)]
    return {"evals": evals, "metrics": metrics, "snr": snr or []}


def snr_row(step, values):
    return {"step": step, "buckets": {name: None if v is None else
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


def test_first_reaching_takes_the_first_evaluation_and_its_forward_tokens():
    r = run(0.75, [], middle=0.6)
    assert report.first_reaching(r["evals"], r["metrics"], 0.6) == {"step": 10, "forward_tokens": 2000}
    assert report.first_reaching(r["evals"], r["metrics"], 0.7) == {"step": 20, "forward_tokens": 3000}
    assert report.first_reaching(r["evals"], r["metrics"], 0.5) == {"step": 0, "forward_tokens": 0}
    assert report.first_reaching(r["evals"], r["metrics"], 0.8) is None
    # A mean of k/N accuracies that rounds a hair above one of them still counts as reached.
    assert report.first_reaching(r["evals"], r["metrics"], (0.6 + 0.6 + 0.6) / 3)["step"] == 10


def test_summarize_base_row_levels_baseline_and_reaching():
    runs = {"forward_kl": {0: run(0.6, ["a"]), 1: run(0.7, ["a", "b"])},
            "paced": {0: run(0.75, ["a", "b"], middle=0.7), 1: run(0.5, ["b"])}}
    results = report.summarize(runs)
    assert results["levels"] == ["L1", "L2"] and results["steps"] == 20 and results["seeds"] == [0, 1]
    assert results["base"]["accuracy"]["all"]["mean"] == 0.5 and results["base"]["accuracy"]["L1"]["mean"] == 1.0
    assert results["base"]["same_in_every_run"]
    assert results["baseline_accuracy"] == pytest.approx(0.65)
    fkl, paced = results["methods"]["forward_kl"], results["methods"]["paced"]
    assert fkl["accuracy"]["all"]["mean"] == pytest.approx(0.65)
    assert fkl["accuracy"]["all"]["std"] == pytest.approx(math.sqrt(0.005))
    assert fkl["forgetting"]["mean"] == pytest.approx(0.25)  # 1/2 lost, then 0/2
    assert fkl["to_baseline"]["reached"] == 1 and fkl["to_baseline"]["steps"]["mean"] == 20
    reach = paced["to_baseline"]
    assert reach["reached"] == 1 and reach["seeds"] == 2
    assert reach["steps"]["mean"] == 10 and reach["forward_tokens"]["mean"] == 2000
    assert paced["curve"] == {"steps": [0, 10, 20], "mean": [0.5, 0.6, 0.625],
                              "std": [0.0, pytest.approx(math.sqrt(0.02)), pytest.approx(math.sqrt(0.03125))]}


def test_summarize_without_the_baseline_has_no_threshold():
    results = report.summarize({"paced": {0: run(0.6, ["a"])}})
    assert results["baseline_accuracy"] is None and "to_baseline" not in results["methods"]["paced"]
    assert "forward_kl was not run" in report.markdown(results)
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


def test_markdown_has_the_four_tables():
    runs = {"forward_kl": {0: run(0.6, ["a"]), 1: run(0.7, ["a", "b"])},
            "paced": {0: run(0.4, ["a"], snr=[snr_row(0, {"p=0": (0.0, 0.0), "(0,1)": (0.5, 0.4)})])}}
    text = report.markdown(report.summarize(runs))
    assert "| base (step 0) | 2 | 100.0 ± 0.0 | 0.0 ± 0.0 | 50.0 ± 0.0 |" in text
    assert "| forward_kl | 2 | 65.0 ± 7.1 | 65.0 ± 7.1 | 65.0 ± 7.1 |" in text
    assert "| paced | not reached |  | 0/1 |" in text
    assert "| forward_kl | 20 | 3.00M | 1/2 |" not in text and "| forward_kl | 20 | 3k | 1/2 |" in text
    assert "| (0,1) | 0.400 | 16 | 0.5 | 1 |" in text
    assert text.count("\n|---|") == 4  # accuracy, forgetting, reaching, SNR (no seed pairs: no paired table)


def test_run_state_done_partial_absent_and_other_settings(tmp_path):
    expected = {"train": {"steps": 20, "output_dir": "x", "seed": 0}, "data": {"responses_dir": "r"}}
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


def test_load_runs_leaves_out_unfinished_runs_and_refuses_mixed_lengths(tmp_path):
    def write(method, seed, steps, last_step):
        directory = tmp_path / method / f"seed{seed}"
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({"train": {"steps": steps}}))
        (directory / "eval.jsonl").write_text(
            "".join(json.dumps(eval_row(s, 0.5, 1, 0, [])) + "\n" for s in (0, last_step)))

    write("paced", 0, 20, 20)
    write("paced", 1, 20, 10)
    runs = report.load_runs(tmp_path, ["forward_kl", "paced"])
    assert list(runs) == ["paced"] and list(runs["paced"]) == [0]
    assert report.load_runs(tmp_path, ["paced"], seeds=3)["paced"].keys() == {0}
    write("forward_kl", 0, 30, 30)
    with pytest.raises(UserError, match="different lengths"):
        report.load_runs(tmp_path, ["forward_kl", "paced"])


def test_the_default_comparison_fits_the_hour_budget(tmp_path):
    """The estimate (COST_S, measured here) of the sweep (every method at every rate), the seeds'
    step-0 estimates and the comparison (every method at one rate, every seed) is under an hour."""
    args = cc.parse_args(["--out", str(tmp_path)])
    assert len(args.lrs) >= 3 and args.seeds >= 5
    sweep = cc.plan_runs(args, {m: args.lrs for m in args.methods}, args.sweep_seeds, sweep=True)
    comparison = cc.plan_runs(args, {m: [1e-3] for m in args.methods}, args.seeds, sweep=False)
    assert len(sweep) == len(args.methods) * len(args.lrs) * args.sweep_seeds + args.sweep_seeds
    assert len(comparison) == len(args.methods) * args.seeds + args.seeds  # no estimate is done yet
    total_s = sum(r["estimate_s"] for r in sweep + comparison) + 2 * cc.COST_S["launch"]
    assert total_s < 60 * 60


def test_sweep_runs_score_on_validation_and_comparison_runs_on_held_out_with_retention(tmp_path):
    args = cc.parse_args(["--out", str(tmp_path), "--steps", "40"])
    sweep = cc.run_overrides(args, "paced", 0, 1e-3, sweep=True)
    final = cc.run_overrides(args, "paced", 3, 3e-3, sweep=False)
    assert "data.eval=arith:val" in sweep and "data.retain=" in sweep and "eval.every=0" in sweep
    assert "data.eval=arith:eval" in final and "data.retain=arith:retain" in final
    assert "train.lr=0.001" in sweep and "train.lr=0.003" in final and "train.seed=3" in final
    assert f"train.output_dir={tmp_path}/sweep/paced/lr0.001/seed0" in sweep
    assert f"train.output_dir={tmp_path}/paced/seed3" in final
    # paced probes the SNR at 0, S/2 and S only in the comparison; calibrated needs its probes in both.
    assert "snr.every=0" in sweep and "snr.every=20" in final
    assert "snr.every=10" in cc.run_overrides(args, "paced_calibrated", 0, 1e-3, sweep=True)
    assert "curriculum.apply=sample" in cc.run_overrides(args, "paced_sample", 0, 1e-3, sweep=False)


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
    runs = {"forward_kl": {0: {"evals": evals, "metrics": [], "snr": []}, 1: {"evals": evals, "metrics": [], "snr": []}}}
    results = report.summarize(runs)
    assert results["retention"] and results["methods"]["forward_kl"]["base_solved"]["mean"] == 10
    assert "the retention set" in report.markdown(results)


def test_snr_mid_run_is_the_probe_nearest_half_way():
    rows = [snr_row(0, {"(0,1)": (0.5, 0.4)}), snr_row(10, {"(0,1)": (0.2, 0.5)}), snr_row(20, {"(0,1)": (0.1, 0.6)})]
    runs = {"paced": {0: run(0.6, [], snr=rows), 1: run(0.6, [], snr=rows)}}
    snr = report.summarize(runs)["snr"]
    assert snr["middle_step"] == 10 and snr["middle"]["(0,1)"]["snr"]["mean"] == pytest.approx(0.2)
    assert "at step 10" in report.markdown(report.summarize(runs))


def test_one_step0_estimate_per_seed_serves_every_method_that_weights_by_pass_rates(tmp_path):
    args = cc.parse_args(["--out", str(tmp_path), "--steps", "20", "--methods", "forward_kl", "paced", "hard_filter"])
    competence = tmp_path / "competence" / "seed1" / "competence.jsonl"
    assert f"curriculum.competence={competence}" in cc.run_overrides(args, "paced", 1, 1e-3, sweep=True)
    assert f"curriculum.competence={competence}" in cc.run_overrides(args, "hard_filter", 1, 3e-3, sweep=False)
    assert not any(o.startswith("curriculum.competence=") for o in cc.run_overrides(args, "forward_kl", 1, 1e-3,
                                                                                      sweep=False))
    pending = cc.plan_runs(args, {m: [1e-3, 3e-3] for m in args.methods}, 2, sweep=True)
    assert [(r["method"], r["seed"]) for r in pending[:7]] == [
        ("estimate", 0), ("forward_kl", 0), ("forward_kl", 0), ("paced", 0), ("paced", 0), ("hard_filter", 0),
        ("hard_filter", 0)]
    assert pending[7]["method"] == "estimate" and pending[7]["seed"] == 1
    # A finished estimate is not planned again.
    (tmp_path / "competence" / "seed0").mkdir(parents=True)
    (tmp_path / "competence" / "seed0" / "estimate.json").write_text(json.dumps({"forward_tokens": 500}))
    pending = cc.plan_runs(args, {m: [1e-3] for m in args.methods}, 1, sweep=True)
    assert "estimate" not in [r["method"] for r in pending]


def test_a_run_that_read_its_pass_rates_is_charged_the_estimates_tokens(tmp_path):
    estimate_dir = tmp_path / "competence" / "seed0"
    estimate_dir.mkdir(parents=True)
    (estimate_dir / "estimate.json").write_text(json.dumps({"forward_tokens": 500}))
    for method, given in (("paced", str(estimate_dir / "competence.jsonl")), ("forward_kl", "")):
        directory = tmp_path / method / "seed0"
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({"train": {"steps": 20}, "curriculum": {"competence": given}}))
        r = run(0.7, [], middle=0.7)
        (directory / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in r["evals"]))
        (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in r["metrics"]))
    runs = report.load_runs(tmp_path, ["forward_kl", "paced"])
    assert runs["paced"][0]["estimate_tokens"] == 500 and runs["forward_kl"][0]["estimate_tokens"] == 0
    results = report.summarize(runs)
    assert results["methods"]["paced"]["to_baseline"]["forward_tokens"]["mean"] == 2000 + 500
    assert results["methods"]["forward_kl"]["to_baseline"]["forward_tokens"]["mean"] == 2000


def test_paired_differences_at_the_end_and_half_way():
    runs = {"forward_kl": {0: run(0.6, [], middle=0.5), 1: run(0.7, [], middle=0.6)},
            "paced": {0: run(0.65, [], middle=0.7), 1: run(0.7, [], middle=0.8)}}
    results = report.summarize(runs)
    assert results["paired_middle_step"] == 10
    paced = results["methods"]["paced"]
    assert paced["vs_baseline"]["mean"] == pytest.approx(0.025) and paced["vs_baseline"]["wins"] == 1
    assert paced["vs_baseline_middle"]["mean"] == pytest.approx(0.2) and paced["vs_baseline_middle"]["wins"] == 2
    assert "| paced | +2.5 | [+0.0, +5.0] | 1/1/0 | +20.0 | [+20.0, +20.0] | 2/0/0 |" in report.markdown(results)
