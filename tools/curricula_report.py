"""The report of tools/compare_curricula.py: read its run directories, aggregate over seeds,
write markdown tables and plots. Pure functions apart from reading files and drawing; the
compute accounting is tools/curricula_compute.py."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paced_ds.errors import UserError  # noqa: E402  (after the checkout is on the path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curricula_compute import estimate_flops, params_of_run, training_flops  # noqa: E402

BASELINE = "forward_kl"  # the unweighted distillation every other method is measured against; its compute is B
SNR_SOURCES = ("paced",)  # runs whose snr.jsonl has the step-0 probe, preferred first
BUDGETS = (0.25, 0.5, 1.0)  # the shares of B the held-out accuracy is read at
# An evaluation counts for a budget up to this share of B above it: a run's steps are whole, and
# a step's compute varies with the lengths of the sequences it draws.
BUDGET_SLACK = 0.02


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def competence_dir(out: Path, seed: int) -> Path:
    return out / "competence" / f"seed{seed}"


def sweep_dir(out: Path, method: str, lr: float, seed: int) -> Path:
    return out / "sweep" / method / f"lr{lr:g}" / f"seed{seed}"


def pilot_dir(out: Path, method: str) -> Path:
    return out / "pilot" / method


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; none when it does not exist (a run that wrote none)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---- reading the runs ---------------------------------------------------------------------

def load_runs(out: Path, methods: list[str], seeds: int | None = None) -> dict[str, dict[int, dict]]:
    """Finished runs under ``out``: {method: {seed: {"evals", "flops", "snr"}}}, ``flops`` the
    training compute at each evaluation (curricula_compute.training_flops). ``seeds``:
    0..seeds-1; None: every seed directory there. The seeds of a method must have trained the
    same steps (methods differ: each has its own steps at the same compute)."""
    runs = {}
    for method in methods:
        found = (range(seeds) if seeds is not None else
                 sorted(int(p.name[4:]) for p in (out / method).glob("seed*") if p.name[4:].isdigit()))
        steps = set()
        for seed in found:
            directory = run_dir(out, method, seed)
            config_path = directory / "config.json"
            evals = read_jsonl(directory / "eval.jsonl")
            if not config_path.is_file() or not evals:
                continue
            config = json.loads(config_path.read_text())
            run_steps = config["train"]["steps"]
            if evals[-1]["step"] != run_steps:
                print(f"compare_curricula: {directory} is unfinished (last evaluation at step "
                      f"{evals[-1]['step']} of {run_steps}); left out")
                continue
            if "flops_total" not in evals[-1]:
                raise UserError(f"{directory}: its eval.jsonl has no flops_* (a run made before paced-ds counted "
                                "compute); rerun the comparison in a new --out")
            steps.add(run_steps)
            metrics, snr = read_jsonl(directory / "metrics.jsonl"), read_jsonl(directory / "snr.jsonl")
            params = params_of_run(metrics[-1])
            charged = charged_flops(config, params)
            runs.setdefault(method, {})[seed] = {
                "evals": evals, "snr": snr, "flops": training_flops(evals, snr, charged, params),
                # the compute spent before the first step (the step-0 estimate): still the base student
                "start_flops": charged + metrics[0]["flops_rollout_step"]}
        if len(steps) > 1:
            raise UserError(f"{out / method} holds runs of different lengths ({sorted(steps)} steps); compare runs "
                            "of one plan: use separate --out directories")
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


def charged_flops(config: dict, params: dict[str, float]) -> float:
    """The compute of the shared step-0 estimate a run read (curriculum.competence) instead of
    rolling out itself, 2 N_S a token of its estimate.json ``forward_tokens``; 0 when it read none."""
    given = config.get("curriculum", {}).get("competence")
    if not given:
        return 0.0
    estimate = Path(given).parent / "estimate.json"
    if not estimate.is_file():
        raise UserError(f"{estimate}: missing, so the compute of the estimate in {given} is unknown; "
                        "rerun the comparison to make it again")
    return estimate_flops(json.loads(estimate.read_text())["forward_tokens"], params)


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


def at_budget(run: dict, limit: float) -> int:
    """The index of ``run``'s last evaluation whose training compute is at most ``limit`` FLOPs
    (the step-0 evaluation, at 0, when no later one is)."""
    return max(i for i, flops in enumerate(run["flops"]) if flops <= limit)


def accuracy_at_budget(seed_runs: dict[int, dict], limit: float) -> dict[int, dict]:
    """Per seed, the last evaluation at or below ``limit`` FLOPs: {"accuracy", "flops", "step"}."""
    out = {}
    for seed, run in seed_runs.items():
        i = at_budget(run, limit)
        out[seed] = {"accuracy": run["evals"][i]["accuracy"], "flops": run["flops"][i], "step": run["evals"][i]["step"]}
    return out


def first_reaching(run: dict, threshold: float) -> dict | None:
    """The first evaluation at or above ``threshold``: {"step", "flops"}; None if none."""
    for row, flops in zip(run["evals"], run["flops"]):
        if row["accuracy"] >= threshold - 1e-9:  # exact ties of k/N accuracies count as reached
            return {"step": row["step"], "flops": flops}
    return None


def accuracy_curve(seed_runs: dict[int, dict]) -> dict:
    """Overall accuracy at each evaluation step every seed has: steps, the mean training compute
    there (flops), mean and std of the accuracy."""
    by_seed = [{row["step"]: (row["accuracy"], flops) for row, flops in zip(run["evals"], run["flops"])}
               for run in seed_runs.values()]
    steps = sorted(set.intersection(*(set(points) for points in by_seed)))
    accuracy = [mean_std([points[step][0] for points in by_seed]) for step in steps]
    return {"steps": steps, "flops": [statistics.fmean(points[step][1] for points in by_seed) for step in steps],
            "mean": [a["mean"] for a in accuracy], "std": [a["std"] or 0.0 for a in accuracy],
            "start_flops": statistics.fmean(run.get("start_flops", 0.0) for run in seed_runs.values())}


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


def summarize(runs: dict[str, dict[int, dict]], budgets: dict | None = None) -> dict:
    """Everything the report shows, from ``load_runs``' result and the plan (budgets.json, if any)."""
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
              "base": {"accuracy": {key: mean_std([accuracies(row, levels)[key] for row in base_rows.values()])
                                    for key in [*levels, "all"]},
                       "seeds": len(base_rows), "same_in_every_run": len(step0) == 1},
              "plan": budgets, "methods": {}}
    for method, seed_runs in runs.items():
        finals = [accuracies(run["evals"][-1], levels) for run in seed_runs.values()]
        result["methods"][method] = {
            "seeds": sorted(seed_runs), "steps": next(iter(seed_runs.values()))["evals"][-1]["step"],
            "accuracy": {key: mean_std([f[key] for f in finals]) for key in [*levels, "all"]},
            "forgetting": mean_std([forgetting(run["evals"]) for run in seed_runs.values()]),
            "base_solved": mean_std([run["evals"][0]["retention_set"] if "retention_set" in run["evals"][0]
                                     else len(run["evals"][0].get("solved", [])) for run in seed_runs.values()]),
            "flops": mean_std([run["flops"][-1] for run in seed_runs.values()]),
            "curve": accuracy_curve(seed_runs),
        }
    # B, as measured: forward_kl's training compute at its final evaluation, mean over seeds.
    budget = result["methods"].get(BASELINE, {}).get("flops", {}).get("mean")
    baseline = result["methods"].get(BASELINE, {}).get("accuracy", {}).get("all", {}).get("mean")
    result["budget_flops"], result["baseline_accuracy"] = budget, baseline
    # A method that does not fit: the share of B its fewest steps would need.
    result["not_run"] = {m: b["planned_flops"] / budgets["budget_flops"] for m, b in (budgets or {}).get(
        "methods", {}).items() if not b["steps"]}
    if budget is None:
        return with_snr(result, runs)
    at = {method: {share: accuracy_at_budget(seed_runs, (share + BUDGET_SLACK) * budget) for share in BUDGETS}
          for method, seed_runs in runs.items()}
    for method, seed_runs in runs.items():
        r = result["methods"][method]
        r["at_budget"] = {f"{share:g}": {"accuracy": mean_std([e["accuracy"] for e in chosen.values()]),
                                         "flops_share": mean_std([e["flops"] / budget for e in chosen.values()]),
                                         "per_seed": {str(seed): e for seed, e in chosen.items()}}
                          for share, chosen in at[method].items()}
        reached = [first_reaching(run, baseline) for run in seed_runs.values()]
        hits = [x for x in reached if x is not None]
        r["to_baseline"] = {"reached": len(hits), "seeds": len(reached), "steps": mean_std([x["step"] for x in hits]),
                            "flops_share": mean_std([x["flops"] / budget for x in hits]),
                            "per_seed": dict(zip(map(str, seed_runs), reached))}
        if method != BASELINE:  # paired by seed at the whole budget and at half of it
            for key, share in (("vs_baseline", 1.0), ("vs_baseline_half", 0.5)):
                r[key] = paired_difference({s: e["accuracy"] for s, e in at[method][share].items()},
                                           {s: e["accuracy"] for s, e in at[BASELINE][share].items()})
    return with_snr(result, runs)


