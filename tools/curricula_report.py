"""The report of tools/compare_curricula.py: read its run directories, aggregate over seeds,
write markdown tables and plots. Pure functions apart from reading files and drawing."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paced_ds.errors import UserError  # noqa: E402  (after the checkout is on the path)

BASELINE = "forward_kl"  # the unweighted distillation every other method is measured against
SNR_SOURCES = ("paced", "paced_calibrated")  # runs whose snr.jsonl has the step-0 probe, preferred first


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def competence_dir(out: Path, seed: int) -> Path:
    return out / "competence" / f"seed{seed}"


def sweep_dir(out: Path, method: str, lr: float, seed: int) -> Path:
    return out / "sweep" / method / f"lr{lr:g}" / f"seed{seed}"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; none when it does not exist (a run that wrote none)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---- reading the runs ---------------------------------------------------------------------

def load_runs(out: Path, methods: list[str], seeds: int | None = None) -> dict[str, dict[int, dict]]:
    """Finished runs under ``out``: {method: {seed: {"evals", "metrics", "snr"}}}. ``seeds``:
    0..seeds-1; None: every seed directory there. All must have trained the same steps."""
    runs, steps = {}, set()
    for method in methods:
        found = (range(seeds) if seeds is not None else
                 sorted(int(p.name[4:]) for p in (out / method).glob("seed*") if p.name[4:].isdigit()))
        for seed in found:
            directory = run_dir(out, method, seed)
            config_path = directory / "config.json"
            evals = read_jsonl(directory / "eval.jsonl")
            if not config_path.is_file() or not evals:
                continue
            run_steps = json.loads(config_path.read_text())["train"]["steps"]
            if evals[-1]["step"] != run_steps:
                print(f"compare_curricula: {directory} is unfinished (last evaluation at step "
                      f"{evals[-1]['step']} of {run_steps}); left out")
                continue
            steps.add(run_steps)
            runs.setdefault(method, {})[seed] = {"evals": evals, "metrics": read_jsonl(directory / "metrics.jsonl"),
                                                 "snr": read_jsonl(directory / "snr.jsonl"),
                                                 "estimate_tokens": given_estimate_tokens(config_path)}
    if len(steps) > 1:
        raise UserError(f"{out} holds runs of different lengths ({sorted(steps)} steps); compare runs of one "
                        "length: use separate --out directories")
    return runs


def sweep_results(out: Path, methods: list[str], lrs: list[float], seeds: int) -> dict[str, dict[str, dict]]:
    """Final validation accuracy of the sweep: {method: {lr: mean_std over seeds}}."""
    result = {}
    for method in methods:
        for lr in lrs:
            finals = []
            for seed in range(seeds):
                evals = read_jsonl(sweep_dir(out, method, lr, seed) / "eval.jsonl")
                if not evals:
                    raise UserError(f"{sweep_dir(out, method, lr, seed)}: the sweep run has no evaluation; "
                                    "rerun the comparison to finish it")
                finals.append(evals[-1]["accuracy"])
            result.setdefault(method, {})[f"{lr:g}"] = mean_std(finals)
    return result


def given_estimate_tokens(config_path: Path) -> int:
    """Student forward tokens of the competence estimate a run read (curriculum.competence) instead
    of rolling out itself: they count as that run's. 0 when it read none."""
    given = json.loads(config_path.read_text()).get("curriculum", {}).get("competence")
    if not given:
        return 0
    estimate = Path(given).parent / "estimate.json"
    return json.loads(estimate.read_text())["forward_tokens"] if estimate.is_file() else 0


# ---- aggregation (pure) -------------------------------------------------------------------

