"""``paced-ds``: the command line.

    paced-ds train    --config RECIPE [--nproc N] [--hostfile H] [key=value ...]
    paced-ds generate --config RECIPE [--nproc N] [key=value ...]
    paced-ds estimate --config RECIPE [--nproc N] [key=value ...]
    paced-ds snr      --config RECIPE [--model DIR | --run RUN_DIR [--tag step_N]] [key=value ...]
    paced-ds eval     --config RECIPE [--model DIR] [--nproc N] [key=value ...]
    paced-ds export   --run RUN_DIR [--tag step_N] [--out DIR]
    paced-ds demo     [--output-dir DIR]
    paced-ds config   [--config RECIPE] [key=value ...] [--reference]

``train``, ``generate`` and ``eval`` check the config, models and data here, then start
the deepspeed launcher on this node (``DS_ACCELERATOR=cpu`` when no GPU is present), as
``deepspeed --num_gpus N --module paced_ds.train --config RECIPE ...`` would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from paced_ds.config import REPO_ROOT, describe, load_config
from paced_ds.errors import UserError
from paced_ds.runtime.dist import ensure_accelerator_env, free_port

DEMO_RECIPE = "ds_configs/recipes/tiny_arith.yaml"


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def launch(task: str, recipe: str | None, overrides: list[str], nproc: int, hostfile: str | None = None,
           result_json: str | None = None) -> int:
    """Run ``paced_ds.train --task TASK`` on ``nproc`` ranks of this node with the deepspeed launcher."""
    ensure_accelerator_env()
    env = dict(os.environ)
    cpu = env.get("DS_ACCELERATOR") == "cpu"
    if cpu:
        # One rank per share of the cores; more threads than cores slows every rank down.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    else:
        cmd += ["--num_gpus", str(nproc)]
    cmd += ["--module", "paced_ds.train", "--task", task]
    if recipe:
        cmd += ["--config", str(recipe)]
    if result_json:
        cmd += ["--result-json", result_json]
    cmd += list(overrides)
    return subprocess.call(cmd, env=env)


def preflight(recipe: str | None, overrides: list[str]):
    """The checks every rank would do first, done once here so that no rank starts in vain."""
    from paced_ds.distill.trainer import preflight as check_inputs

    cfg = load_config(recipe, overrides)
    check_inputs(cfg)
    return cfg


def cmd_train(args) -> int:
    cfg = preflight(args.config, args.overrides)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    code = launch("train", args.config, args.overrides, args.nproc, args.hostfile)
    if code == 0:
        print(f"paced-ds: run directory {cfg.train.output_dir}")
    return code


def cmd_generate(args) -> int:
    preflight(args.config, args.overrides)
    return launch("generate", args.config, args.overrides, args.nproc)


def cmd_estimate(args) -> int:
    preflight(args.config, args.overrides)
    return launch("estimate", args.config, args.overrides, args.nproc)


def cmd_snr(args) -> int:
    overrides = list(args.overrides)
    if args.run:  # a checkpoint: merge its ZeRO shards into a Hugging Face directory first
        from paced_ds.runtime.export import export_checkpoint

        model = export_checkpoint(args.run, tag=args.tag)
        print(f"paced-ds: checkpoint exported to {model}")
        overrides.append(f"model.student={model}")
    elif args.model:
        overrides.append(f"model.student={args.model}")
    preflight(args.config, overrides)
    return launch("snr", args.config, overrides, args.nproc)


def cmd_eval(args) -> int:
    overrides = list(args.overrides) + ([f"model.student={args.model}"] if args.model else [])
    preflight(args.config, overrides)
    return launch("eval", args.config, overrides, args.nproc)


def cmd_export(args) -> int:
    from paced_ds.runtime.export import export_checkpoint

    out = export_checkpoint(args.run, tag=args.tag, out=args.out)
    print(f"paced-ds: student exported to {out}")
    return 0


def cmd_demo(args) -> int:
    recipe = str(REPO_ROOT / DEMO_RECIPE)
    output_dir = Path(args.output_dir)
    overrides = [f"train.output_dir={output_dir}"] + list(args.overrides)
    if (output_dir / "checkpoints").is_dir() and (output_dir / "config.json").is_file():
        print(f"paced-ds demo: replacing the previous demo run in {output_dir}")
        shutil.rmtree(output_dir)
    preflight(recipe, overrides)
    print(f"paced-ds demo: distilling the shipped tiny teacher into the tiny student on {args.nproc} "
          f"{'CPU ranks' if not _has_gpu() else 'GPUs'} ({DEMO_RECIPE})", flush=True)
    code = launch("train", recipe, overrides, args.nproc)
    if code:
        return code
    print_demo_summary(output_dir)
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def print_demo_summary(output_dir: Path) -> None:
    from paced_ds.distill.generation import accuracy_table

    evals = [json.loads(line) for line in (output_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    before, after = evals[0], evals[-1]
    levels = list(accuracy_table(after["by_difficulty"]))
    print("\nheld-out greedy accuracy of the student (per difficulty level):")
    print("| | " + " | ".join(levels) + " | all |")
    print("|---|" + "---|" * (len(levels) + 1))
    for label, row in (("before", before), ("after", after)):
        cells = " | ".join(f"{row['by_difficulty'].get(level, float('nan')):.0%}" for level in levels)
        print(f"| {label} (step {row['step']}) | {cells} | {row['accuracy']:.0%} |")
    print(f"\nTensorBoard logs:   {output_dir / 'tensorboard'}  (tensorboard --logdir {output_dir / 'tensorboard'})")
    print(f"metrics:            {output_dir / 'metrics.jsonl'}, {output_dir / 'eval.jsonl'}")
    print(f"exported student:   {output_dir / 'student'}  (AutoModelForCausalLM.from_pretrained)")


def cmd_config(args) -> int:
    if args.reference:
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for key, kind, default, help_text in describe():
            print(f"| `{key}` | {kind} | `{default}` | {help_text} |")
        return 0
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paced-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def launched(name: str, help_text: str):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="YAML recipe")
        p.add_argument("--nproc", type=int, default=default_nproc(),
                       help="ranks on this node (default: GPUs present, or 2 CPU ranks)")
        p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
        return p

    p = launched("train", "distil: start the deepspeed launcher on this node")
    p.add_argument("--hostfile", help="deepspeed hostfile for a multi-node run")
    p.set_defaults(func=cmd_train)
    launched("generate", "write the teacher's verified reference responses for data.train").set_defaults(
        func=cmd_generate)
    launched("estimate", "the student's pass rates from curriculum.rollouts samples per problem, "
                         "written to <train.output_dir>/competence.jsonl").set_defaults(func=cmd_estimate)
    p = launched("snr", "gradient SNR per pass-rate bucket of model.student, --model or a checkpoint (--run)")
    p.add_argument("--model", help="model directory to probe (sets model.student)")
    p.add_argument("--run", help="run directory whose checkpoint to probe")
    p.add_argument("--tag", help="checkpoint tag with --run (default: latest)")
    p.set_defaults(func=cmd_snr)
    p = launched("eval", "greedy held-out accuracy of model.student (or --model) per difficulty")
    p.add_argument("--model", help="model directory to evaluate (sets model.student)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint's student in Hugging Face format (offline, 1 process)")
    p.add_argument("--run", required=True, help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--tag", help="checkpoint tag, e.g. step_100 (default: latest)")
    p.add_argument("--out", help="output directory (default: RUN/student-<tag>)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the reference recipe on the shipped tiny models, 2 ranks")
    p.add_argument("--output-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--reference", action="store_true", help="markdown table of every key")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"paced-ds: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
