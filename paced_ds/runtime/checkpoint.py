"""Checkpoints through the DeepSpeed engine, and the student's Hugging Face export.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: DeepSpeed's files (engine state,
optimizer shards, and the run's own state as client state), each rank's RNG states
(``rng_rank<r>.json``: DeepSpeed keeps client state from one rank only under ZeRO-1/2) and
``paced_ds.json`` (step, world size, config), which is read before any rank starts.

Crash safety: every rank writes into ``.tmp-step_<N>`` and fsyncs what is there; once all
have (a barrier), rank 0 renames it to ``step_<N>`` and only then replaces ``latest``
atomically, syncing the directory after each. A crash (or a power loss) at any point leaves
``latest`` naming a complete checkpoint; ``.tmp-*`` leftovers are removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from paced_ds.errors import UserError
from paced_ds.runtime import dist, faults
from paced_ds.runtime.files import write_text_atomic
from paced_ds.runtime.rundir import RunDir

PARTIAL_PREFIX = ".tmp-"  # a checkpoint being written, or left half-written by a crash
STATE_FILE = "paced_ds.json"

# Config keys that may differ when a run is resumed (a trailing dot: the whole section).
# They change where things go, what is logged or evaluated, how long the run lasts or how
# the teacher is stored, not the training trajectory. Any other difference is refused.
RESUME_MAY_CHANGE = (
    "logging.", "eval.", "data.eval", "data.eval_split", "data.arith_eval_per_level", "data.responses_dir",
    "train.output_dir", "train.resume", "train.steps", "train.save_every", "train.timeout_s", "train.export",
    "train.max_nonfinite_steps", "teacher.offload", "teacher.nvme_path", "teacher.cache", "teacher.address",
    "teacher.ranks",
)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return RunDir(output_dir).checkpoints


def rng_state() -> dict:
    """This process's python, numpy and torch RNG states as plain JSON data."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {"python": [version, list(python_state), python_gauss],
             "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save(engine, output_dir: str | Path, step: int, client_state: dict, config: dict) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    staging = root / f"{PARTIAL_PREFIX}{tag}"
    rng = rng_state()  # before DeepSpeed runs any code of its own
    if dist.is_main():
        remove_partial(root)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    write_text_atomic(staging / f"rng_rank{dist.rank()}.json", json.dumps(rng))
    if dist.is_main():
        write_text_atomic(staging / STATE_FILE, json.dumps(
            {"step": step, "world_size": dist.world_size(), "config": config}, indent=1))
    faults.kill_in_save(step, dist.rank())
    sync_files(staging)
    dist.barrier()  # every rank's share is on disk, and synced
    if dist.is_main():
        publish(root, staging, tag)
    dist.barrier()
    return root / tag


def publish(root: Path, staging: Path, tag: str) -> None:
    """Rank 0: make the finished ``staging`` directory ``tag``, then point ``latest`` at it."""
    final = root / tag
    if final.exists():  # left by a crash between its rename and `latest`, or a rewound run's
        replaced = root / f"{PARTIAL_PREFIX}replaced-{tag}"
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
        staging.rename(final)
        shutil.rmtree(replaced)
    else:
        staging.rename(final)
    sync_directory(root)  # the rename survives a power loss before `latest` names it
    write_text_atomic(root / "latest", tag)
    sync_directory(root)


