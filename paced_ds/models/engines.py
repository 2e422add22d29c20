"""The two DeepSpeed engines: a ZeRO-3 student that trains and a ZeRO-3 teacher that only infers.

Both are loaded from Hugging Face format already partitioned: an ``HfDeepSpeedConfig`` is
alive while ``from_pretrained`` runs, so transformers builds the model under
``deepspeed.zero.Init`` and no rank ever holds a whole 70B teacher. The teacher is a
stage-3 engine with no optimizer whatever the student's stage, its partitions on the
accelerator, in CPU memory or on NVMe (``teacher.offload``).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch

from paced_ds.config import RunConfig, TrainConfig, load_ds_config
from paced_ds.errors import UserError
from paced_ds.runtime.exit import on_exit
from paced_ds.runtime.log import say

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODELS = ("tiny-teacher", "tiny-student")


def resolve_model(name: str, key: str) -> str:
    """A model path or hub name; the shipped names map to ``paced_ds/assets``."""
    if name in SHIPPED_MODELS:
        path = ASSETS / name
        if not (path / "config.json").is_file():
            raise UserError(f"config key {key}: the shipped model {name} is missing from {ASSETS} "
                            "(reinstall paced-ds, or run tools/build_tiny_models.py)")
        return str(path)
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"config key {key}: no model at {name} (a Hugging Face model directory "
                        "with config.json is expected)")
    return str(path) if path.exists() else name


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 products in hardware (x86 ``avx512_bf16`` or
    ``amx_bf16``, Arm ``bf16``); True when it cannot tell."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return True
    flags = {word for line in text.splitlines() if line.lower().startswith(("flags", "features"))
             for word in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


_WARNED_BF16_CPU = False


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.model.dtype == "bf16":
        global _WARNED_BF16_CPU
        if not _WARNED_BF16_CPU and not torch.cuda.is_available() and not cpu_has_native_bf16():
            _WARNED_BF16_CPU = True
            say("warning: model.dtype=bf16 on a CPU without bf16 instructions (no avx512_bf16, amx_bf16 or bf16 "
                "in /proc/cpuinfo): its matrix products are emulated, ~170x slower than fp32 on a 2-core AVX2 "
                "machine (docs/benchmarks.md); model.dtype=auto picks fp32 here")
        return torch.bfloat16
    if cfg.model.dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def _apply_dtype(ds_config: dict, dtype: torch.dtype) -> None:
    ds_config["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds_config.pop("fp16", None)


def student_ds_config(cfg: RunConfig) -> dict:
    """The student's DeepSpeed JSON with the run config's values written in."""
    ds_config = load_ds_config(cfg.train.ds_config, "train.ds_config")
    ds_config["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds_config.pop("train_batch_size", None)
    ds_config["gradient_clipping"] = cfg.train.clip_grad
    optimizer = ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    zero = ds_config.setdefault("zero_optimization", {})
    zero["stage"] = cfg.train.zero_stage
    zero["offload_optimizer"] = {"device": cfg.train.offload_optimizer}
    if cfg.train.offload_optimizer == "cpu":
        optimizer["params"].pop("torch_adam", None)  # DeepSpeedCPUAdam does the offloaded step
    ds_config.pop("scheduler", None)  # the LR schedule is ours (train.warmup_steps, train.decay)
    _apply_dtype(ds_config, compute_dtype(cfg))
    return ds_config


def teacher_ds_config(cfg: RunConfig) -> dict:
    path = cfg.teacher.ds_config
    if path == "auto":
        path = {"none": "ds_configs/teacher_zero3.json",
                "cpu": "ds_configs/teacher_zero3_offload_cpu.json",
                "nvme": "ds_configs/teacher_zero3_offload_nvme.json"}[cfg.teacher.offload]
    ds_config = load_ds_config(path, "teacher.ds_config")
    ds_config["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    zero = ds_config.setdefault("zero_optimization", {})
    zero["stage"] = 3  # stage 1/2 need an optimizer; a sharded frozen model is stage 3
    offload = zero.setdefault("offload_param", {})
    offload["device"] = cfg.teacher.offload
    if cfg.teacher.offload == "nvme":
        offload["nvme_path"] = cfg.teacher.nvme_path
        check_async_io()
    _apply_dtype(ds_config, compute_dtype(cfg))
    return ds_config


def check_async_io() -> None:
    """NVMe offload needs DeepSpeed's async_io op; say what to install when it cannot build."""
    # The name resolves to the current accelerator's builder (on the CPU accelerator,
    # deepspeed.ops.op_builder.cpu.AsyncIOBuilder), the one DeepSpeed's swapper loads.
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise UserError("teacher.offload=nvme needs DeepSpeed's async_io op, which cannot be built here: "
                        "install libaio (Debian/Ubuntu: apt-get install libaio-dev), then retry")


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    name = resolve_model(cfg.model.tokenizer or cfg.model.student,
                         "model.tokenizer" if cfg.model.tokenizer else "model.student")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer {name}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shared_vocab_size(cfg: RunConfig, student_tokenizer, teacher: str | None = None) -> int:
    """The token range both models score; a different tokenizer is an error, padding rows are not.

    Checked from the config files alone (no weights loaded), before any engine is built.
    """
    from transformers import AutoConfig, AutoTokenizer

    teacher_name = teacher or resolve_model(cfg.model.teacher, "model.teacher")
    student_name = resolve_model(cfg.model.student, "model.student")
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name, trust_remote_code=cfg.model.trust_remote_code)
        teacher_config = AutoConfig.from_pretrained(teacher_name, trust_remote_code=cfg.model.trust_remote_code)
        student_config = AutoConfig.from_pretrained(student_name, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the teacher/student configs: {str(err).splitlines()[0]}") from None
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        theirs, ours = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        differing = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
        raise UserError(f"model.teacher and model.student use different tokenizers ({len(theirs)} vs "
                        f"{len(ours)} tokens; e.g. {differing}): token-level distillation needs one vocabulary")
    teacher_rows = teacher_config.get_text_config().vocab_size
    student_rows = student_config.get_text_config().vocab_size
    shared = min(teacher_rows, student_rows)
    if shared < len(student_tokenizer):
        raise UserError(f"model.teacher has {teacher_rows} and model.student {student_rows} embedding rows, "
                        f"fewer than the tokenizer's {len(student_tokenizer)} tokens")
    return shared


def _from_pretrained(name: str, ds_config: dict, dtype: torch.dtype, trust_remote_code: bool, key: str):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Alive only while from_pretrained runs: transformers holds it as a weak global and, with
    # ZeRO-3 in it, builds the model partitioned under deepspeed.zero.Init.
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (kept alive on purpose)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"config key {key}: cannot load {name}: {str(err).splitlines()[0]}") from None
    finally:
        del hf_ds_config
    return model


