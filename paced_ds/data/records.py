"""Problem records: load them from a file, a saved dataset or a ``datasets`` name, and
validate them.

A record is ``{"id": str, "prompt": str, "answer": str}`` with an optional ``"response"``
(a reference solution) and an optional ``"difficulty"`` (docs/real-models.md, "Data"). Data
that names its fields differently is read through a field mapping (``data.fields.<name>``).
A bad record stops the load with a one-line ``UserError`` naming the file, the line (jsonl)
or row, and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from paced_ds.errors import UserError
from paced_ds.runtime.files import read_jsonl

CANONICAL_FIELDS = ("id", "prompt", "answer", "response", "difficulty")
REQUIRED_FIELDS = ("prompt", "answer")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# What a ``datasets`` name looks like ("gsm8k", "openai/gsm8k"); anything else that does
# not exist locally is reported as a missing file rather than sent to the hub.
_DATASET_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_problems(source: str, *, fields: dict[str, str] | None = None, split: str = "train",
                  limit: int | None = None, subset: str = "") -> list[dict]:
    """Load and validate the problems in ``source``.

    ``source`` is a ``.jsonl`` file (one object per line; blank lines skipped), a ``.json``
    file (a list of objects), a ``.parquet`` file, a directory written by
    ``datasets.Dataset.save_to_disk`` (a saved ``DatasetDict`` gives its ``split``), or
    otherwise a ``datasets`` name, loaded with ``datasets.load_dataset(source, subset, split=split)``
    (no remote code; ``subset`` is the dataset's configuration, e.g. ``"main"`` for openai/gsm8k).

    ``fields`` maps a canonical name (``CANONICAL_FIELDS``) to the source's field name;
    unmapped names are read under their own name. ``prompt`` and ``answer`` are required.
    ``id`` is required only when ``fields`` maps it; otherwise a problem without one gets
    ``"<stem>-<index>"`` (stem of the file or dataset name, 0-based position in the source),
    which is stable as long as the source's order is. Numbers are accepted for ``id``,
    ``answer`` and ``difficulty`` and converted to ``str``; nulls in the optional fields
    count as absent.

    Locations in errors: ``file:line`` (1-based) for jsonl, ``file: row i`` (0-based) for
    everything else. Returns records holding only canonical keys, values ``str``; the first
    ``limit`` problems when ``limit`` is given.
    """
    fields = _check_fields(fields or {})
    if limit is not None and limit < 1:
        raise UserError(f"data limit must be >= 1, got {limit}")
    rows, stem = _open_source(source, split, subset)
    records: list[dict] = []
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        record = _to_record(row, where, fields, default_id=f"{stem}-{index}")
        if record["id"] in first_seen:
            raise UserError(f"{where}: duplicate id {record['id']!r} "
                            f"(first at {_short_location(first_seen[record['id']])})")
        first_seen[record["id"]] = where
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{source}: no problems")
    return records


def _check_fields(fields: dict[str, str]) -> dict[str, str]:
    for name, source_name in fields.items():
        if name not in CANONICAL_FIELDS:
            raise UserError(f"data.fields.{name}: unknown field; the fields are "
                            f"{', '.join(CANONICAL_FIELDS)}")
        if not isinstance(source_name, str) or not source_name:
            raise UserError(f"data.fields.{name}: must name a field of the data, got {source_name!r}")
    return dict(fields)


def _open_source(source: str, split: str, subset: str = "") -> tuple[Iterator[tuple[str, object]], str]:
    """The source's rows as ``(location, row)`` pairs, and the stem for generated ids."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _saved_dataset_rows(path, source, split), path.name
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _jsonl_rows(path, source), path.stem
        if suffix == ".json":
            return _json_rows(path, source), path.stem
        if suffix == ".parquet":
            return _parquet_rows(path, source), path.stem
        raise UserError(f"{source}: unsupported data file; use one of "
                        f"{', '.join(DATA_FILE_SUFFIXES)}, a save_to_disk directory or a datasets name")
    if path.suffix.lower() in DATA_FILE_SUFFIXES or not _DATASET_NAME.fullmatch(source):
        raise UserError(f"data file not found: {source}")
    return _hub_rows(source, split, subset), source.rsplit("/", 1)[-1]


def _jsonl_rows(path: Path, source: str):
    try:
        for line_number, row in read_jsonl(path, source, objects=False):  # a row's type is checked with its fields
            yield f"{source}:{line_number}", row
    except OSError as e:
        raise UserError(f"{source}: cannot be read ({e.strerror})") from None


def _json_rows(path: Path, source: str):
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise UserError(f"{source}: cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
    except ValueError as e:
        raise UserError(f"{source}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list of problem objects, got {_type_name(data)}")
    for index, row in enumerate(data):
        yield f"{source}: row {index}", row


def _parquet_rows(path: Path, source: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{source}: row {index}", row
                index += 1
    except pyarrow.ArrowException as e:
        raise UserError(f"{source}: not a readable parquet file ({_first_line(e)})") from None


def _saved_dataset_rows(path: Path, source: str, split: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise UserError(f"{source}: a directory, but not one written by datasets' save_to_disk "
                        f"({_first_line(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"{source}: no split {split!r} (it has {', '.join(dataset)})")
        dataset = dataset[split]
    for index, row in enumerate(dataset):
        yield f"{source}: row {index}", row


def _hub_rows(source: str, split: str, subset: str = ""):
    import datasets

    try:
        dataset = datasets.load_dataset(source, *([subset] if subset else []), split=split)
    except Exception as e:  # offline, unknown name, bad split: all things the user fixes
        raise UserError(f"{source}: not a local file, and datasets could not load it "
                        f"(split {split!r}): {type(e).__name__}: {_first_line(e)}") from e
    for index, row in enumerate(dataset):
        yield f"{source} [{split}]: row {index}", row


def _to_record(row: object, where: str, fields: dict[str, str], default_id: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: not an object (got {_type_name(row)})")
    record = {}
    for name in CANONICAL_FIELDS:
        source_name = fields.get(name, name)
        value = row.get(source_name)
        required = name in REQUIRED_FIELDS or (name == "id" and "id" in fields)
        if source_name not in row:
            if required:
                raise UserError(f"{where}: missing field {name!r} ({_mapping_hint(name, fields)}; "
                                f"the object has {', '.join(map(repr, row)) or 'no fields'})")
            continue
        if value is None and not required:
            continue
        record[name] = _field_value(name, value, where, source_name)
    record.setdefault("id", default_id)
    return record


def _field_value(name: str, value: object, where: str, source_name: str) -> str:
    label = repr(name) if source_name == name else f"{name!r} (from {source_name!r})"
    numbers_ok = name in ("id", "answer", "difficulty")
    if isinstance(value, str):
        if name in ("prompt", "answer", "id") and not value.strip():
            raise UserError(f"{where}: field {label} is empty")
        return value
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    wanted = "a string or a number" if numbers_ok else "a non-empty string" if name == "prompt" else "a string"
    raise UserError(f"{where}: field {label} must be {wanted}, got {_type_name(value)}")


def _mapping_hint(name: str, fields: dict[str, str]) -> str:
    if name in fields:
        return f"data.fields.{name} maps it to {fields[name]!r}"
    return f"set data.fields.{name} to the name your data uses"


def _short_location(where: str) -> str:
    """``"train.jsonl:4"`` -> ``"line 4"``; ``"x.parquet: row 4"`` -> ``"row 4"``."""
    head, _, tail = where.rpartition(":")
    tail = tail.strip()
    return f"line {tail}" if tail.isdigit() else tail


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean",
            str: "a string"}.get(type(value), type(value).__name__)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