def with_snr(result: dict, runs: dict[str, dict[int, dict]]) -> dict:
    """``result`` with the SNR tables: the paced runs' probes at step 0 and nearest half-way."""
    source = next((m for m in SNR_SOURCES if m in runs and any(run["snr"] for run in runs[m].values())), None)
    probe_steps = sorted({row["step"] for run in runs[source].values() for row in run["snr"]}) if source else []
    steps = result["methods"][source]["steps"] if source else 0
    middle = min((s for s in probe_steps if s > 0), key=lambda s: abs(s - steps / 2), default=None)
    result["snr"] = {"source": source, "buckets": snr_at(runs[source], 0) if source else {},
                     "middle_step": middle, "middle": snr_at(runs[source], middle) if middle is not None else {}}
    return result


# ---- the report ---------------------------------------------------------------------------

COMPUTE_NOTE = ("Training compute: student (6 N_S a token trained) + teacher (2 N_T a token scored) + rollouts "
                "(2 N_S a token of competence estimates and on-policy rollouts), as each run's meter counts them, "
                "plus, for a method that reads the seed's shared step-0 estimate, that estimate's rollouts (2 N_S "
                "a token). Held-out and retention evaluations and the paced runs' gradient-SNR probes are "
                "measurement and are not counted.")


def pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f}" + (f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else "")


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def markdown(results: dict) -> str:
    levels, methods, base = results["levels"], results["methods"], results["base"]
    budget = results["budget_flops"]
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
                        "per cell, each method at its own steps; the chosen rate in bold.\n\n"
                        + table(["method", *lrs], rows))
    sections.append(budget_section(results))
    if budget is None:
        sections.append(f"### Held-out accuracy at compute budgets\n\n{BASELINE} was not run: no budget.")
    else:
        columns = [f"{100 * s:g}% of B" for s in BUDGETS]
        rows = [["base (step 0)", str(base["seeds"]), *(f"{pct(base['accuracy']['all'])} (0%)" for _ in BUDGETS)]]
        for m, r in methods.items():
            cells = [f"{pct(r['at_budget'][f'{s:g}']['accuracy'])} "
                     f"({share(r['at_budget'][f'{s:g}']['flops_share']['mean'])})" for s in BUDGETS]
            rows.append([m, str(len(r["seeds"])), *cells])
        sections.append(f"### Held-out accuracy (%) at 25%, 50% and 100% of B\n\nPer seed, the last evaluation "
                        f"whose training compute is at most the budget (plus {100 * BUDGET_SLACK:g}% of B, for whole "
                        "steps); the step-0 evaluation, the base student, counts as compute 0. Mean ± std over "
                        "seeds; in brackets, where those evaluations lay (mean share of B).\n\n"
                        + table(["method", "seeds", *columns], rows))

    rows = [["base (step 0)", str(base["seeds"]), *(pct(base["accuracy"][k]) for k in [*levels, "all"])]]
    rows += [[m, str(r["steps"]), *(pct(r["accuracy"][k]) for k in [*levels, "all"])] for m, r in methods.items()]
    note = "" if base["same_in_every_run"] else " The step-0 evaluations differ between runs."
    sections.append("### Held-out accuracy (%) per level at the final evaluation\n\nGreedy accuracy on the held-out "
                    "problems per difficulty level after each method's own steps (its whole budget; its measured "
                    f"compute is in the budget table), mean ± std over seeds.{note}\n\n"
                    + table(["method", "steps", *levels, "all"], rows))

    if budget is not None:
        def cells(d):
            if d is None:
                return ["n/a", "", ""]
            return [f"{100 * d['mean']:+.1f}", f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
                    f"{d['wins']}/{d['ties']}/{d['losses']}"]

        rows = [[m, *cells(r.get("vs_baseline")), *cells(r.get("vs_baseline_half"))]
                for m, r in methods.items() if m != BASELINE and r.get("vs_baseline") is not None]
        if rows:
            sections.append(f"### Against {BASELINE} at equal compute, paired by seed\n\nHeld-out accuracy at 100% "
                            f"and at 50% of B minus {BASELINE}'s of the same seed at the same budget (points): mean, "
                            "95% percentile-bootstrap interval over seeds, and seeds won/tied/lost. An interval "
                            "that contains 0 is no evidence of a difference.\n\n"
                            + table(["method", "100% of B", "95% interval", "won/tied/lost", "50% of B",
                                     "95% interval", "won/tied/lost"], rows))

    rows = [[m, pct(r["forgetting"]), f"{r['base_solved']['mean']:.0f}" if r["base_solved"]["mean"] else "n/a"]
            for m, r in methods.items()]
    what = ("the retention set (the retention problems the base student solves)" if results.get("retention")
            else "the held-out problems the base student solves")
    sections.append(f"### Forgetting\n\nOf {what}, the share (%) the final student no longer solves, "
                    "mean ± std over seeds.\n\n"
                    + table(["method", "forgotten (%)", "problems in the set"], rows))

    if budget is not None:
        rows = []
        for m, r in methods.items():
            reach = r["to_baseline"]
            if not reach["reached"]:
                rows.append([m, "not reached", "", f"0/{reach['seeds']}"])
                continue
            rows.append([m, share(reach["flops_share"]["mean"]), f"{reach['steps']['mean']:.0f}",
                         f"{reach['reached']}/{reach['seeds']}"])
        below = results["baseline_accuracy"] <= base["accuracy"]["all"]["mean"]
        note = (f" {BASELINE} ends at or below the base student ({pct(base['accuracy']['all'])}%), so every run "
                "reaches it at step 0 and this table says nothing." if below else "")
        sections.append(f"### Compute to reach {BASELINE}'s final accuracy\n\nFirst evaluation at or above "
                        f"{BASELINE}'s final mean accuracy, {100 * results['baseline_accuracy']:.1f}%: its training "
                        "compute (share of B) and step, mean over the seeds that reach it. The evaluations are "
                        f"every few steps, so this is an upper bound on the compute needed.{note}\n\n"
                        + table(["method", "compute (share of B)", "step", "seeds reaching"], rows))

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