def sync_files(directory: Path) -> None:
    """fsync every file under ``directory`` (each rank: files this node wrote have dirty pages
    only here; the others' cost nothing), then the directories themselves."""
    for path in sorted(directory.rglob("*"), reverse=True):  # files before their directories
        if path.is_dir():
            sync_directory(path)
        else:
            _fsync(path, os.O_RDONLY)
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:  # removed meanwhile (another rank's temporary file)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(root: Path) -> None:
    """Remove what crashed saves left (``.tmp-*``); never a complete checkpoint."""
    for path in root.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def find_resume(output_dir: str | Path, resume: str) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from, or None: train.resume = never | auto | PATH.

    Only complete checkpoints are ever found: ``latest`` names one only once it is renamed
    into place, and a PATH into a ``.tmp-*`` directory is refused.
    """
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoint_dir(output_dir)
        return named_by_latest(root) if (root / "latest").is_file() else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"config key train.resume: no checkpoint directory {resume}")
    if (path / "latest").is_file():
        return named_by_latest(path)
    if path.name.startswith(PARTIAL_PREFIX):
        raise UserError(f"config key train.resume: {resume} is a checkpoint a crash left unfinished; "
                        "resume from a complete one (step_N)")
    return path.parent, path.name


def named_by_latest(root: Path) -> tuple[Path, str]:
    tag = (root / "latest").read_text().strip()
    if not tag or "/" in tag or not (root / tag).is_dir():
        raise UserError(f"{root / 'latest'}: names {tag!r}, which is no checkpoint directory beside it; "
                        "write the name of a complete checkpoint (step_N) into it, or set train.resume=PATH")
    return root, tag


def read_state(directory: Path) -> dict | None:
    """The checkpoint's paced_ds.json (None for checkpoints written before it existed)."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        state = str(err)
    if not isinstance(state, dict) or not {"step", "world_size", "config"} <= set(state):
        raise UserError(f"{path}: not the step, world size and config of a checkpoint ({str(state)[:80]}); the "
                        "checkpoint is damaged: resume from an earlier one with train.resume=PATH")
    return state


def flat(config: dict) -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def run_altering(config: dict) -> dict:
    """The flattened config without the keys in RESUME_MAY_CHANGE."""
    return {key: value for key, value in flat(config).items()
            if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                       for allowed in RESUME_MAY_CHANGE)}


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Run-altering keys whose value differs; a key the saved config lacks (added to paced-ds
    since) counts as its default, which ``defaults`` supplies."""
    from paced_ds.config import RunConfig

    defaults = run_altering(RunConfig().to_dict())
    before = {**defaults, **run_altering(saved)}
    return [key for key, value in run_altering(current).items() if before.get(key, value) != value]


def check_config(saved: dict, cfg, step: int, where: Path) -> None:
    """Refuse to resume with a config that would change the run (see RESUME_MAY_CHANGE)."""
    changed = changed_keys(saved, cfg.to_dict())
    if changed:
        before, now = flat(saved), flat(cfg.to_dict())
        shown = ", ".join(f"{key} {_short(before.get(key))} -> {_short(now[key])}" for key in changed)
        allowed = ", ".join(key + "*" if key.endswith(".") else key for key in RESUME_MAY_CHANGE)
        raise UserError(f"config key train.resume: {where} was made with another config ({shown}); these keys "
                        f"change the run, so restore them or start a new run in another train.output_dir "
                        f"(a resume may change only {allowed})")
    if cfg.train.steps < step:
        raise UserError(f"config key train.steps: {cfg.train.steps} is below the step of checkpoint {where} ({step})")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resumable(root: Path, tag: str, cfg) -> None:
    """Before any rank starts: the checkpoint is complete, holds plain data only, and was
    made by this run's config (what may differ: RESUME_MAY_CHANGE)."""
    directory = root / tag
    state = read_state(directory)
    if state is not None:
        check_config(state["config"], cfg, state["step"], directory)
    if not any(directory.glob("*model_states.pt")):
        raise UserError(f"config key train.resume: {directory} holds no DeepSpeed model states "
                        "(*model_states.pt): not a complete checkpoint")
    verify_safe(directory)


TRUSTED_MODULES = ("deepspeed.",)  # classes DeepSpeed itself pickles into its checkpoints (e.g. ZeroStageEnum)


