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
import traceback

from paced_ds.errors import BUG_NOTE, UserError
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


def report_failure(err: Exception) -> int:
    """Say why this rank fails, once for the whole job, and return its exit status.

    A user error is one line naming its rank (status 2); a bug keeps its traceback and says it
    is one (status 1). A rank whose collective broke because another rank failed first stays
    quiet: that rank speaks. Of several ranks failing on their own, the first speaks."""
    from paced_ds.runtime import dist

    if not isinstance(err, UserError):
        peer = dist.failed_peer()
        if peer is not None:  # a consequence of that rank's failure, which it reports
            return peer[1]
    lost = dist.lost_a_peer(err)
    code = 2 if isinstance(err, UserError) else 1
    first, store = dist.claim_failure(code)
    if first:
        where = f" (rank {dist.rank()})" if dist.world_size() > 1 else ""
        if isinstance(err, UserError) or lost:
            text = str(err) if not lost else f"lost contact with another rank ({str(err).splitlines()[0][:200]})"
            # One write, so that lines of ranks failing at once stay whole (print writes the line and
            # its newline separately, and two ranks' errors ran together on one line).
            sys.stderr.write(f"paced-ds: error{where}: {text}\n")
        else:
            sys.stderr.write("".join(traceback.format_exception(err)) + BUG_NOTE + where + "\n")
        sys.stderr.flush()
    dist.wait_for_quiet_peers(store)  # the process group goes down after, in main's finally
    return code


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
    except Exception as err:  # noqa: BLE001 - every failure leaves through report_failure
        return report_failure(err)
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