def lr_lambda(train_cfg: TrainConfig):
    """Linear warmup, then cosine/linear decay to train.min_lr_ratio, as a LambdaLR factor.
    A warmup longer than the run is clipped to it, with a warning (as Hugging Face's Trainer
    does): a short smoke run of a recipe need not edit its warmup."""
    warmup, total, floor = train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr_ratio
    if warmup > total:
        say(f"warning: train.warmup_steps ({warmup}) exceeds train.steps ({total}); warming up over all {total} "
            "steps instead")
        warmup = total

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train_cfg.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if train_cfg.decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def build_student(cfg: RunConfig):
    """The trainable student engine (ZeRO stage train.zero_stage) and its DeepSpeed config."""
    import deepspeed

    ds_config = student_ds_config(cfg)
    name = resolve_model(cfg.model.student, "model.student")
    model = _from_pretrained(name, ds_config, compute_dtype(cfg), cfg.model.trust_remote_code, "model.student")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.tiled_mlp:
        from paced_ds.models.ulysses import tile_mlps

        if not tile_mlps(model):
            raise UserError(f"config key model.tiled_mlp: {type(model).__name__} has no gated MLP (gate_proj, "
                            "up_proj, down_proj) to tile")
    model.config.use_cache = False
    if cfg.model.freeze_embeddings:
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            if embedding is not None:
                embedding.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train)))
    return engine, ds_config


