"""Run functions in worker processes, each call within a hard deadline.

A thread cannot be stopped and ``signal``-based timeouts work only in a main thread, so a
call that must return in time, from any thread, runs in a worker process instead:
:class:`DeadlinePool` sends it ``(function, args)`` (pickled, so the function must be
importable there) and waits at most ``budget_s``. The worker stops itself a little before
(SIGALRM); one that does not answer by the deadline is killed and replaced, and the call's
outcome is ``("timeout", None)``. Outcomes are ``("ok", value)``, ``("timeout", None)``,
``("error", "Type: message")`` (the function raised), ``("crashed", exit code)`` or
``("unavailable", None)`` (no worker could start: the caller decides without one).

Workers are fresh interpreters (``subprocess``, not fork), started when first needed and
kept idle between calls (a spare, too, so that after a timeout the next call need not
wait for a start); starting one is waited for on top of the budget, up to
``start_timeout_s``. A forked child never uses its parent's workers: its pool starts its
own. The idle workers are stopped when the process leaves, ``os._exit`` included
(``paced_ds.runtime.exit``).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from paced_ds.runtime.exit import on_exit

logger = logging.getLogger(__name__)

_SOFT_DEADLINE = 0.85  # of the budget: a worker stops itself here, before it must be killed
_FORK_LOCK = threading.Lock()


class DeadlinePool:
    """Worker processes lent to ``run``; ``name`` says what they do in messages (e.g.
    "math-verify"), ``warm_up`` (an importable function, or None) runs in each new
    worker before it takes work, ``max_idle`` workers are kept after a call, and
    ``on_unavailable(reason)`` is told once when no worker starts (default: a warning)."""

    def __init__(self, name: str, *, start_timeout_s: float, max_idle: int,
                 warm_up: Callable[[], None] | None = None,
                 on_unavailable: Callable[[str], None] | None = None):
        if warm_up is not None and (warm_up.__module__ == "__main__" or not warm_up.__qualname__.isidentifier()):
            raise ValueError(f"DeadlinePool warm_up {warm_up.__qualname__} must be importable "
                             "from a module: workers are fresh interpreters")
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.max_idle = max_idle
        self._warm_up = f"{warm_up.__module__}:{warm_up.__qualname__}" if warm_up else None
        self._on_unavailable = on_unavailable or self._warn_unavailable
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self.pid = os.getpid()
        self.unavailable = False  # a worker failed to start: every outcome is "unavailable"
        self._closes_at_exit = False

    def run(self, tasks: list[tuple], budget_s: float, workers: int = 1) -> list[tuple[str, object]]:
        """Each task (function, args) run in one of ``workers`` workers within ``budget_s``
        of being sent to it; the outcomes in the tasks' order (see the module docstring)."""
        self._own_process()
        outcomes: list = [("unavailable", None)] * len(tasks)
        if self.unavailable or not tasks:
            return outcomes
        pending, busy = deque(range(len(tasks))), {}  # busy: worker -> (task, deadline)
        try:
            crew = self._take(min(workers, len(tasks)))
        except OSError as error:
            self._give_up(f"cannot start a {self.name} worker ({error})")
            return outcomes
        start_deadline_s = time.monotonic() + self.start_timeout_s
        try:
            while pending or busy:
                now = time.monotonic()
                for i, worker in enumerate(crew):
                    if worker.ready and worker not in busy and pending:
                        task = pending.popleft()
                        function, args = tasks[task]
                        try:
                            worker.tasks.send((function, args, budget_s * _SOFT_DEADLINE))
                        except BrokenPipeError:  # it died while idle (killed from outside)
                            pending.appendleft(task)
                            crew[i] = self._replace(worker)
                            start_deadline_s = time.monotonic() + self.start_timeout_s
                            continue
                        busy[worker] = (task, now + budget_s)
                if not busy and now > start_deadline_s:
                    self._give_up(f"no {self.name} worker started in {self.start_timeout_s:.0f} s")
                    break
                deadline_s = min([d for _, d in busy.values()] or [start_deadline_s])
                answered = wait([w.replies for w in crew], timeout=max(deadline_s - now, 0))
                for i, worker in enumerate(crew):
                    if worker.replies in answered:
                        try:
                            reply = worker.replies.recv()
                        except (EOFError, OSError):
                            reply = ("crashed", worker.process.poll())
                        if not worker.ready and reply[0] != "ready":
                            # Died while starting: its warm-up (an import) fails here.
                            self._give_up(f"a {self.name} worker exited with {reply[1]} while starting")
                            crew[i] = None
                            worker.close()
                            break
                        if worker in busy:
                            outcomes[busy.pop(worker)[0]] = reply
                        worker.ready = True
                        if reply[0] == "crashed":
                            crew[i] = self._replace(worker)
                    elif worker in busy and busy[worker][1] <= time.monotonic():
                        outcomes[busy.pop(worker)[0]] = ("timeout", None)
                        crew[i] = self._replace(worker)
                    if crew[i] is not worker:  # its replacement gets its own start time
                        start_deadline_s = time.monotonic() + self.start_timeout_s
                if self.unavailable:
                    break
        finally:
            crew = [worker for worker in crew if worker is not None]
            for worker in busy:  # only on an exception: their replies would be stale
                crew.remove(worker)
                worker.close()
            self._give_back(crew)
        return outcomes

    def close(self) -> None:
        """Stop the idle workers (a later ``run`` starts new ones)."""
        if os.getpid() != self.pid:  # a forked child's copy: the workers are the parent's
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def _own_process(self) -> None:
        """In a forked child, forget the parent's workers (closing only this process's
        copies of their pipes) and start afresh."""
        if self.pid == os.getpid():
            return
        with _FORK_LOCK:
            if self.pid == os.getpid():
                return
            for worker in self._idle:
                worker.forget()
            self._lock, self._idle, self.unavailable = threading.Lock(), [], False
            self.pid, self._closes_at_exit = os.getpid(), False

    def _take(self, count: int) -> list[_Worker]:
        with self._lock:
            if not self._closes_at_exit:
                on_exit(self.close)  # paced_ds.train leaves with os._exit: atexit is not enough
                self._closes_at_exit = True
            self._idle.sort(key=lambda worker: not worker.ready)
            crew, self._idle = self._idle[:count], self._idle[count:]
            crew += [_Worker(self._warm_up) for _ in range(count - len(crew))]
            if count == 1 and not self._idle:
                # The spare: after a timeout the next single call need not wait for a
                # start. (A batch replaces its own workers while the others go on.)
                self._idle.append(_Worker(self._warm_up))
        return crew

    def _give_back(self, crew: list[_Worker]) -> None:
        with self._lock:
            self._idle += crew
            extra = self._idle[max(2, self.max_idle):]  # 2: a single call's worker and its spare
            del self._idle[len(self._idle) - len(extra):]
        for worker in extra:
            worker.close()

    def _replace(self, worker: _Worker) -> _Worker:
        worker.close()
        return _Worker(self._warm_up)

    def _give_up(self, reason: str) -> None:
        self.unavailable = True
        self._on_unavailable(reason)

    def _warn_unavailable(self, reason: str) -> None:
        logger.warning("%s; %s calls report 'unavailable' from now on", reason, self.name)


