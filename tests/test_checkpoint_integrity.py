"""A full disk loses nothing, and a damaged checkpoint is named: in one process, with the
tiny student's real DeepSpeed engine.

A save that runs out of space (a write raising ENOSPC, or torch's own writer error) leaves
the previous checkpoint and ``latest`` as they were, removes what it wrote and stops with
one line; a checkpoint records its files' sizes and SHA-256, and a resume from one whose
file is truncated, missing or altered names the file (train.resume=auto falls back to the
newest complete checkpoint and says so).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch

from paced_ds.config import load_config
from paced_ds.errors import UserError
from paced_ds.models import engines
from paced_ds.models.export import export_checkpoint
from paced_ds.runtime import checkpoint, dist

from launch import RECIPE

STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIMIZER = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def engine():
    """The tiny student's engine in a process group of this one process (gloo)."""
    saved = dict(os.environ)
    dist.init(60)
    engine, _ = engines.build_student(load_config(RECIPE, []))
    yield engine
    dist.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def save(engine, run, step: int):
    return checkpoint.save(engine, run, step, {"made_at": step}, {"train": {"steps": 8}})


def listing(run) -> list[str]:
    """The checkpoints directory, without the recovery scripts DeepSpeed copies into it."""
    return sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("zero_to_"))


def contents(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def full_disk_in_torch_save(monkeypatch, name: str, error: Exception) -> None:
    """torch.save of the file ``name`` writes half its bytes, then raises ``error``, as on a disk
    that fills up mid-file; every other file is written as usual."""
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if not str(path).endswith(name):
            return real_save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error

    monkeypatch.setattr(torch, "save", save_until_full)


def full_disk_in_torch_writer(monkeypatch) -> None:
    """What torch.save(obj, path) really raises on a full disk (checked on a small tmpfs, torch
    2.x): its writer's error, no OS error in sight; and the filesystem then has no byte free."""
    full_disk_in_torch_save(monkeypatch, STATES, RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))


def full_disk_in_own_write(monkeypatch, name: str) -> None:
    """paced-ds's own write of the file ``name`` (rng_rank0.json, manifest.json) fails with ENOSPC."""
    real_write = checkpoint.write_text_atomic

    def write_until_full(path, text):
        if str(path).endswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, text)

    monkeypatch.setattr(checkpoint, "write_text_atomic", write_until_full)


# Where the disk fills up, and what the error line then says.
FULL_DISK = {
    "optimizer states": (lambda mp: full_disk_in_torch_save(mp, OPTIMIZER, OSError(errno.ENOSPC, os.strerror(
        errno.ENOSPC))), "No space left on device ("),
    "model states, torch's writer error": (full_disk_in_torch_writer, "no space left on device (0 bytes free there; "
                                           "torch: [enforce fail at inline_container.cc:672] . unexpected pos"),
    "RNG states": (lambda mp: full_disk_in_own_write(mp, "rng_rank0.json"), "No space left on device: "),
    "manifest, written last": (lambda mp: full_disk_in_own_write(mp, "manifest.json"), "No space left on device: "),
}


@pytest.mark.parametrize("where", FULL_DISK)
def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    root = run / "checkpoints"
    save(engine, run, 2)
    before = contents(root / "step_2")
    fill_disk, said = FULL_DISK[where]
    with monkeypatch.context() as patched:
        fill_disk(patched)
        with pytest.raises(UserError) as failed:
            save(engine, run, 4)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {root / 'step_4'} not saved: rank 0: ")
    assert said in message, message
    assert f"{root / 'latest'} still names 'step_2'" in message and "train.resume=auto" in message
    assert listing(run) == ["latest", "step_2"]  # no .tmp-step_4 left half-written
    assert (root / "latest").read_text() == "step_2" and contents(root / "step_2") == before
    assert checkpoint.find_resume(run, "auto") == (root, "step_2")
    assert checkpoint.load(engine, root, "step_2")["made_at"] == 2  # it loads: sizes and hashes agree
    save(engine, run, 4)  # space again: the next save goes through
    assert listing(run) == ["latest", "step_2", "step_4"] and (root / "latest").read_text() == "step_4"


def test_a_rank_whose_own_writes_succeeded_stops_too(engine, tmp_path, monkeypatch):
    """Rank 0's files are written, but rank 1 reports a full disk in the exchange after the
    writes: rank 0 removes the partial checkpoint and raises the same line, naming rank 1."""
    run = tmp_path / "run"
    save(engine, run, 2)
    lost = f"No space left on device: {run / 'checkpoints' / '.tmp-step_4' / OPTIMIZER.replace('rank_0', 'rank_1')}"
    monkeypatch.setattr(dist, "all_gather_objects", lambda mine: [mine, (lost, None)])
    with pytest.raises(UserError, match=r"step_4 not saved: rank 1: No space left on device: .*rank_1_mp") as failed:
        save(engine, run, 4)
    assert "\n" not in str(failed.value)
    assert listing(run) == ["latest", "step_2"]