def best_lrs(sweep: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Each method's learning rate of the highest mean validation accuracy; a tie keeps the smaller rate."""
    best = {}
    for method, by_lr in sweep.items():
        ordered = sorted(by_lr.items(), key=lambda item: float(item[0]))
        best[method] = float(max(ordered, key=lambda item: item[1]["mean"])[0])
    return best


def paired_difference(method: dict[int, float], baseline: dict[int, float], resamples: int = 10_000,
                      seed: int = 0) -> dict | None:
    """``method - baseline`` paired by seed: mean, a percentile-bootstrap 95% interval over seeds,
    and the seeds won, tied and lost. None without two shared seeds."""
    import random

    shared = sorted(set(method) & set(baseline))
    if len(shared) < 2:
        return None
    diffs = [method[s] - baseline[s] for s in shared]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return {"mean": statistics.fmean(diffs), "low": means[int(0.025 * resamples)],
            "high": means[int(0.975 * resamples) - 1], "seeds": len(shared),
            "wins": sum(d > 1e-12 for d in diffs), "ties": sum(abs(d) <= 1e-12 for d in diffs),
            "losses": sum(d < -1e-12 for d in diffs)}


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (sample std; None below 2 values), "n"}; mean None for no values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def level_names(evals: list[dict]) -> list[str]:
    from paced_ds.models.generation import accuracy_table

    return list(accuracy_table(evals[-1]["by_difficulty"]))


def accuracies(row: dict, levels: list[str]) -> dict[str, float]:
    """One eval.jsonl row's accuracy per level and overall ("all")."""
    return {**{level: row["by_difficulty"].get(level, math.nan) for level in levels}, "all": row["accuracy"]}


def forgetting(evals: list[dict]) -> float | None:
    """Share of the retention set (the retention problems solved at step 0) that the final
    evaluation no longer solves; without a retention set, the same share of the held-out
    problems solved at step 0 (eval.record_problems). None when neither was recorded."""
    if "forgotten" in evals[-1]:
        value = evals[-1]["forgotten"]
        return value if value is not None and math.isfinite(value) else None
    if "solved" not in evals[0] or "solved" not in evals[-1] or not evals[0]["solved"]:
        return None
    before, after = set(evals[0]["solved"]), set(evals[-1]["solved"])
    return len(before - after) / len(before)


def forward_tokens_at(metrics: list[dict], step: int, before: int = 0) -> int:
    """Student forward tokens spent by the end of ``step``: ``before`` (a step-0 estimate made
    outside the run), plus the run's own count."""
    rows = [row for row in metrics if row["step"] <= step]
    return before + (rows[-1]["forward_tokens"] if rows else 0)


def first_reaching(evals: list[dict], metrics: list[dict], threshold: float, before: int = 0) -> dict | None:
    """The first evaluation at or above ``threshold``: {"step", "forward_tokens"}; None if none."""
    for row in evals:
        if row["accuracy"] >= threshold - 1e-9:  # exact ties of k/N accuracies count as reached
            return {"step": row["step"], "forward_tokens": forward_tokens_at(metrics, row["step"], before)}
    return None


def accuracy_at(seed_runs: dict[int, dict], step: int) -> dict[int, float]:
    """Overall accuracy per seed at the evaluation of ``step`` (seeds without one left out)."""
    found = {seed: [row["accuracy"] for row in run["evals"] if row["step"] == step] for seed, run in seed_runs.items()}
    return {seed: values[0] for seed, values in found.items() if values}


def accuracy_curve(seed_runs: dict[int, dict]) -> dict:
    """Overall accuracy at each evaluation step every seed has: steps, mean, std."""
    by_seed = [{row["step"]: row["accuracy"] for row in run["evals"]} for run in seed_runs.values()]
    steps = sorted(set.intersection(*(set(acc) for acc in by_seed)))
    points = [mean_std([acc[step] for acc in by_seed]) for step in steps]
    return {"steps": steps, "mean": [p["mean"] for p in points], "std": [p["std"] or 0.0 for p in points]}


def snr_at(seed_runs: dict[int, dict], step: int = 0) -> dict:
    """Per bucket, over seeds, from each run's probe at ``step``: SNR, mean pass rate, problems probed."""
    rows = [row for run in seed_runs.values() for row in run["snr"] if row["step"] == step]
    names = list(dict.fromkeys(name for row in rows for name in row["buckets"]))
    result = {}
    for name in names:
        parts = [row["buckets"].get(name) for row in rows]
        parts = [p for p in parts if p is not None]
        result[name] = {"snr": mean_std([p["snr"] for p in parts]),
                        "pass_rate": mean_std([p["pass_rate"] for p in parts]),
                        "count": mean_std([p["count"] for p in parts]), "seeds": len(parts),
                        "infinite": sum(1 for p in parts if math.isinf(p["snr"]))}
    return result


