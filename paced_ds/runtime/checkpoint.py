"""Checkpoints through the DeepSpeed engine, and the student's Hugging Face export.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/`` written collectively by every
rank (engine state, optimizer shards) with the run's own state as DeepSpeed client
state; DeepSpeed's ``latest`` file names the newest tag and is written last.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from paced_ds.errors import UserError
from paced_ds.runtime import dist


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save(engine, output_dir: str | Path, step: int, client_state: dict) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
    dist.barrier()
    return root / tag


def find_resume(output_dir: str | Path, resume: str) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from, or None: train.resume = never | auto | PATH."""
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoint_dir(output_dir)
        latest = root / "latest"
        if not latest.is_file():
            return None
        return root, latest.read_text().strip()
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"config key train.resume: no checkpoint at {resume}")
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    return path.parent, path.name


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
                name = found.group(1) if found else None
                if name is None or not name.startswith(TRUSTED_MODULES) or len(allowed) > 50:
                    what = f"the global {name}" if name else str(err).splitlines()[0]
                    raise UserError(f"{path}: refusing to load this checkpoint: it holds a pickled object "
                                    f"that is not plain data ({what}); only load checkpoints you made") from None
                module, attribute = name.rsplit(".", 1)
                allowed.append(getattr(importlib.import_module(module), attribute))


def load(engine, root: Path, tag: str) -> dict:
    """Collective: restores the engine and returns the client state saved with it."""
    if not (root / tag).is_dir():
        raise UserError(f"config key train.resume: checkpoint {root / tag} does not exist")
    verify_safe(root / tag)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"config key train.resume: DeepSpeed could not load {root / tag}")
    return client_state or {}


def export_student(engine, tokenizer, target: str | Path) -> Path | None:
    """Write the student in Hugging Face format (safetensors) to ``target``; collective.

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
        module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    dist.barrier()
    return target