def verify_safe(directory: Path) -> None:
    """Refuse a checkpoint holding pickled objects beyond tensors, plain data and DeepSpeed's own
    classes, before DeepSpeed (whose loader unpickles freely) ever opens it.

    Each file is read by torch's weights-only unpickler (memory-mapped, so nothing large is
    read twice); a class from a trusted module is allowed and the file read again.
    """
    import importlib
    import re

    for path in sorted(directory.glob("*.pt")):
        allowed: list = []
        while True:
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                break
            except Exception as err:  # torch raises UnpicklingError (or RuntimeError) for a refused global
                found = re.search(r"GLOBAL ([\w.]+)", str(err))
                if found is None:  # no refused class: the file itself cannot be read
                    raise UserError(f"{path}: not a readable checkpoint file ({str(err).splitlines()[0]}); it is "
                                    "truncated or damaged: resume from an earlier checkpoint with "
                                    "train.resume=PATH") from None
                name = found.group(1)
                if not name.startswith(TRUSTED_MODULES) or len(allowed) > 50:
                    raise UserError(f"{path}: refusing to load this checkpoint: it holds a pickled object "
                                    f"that is not plain data (the global {name}); only load checkpoints you "
                                    "made") from None
                module, attribute = name.rsplit(".", 1)
                allowed.append(getattr(importlib.import_module(module), attribute))


def check_world_size(root: Path, tag: str, world_size: int) -> None:
    """DeepSpeed loads a checkpoint only into as many data-parallel ranks as wrote it."""
    state = read_state(root / tag)
    if state is not None and state["world_size"] != world_size:
        raise UserError(f"config key train.resume: {root / tag} was written by {state['world_size']} ranks, this "
                        f"run has {world_size}; resume with as many ranks (DeepSpeed's ds_to_universal converts a "
                        "checkpoint to another world size)")


def load(engine, root: Path, tag: str) -> dict:
    """Collective: restores the engine and returns the client state saved with it, with this
    rank's RNG states under "rng" (None for checkpoints written before they were saved)."""
    directory = root / tag
    if not directory.is_dir():
        raise UserError(f"config key train.resume: checkpoint {directory} does not exist")
    check_world_size(root, tag, dist.world_size())
    verify_safe(directory)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"config key train.resume: DeepSpeed could not load {directory}")
    rng = directory / f"rng_rank{dist.rank()}.json"
    return {**(client_state or {}), "rng": json.loads(rng.read_text()) if rng.is_file() else None}


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_pretrained_as(module, state_dict: dict, staging: Path, dtype: str) -> None:
    """``module.save_pretrained`` with ``state_dict``'s floating tensors in ``dtype`` (fp32 | bf16;
    auto: as they are), and config.json saying so, so that ``from_pretrained`` loads them as written."""
    if dtype != "auto":
        torch_dtype, cast = EXPORT_DTYPES[dtype], {}
        for name, tensor in state_dict.items():
            if tensor.is_floating_point():
                key = (tensor.data_ptr(), tensor.shape)  # tied weights stay one tensor, so they are saved once
                if key not in cast:
                    cast[key] = tensor.to(torch_dtype)
                state_dict[name] = cast[key]
    written = {t.dtype for t in state_dict.values() if t.is_floating_point()}  # save_pretrained empties the dict
    module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
    # save_pretrained writes the module's own dtype into config.json; say what the tensors are.
    if len(written) == 1:
        config_path = Path(staging) / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = str(written.pop()).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_student(engine, tokenizer, target: str | Path, dtype: str = "auto") -> Path | None:
    """Write the student in Hugging Face format (safetensors, ``dtype``; auto: the dtype it trains
    in) to ``target``; collective.

    Every rank takes part in gathering the ZeRO-3 partitions; rank 0 writes to a
    temporary directory and renames it, so ``target`` is never half-written.
    """
    target = Path(target)
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if dist.is_main():
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        module = engine.module
        module.config.use_cache = True
        save_pretrained_as(module, state_dict, staging, dtype)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    dist.barrier()
    return target
