"""Fault injection, a testing aid: ``PACED_DS_FAULT`` makes a rank die or a loss go NaN on cue.

    PACED_DS_FAULT="kill:rank=1:step=3"      rank 1 SIGKILLs itself once optimizer step 3 is
                                             done and logged, before its checkpoint is saved
    PACED_DS_FAULT="kill:rank=0:save=4"      rank 0 SIGKILLs itself inside the save of step 4:
                                             its files are written, the checkpoint not yet renamed
    PACED_DS_FAULT="kill:answers=3"          a pipelined teacher rank SIGKILLs itself once it has
                                             sent 3 answers (rank=R: only teacher rank R)
    PACED_DS_FAULT="nan:step=2[:rank=1][:times=3]"
                                             the loss of step 2 is multiplied by NaN (on every
                                             rank, or on ``rank``) for its first ``times`` tries
    PACED_DS_FAULT="nangrad:step=2[:rank=1][:times=3]"
                                             the loss of step 2 stays finite but its gradient is
                                             NaN (the same ``rank`` and ``times``)
    PACED_DS_FAULT="error:rank=1:step=2"     rank 1 raises a UserError once optimizer step 2 is
                                             done (how a user error on one rank looks)

Several faults are separated by commas. Steps count from 1 like the metrics. The variable
is read once, into a :class:`Faults` the loop is given (``Faults.from_env(rank)``); when it is
unset, the object is false and the loop calls nothing of it. A killed rank first unlinks its
job's /dev/shm all-reduce buffers (the ones a clean exit removes), so that tests which kill
ranks leave nothing behind.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from paced_ds.errors import UserError

ENV = "PACED_DS_FAULT"
KEYS = {"kill": {"rank", "step", "save", "answers"}, "nan": {"rank", "step", "times"},
        "nangrad": {"rank", "step", "times"}, "error": {"rank", "step"}}


@dataclass
class Fault:
    action: str  # kill | nan | nangrad | error
    step: int | None = None  # kill after this optimizer step / NaN loss at this step
    save: int | None = None  # kill inside the save of this step's checkpoint
    answers: int | None = None  # kill a pipelined teacher rank once it has sent this many answers
    rank: int | None = None  # None: every rank
    times: int = 1  # nan: how many tries of the step get a NaN loss


def parse(text: str) -> list[Fault]:
    """The faults of a ``PACED_DS_FAULT`` value; a malformed one is a UserError."""
    faults = []
    for spec in filter(None, (part.strip() for part in text.split(","))):
        action, *pairs = spec.split(":")
        if action not in KEYS:
            raise UserError(f"{ENV}={text!r}: unknown fault {action!r} (kill, nan, nangrad or error)")
        values = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in KEYS[action] or not value.isdigit():
                raise UserError(f"{ENV}={text!r}: {pair!r} is not one of "
                                f"{', '.join(f'{k}=N' for k in sorted(KEYS[action]))} for {action}")
            values[key] = int(value)
        fault = Fault(action, **values)
        if [fault.step, fault.save, fault.answers].count(None) != 2:
            raise UserError(f"{ENV}={text!r}: {spec!r} needs exactly one of step=N or save=N"
                            + (" or answers=N" if action == "kill" else ""))
        faults.append(fault)
    return faults


class Faults:
    """The faults ``PACED_DS_FAULT`` asks of one rank, parsed once; false when there are none."""

    def __init__(self, faults: list[Fault], rank: int):
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]
        self._tries: dict[tuple[str, int], int] = {}  # (action, step) -> tries of the step spoiled so far

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        return cls(parse(os.environ.get(ENV, "")), rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def after_step(self, step: int) -> None:
        """Once optimizer step ``step`` is done and logged: ``kill`` or ``error`` faults."""
        if any(f.action == "kill" and f.step == step for f in self.faults):
            _die(f"after step {step}")
        if any(f.action == "error" and f.step == step for f in self.faults):
            raise UserError(f"{ENV}: a user error injected after step {step}")

    def in_save(self, step: int) -> None:
        if any(f.action == "kill" and f.save == step for f in self.faults):
            _die(f"inside the save of step {step}")

    def after_answers(self, answers: int) -> None:
        """A pipelined teacher rank has sent ``answers`` answers (rank = its teacher rank)."""
        if any(f.action == "kill" and f.answers == answers for f in self.faults):
            _die(f"after sending {answers} answers")

    def spoil_loss(self, step: int):
        """What to do to this try's loss (call once per try of ``step``): nothing, or under a
        ``nan`` fault make it NaN, under ``nangrad`` make its gradient NaN."""
        for fault in self.faults:
            if fault.action in ("nan", "nangrad") and fault.step == step:
                tries = self._tries.get((fault.action, step), 0)
                if tries < fault.times:
                    self._tries[fault.action, step] = tries + 1
                    return (lambda loss: loss * float("nan")) if fault.action == "nan" else _NanGradient.apply
        return lambda loss: loss


NONE = Faults([], rank=0)


class _NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _die(where: str) -> None:
    from paced_ds.runtime import dist

    print(f"paced-ds: {ENV}: rank {dist.rank()} kills itself {where}", flush=True)
    dist.remove_shared_memory()
    os.kill(os.getpid(), signal.SIGKILL)