def budget_section(results: dict) -> str:
    """The plan (budgets.json) beside what the runs measured."""
    plan, budget, methods = results.get("plan"), results["budget_flops"], results["methods"]
    head = "### Compute budget\n\n" + COMPUTE_NOTE
    if plan is None:
        return head + "\n\nNo plan (budgets.json) in this directory."
    planned = plan["budget_flops"]
    as_measured = f", {budget:.3g} as measured (mean over its seeds)" if budget else ""
    head += (f"\n\nB = {BASELINE}'s compute over {plan['steps']} steps: {planned:.3g} FLOPs as planned from its "
             f"{plan['pilot_steps']}-step pilot{as_measured}. Each method trains the most steps whose planned "
             "compute is at most B: its competence estimates (the step-0 one, read or made, and its refreshes, "
             "each taken to cost what the step-0 one did) and its steps. A method is not run when even its fewest "
             "steps (1; R + 1 for R refreshes) would need more. Shares of the planned B, the last column of the "
             "measured B.")
    if budget and abs(budget / planned - 1) > BUDGET_SLACK:  # the plan missed: the budget columns would mislead
        head += (f" **The measured B is {100 * (budget / planned - 1):+.1f}% off the planned one**: runs planned to "
                 "the planned B may end past the 100% budget, whose column then shows an earlier evaluation.")
    rows = []
    for m, p in plan["methods"].items():
        per_step = (p["planned_flops"] - p["fixed_flops"]) / p["planned_steps"]
        if not p["steps"]:
            rows.append([m, "not run", share(p["fixed_flops"] / planned), f"{100 * per_step / planned:.2f}%",
                         f"{share(p['planned_flops'] / planned)} (its fewest steps)", ""])
            continue
        measured = methods.get(m, {}).get("flops", {}).get("mean")
        rows.append([m, str(p["steps"]), share(p["fixed_flops"] / planned), f"{100 * per_step / planned:.2f}%",
                     share(p["planned_flops"] / planned), share(measured / budget) if measured and budget else "n/a"])
    return head + "\n\n" + table(["method", "steps", "estimates", "a step", "planned", "measured"], rows)


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


