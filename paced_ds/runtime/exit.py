"""Work a process must do on its way out, even when it leaves with ``os._exit``.

``paced_ds.train`` ends with ``os._exit`` (the interpreter's own teardown sometimes aborted
finished ranks inside gloo's threads), which skips ``atexit``. What must still happen (removing
a teacher's NVMe swap files, stopping answer-checker workers) is registered here instead: it
runs at :func:`run_hooks`, or at a normal interpreter exit for code that never reaches it.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable

_HOOKS: list[tuple[Callable, tuple, dict]] = []
_LOCK = threading.Lock()


def on_exit(fn: Callable, *args, **kwargs) -> None:
    """Call ``fn(*args, **kwargs)`` when the process leaves (last registered, first run)."""
    with _LOCK:
        if not _HOOKS:
            atexit.register(run_hooks)
        _HOOKS.append((fn, args, kwargs))


def run_hooks() -> None:
    """Run and forget every registered hook; one that raises does not stop the others."""
    while True:
        with _LOCK:
            if not _HOOKS:
                return
            fn, args, kwargs = _HOOKS.pop()
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - leaving anyway; say what was not cleaned
            print(f"paced-ds: at exit, {getattr(fn, '__name__', fn)} failed: {err}", flush=True)