def summarize(runs: dict[str, dict[int, dict]]) -> dict:
    """Everything the report shows, from ``load_runs``' result."""
    if not runs:
        raise UserError("no finished run to report on")
    first = next(iter(runs.values()))
    levels = level_names(next(iter(first.values()))["evals"])
    seeds = sorted({seed for seed_runs in runs.values() for seed in seed_runs})
    # base: the step-0 evaluation, per seed from the first method that has that seed.
    base_rows = {seed: next(r[seed]["evals"][0] for r in runs.values() if seed in r) for seed in seeds}
    step0 = {json.dumps(accuracies(run["evals"][0], levels)) for r in runs.values() for run in r.values()}
    result = {"levels": levels, "seeds": seeds,
              "retention": all("retention_set" in run["evals"][0] for r in runs.values() for run in r.values()),
              "steps": next(iter(first.values()))["evals"][-1]["step"],
              "base": {"accuracy": {key: mean_std([accuracies(row, levels)[key] for row in base_rows.values()])
                                    for key in [*levels, "all"]},
                       "seeds": len(base_rows), "same_in_every_run": len(step0) == 1},
              "methods": {}}
    for method, seed_runs in runs.items():
        finals = [accuracies(run["evals"][-1], levels) for run in seed_runs.values()]
        result["methods"][method] = {
            "seeds": sorted(seed_runs),
            "accuracy": {key: mean_std([f[key] for f in finals]) for key in [*levels, "all"]},
            "forgetting": mean_std([forgetting(run["evals"]) for run in seed_runs.values()]),
            "base_solved": mean_std([run["evals"][0]["retention_set"] if "retention_set" in run["evals"][0]
                                     else len(run["evals"][0].get("solved", [])) for run in seed_runs.values()]),
            "curve": accuracy_curve(seed_runs),
        }
    baseline = result["methods"].get(BASELINE, {}).get("accuracy", {}).get("all", {}).get("mean")
    result["baseline_accuracy"] = baseline
    if baseline is not None:
        for method, seed_runs in runs.items():
            reached = [first_reaching(run["evals"], run["metrics"], baseline, run.get("estimate_tokens", 0))
                       for run in seed_runs.values()]
            hits = [r for r in reached if r is not None]
            result["methods"][method]["to_baseline"] = {
                "reached": len(hits), "seeds": len(reached),
                "steps": mean_std([r["step"] for r in hits]),
                "forward_tokens": mean_std([r["forward_tokens"] for r in hits]),
                "per_seed": dict(zip(map(str, seed_runs), reached))}
        # Paired by seed at the end, and at the evaluation nearest half-way (how the race goes, not only its end).
        eval_steps = [row["step"] for row in next(iter(runs[BASELINE].values()))["evals"]]
        middle = min((s for s in eval_steps if 0 < s < result["steps"]), key=lambda s: abs(s - result["steps"] / 2),
                     default=None)
        result["paired_middle_step"] = middle
        for method, seed_runs in runs.items():
            if method == BASELINE:
                continue
            for key, step in (("vs_baseline", result["steps"]), ("vs_baseline_middle", middle)):
                if step is not None:
                    result["methods"][method][key] = paired_difference(
                        accuracy_at(seed_runs, step), accuracy_at(runs[BASELINE], step))
    source = next((m for m in SNR_SOURCES if m in runs and any(run["snr"] for run in runs[m].values())), None)
    probe_steps = sorted({row["step"] for run in runs[source].values() for row in run["snr"]}) if source else []
    # mid-run: the probe nearest half-way through the runs (the paced runs probe at S/2)
    middle = min((s for s in probe_steps if s > 0), key=lambda s: abs(s - result["steps"] / 2), default=None)
    result["snr"] = {"source": source, "buckets": snr_at(runs[source], 0) if source else {},
                     "middle_step": middle, "middle": snr_at(runs[source], middle) if middle is not None else {}}
    return result


# ---- the report ---------------------------------------------------------------------------

def pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f}" + (f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else "")


def tokens(count: float) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}k" if count else "0"


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def markdown(results: dict) -> str:
    levels, steps, methods = results["levels"], results["steps"], results["methods"]
    base = results["base"]
    sections = []
    if results.get("lr_sweep"):
        sweep = results["lr_sweep"]
        lrs = [f"{lr:g}" for lr in sweep["lrs"]]
        rows = []
        for m, by_lr in sweep["validation_accuracy"].items():
            chosen = f"{sweep['best'][m]:g}"
            rows.append([m, *(("**" + pct(by_lr[lr]) + "**") if lr == chosen else pct(by_lr[lr]) for lr in lrs)])
        sections.append(f"### Learning rates, chosen on the validation split\n\nFinal overall accuracy (%) on the "
                        f"validation split (disjoint from the held-out split below), {sweep['sweep_seeds']} seed(s) "
                        "per cell; the chosen rate in bold.\n\n" + table(["method", *lrs], rows))

    rows = [["base (step 0)", str(base["seeds"]), *(pct(base["accuracy"][k]) for k in [*levels, "all"])]]
    rows += [[m, str(len(r["seeds"])), *(pct(r["accuracy"][k]) for k in [*levels, "all"])] for m, r in methods.items()]
    note = "" if base["same_in_every_run"] else " The step-0 evaluations differ between runs."
    sections.append(f"### Held-out accuracy (%) after {steps} steps, mean ± std over seeds\n\n"
                    f"Greedy accuracy on the held-out problems per difficulty level.{note}\n\n"
                    + table(["method", "seeds", *levels, "all"], rows))

    if results["baseline_accuracy"] is not None:
        middle = results.get("paired_middle_step")

        def cells(d):
            if d is None:
                return ["n/a", "", ""]
            return [f"{100 * d['mean']:+.1f}", f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
                    f"{d['wins']}/{d['ties']}/{d['losses']}"]

        rows = [[m, *cells(r.get("vs_baseline")), *(cells(r.get("vs_baseline_middle")) if middle else [])]
                for m, r in methods.items() if m != BASELINE and r.get("vs_baseline") is not None]
        if rows:
            header = ["method", f"step {steps}", "95% interval", "won/tied/lost"]
            if middle:
                header += [f"step {middle}", "95% interval", "won/tied/lost"]
            sections.append(f"### Against {BASELINE}, paired by seed\n\nOverall held-out accuracy minus "
                            f"{BASELINE}'s of the same seed (points), at the end"
                            + (f" and at step {middle}" if middle else "") + ": mean, 95% percentile-bootstrap "
                            "interval over seeds, and seeds won/tied/lost. An interval that contains 0 is no "
                            "evidence of a difference.\n\n" + table(header, rows))

    rows = [[m, pct(r["forgetting"]), f"{r['base_solved']['mean']:.0f}" if r["base_solved"]["mean"] else "n/a"]
            for m, r in methods.items()]
    what = ("the retention set (the retention problems the base student solves)" if results.get("retention")
            else "the held-out problems the base student solves")
    sections.append(f"### Forgetting\n\nOf {what}, the share (%) the final student no longer solves, "
                    "mean ± std over seeds.\n\n"
                    + table(["method", "forgotten (%)", "problems in the set"], rows))

    if results["baseline_accuracy"] is None:
        sections.append(f"### Steps and tokens to the unweighted baseline\n\n{BASELINE} was not run: no threshold.")
    else:
        rows = []
        for m, r in methods.items():
            reach = r["to_baseline"]
            if not reach["reached"]:
                rows.append([m, "not reached", "", f"0/{reach['seeds']}"])
                continue
            rows.append([m, f"{reach['steps']['mean']:.0f}", tokens(reach["forward_tokens"]["mean"]),
                         f"{reach['reached']}/{reach['seeds']}"])
        below = results["baseline_accuracy"] <= base["accuracy"]["all"]["mean"]
        note = (f" {BASELINE} ends at or below the base student ({pct(base['accuracy']['all'])}%), so every run "
                "reaches it at step 0 and this table says nothing." if below else "")
        sections.append(f"### Steps and tokens to the unweighted baseline\n\nFirst evaluation at or above "
                        f"{BASELINE}'s final mean accuracy, "
                        f"{100 * results['baseline_accuracy']:.1f}%: optimizer steps and student forward tokens "
                        f"(training sequences and rollouts), mean over the seeds that reach it.{note}\n\n"
                        + table(["method", "steps", "student forward tokens", "seeds reaching"], rows))

    snr = results["snr"]
    if not snr["source"]:
        sections.append("### Gradient SNR per pass-rate bucket\n\nNo paced run with an SNR probe.")
    else:
        for step, buckets in ((0, snr["buckets"]), (snr.get("middle_step"), snr.get("middle", {}))):
            if step is None:
                continue
            sections.append(f"### Gradient SNR per pass-rate bucket at step {step}\n\nSNR = ||E g||^2 / tr Cov g "
                            f"over the problems of each bucket, probed at step {step} in the {snr['source']} runs "
                            "(buckets by the pass rates the run weights with); mean ± std over seeds.\n\n"
                            + snr_table(buckets))
    return "\n\n".join(sections) + "\n"


