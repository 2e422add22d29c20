"""Helpers for tests that start real ranks (deepspeed launcher, torchrun) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from paced_ds.data import arith

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "ds_configs" / "recipes" / "tiny_arith.yaml"


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def gpu_env(**extra) -> dict:
    """The environment of a launch on CUDA GPUs: DeepSpeed detects its CUDA accelerator itself."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], *, timeout: int = 600, env: dict | None = None, cwd: Path | None = None):
    """Run ``cmd``; returns the CompletedProcess with stdout and stderr as text."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or cpu_env(),
                          cwd=cwd or REPO)


def paced_ds(*args: str, timeout: int = 600):
    return run([sys.executable, "-m", "paced_ds.cli", *map(str, args)], timeout=timeout)


def small_overrides(tmp: Path, **extra) -> list[str]:
    """A run small enough for a test: a few steps of tiny batches, a short eval."""
    values = {
        "train.output_dir": tmp / "run", "data.responses_dir": tmp / "responses",
        "train.steps": 4, "train.warmup_steps": 1, "train.micro_batch_size": 4, "train.grad_accum": 1,
        "eval.every": 0, "eval.limit_per_level": 0, "data.arith_eval_per_level": 6, "data.arith_retain_per_level": 6,
        "data.arith_train_per_level": 10, "eval.max_new_tokens": 16, "logging.progress": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def write_problems(path: Path, per_level: int, *, with_response: bool, seed: int = 0) -> Path:
    return arith.write_jsonl(arith.dataset("train", per_level, seed=seed), path, with_response=with_response)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def explain(result) -> str:
    """The tail of a failed launch's output, for the assertion message."""
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
