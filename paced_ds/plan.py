"""``paced-ds plan``: memory per GPU and per node of each teacher placement, whether a recipe's
placement and generation phases fit, and what its run costs in FLOPs (runtime/memory.py and
distill/compute.py do the arithmetic; this prints it)."""

from __future__ import annotations

from paced_ds.config import load_config
from paced_ds.errors import UserError

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
    split = args.sequence_parallel or (cfg.train.sequence_parallel if cfg else 1)
    response_len = args.response_len or seq_len
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                        ("--seq-len", seq_len), ("--micro-batch", micro_batch), ("--sequence-parallel", split),
                        ("--response-len", response_len)):
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
    fused = cfg.loss.fused if cfg else True
    if response_len > seq_len:
        raise UserError(f"--response-len {response_len}: at most --seq-len ({seq_len})")
    if (args.nodes * args.gpus_per_node) % split:
        raise UserError(f"--sequence-parallel {split}: must divide the {args.nodes * args.gpus_per_node} GPUs")
    rows = memory.plan(student, teacher, args.nodes, args.gpus_per_node, gpu_mem, cpu_mem, seq_len, micro_batch,
                       teacher_gpus, teacher_batch, checkpointing, fused=fused, sequence_parallel=split,
                       response_len=response_len)
    world = args.nodes * args.gpus_per_node
    print(f"teacher {teacher.params / 1e9:.1f}B params (hidden {teacher.hidden}, {teacher.layers} layers), "
          f"student {student.params / 1e9:.1f}B (hidden {student.hidden}, {student.layers} layers); "
          f"{args.nodes} x {args.gpus_per_node} GPUs of {gpu_mem / memory.GIB:.1f} GiB (fits: total <= "
          f"{memory.GPU_FIT_FRACTION:.0%}), {cpu_mem / memory.GIB:.0f} GiB CPU per node; "
          f"micro-batch {micro_batch} x {seq_len} tokens ({response_len} scored)"
          + (f", each split over {split} GPUs (sequence parallel)" if split > 1 else "")
          + f", {'fused' if fused else 'whole'} logits, {args.dtype}; GiB per GPU / per node\n")
    print(memory.render_markdown(rows))
    best = memory.recommend(rows)
    if best is None:
        larger = next((size for size in (2, 4, 8, 16) if size > split and world % size == 0 and memory.recommend(
            memory.plan(student, teacher, args.nodes, args.gpus_per_node, gpu_mem, cpu_mem, seq_len, micro_batch,
                        teacher_gpus, teacher_batch, checkpointing, fused=fused, sequence_parallel=size,
                        response_len=response_len))), None)
        hint = f"train.sequence_parallel={larger} fits; or " if larger else ""
        print(f"\nnothing fits on {world} GPUs: {hint}add nodes, or shorten --seq-len / --micro-batch")
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
        units = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1.0, "FLOP"))
        scale, unit = next((scale, unit) for scale, unit in units if value >= scale or scale == 1)
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