class _Worker:
    """One worker process (this file's ``_worker_main``), driven over two pipes."""

    def __init__(self, warm_up: str | None):
        task_read, task_write = os.pipe()
        reply_read, reply_write = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        command = ("from paced_ds.runtime.deadline_pool import _worker_main; "
                   f"_worker_main({task_read}, {reply_write}, {warm_up!r})")
        try:
            self.process = subprocess.Popen([sys.executable, "-c", command], env=env,
                                            pass_fds=(task_read, reply_write),
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            os.close(task_read)
            os.close(reply_write)
        self.tasks = Connection(task_write, readable=False)
        self.replies = Connection(reply_read, writable=False)
        self.ready = False

    def close(self) -> None:
        self.forget()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def forget(self) -> None:
        """Close this process's ends of the pipes; the worker, seeing EOF, exits."""
        self.tasks.close()
        self.replies.close()


class _SoftDeadline(BaseException):
    """Raised in a worker at its own deadline; not an Exception, so that code catching
    Exception (math-verify does) lets it reach the worker loop."""


def _worker_main(task_fd: int, reply_fd: int, warm_up: str | None) -> None:
    """A worker's loop: run ``warm_up`` ("module:function"), say ready, then answer each task
    (function, args, soft deadline) with ("ok", value) / ("timeout", None) / ("error", text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; EOF ends us

    def on_deadline(signum, frame):
        raise _SoftDeadline()

    signal.signal(signal.SIGALRM, on_deadline)
    tasks, replies = Connection(task_fd, writable=False), Connection(reply_fd, readable=False)
    if warm_up:  # imports and first-use costs are paid here, not inside some call's deadline
        module, function = warm_up.split(":")
        getattr(importlib.import_module(module), function)()
    replies.send(("ready", os.getpid()))
    while True:
        try:
            function, args, soft_deadline_s = tasks.recv()
        except (EOFError, OSError):
            return
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(soft_deadline_s, 0.001))
                reply = ("ok", function(*args))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftDeadline:
            reply = ("timeout", None)
        except Exception as error:  # reported to the caller, which decides without it
            reply = ("error", f"{type(error).__name__}: {error}")
        replies.send(reply)
