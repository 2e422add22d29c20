"""Files that are never seen half-written."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from paced_ds.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | Path):
    """A text file to write that appears at ``path`` in one step, complete and synced, when the
    block ends; on any failure the old file (if any) is untouched and nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object a line (see ``atomic_open``)."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` into ``path`` (see ``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def read_jsonl(path: str | Path, name: str | None = None, *, objects: bool = True) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` of each non-blank line; a line that is not JSON (or, with
    ``objects``, not a JSON object) is a one-line UserError naming ``name:line`` (``name``
    defaults to the path)."""
    name = str(path) if name is None else name
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                raise UserError(f"{name}:{number}: not valid JSON ({str(e).splitlines()[0]})") from None
            if objects and not isinstance(value, dict):
                raise UserError(f"{name}:{number}: not a JSON object")
            yield number, value


def check_output_dir(path: str | Path, key: str, *, writable: bool = True) -> None:
    """That directory ``path`` (config key ``key``) exists or can be made (and, if ``writable``,
    written): else one line naming the key and why (a file in the way, no permission)."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"config key {key}: {path} is a file, not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"config key {key}: {path} cannot be a directory: {existing} is a file")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"config key {key}: {path} cannot be written: no write permission on {existing}")

