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
    assert text.count("\n|---|") == 4


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


def test_the_default_comparison_fits_the_hour_budget():
    args = cc.parse_args([])
    total_s = sum(cc.estimate_run_s(m, args.steps, args.eval_every, args.snr_every, 1600, 8) for m in args.methods)
    assert total_s * args.seeds + cc.COST_S["launch"] < 45 * 60