def plot_accuracy(results: dict, path: Path, x: str = "compute") -> None:
    """Held-out accuracy per method against training compute (``x="compute"``, FLOPs, with B's
    shares marked) or against optimizer steps (``x="steps"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    styles, markers = ["-", "--", "-.", ":"], "osD^vP*X"  # overlapping curves stay distinguishable
    for i, (method, r) in enumerate(results["methods"].items()):
        curve = r["curve"]
        xs = list(curve["flops"] if x == "compute" else curve["steps"])
        mean = [100 * m for m in curve["mean"]]
        std = [100 * s for s in curve["std"]]
        if x == "compute" and curve.get("start_flops") and curve["steps"][:1] == [0]:
            # the estimate before the first step buys no accuracy yet: flat until training starts
            xs.insert(1, curve["start_flops"])
            mean.insert(1, mean[0])
            std.insert(1, std[0])
        line, = ax.plot(xs, mean, styles[i % len(styles)], marker=markers[i % len(markers)],
                        markersize=4, lw=1.6, color=f"C{i}", label=f"{method} ({len(r['seeds'])} seeds)")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.12, lw=0)
    if results["baseline_accuracy"] is not None:
        ax.axhline(100 * results["baseline_accuracy"], color="grey", lw=0.8, ls=":",
                   label=f"{BASELINE} final mean")
    if x == "compute":
        if results["budget_flops"]:
            for s in BUDGETS:
                ax.axvline(s * results["budget_flops"], color="black", lw=0.6, ls="--", alpha=0.5)
                ax.annotate(f"{100 * s:g}% of B", (s * results["budget_flops"], 0), xycoords=("data", "axes fraction"),
                            xytext=(3, 4), textcoords="offset points", fontsize=7)
        ax.set_xlabel("training compute, FLOPs (evaluation not counted)")
        ax.set_title("Held-out greedy accuracy against compute, mean over seeds (band: ± std)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("student optimizer steps")
        ax.set_title("Held-out greedy accuracy against steps, mean over seeds (band: ± std)")
    ax.set_ylabel("held-out accuracy (%)")
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
