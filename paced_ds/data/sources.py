"""The run's problems: read from the configured sources, with teacher responses attached.

``data.train``/``data.eval`` name a file, a ``datasets`` directory or name, or a
generated task: ``arith:<split>`` (the reference task) or ``words:<split>`` (GSM8K-style
word problems, ``paced_ds.data.word_problems``). Generated problems carry no reference
response on purpose: the teacher writes them, as it would for a real problem set, and
they are stored for later runs (see ``paced_ds.data.responses``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from paced_ds.data import arith, word_problems
from paced_ds.data.records import load_problems
from paced_ds.data.responses import (
    attach_responses,
    load_responses,
    problems_sha256,
    responses_path,
    save_responses,
    teacher_key,
)
from paced_ds.errors import UserError

ARITH_PREFIX = "arith:"
# prefix -> the generator of that task (both take split, per_level, seed)
GENERATED = {ARITH_PREFIX: arith.dataset, "words:": word_problems.dataset}
# data.layout -> the field mapping of a public dataset's layout (data.fields entries win)
LAYOUTS: dict[str, dict[str, str]] = {
    # openai/gsm8k: question, and an answer that is the worked solution ending in '#### N'
    "gsm8k": {"prompt": "question", "answer": "answer", "response": "answer"},
    # hendrycks MATH (and its mirrors): problem, a solution with the answer boxed, 'Level 3'
    "math": {"prompt": "problem", "answer": "solution", "response": "solution", "difficulty": "level"},
}


def generated_prefix(source: str) -> str | None:
    return next((prefix for prefix in GENERATED if source.startswith(prefix)), None)


def field_mapping(data_cfg) -> dict[str, str]:
    """``data.layout``'s mapping (the config allows only ``LAYOUTS``' names) with ``data.fields`` on top."""
    return {**LAYOUTS.get(data_cfg.layout, {}), **dict(data_cfg.fields)}


def load(source: str, data_cfg, *, split: str, per_level: int) -> list[dict]:
    """Problem records of ``source`` (validated by ``records.load_problems``: its module doc)."""
    prefix = generated_prefix(source)
    if prefix:
        which = source[len(prefix):]
        if which not in arith.SPLITS:
            raise UserError(f"unknown generated source {source!r}: use "
                            + ", ".join(f"{prefix}{split}" for split in arith.SPLITS))
        records = GENERATED[prefix](which, per_level, seed=data_cfg.arith_seed)
        return [{k: v for k, v in r.items() if k != "response"} for r in records]
    return load_problems(source, fields=field_mapping(data_cfg), split=split, subset=data_cfg.subset)


def load_train(data_cfg) -> list[dict]:
    return load(data_cfg.train, data_cfg, split=data_cfg.split, per_level=data_cfg.arith_train_per_level)


def load_eval(data_cfg) -> list[dict]:
    if not data_cfg.eval:
        return []
    return load(data_cfg.eval, data_cfg, split=data_cfg.eval_split, per_level=data_cfg.arith_eval_per_level)


def load_retain(data_cfg) -> list[dict]:
    if not data_cfg.retain:
        return []
    return load(data_cfg.retain, data_cfg, split=data_cfg.eval_split, per_level=data_cfg.arith_retain_per_level)


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
    prefix = generated_prefix(source)
    if prefix:  # not a file: keyed by the generator's settings
        source = f"{prefix[:-1]}-train-{data_cfg.arith_train_per_level}-seed{data_cfg.arith_seed}"
    return responses_path(source, teacher, cache_dir, split=data_cfg.split)


def missing_responses(records: list[dict]) -> list[dict]:
    return [r for r in records if not r.get("response")]


def teacher_identity(path: str) -> str:
    """The teacher as its stored responses are keyed: its path plus a fingerprint of its
    weights, so a retrained teacher at the same path never reuses an old teacher's answers.
    Small models are hashed by content; large ones by weight file names, sizes and times."""
    root = Path(path)
    if not root.is_dir():
        return path  # a hub name: the name is the identity
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    digest = hashlib.sha256()
    by_content = sum(p.stat().st_size for p in weights) <= 256 * 2**20
    for p in weights:
        digest.update(p.name.encode())
        digest.update(p.read_bytes() if by_content else f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return f"{root.resolve()}@{digest.hexdigest()[:12]}"


def stored_header(path: Path) -> dict | None:
    """The header line of a stored responses file (None if absent or unreadable)."""
    try:
        with Path(path).open() as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def with_stored_responses(records: list[dict], data_cfg, teacher: str) -> tuple[list[dict], int] | None:
    """Records with the stored teacher responses attached, and how many were dropped
    as wrong; None when some responses are needed and none are stored for exactly these
    problems and this teacher (a stale file is then regenerated)."""
    needed = missing_responses(records)
    if not needed:
        return records, 0
    path = stored_responses_path(data_cfg, teacher)
    digest = problems_sha256(records)
    header = stored_header(path)
    if header is not None and (header.get("data_sha256") != digest or header.get("teacher") != teacher_key(teacher)):
        return None
    stored = load_responses(path, teacher=teacher, data_sha256=digest, needed=[r["id"] for r in needed])
    if stored is None:
        return None
    return attach_responses(records, stored, keep_incorrect=data_cfg.keep_incorrect)


def store_responses(records: list[dict], rows: list[dict], data_cfg, teacher: str) -> Path:
    path = stored_responses_path(data_cfg, teacher)
    return save_responses(path, rows, teacher=teacher, data_sha256=problems_sha256(records))
