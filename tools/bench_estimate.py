"""Adaptive against fixed-K competence estimates on the reference task: rollouts, generated
tokens, seconds, and how well the per-problem weights agree.

    python tools/bench_estimate.py                       # the training split, the default settings (9 estimates)
    python tools/bench_estimate.py --tol 0.12 0.16 0.2   # the table in docs/curriculum.md#adaptive-estimate
    python tools/bench_estimate.py --split arith:val --fixed-seeds 0 1 4 --adaptive-seeds 2 3 5 --tol 0.12 0.14 0.16
                                                         # choosing settings: on the validation split

Each estimate is `paced-ds estimate` (the recipe's tiny student, --nproc ranks; its launch is
not counted in the seconds): fixed K = curriculum.rollouts with each --fixed-seeds, then the
adaptive estimate (curriculum.rollouts_min > 0) with each --tol and each --adaptive-seeds. The
markdown table gives each estimate's rollouts (and share of fixed K's), rounds, generated tokens,
seconds (rank 0's estimate), and the Spearman correlation of its per-problem weights
(competence.jsonl's ``weight``, ties at their average rank) with those of the first fixed-K
estimate. The other fixed-K rows are the noise floor: two fixed-K estimates with different
seeds agree that well. The seeds are train.seed values; give every estimate its own, so that no
two share a rollout. An estimate takes about a minute here (2 CPU ranks), launch included.

Estimates already in --out (a result.json beside competence.jsonl) are reused; --fresh redoes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from paced_ds.cli import DEMO_RECIPE, check_before_launch, launch_command  # noqa: E402
from paced_ds.config import load_config  # noqa: E402
from paced_ds.runtime.files import read_jsonl  # noqa: E402

TARGET_SHARE = 0.5  # the targets: at most half of fixed K's rollouts,
TARGET_SPEARMAN_GAP = 0.02  # and weights that agree with fixed K's at most this much less than fixed K's own
# The adaptive estimate's weights: posterior means under a prior fitted per difficulty level, those under 20% of
# the kernel's peak 0 (the smallest nonzero plug-in weight at K = 8, w(1/8), is 44% of it).
POSTERIOR = ["curriculum.posterior=true", "curriculum.prior=fitted", "curriculum.weight_floor=0.2"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="arith:train", help="data.train of every estimate (default arith:train)")
    parser.add_argument("--out", default="runs/bench_estimate", help="where the estimates are written")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per estimate (default 2)")
    parser.add_argument("--fixed-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="fixed-K seeds; the first is the reference, the others its noise floor (default 0 1 2)")
    parser.add_argument("--adaptive-seeds", type=int, nargs="+", default=[3, 4, 5], help="default 3 4 5")
    parser.add_argument("--rollouts-min", type=int, default=2, help="curriculum.rollouts_min (default 2)")
    parser.add_argument("--rollouts-round", type=int, help="curriculum.rollouts_round (default: the config's)")
    parser.add_argument("--tol", type=float, nargs="+", help="curriculum.rollouts_tol values (default: the config's)")
    parser.add_argument("--weights", choices=("posterior", "plug-in"), default="posterior",
                        help="the adaptive estimate's weights: posterior = " + " ".join(POSTERIOR) + " (default; "
                             "docs/curriculum.md#adaptive-estimate), plug-in = w(correct / trials)")
    parser.add_argument("--fresh", action="store_true", help="redo estimates already in --out")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every estimate")
    return parser.parse_args(argv)


def run_estimate(out: Path, overrides: list[str], nproc: int, fresh: bool) -> tuple[dict, dict[str, float]]:
    """`paced-ds estimate` into ``out`` (or the one already there): its result and {id: weight}."""
    result_path, log_path = out / "result.json", out / "log.txt"
    if fresh or not result_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        overrides = overrides + [f"train.output_dir={out}", "logging.progress=false"]
        check_before_launch(DEMO_RECIPE, overrides)
        cmd, env = launch_command("estimate", DEMO_RECIPE, overrides, nproc, result_json=str(result_path))
        print(f"estimating into {out} ...", file=sys.stderr, flush=True)
        with open(log_path, "w") as log:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        if code != 0 or not result_path.is_file():
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
            sys.exit(f"bench_estimate: the estimate in {out} failed (exit {code}); the end of {log_path}:\n{tail}")
    weights = {row["id"]: row["weight"] for _, row in read_jsonl(out / "competence.jsonl")}
    return json.loads(result_path.read_text()), weights


def posterior_weights(estimate_dir: Path, cfg) -> dict[str, float]:
    """{id: weight} of an estimate's counts under ``cfg``'s curriculum (the adaptive estimate's
    posterior weights, for a fixed-K estimate's counts)."""
    from paced_ds.curriculum.curriculum import Curriculum
    from paced_ds.data.sources import load_train

    records = load_train(cfg.data)
    curriculum = Curriculum(cfg, records)
    curriculum.load_given(str(estimate_dir / "competence.jsonl"))
    return dict(zip(curriculum.table.ids, curriculum.weights().tolist()))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation, ties at their average rank (scipy's when it is installed)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return _pearson(_average_ranks(x), _average_ranks(y))
    return float(spearmanr(x, y)[0])


def _average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float:
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = (sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y)) ** 0.5
    return covariance / spread if spread else float("nan")


def row(name: str, seed: str, result: dict, agreement: str) -> str:
    share = result["rollouts"] / result["fixed_rollouts"]
    return (f"| {name} | {seed} | {result['rollouts']} | {share:.1%} | {result['rounds']} | "
            f"{result['generated_tokens']} | {result['seconds']:.1f} | {agreement} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    base = [f"data.train={args.split}", *args.overrides]
    cfg = load_config(DEMO_RECIPE, base)
    k, out = cfg.curriculum.rollouts, Path(args.out).resolve()
    settings = [f"curriculum.rollouts_min={args.rollouts_min}", *(POSTERIOR if args.weights == "posterior" else [])]
    if args.rollouts_round is not None:
        settings.append(f"curriculum.rollouts_round={args.rollouts_round}")
    resolved = load_config(DEMO_RECIPE, base + settings).curriculum
    tols = args.tol or [resolved.rollouts_tol]
    label = f"m{args.rollouts_min}_r{resolved.rollouts_round}" + ("_posterior" if args.weights == "posterior" else "")

    fixed = [run_estimate(out / f"fixed_k{k}_seed{seed}", base + [f"train.seed={seed}"], args.nproc, args.fresh)
             for seed in args.fixed_seeds]
    ids = list(fixed[0][1])
    reference = [fixed[0][1][i] for i in ids]

    def agreement(weights: dict[str, float]) -> float:
        return spearman(reference, [weights[i] for i in ids])

    lines = ["| estimate | seed | rollouts | share of fixed K | rounds | generated tokens | seconds | "
             f"Spearman vs fixed K={k} seed {args.fixed_seeds[0]} |", "|---|---|---|---|---|---|---|---|",
             row(f"fixed K={k}", str(args.fixed_seeds[0]), fixed[0][0], "(reference)")]
    floors = [agreement(weights) for _, weights in fixed[1:]]
    lines += [row(f"fixed K={k}", str(seed), result, f"{floor:.3f} (noise floor)")
              for seed, (result, _), floor in zip(args.fixed_seeds[1:], fixed[1:], floors)]
    if args.weights == "posterior" and len(fixed) > 1:  # what the weights alone do: fixed K's counts, reweighted
        reweighted = posterior_weights(out / f"fixed_k{k}_seed{args.fixed_seeds[1]}", load_config(
            DEMO_RECIPE, base + settings))
        lines.append(row(f"fixed K={k}, {args.weights} weights", str(args.fixed_seeds[1]), fixed[1][0],
                         f"{agreement(reweighted):.3f}"))
    summaries = []
    for tol in tols:
        name = f"adaptive min={args.rollouts_min} round={resolved.rollouts_round} tol={tol:g} {args.weights}"
        runs = [run_estimate(out / f"adaptive_{label}_tol{tol:g}_seed{seed}",
                             base + settings + [f"curriculum.rollouts_tol={tol}", f"train.seed={seed}"],
                             args.nproc, args.fresh) for seed in args.adaptive_seeds]
        agreements = [agreement(weights) for _, weights in runs]
        lines += [row(name, str(seed), result, f"{value:.3f}")
                  for seed, (result, _), value in zip(args.adaptive_seeds, runs, agreements)]
        share = sum(result["rollouts"] for result, _ in runs) / sum(result["fixed_rollouts"] for result, _ in runs)
        summaries.append((name, share, sum(agreements) / len(agreements)))
    print(f"data.train={args.split}: {len(ids)} problems, K={k}, {args.nproc} ranks\n")
    print("\n".join(lines))
    if floors:
        floor = sum(floors) / len(floors)
        print(f"\ntargets: share of fixed K <= {TARGET_SHARE:.0%}; Spearman >= noise floor {floor:.3f} - "
              f"{TARGET_SPEARMAN_GAP} = {floor - TARGET_SPEARMAN_GAP:.3f}")
        for name, share, mean in summaries:
            verdict = ("meets both" if share <= TARGET_SHARE and mean >= floor - TARGET_SPEARMAN_GAP else
                       f"share {'met' if share <= TARGET_SHARE else 'missed'}, agreement "
                       f"{'met' if mean >= floor - TARGET_SPEARMAN_GAP else 'missed'}")
            print(f"- {name}: {share:.1%} of fixed K's rollouts, mean Spearman {mean:.3f} "
                  f"({mean - floor:+.3f} against the floor): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