def snr_table(buckets: dict) -> str:
    rows = []
    for name, b in buckets.items():
        if not b["seeds"]:
            rows.append([name, "n/a", "n/a", "-", "0 (fewer than 2 problems)"])
            continue
        value = (f"{b['snr']['mean']:.3g}" + (f" ± {b['snr']['std']:.2g}" if b["snr"]["std"] is not None else "")
                 if b["snr"]["mean"] is not None else "inf") + (f" ({b['infinite']} inf)" if b["infinite"] else "")
        rows.append([name, f"{b['pass_rate']['mean']:.3f}", f"{b['count']['mean']:.0f}", value, str(b["seeds"])])
    return table(["bucket", "mean pass rate", "problems probed", "SNR", "seeds"], rows)


def plot_accuracy(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    styles, markers = ["-", "--", "-.", ":"], "osD^vP*X"  # overlapping curves stay distinguishable
    for i, (method, r) in enumerate(results["methods"].items()):
        curve = r["curve"]
        mean = [100 * m for m in curve["mean"]]
        std = [100 * s for s in curve["std"]]
        line, = ax.plot(curve["steps"], mean, styles[i % len(styles)], marker=markers[i % len(markers)],
                        markersize=4, lw=1.6, color=f"C{i}", label=f"{method} ({len(r['seeds'])} seeds)")
        ax.fill_between(curve["steps"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.12, lw=0)
    if results["baseline_accuracy"] is not None:
        ax.axhline(100 * results["baseline_accuracy"], color="grey", lw=0.8, ls=":",
                   label=f"{BASELINE} final mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("student optimizer steps")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Held-out greedy accuracy, mean over seeds (band: ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_snr(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    snr = results["snr"]
    series = [(0, snr["buckets"]), (snr.get("middle_step"), snr.get("middle", {}))]
    drawn = 0
    for i, (step, buckets) in enumerate(series):
        points = [(name, b) for name, b in buckets.items() if b["snr"]["mean"] is not None]
        if step is None or not points:
            continue
        drawn += 1
        xs = [b["pass_rate"]["mean"] for _, b in points]
        ys = [b["snr"]["mean"] for _, b in points]
        ax.errorbar(xs, ys, xerr=[b["pass_rate"]["std"] or 0 for _, b in points],
                    yerr=[b["snr"]["std"] or 0 for _, b in points], fmt="o-" if i == 0 else "s--", capsize=4,
                    lw=1.4, color=f"C{i}", label=f"step {step}")
        for (name, _), x, y in zip(points, xs, ys):
            right = x > 0.85  # labels near p = 1 go left of their point, inside the axes
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(-5 if right else 5, 6),
                        ha="right" if right else "left", fontsize=7, color=f"C{i}")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no SNR probe", ha="center", transform=ax.transAxes)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("pass rate p (bucket mean)")
    ax.set_ylabel("gradient SNR = ||E g||² / tr Cov g")
    ax.set_title(f"Gradient SNR per pass-rate bucket ({results['snr']['source'] or '-'} runs, "
                 "mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