def largest_parameter_numel(name: str, trust_remote_code: bool) -> int:
    """The element count of the model's largest parameter, from a weightless (meta) copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return max(p.numel() for p in model.parameters())


def fit_nvme_buffers(ds_config: dict, name: str, trust_remote_code: bool, world: int) -> str | None:
    """Raise offload_param.buffer_size to the largest partition DeepSpeed will swap.

    Each swapped partition is read into one pinned buffer of buffer_size elements; a bigger
    one fails deep inside from_pretrained ("More elements ... than buffer size"). A 70B's
    embedding is 1.05e9 elements, 1.3e8 per rank on 8 ranks, above DeepSpeed's default 1e8.
    """
    offload = ds_config["zero_optimization"]["offload_param"]
    configured = int(offload.get("buffer_size", 100_000_000))
    needed = math.ceil(largest_parameter_numel(name, trust_remote_code) / world)
    if needed <= configured:
        return None
    offload["buffer_size"] = needed
    return (f"teacher.offload=nvme: offload_param.buffer_size raised from {configured} to {needed} elements "
            f"(the largest teacher partition on {world} ranks)")


def nvme_partitions(engine) -> tuple[int, int, int, Path | None]:
    """This rank's teacher partitions on NVMe (count, bytes of their swap files), those left
    in memory, and this rank's swap folder.

    DeepSpeed swaps a partition only from 1 MiB up (MIN_AIO_BYTES); smaller ones stay in
    CPU memory, so a tiny teacher offloaded to NVMe never touches the disk.
    """
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    swapped, swap_bytes, in_memory, folder = 0, 0, 0, None
    for param in engine.module.parameters():
        swapper = getattr(param, "nvme_swapper", None)
        if swapper is None:
            continue
        folder = Path(swapper.swap_folder)
        if getattr(param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme:
            swapped += 1
            swap_bytes += Path(swapper.get_path(param, must_exist=True)).stat().st_size
        else:
            in_memory += 1
    return swapped, swap_bytes, in_memory, folder


def build_teacher(cfg: RunConfig, name: str | None = None):
    """The teacher (``name``, else model.teacher) as a frozen ZeRO-3 inference engine."""
    return build_inference_engine(cfg, name or resolve_model(cfg.model.teacher, "model.teacher"), role="teacher")


def build_inference_engine(cfg: RunConfig, name: str, role: str):
    """Model ``name`` as a frozen, sharded ZeRO-3 inference engine (no optimizer, never in
    train mode), set up like the teacher (teacher.offload); ``role`` names it ("teacher", or
    "student" for the frozen student of `paced-ds snr`, `eval` and `estimate`).

    With teacher.offload=nvme its swap files go to <teacher.nvme_path>/<role>: DeepSpeed
    empties its swap folder when an engine starts, so two engines in one process (the
    teacher and the frozen student of `paced-ds snr`) need folders of their own.
    """
    import deepspeed

    from paced_ds.runtime import dist

    ds_config = teacher_ds_config(cfg)
    nvme = cfg.teacher.offload == "nvme"
    if nvme:
        swap_dir = Path(cfg.teacher.nvme_path).expanduser() / role
        try:
            swap_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"config key teacher.nvme_path: cannot create {swap_dir} ({err.strerror}); "
                            "name a writable directory on a local NVMe drive") from None
        ds_config["zero_optimization"]["offload_param"]["nvme_path"] = str(swap_dir)
        raised = fit_nvme_buffers(ds_config, name, cfg.model.trust_remote_code, dist.world_size())
        if raised and dist.is_main():
            print(f"paced-ds: {raised}", flush=True)
    model = _from_pretrained(name, ds_config, compute_dtype(cfg), cfg.model.trust_remote_code, "model.teacher")
    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
    engine.module.eval()
    if nvme:
        swapped, swap_bytes, in_memory, folder = nvme_partitions(engine)
        if dist.is_main():
            print(f"paced-ds: {role} on NVMe: {swapped} partitions, {swap_bytes / 2**20:.1f} MiB of swap files "
                  f"in {folder}; {in_memory} smaller ones kept in memory", flush=True)
        # The swap files are useless once this process ends (DeepSpeed empties the folder
        # at the next start anyway); do not leave a teacher's worth of them on the disk.
        if folder is not None:
            on_exit(shutil.rmtree, folder, ignore_errors=True)
    return engine