def test_a_checkpoint_records_the_size_and_hash_of_every_file(engine, tmp_path):
    directory = save(engine, tmp_path / "run", 2)
    files = json.loads((directory / "manifest.json").read_text())["files"]
    on_disk = sorted(p.name for p in directory.iterdir() if p.name != "manifest.json")
    assert sorted(files) == on_disk and {STATES, OPTIMIZER, "rng_rank0.json", "paced_ds.json"} <= set(files)
    for name, record in files.items():
        data = (directory / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_the_hashing_is_shared_evenly_and_wholly_among_the_ranks():
    sizes = {f"file{i}": size for i, size in enumerate([900, 500, 400, 300, 300, 100, 0])}
    shares = [checkpoint.share(sizes, rank, 3) for rank in range(3)]
    assert sorted(name for part in shares for name in part) == sorted(sizes)  # each file once
    assert [sum(sizes[name] for name in part) for part in shares] == [900, 800, 800]


def test_a_truncated_or_missing_file_is_named_and_auto_falls_back(engine, tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    save(engine, run, 2)
    save(engine, run, 4)
    states = root / "step_4" / STATES
    full_size = states.stat().st_size
    states.write_bytes(states.read_bytes()[:100])  # a copy cut short
    expected = f"{states} has 100 bytes, manifest.json records {full_size}: truncated or damaged"
    for explicit in (root / "step_4", root):  # the checkpoint, or the directory whose `latest` names it
        with pytest.raises(UserError, match="config key train.resume: ") as refused:
            checkpoint.find_resume(run, str(explicit))
        assert expected in str(refused.value) and "\n" not in str(refused.value)
    assert checkpoint.find_resume(run, "auto") == (root, "step_2")
    assert checkpoint.fallback_note("auto", root, "step_2") == (
        f", the newest complete checkpoint, not the one {root / 'latest'} names: {expected}")
    assert checkpoint.fallback_note(str(root / "step_2"), root, "step_2") == ""  # chosen by hand: nothing to say
    states.unlink()
    assert checkpoint.find_resume(run, "auto") == (root, "step_2")
    with pytest.raises(UserError, match=f"{STATES} is missing \\(manifest.json records {full_size} bytes\\)"):
        checkpoint.find_resume(run, str(root / "step_4"))
    (root / "step_2" / OPTIMIZER).write_bytes(b"")  # and now the fallback is damaged too
    with pytest.raises(UserError, match=f"{STATES} is missing.*holds no other complete checkpoint"):
        checkpoint.find_resume(run, "auto")


def test_latest_naming_a_missing_checkpoint(engine, tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    save(engine, run, 2)
    (root / "latest").write_text("step_9")
    assert checkpoint.find_resume(run, "auto") == (root, "step_2")
    assert "names 'step_9', which is no checkpoint directory" in checkpoint.fallback_note("auto", root, "step_2")
    with pytest.raises(UserError, match="latest names 'step_9'"):
        checkpoint.find_resume(run, str(root))


def test_an_altered_file_of_the_right_size_is_named_as_it_loads(engine, tmp_path):
    run = tmp_path / "run"
    directory = save(engine, run, 2)
    states = directory / STATES
    data = bytearray(states.read_bytes())
    data[-30] ^= 0xFF  # one flipped byte: the size is right, the hash is not
    states.write_bytes(bytes(data))
    assert checkpoint.find_resume(run, "auto") == (directory.parent, "step_2")  # sizes only, before it loads
    with pytest.raises(UserError, match=f"{states}: {len(data)} bytes of SHA-256 .* the file is damaged") as refused:
        checkpoint.load(engine, directory.parent, "step_2")
    assert "\n" not in str(refused.value)
    (run / "config.json").write_text("{}")  # and the offline export, in one process, hashes every file
    with pytest.raises(UserError, match=f"--tag step_2: {states}: .* the file is damaged; export another"):
        export_checkpoint(str(run), "step_2")


def test_a_checkpoint_from_before_manifests_still_loads(engine, tmp_path):
    run = tmp_path / "run"
    directory = save(engine, run, 2)
    (directory / "manifest.json").unlink()
    assert checkpoint.find_resume(run, "auto") == (directory.parent, "step_2")
    assert checkpoint.load(engine, directory.parent, "step_2")["made_at"] == 2


# Each of two ranks saves step 2, then step 4 with rank 1's disk full: its first torch.save,
# inside DeepSpeed's collective save_checkpoint, writes a few bytes and raises ENOSPC.
TWO_RANKS_SCRIPT = """
import errno, os, sys, torch
from paced_ds.config import load_config
from paced_ds.errors import UserError
from paced_ds.models import engines
from paced_ds.models.export import export_checkpoint
from paced_ds.runtime import checkpoint, dist
dist.init(60)
engine, _ = engines.build_student(load_config(sys.argv[1], []))
checkpoint.save(engine, sys.argv[2], 2, {}, {})
if dist.rank() == 1:
    def full_disk(obj, path, *args, **kwargs):
        open(path, "wb").write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    torch.save = full_disk
try:
    checkpoint.save(engine, sys.argv[2], 4, {}, {})
except UserError as err:
    print(f"rank {dist.rank()}: {err}", flush=True)
dist.shutdown()
"""


@pytest.mark.distributed
def test_every_rank_stops_when_one_runs_out_of_space_inside_deepspeed(tmp_path):
    """Rank 0 finishes its writes and waits in DeepSpeed's closing barrier while rank 1 fails
    before it: both learn of the failure within seconds (no wait for the 60 s timeout), both
    stop with rank 1's line, and step_2 and `latest` are as they were."""
    import subprocess
    import sys
    import time

    from launch import REPO, cpu_env, explain

    port, run = dist.free_port(), tmp_path / "run"
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", TWO_RANKS_SCRIPT, str(RECIPE), str(run)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cpu_env(
                                  RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for rank in (0, 1)]
    results = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    for rank, result in enumerate(results):
        assert result.returncode == 0, explain(result)
        said = [line for line in result.stdout.splitlines() if line.startswith(f"rank {rank}: ")]
        assert len(said) == 1, explain(result)
        assert f"{run / 'checkpoints' / 'step_4'} not saved: rank 1: No space left on device" in said[0]
    assert time.monotonic() - started < 55  # no rank waited for the 60 s timeout
    assert listing(run) == ["latest", "step_2"] and (run / "checkpoints" / "latest").read_text() == "step_2"
