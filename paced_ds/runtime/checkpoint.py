"""Checkpoints through the DeepSpeed engine, and the student's Hugging Face export.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: DeepSpeed's files (engine state,
optimizer shards, and the run's own state as client state), each rank's RNG states
(``rng_rank<r>.json``: DeepSpeed keeps client state from one rank only under ZeRO-1/2) and
``paced_ds.json`` (step, world size, config), which is read before any rank starts, and,
written last, ``manifest.json``: every file's size and SHA-256.

Crash safety: every rank writes into ``.tmp-step_<N>`` and fsyncs what is there; once all
have, the ranks hash a share of the files each, rank 0 writes the manifest, renames the
directory to ``step_<N>`` and only then replaces ``latest`` atomically, syncing the
directory after each. A crash (or a power loss) at any point leaves ``latest`` naming a
complete checkpoint; ``.tmp-*`` leftovers are removed by the next save. A write that fails
(a full disk) is told to every rank, which all stop with the partial directory removed.
A resume checks the sizes before it picks a checkpoint and the hashes as it loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from paced_ds.errors import UserError
from paced_ds.runtime import dist
from paced_ds.runtime.faults import NONE, Faults
from paced_ds.runtime.files import write_text_atomic
from paced_ds.runtime.rundir import RunDir

PARTIAL_PREFIX = ".tmp-"  # a checkpoint being written, or left half-written by a crash
STATE_FILE = "paced_ds.json"
MANIFEST = "manifest.json"  # every file's bytes and SHA-256, written last (older checkpoints have none)

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


def save(engine, output_dir: str | Path, step: int, client_state: dict, config: dict, faults: Faults = NONE) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    A write that fails on any rank (a full disk) fails the save on every rank alike: what it
    wrote is removed, the previous checkpoint and ``latest`` stay as they were, and every rank
    raises one UserError naming the checkpoint, the rank that failed and its OS error.
    """
    root = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    staging = root / f"{PARTIAL_PREFIX}{tag}"
    rng = rng_state()  # before DeepSpeed runs any code of its own
    if dist.is_main():
        remove_partial(root)
    dist.barrier()
    with failed_writes_kept(engine) as failed_writes:
        try:
            engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as err:
            # Not a write of its checkpoint engine (those are kept): this rank may have skipped
            # collectives of DeepSpeed's that the others wait in, so it cannot tell them; it stops
            # (and the launcher stops them), leaving the partial directory to the next save.
            raise UserError(unsaved(root, tag, dist.rank(), describe_failure(err, root), removed=False)) from err
    failure = failed_writes[0] if failed_writes else None
    if failure is None:
        try:
            write_text_atomic(staging / f"rng_rank{dist.rank()}.json", json.dumps(rng))
            if dist.is_main():
                write_text_atomic(staging / STATE_FILE, json.dumps(
                    {"step": step, "world_size": dist.world_size(), "config": config}, indent=1))
            if faults:
                faults.in_save(step)  # PACED_DS_FAULT=kill:save=N (tests)
            sync_files(staging)
        except Exception as err:  # a failed rank still takes part in the exchange that tells the others
            failure = err
    agree_or_stop(root, tag, failure)  # every rank's share is on disk, and synced
    # The ranks split the hashing by bytes, not by who wrote what (DeepSpeed's file naming to
    # know): checkpoints live on a filesystem every rank reads, as resuming needs, and each rank
    # reads ~1/world of the bytes, in parallel, where rank 0 alone would read them all.
    records, failure = {}, None
    try:
        names = share(file_sizes(staging), dist.rank(), dist.world_size())
        records = {name: file_record(staging / name) for name in names}
    except Exception as err:
        failure = err
    manifest = {name: record for part in agree_or_stop(root, tag, failure, records) for name, record in part.items()}
    failure = None
    if dist.is_main():
        try:
            for name in file_sizes(staging).keys() - manifest.keys():  # a file another rank's listing missed
                manifest[name] = file_record(staging / name)
            write_text_atomic(staging / MANIFEST, json.dumps({"files": dict(sorted(manifest.items()))}, indent=1))
            sync_directory(staging)
            publish(root, staging, tag)
        except Exception as err:
            failure = err
    agree_or_stop(root, tag, failure)
    return root / tag


