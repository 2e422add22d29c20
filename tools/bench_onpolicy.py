"""Time per on-policy step, split into generation, weight sync and training, with the rollouts
from Hugging Face (the gathered student) and from a vLLM server synced to the student every step.

    python tools/bench_onpolicy.py [--model DIR] [--steps 6] [--problems 8] [--max-new-tokens 48]
                                   [--nproc 2] [--engines hf,vllm,vllm-overlap] [--output-dir runs/bench_onpolicy]

Runs the same `paced-ds train` once per engine: ``--nproc`` ranks, ``--problems`` problems per
rank a step (the reference task's), one rollout each at temperature 1, reverse KL on it
(``loss.schedule=on_policy``), the model as its own teacher (the cost of a step does not depend
on what the teacher says). ``hf`` samples from a copy of the ZeRO-3 student gathered each step
(``rollout.gather``); ``vllm`` has a vLLM server paced-ds starts on this node (``paced-ds
setup-vllm``) load the student's weights before each step's rollouts, through /dev/shm;
``vllm-overlap`` adds ``rollout.overlap=true`` (the next step's rollouts generated while this
step trains, one update stale). The
first step is left out of the means (its gathers and the server's first requests warm up); the
server's start-up is printed below the table, not counted in a step.

Prints one markdown row per engine with the mean seconds per step of generation
(``rollout_time_s`` in metrics.jsonl), sync (``rollout_sync_s``), training (``train_time_s``:
teacher and student forward, backward and update) and the whole step, and the step's speed-up
over ``hf``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "vllm", "vllm-overlap")
COLUMNS = ("rollout_time_s", "rollout_sync_s", "train_time_s", "step_time_s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="student model directory (default: SmolLM2-135M, tools/real_models.py)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps a run (default 6; the first is left out)")
    parser.add_argument("--problems", type=int, default=8, help="problems (rollouts) per rank a step (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest rollout (default 48)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"which of {', '.join(ENGINES)} (default all)")
    parser.add_argument("--output-dir", default="runs/bench_onpolicy", help="where the runs go")
    return parser.parse_args(argv)


def default_model() -> str:
    sys.path.insert(0, str(REPO / "tools"))
    import real_models

    return str(real_models.ensure("smollm2-135m"))


def run_engine(args, model: str, engine: str) -> Path:
    out = Path(args.output_dir) / engine
    command = [sys.executable, "-m", "paced_ds.cli", "train", "--config", "ds_configs/recipes/tiny_arith.yaml",
               "--nproc", str(args.nproc), f"model.student={model}", f"model.teacher={model}", "data.eval=",
               "data.retain=", "data.max_length=256", "data.arith_train_per_level=40", "loss.schedule=on_policy",
               "loss.kind=reverse_kl", "curriculum.mode=uniform", f"rollout.max_new_tokens={args.max_new_tokens}",
               "rollout.temperature=1", f"train.steps={args.steps}", "train.warmup_steps=0",
               f"train.micro_batch_size={args.problems}", "train.grad_accum=1", "train.export=false",
               "teacher.offload=none", "logging.progress=false", f"rollout.engine={engine.split('-')[0]}",
               f"rollout.overlap={str(engine.endswith('overlap')).lower()}", f"train.output_dir={out}"]
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (Path(args.output_dir) / f"{engine}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"bench_onpolicy: the {engine} run failed (exit {result.returncode}); its log: "
                 f"{Path(args.output_dir) / f'{engine}.log'}\n{result.stderr[-2000:]}")
    for line in result.stdout.splitlines():
        if "vLLM server ready in" in line:
            print(f"({engine}: {line.removeprefix('paced-ds: ')})")
    return out


def step_means(run_dir: Path) -> dict[str, float]:
    """The mean of each column over the run's steps after the first."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [row for row in rows if row["step"] > 1 and row.get("on_policy")]
    if not kept:
        raise SystemExit(f"bench_onpolicy: {run_dir}/metrics.jsonl has no on-policy step after the first")
    return {column: statistics.fmean(row[column] for row in kept) for column in COLUMNS} | {"steps": len(kept)}


def table(means: dict[str, dict[str, float]]) -> str:
    lines = ["| rollouts from | generation s | sync s | training s | step s | step vs hf |",
             "|---|---:|---:|---:|---:|---:|"]
    base = means.get("hf", {}).get("step_time_s")
    for engine, row in means.items():
        ratio = f"{base / row['step_time_s']:.2f}x" if base else "-"
        lines.append(f"| {engine} | {row['rollout_time_s']:.2f} | {row['rollout_sync_s']:.2f} | "
                     f"{row['train_time_s']:.2f} | {row['step_time_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        sys.exit(f"bench_onpolicy: unknown engine(s) {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    model = args.model or default_model()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    means = {engine: step_means(run_engine(args, model, engine)) for engine in engines}
    print(f"\n{Path(model).name}, {args.nproc} ranks, {args.problems} rollouts a rank a step of at most "
          f"{args.max_new_tokens} new tokens, mean of steps 2-{args.steps}:\n")
    print(table(means))


if __name__ == "__main__":
    main()
