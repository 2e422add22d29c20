"""Student tokens/s for each teacher backend: resident engine, CPU-offloaded engine, pipelined
teacher job, offline cache; one row each, on the shipped tiny models.

    python tools/bench_teacher.py [--nproc 2] [--steps 30] [--warmup 5] [--topk 0]
                                  [--variants none cpu pipelined cache] [--gpu] [--work-dir DIR]

It first writes the offline cache (``paced-ds cache-teacher``, the same teacher responses
the other variants train on), then runs ``tools/bench_step.py`` over the variants, so
every row is a real ``paced-ds train`` run of the reference recipe, and the table and its
columns are bench_step's: ``teacher time`` is the time the students spent getting teacher
logits (a forward, a cache read, or waiting for the pipelined teacher's answer).

``--nproc`` is the student ranks; the pipelined variant adds one teacher rank beside them.
On a machine with GPUs (``--gpu``: bf16, one GPU per rank; the pipelined teacher takes
the GPU after the students') the same rows measure the real thing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import bench_step  # noqa: E402 (after tools/ is on the path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="student ranks (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians (default 5)")
    parser.add_argument("--topk", type=int, default=0, help="teacher.topk of the cache and the pipelined "
                                                            "teacher (default 0: the full distribution)")
    parser.add_argument("--variants", nargs="+", default=["none", "cpu", "pipelined", "cache"],
                        choices=["none", "cpu", "nvme", "pipelined", "cache"], help="rows, first is the baseline")
    parser.add_argument("--gpu", action="store_true", help="bf16 on CUDA GPUs (one per rank)")
    parser.add_argument("--extra", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--work-dir", help="keep run directories, logs and the cache here")
    parser.add_argument("--json", help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_teacher-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    responses, store = work_dir / "responses", work_dir / "cache"
    extra = [f"teacher.topk={args.topk}", f"teacher.cache={store}", *(["model.dtype=bf16"] if args.gpu else []),
             *args.extra]
    if "cache" in args.variants and not (store / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "paced_ds.cli", "cache-teacher", "--config", bench_step.RECIPE,
               "--nproc", str(args.nproc), f"data.responses_dir={responses}",
               f"train.output_dir={work_dir / 'cache-run'}",
               *bench_step.BENCH_OVERRIDES, *extra]
        print(f"bench_teacher: {shlex.join(cmd)}", flush=True)
        code = subprocess.call(cmd, cwd=REPO_ROOT)
        if code:
            print(f"bench_teacher: error: making the cache failed (exit {code})", file=sys.stderr)
            return code
    step_args = ["--nproc", str(args.nproc), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--variants", *args.variants, "--responses-dir", str(responses), "--work-dir", str(work_dir),
                 "--extra", *extra, *(["--json", args.json] if args.json else [])]
    return bench_step.main(step_args)


if __name__ == "__main__":
    sys.exit(main())
