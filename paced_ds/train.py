"""The entry every rank runs: ``deepspeed --module paced_ds.train --config RECIPE [key=value ...]``.

Also ``torchrun -m paced_ds.train ...`` and, for one process, ``python -m paced_ds.train``.
``--task`` selects what the ranks do: ``train`` (default), ``generate`` (teacher reference
responses only), ``cache-teacher`` (its top-k log-probs, for teacher.backend=cache),
``estimate`` (the student's pass rates, competence.jsonl), ``snr`` (gradient SNR per
pass-rate bucket), ``eval`` (held-out accuracy of ``model.student``) or ``teacher-serve``
(the teacher job of teacher.backend=pipelined).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from paced_ds.errors import UserError
from paced_ds.runtime.dist import ensure_accelerator_env

TASKS = ("train", "generate", "cache-teacher", "estimate", "snr", "eval", "teacher-serve")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="paced_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (e.g. ds_configs/recipes/tiny_arith.yaml)")
    parser.add_argument("--task", choices=TASKS, default="train")
    parser.add_argument("--result-json", help="write the task's summary here (rank 0)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is read from the environment")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


def run(task: str, cfg) -> dict:
    from paced_ds.distill import tasks, trainer

    entry = {"train": trainer.train, "generate": tasks.generate, "cache-teacher": tasks.cache_teacher,
             "estimate": tasks.estimate_competence, "snr": tasks.measure_snr, "eval": tasks.evaluate,
             "teacher-serve": tasks.teacher_serve}[task]
    return entry(cfg)


def quiet_libraries() -> None:
    """Where the output is not a terminal, the libraries' own progress bars (loading weights,
    writing shards, reading datasets) are carriage-return redraws that a log file keeps as
    clutter: turn them off. Their bars stay on a terminal."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv=None) -> int:
    ensure_accelerator_env()
    quiet_libraries()
    args = parse_args(argv)
    from paced_ds.config import load_config
    from paced_ds.runtime import dist

    try:
        cfg = load_config(args.config, args.overrides)
        result = run(args.task, cfg)
        if args.result_json and dist.is_main():
            with open(args.result_json, "w") as f:
                json.dump(result, f, default=str, indent=1)
    except UserError as err:
        where = f" (rank {dist.rank()})" if dist.world_size() > 1 else ""
        # One write, so that the ranks' lines stay whole when they fail at once (print writes the
        # line and its newline separately, and two ranks' errors ran together on one line).
        sys.stderr.write(f"paced-ds: error{where}: {err}\n")
        sys.stderr.flush()
        return 2
    finally:
        # Tear gloo/NCCL down before the interpreter does: left to exit, gloo's threads
        # sometimes abort the process ("terminate called without an active exception").
        dist.shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    # The process group is down and every output is written and closed: leave now. Left to the
    # interpreter's teardown, gloo's or DeepSpeed's threads sometimes abort a finished rank
    # ("terminate called without an active exception", exit -6), failing a run that succeeded.
    # os._exit skips atexit: the clean-up paced-ds itself needs runs here.
    from paced_ds.runtime.exit import run_hooks

    run_hooks()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
