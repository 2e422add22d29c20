"""Distributed helpers: start the process group, who am I, and the few collectives we use.

Works under the ``deepspeed`` launcher, ``torchrun`` and a plain single process. On a
machine with no GPU, DeepSpeed's CPU accelerator and gloo are used
(``DS_ACCELERATOR=cpu``, set by ``paced-ds`` when no CUDA device is visible).
"""

from __future__ import annotations

import datetime
import glob
import logging
import os
import socket
import sys
import threading
import time
import warnings

import torch
import torch.distributed as torch_dist

from paced_ds.errors import UserError


def ensure_accelerator_env() -> None:
    """Pick DeepSpeed's CPU accelerator when no GPU is visible (before deepspeed is imported)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(timeout_s: int = 900) -> None:
    """Start the process group once (DeepSpeed picks nccl on GPUs, gloo on its CPU accelerator)."""
    ensure_accelerator_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # a plain `python -m paced_ds.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # torchrun sets no LOCAL_SIZE; DeepSpeed's CPU accelerator reads it as its device count.
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # DeepSpeed's ZeRO-3 calls collectives torch has renamed; the warning is theirs to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":  # before NCCL starts, so it never guesses GPU 0
        accelerator.set_device(local_rank())
    # DeepSpeed creates further groups without a timeout, and torch gives those its module
    # default (30 min for gloo, 10 for NCCL): make that default ours, so that every group has it.
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.distributed_c10d.default_pg_timeout = timeout
    torch_dist.distributed_c10d.default_pg_nccl_timeout = timeout
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(timeout=timeout)
        _open_failure_store(timeout_s)


def shutdown() -> None:
    """Destroy the process group (idempotent); call once a rank's work is done.

    Also unlinks this job's shared-memory buffers: DeepSpeed's CPU all-reduce op leaves a
    ~70 MB file per rank in /dev/shm that nothing removes, and they add up run after run
    until the machine runs out of memory. Unlinking a file others still map is safe.
    """
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        _forget_deepspeed_groups()
    remove_shared_memory()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the groups it made (its world, data-parallel, ...) in module globals; a
    process group started again in the same process (tests build engines in one process, one
    module after another) must not meet the destroyed ones."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith("_GROUP"):
            setattr(groups, name, {} if isinstance(value, dict) else None)
        elif name.startswith("_") and name.endswith("_GROUP_RANKS") and isinstance(value, dict):
            value.clear()


def remove_shared_memory() -> None:
    """Unlink this job's DeepSpeed all-reduce buffers in /dev/shm (see shutdown)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
            try:
                os.unlink(path)
            except OSError:
                pass  # another rank of the job removed it first


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name, local_rank()) if name == "cuda" else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; float64 kept exact for counts)."""
    out = values.detach().clone().to(device())
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out.cpu()


def all_gather_objects(obj):
    """Every rank's ``obj``, in rank order (small, picklable-free JSON-like payloads)."""
    if not torch_dist.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT address (teacher.address)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"config key teacher.address: expected HOST:PORT, got {address!r}")
    return host, int(port)


# A rank that fails for a reason of its own claims the failure in a small TCP store of paced-ds's
# own (served by rank 0, apart from the process group's), then says why. Every other rank watches
# that store from a thread and, seeing the claim, leaves quietly with the same exit status: a
# rank blocked in a collective (gloo, NCCL, DeepSpeed's shared-memory all-reduce) learns of a
# failed peer only when that peer's process is gone, and then with a "connection reset"
# traceback. So the user reads the failing rank's line once, and nothing from its peers.
FAILED_KEY, QUIET_KEY, PORT_KEY = "failed_rank", "quiet_ranks", "paced_ds/failure_store_port"
WATCH_INTERVAL_S = 0.5
_failure_store = None


def _open_failure_store(timeout_s: int) -> None:
    global _failure_store
    if world_size() == 1:
        return
    group_store = torch_dist.distributed_c10d._get_default_store()
    host, timeout = os.environ["MASTER_ADDR"], datetime.timedelta(seconds=min(timeout_s, 60))
    if rank() == 0:
        _failure_store = torch_dist.TCPStore(host, 0, world_size(), True, timeout=timeout, wait_for_workers=False)
        group_store.set(PORT_KEY, str(_failure_store.port))
    else:
        port = int(group_store.get(PORT_KEY).decode())
        _failure_store = torch_dist.TCPStore(host, port, world_size(), False, timeout=timeout)
    threading.Thread(target=_watch_for_failed_peers, args=(_failure_store, rank()), daemon=True,
                     name="paced-ds-failure-watch").start()


def _watch_for_failed_peers(store, me: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        try:
            if not store.check([FAILED_KEY]):
                continue
            failed, code = map(int, store.get(FAILED_KEY).decode().split())
            if failed == me:
                return
            store.add(QUIET_KEY, 1)
        except Exception:  # noqa: BLE001 - the store is gone with rank 0: the collectives will tell
            return
        from paced_ds.runtime.exit import run_hooks

        run_hooks()
        remove_shared_memory()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _store():
    return _failure_store if world_size() > 1 else None


def claim_failure(code: int):
    """Called by a rank failing on its own account (exit status ``code``), before :func:`shutdown`.
    Returns (first, store): ``first`` whether no other rank claimed a failure before (only the
    first one speaks), and the store to hand to :func:`wait_for_quiet_peers` after the shutdown
    (None: alone, or no store)."""
    try:
        store = _store()
        if store is None:
            return True, None
        claim = f"{rank()} {code}"
        return store.compare_set(FAILED_KEY, "", claim).decode() == claim, store
    except Exception:  # noqa: BLE001 - the store is rank 0's: gone with it; speak as if alone
        return True, None


def failed_peer() -> tuple[int, int] | None:
    """(rank, exit status) of the rank that claimed a failure, if one did; this rank then
    promises to stay quiet."""
    try:
        store = _store()
        if store is None or not store.check([FAILED_KEY]):
            return None
        failed, code = map(int, store.get(FAILED_KEY).decode().split())
        store.add(QUIET_KEY, 1)
        return failed, code
    except Exception:  # noqa: BLE001 - no store to ask: nobody claimed anything we can know of
        return None


def lost_a_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away."""
    text = str(err)
    return isinstance(err, getattr(torch_dist, "DistBackendError", ())) or (
        isinstance(err, RuntimeError) and any(sign in text for sign in (
            "Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
            "Socket Timeout", "Timed out waiting")))


def wait_for_quiet_peers(store, timeout_s: float = 5.0) -> None:
    """Keep the store (rank 0's, it lives in that process) up until every peer has read the
    claim, or ``timeout_s``; the launcher stops the others once this rank exits anyway."""
    deadline = time.time() + timeout_s
    while store is not None and time.time() < deadline:
        try:
            if store.add(QUIET_KEY, 0) >= int(os.environ.get("WORLD_SIZE", 1)) - 1:
                return
        except Exception:  # noqa: BLE001 - the store went away: nothing left to wait for
            return
        time.sleep(0.05)
