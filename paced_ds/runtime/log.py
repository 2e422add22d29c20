"""What a run prints: one-line messages and progress, from rank 0 only.

Progress is a bar on a terminal. Where the output is not a terminal (a log file, CI), a bar's
carriage-return redraws would be hundreds of lines; there it is one plain line at most every
``PLAIN_EVERY_S`` seconds, and one when the work is done if it took that long.
"""

from __future__ import annotations

import sys
import time

from paced_ds.runtime import dist

PLAIN_EVERY_S = 30.0


def say(message: str) -> None:
    if dist.is_main():
        print(f"paced-ds: {message}", flush=True)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar on rank 0 (``logging.progress``) when stderr is a terminal; else plain
    lines now and then (``PlainProgress``); a silent one on the other ranks."""
    if enabled and dist.is_main() and not sys.stderr.isatty():
        return PlainProgress(total, desc, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or not dist.is_main(),
                dynamic_ncols=True)


class PlainProgress:
    """The part of tqdm's interface a run uses, as a plain line every ``every_s`` seconds:
    ``paced-ds: distilling: 120/300 (40%), 48 s, loss=0.0123``."""

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float = PLAIN_EVERY_S):
        self.total, self.desc, self.n, self.every_s = total, desc, initial, every_s
        self.started = self.last = time.time()
        self.postfix = ""
        self.printed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.time() - self.last >= self.every_s:
            self.line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def line(self) -> None:
        self.last, self.printed = time.time(), True
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"paced-ds: {self.desc}: {self.n}/{self.total}{share}, {self.last - self.started:.0f} s{postfix}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.printed or time.time() - self.started >= self.every_s:
            self.line()
