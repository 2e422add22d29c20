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


def shutdown() -> None:
    """Destroy the process group (idempotent); call once a rank's work is done.

    Also unlinks this job's shared-memory buffers: DeepSpeed's CPU all-reduce op leaves a
    ~70 MB file per rank in /dev/shm that nothing removes, and they add up run after run
    until the machine runs out of memory. Unlinking a file others still map is safe.
    """
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    remove_shared_memory()


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