@contextlib.contextmanager
def failed_writes_kept(engine):
    """Within: a write of DeepSpeed's checkpoint engine that fails (a full disk) is kept in the
    list yielded, not raised, and the rank's later writes are skipped. DeepSpeed so goes on
    through what follows its writes, collectives included (ZeRO-3 gathers its parameters
    again, then a barrier): a rank raising out of save_checkpoint would skip them, and the
    other ranks would wait there until train.timeout_s."""
    checkpoint_engine = engine.checkpoint_engine
    write = checkpoint_engine.save
    failed: list[Exception] = []

    def save(state_dict, path):
        if not failed:
            try:
                write(state_dict, path)
            except Exception as err:
                failed.append(err)

    checkpoint_engine.save = save
    try:
        yield failed
    finally:
        checkpoint_engine.save = write


def agree_or_stop(root: Path, tag: str, failure: Exception | None, payload=None) -> list:
    """Collective: every rank's ``payload`` when no rank's ``failure`` is set. Else rank 0 removes
    the partial checkpoint and every rank raises the first failed rank's error, naming it, as one
    UserError (a failure that is no I/O error is a bug: its rank re-raises it, traceback and all)."""
    reports = dist.all_gather_objects((None if failure is None else describe_failure(failure, root), payload))
    failed = [(rank, error) for rank, (error, _) in enumerate(reports) if error is not None]
    if not failed:
        return [payload for _, payload in reports]
    if dist.is_main():
        shutil.rmtree(root / f"{PARTIAL_PREFIX}{tag}", ignore_errors=True)
    dist.barrier()
    if failure is not None and not isinstance(failure, (OSError, RuntimeError)):
        raise failure
    raise UserError(unsaved(root, tag, *failed[0], removed=True)) from failure


def unsaved(root: Path, tag: str, rank: int, error: str, *, removed: bool) -> str:
    """The one line of a failed save."""
    latest = root / "latest"
    kept = f"{latest} still names {latest.read_text().strip()!r}" if latest.is_file() else "there is no earlier one"
    return (f"checkpoint {root / tag} not saved: rank {rank}: {error}; what it wrote is "
            f"{'removed' if removed else 'left to the next save to remove'} and {kept}: free space (or move "
            "train.output_dir), then continue with train.resume=auto")


