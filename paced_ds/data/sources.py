"""The run's problems: read from the configured sources, with teacher responses attached.

``data.train``/``data.eval`` name a file, a ``datasets`` directory or name, or
``arith:train``/``arith:eval``, the generated reference task. Generated problems carry
no reference response on purpose: the teacher writes them, as it would for a real
problem set, and they are stored for later runs (see ``paced_ds.data.responses``).
"""

from __future__ import annotations

from pathlib import Path

from paced_ds.data import arith
from paced_ds.data.records import load_problems
from paced_ds.data.responses import (attach_responses, load_responses, problems_sha256, responses_path,
                                     save_responses)
from paced_ds.errors import UserError

ARITH_PREFIX = "arith:"


def load(source: str, data_cfg, *, split: str, per_level: int) -> list[dict]:
    """Problem records of ``source`` (validated; DESIGN.md record contract)."""
    if source.startswith(ARITH_PREFIX):
        which = source[len(ARITH_PREFIX):]
        if which not in ("train", "eval"):
            raise UserError(f"unknown generated source {source!r}: use arith:train or arith:eval")
        records = arith.dataset(which, per_level, seed=data_cfg.arith_seed)
        return [{k: v for k, v in r.items() if k != "response"} for r in records]
    return load_problems(source, fields=dict(data_cfg.fields), split=split)


def load_train(data_cfg) -> list[dict]:
    return load(data_cfg.train, data_cfg, split=data_cfg.split, per_level=data_cfg.arith_train_per_level)


def load_eval(data_cfg) -> list[dict]:
    if not data_cfg.eval:
        return []
    return load(data_cfg.eval, data_cfg, split=data_cfg.eval_split, per_level=data_cfg.arith_eval_per_level)


def limit_per_level(records: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` records of each difficulty level, in order (0 = all)."""
    if not limit:
        return records
    seen: dict[str, int] = {}
    kept = []
    for record in records:
        level = str(record.get("difficulty", "all"))
        if seen.get(level, 0) < limit:
            seen[level] = seen.get(level, 0) + 1
            kept.append(record)
    return kept


def stored_responses_path(data_cfg, teacher: str) -> Path:
    source = data_cfg.train
    cache_dir = str(Path(data_cfg.responses_dir).expanduser())
    if source.startswith(ARITH_PREFIX):  # not a file: keyed by the generator's settings
        source = f"arith-train-{data_cfg.arith_train_per_level}-seed{data_cfg.arith_seed}"
    return responses_path(source, teacher, cache_dir, split=data_cfg.split)


def missing_responses(records: list[dict]) -> list[dict]:
    return [r for r in records if not r.get("response")]


def with_stored_responses(records: list[dict], data_cfg, teacher: str) -> tuple[list[dict], int] | None:
    """Records with the stored teacher responses attached, and how many were dropped
    as wrong; None when some responses are needed and none are stored yet."""
    needed = missing_responses(records)
    if not needed:
        return records, 0
    path = stored_responses_path(data_cfg, teacher)
    stored = load_responses(path, teacher=teacher, data_sha256=problems_sha256(records))
    if stored is None:
        return None
    return attach_responses(records, stored, keep_incorrect=data_cfg.keep_incorrect)


def store_responses(records: list[dict], rows: list[dict], data_cfg, teacher: str) -> Path:
    path = stored_responses_path(data_cfg, teacher)
    return save_responses(path, rows, teacher=teacher, data_sha256=problems_sha256(records))