def describe_failure(err: Exception, root: Path) -> str:
    """One line: the OS error behind ``err`` and the space left where checkpoints go."""
    os_error = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OSError)), None)
    if os_error is not None:
        text = (os_error.strerror or str(os_error)) + (f": {os_error.filename}" if os_error.filename else "")
    else:
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return text
    if os_error is None and free < 2**20:  # torch.save's writer on a full disk names no OS error
        return f"no space left on device ({free} bytes free there; torch: {text})"
    return f"{text} ({free / 2**20:.0f} MiB free there)"


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` but the manifest: its path relative to it -> bytes."""
    return {path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST}


def share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's part of the files (name -> bytes), the parts about equal in bytes (largest
    first, each to the rank with the fewest bytes so far); the same split on every rank."""
    loads, mine = [0] * world_size, []
    for name in sorted(sizes, key=lambda name: (-sizes[name], name)):
        least = loads.index(min(loads))
        loads[least] += sizes[name]
        if least == rank:
            mine.append(name)
    return mine


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 16 MiB blocks: any size in little memory, at the
    speed of SHA-256 (~1 GB/s a core; hashlib releases the GIL on large blocks)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


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

    Only complete checkpoints are found (``incomplete``): with auto, the one ``latest`` names,
    or else the newest complete one beside it (``fallback_note`` says why); a PATH, or the
    ``latest`` of a PATH, that names no complete checkpoint is refused, as is a ``.tmp-*`` one.
    """
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoint_dir(output_dir)
        if not (root / "latest").is_file():
            return None
        why = latest_problem(root)
        if why is None:
            return root, (root / "latest").read_text().strip()
        fallback = newest_complete(root)
        if fallback is None:
            raise UserError(f"config key train.resume: {why}, and {root} holds no other complete checkpoint to "
                            "resume from; restore it, or start afresh in another train.output_dir")
        return root, fallback
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"config key train.resume: no checkpoint directory {resume}")
    if (path / "latest").is_file():
        why = latest_problem(path)
        if why is not None:
            raise UserError(f"config key train.resume: {why}; write the name of a complete checkpoint (step_N) "
                            "into it, or set train.resume to that checkpoint (or auto, to take the newest)")
        return path, (path / "latest").read_text().strip()
    if path.name.startswith(PARTIAL_PREFIX):
        raise UserError(f"config key train.resume: {resume} is a checkpoint a crash left unfinished; "
                        "resume from a complete one (step_N)")
    why = incomplete(path)
    if why is not None:
        raise UserError(f"config key train.resume: {why}; resume from another checkpoint (step_N), or set "
                        "train.resume=auto to take the newest complete one")
    return path.parent, path.name


def latest_problem(root: Path) -> str | None:
    """Why the checkpoint ``root/latest`` names is no complete one (a line naming the file), or None."""
    tag = (root / "latest").read_text().strip()
    if not tag or "/" in tag or not (root / tag).is_dir():
        return f"{root / 'latest'} names {tag!r}, which is no checkpoint directory beside it"
    return incomplete(root / tag)


def newest_complete(root: Path) -> str | None:
    """The tag of the newest (highest step) complete checkpoint ``step_N`` in ``root``, or None."""
    steps = sorted((int(path.name[5:]), path.name) for path in root.glob("step_*")
                   if path.name[5:].isdigit() and path.is_dir())
    return next((tag for _, tag in reversed(steps) if incomplete(root / tag) is None), None)


def fallback_note(resume: str, root: Path, tag: str) -> str:
    """For the "resumed from" line: why train.resume=auto passed over the checkpoint ``latest``
    names for ``tag``, or ''."""
    if resume != "auto" or not (root / "latest").is_file() or (root / "latest").read_text().strip() == tag:
        return ""
    return f", the newest complete checkpoint, not the one {root / 'latest'} names: {latest_problem(root)}"


def read_manifest(directory: Path) -> dict | None:
    """The checkpoint's manifest: file name -> {"bytes", "sha256"} (None for checkpoints
    written before they had one)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(r["bytes"], int) and isinstance(r["sha256"], str) for r in files.values()):
            raise TypeError("a record without bytes and sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"{path}: not a checkpoint manifest ({str(err).splitlines()[0][:80]}): the checkpoint "
                        "is damaged") from None
    return files


def incomplete(directory: Path) -> str | None:
    """Why ``directory`` is no complete checkpoint, as one line naming the file, or None.

    Each file its manifest records must be there with its size (a stat each: this runs before
    every resume decision); the SHA-256 hashes are checked once, by ``damaged`` as the
    checkpoint loads. A checkpoint without a manifest (older) needs DeepSpeed's model states only.
    """
    try:
        files = read_manifest(directory)
    except UserError as err:
        return str(err)
    if files is None:
        if not any(directory.glob("*model_states.pt")):
            return f"{directory} holds no DeepSpeed model states (*model_states.pt): not a complete checkpoint"
        return None
    for name, record in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{path} is missing ({MANIFEST} records {record['bytes']} bytes)"
        found = path.stat().st_size
        if found != record["bytes"]:
            return f"{path} has {found} bytes, {MANIFEST} records {record['bytes']}: truncated or damaged"
    return None


def damaged(directory: Path) -> str | None:
    """Collective: the first file whose SHA-256 (or size) differs from the manifest's, as one
    line naming it, or None; each rank hashes its share. A checkpoint without a manifest (older)
    has nothing to check: it loads unverified."""
    files = read_manifest(directory)
    if files is None:
        return None
    wrong = None
    for name in share({name: record["bytes"] for name, record in files.items()}, dist.rank(), dist.world_size()):
        try:
            found = file_record(directory / name)
        except OSError as err:
            wrong = f"{directory / name}: {err.strerror} ({MANIFEST} records {files[name]['bytes']} bytes)"
            break
        if found != files[name]:
            wrong = (f"{directory / name}: {found['bytes']} bytes of SHA-256 {found['sha256'][:16]}..., {MANIFEST} "
                     f"records {files[name]['bytes']} bytes of {files[name]['sha256'][:16]}...: the file is damaged")
            break
    return next((problem for problem in dist.all_gather_objects(wrong) if problem is not None), None)


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
    """Before any rank starts (``find_resume`` found the checkpoint complete): it holds plain
    data only, and was made by this run's config (what may differ: RESUME_MAY_CHANGE)."""
    directory = root / tag
    state = read_state(directory)
    if state is not None:
        check_config(state["config"], cfg, state["step"], directory)
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
    why = damaged(directory)  # on every rank alike: it is collective
    if why is not None:
        raise UserError(f"config key train.resume: {why}; resume from another checkpoint with train.resume=PATH")
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
