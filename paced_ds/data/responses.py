"""Teacher reference responses, generated once and stored beside the data.

The file is JSON lines: a header ``{"paced_ds_responses": 1, "teacher", "data_sha256",
"count"}``, then one ``{"id", "response", "correct"}`` per problem. The header ties the file
to one teacher and one set of problems, so a changed teacher or changed data is refused
rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from paced_ds.errors import UserError
from paced_ds.runtime.files import read_jsonl, write_jsonl_atomic

FORMAT_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def responses_path(source: str, teacher: str, cache_dir: str, *, split: str | None = None) -> Path:
    """Where the teacher's responses for ``source`` live.

    A local file ``dir/train.jsonl`` -> ``dir/train.teacher-<slug>.jsonl``; a local
    directory ``dir/data`` (save_to_disk) -> ``dir/data[.<split>].teacher-<slug>.jsonl``; a
    ``datasets`` name -> ``cache_dir/<name>[.<split>].teacher-<slug>.jsonl``. The slug is
    the teacher's last path component, made filesystem-safe, plus 8 hex digits of a hash of
    the whole teacher name, so two teachers never share a file. ``split`` (for sources that
    have splits) keeps the splits of one dataset apart.
    """
    key = teacher_key(teacher)
    name = _UNSAFE.sub("_", key.rsplit("/", 1)[-1]).strip("._")[:40] or "teacher"
    slug = f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    path = Path(source).expanduser()
    if path.is_file():
        return path.with_name(f"{path.stem}.teacher-{slug}.jsonl")
    split_part = f".{_UNSAFE.sub('_', split)}" if split else ""
    if path.is_dir():
        return path.resolve().with_name(f"{path.resolve().name}{split_part}.teacher-{slug}.jsonl")
    safe_source = _UNSAFE.sub("_", source.replace("/", "--"))
    return Path(cache_dir).expanduser() / f"{safe_source}{split_part}.teacher-{slug}.jsonl"


def teacher_key(teacher: str) -> str:
    """The teacher as recorded in a responses file: a local path made absolute, so that
    ``./teacher`` and ``/abs/teacher`` are one teacher; a hub name as given."""
    path = Path(teacher).expanduser()
    return str(path.resolve()) if path.exists() else teacher.rstrip("/")


def problems_sha256(records: list[dict]) -> str:
    """A hash of the problems' ids, prompts and answers that ignores their order."""
    lines = sorted(json.dumps([r["id"], r["prompt"], r["answer"]], ensure_ascii=False) for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def save_responses(path, rows: list[dict], *, teacher: str, data_sha256: str) -> Path:
    """Write ``rows`` (``id``, ``response``, ``correct``) under a header, atomically: a
    temporary file beside ``path`` replaces it only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"paced_ds_responses": FORMAT_VERSION, "teacher": teacher_key(teacher),
              "data_sha256": data_sha256, "count": len(rows)}
    lines = [{"id": str(row["id"]), "response": row["response"], "correct": bool(row["correct"])} for row in rows]
    return write_jsonl_atomic(path, [header, *lines])


def load_responses(path, *, teacher: str, data_sha256: str, needed: list[str] | None = None) -> dict[str, dict] | None:
    """``{id: {"id", "response", "correct"}}`` from ``path``, or None when there is no file.

    A file from another teacher or for other problems, a truncated file or a malformed line
    is a ``UserError`` naming the file, the line and the key; so is, given the ids of the
    problems that ``needed`` a response, a row for any other id or a needed id without a
    row. Delete the file (or run ``paced-ds generate`` again) to make new responses.
    """
    path = Path(path)
    if not path.is_file():
        return None
    redo = "delete it or run `paced-ds generate` again"
    lines = list(read_jsonl(path))
    if not lines:
        raise UserError(f"{path}: empty; {redo}")
    header = lines[0][1]
    if header.get("paced_ds_responses") != FORMAT_VERSION:
        raise UserError(f"{path}:1: not a paced-ds responses file (header key 'paced_ds_responses' "
                        f"is {header.get('paced_ds_responses')!r}, expected {FORMAT_VERSION})")
    expected = {"teacher": teacher_key(teacher), "data_sha256": data_sha256}
    for key, value in expected.items():
        if header.get(key) != value:
            raise UserError(f"{path}:1: header {key!r} is {header.get(key)!r}, this run has "
                            f"{value!r}; {redo}")
    responses: dict[str, dict] = {}
    wanted = set(needed or ())
    for number, row in lines[1:]:
        for key, kind in (("id", str), ("response", str), ("correct", bool)):
            if not isinstance(row.get(key), kind):
                raise UserError(f"{path}:{number}: field {key!r} must be a {kind.__name__}, "
                                f"got {row.get(key)!r}")
        if row["id"] in responses:
            raise UserError(f"{path}:{number}: duplicate id {row['id']!r}")
        if needed is not None and row["id"] not in wanted:
            raise UserError(f"{path}:{number}: id {row['id']!r} is not a problem of the data that needs a teacher "
                            f"response; {redo}")
        responses[row["id"]] = {"id": row["id"], "response": row["response"], "correct": row["correct"]}
    if header.get("count") != len(responses):
        raise UserError(f"{path}: header 'count' is {header.get('count')!r} but the file holds "
                        f"{len(responses)} responses; {redo}")
    absent = [problem_id for problem_id in needed or () if problem_id not in responses]
    if absent:
        raise UserError(f"{path}: no response for {len(absent)} of the {len(wanted)} problems that need one "
                        f"(e.g. {absent[0]!r}); {redo}")
    return responses


def attach_responses(records: list[dict], responses: dict[str, dict], *,
                     keep_incorrect: bool = False) -> tuple[list[dict], int]:
    """Give each record without a ``response`` the teacher's, and drop the problems whose
    teacher response was judged incorrect (unless ``keep_incorrect``).

    A record's own reference response is kept and its problem never dropped; a record
    with neither stays without a ``response`` (the caller decides what that means).
    Returns new record dicts (the inputs are not modified) and the number dropped.
    """
    attached, dropped = [], 0
    for record in records:
        teacher_row = responses.get(record["id"])
        if "response" in record or teacher_row is None:
            attached.append(dict(record))
            continue
        if not teacher_row["correct"] and not keep_incorrect:
            dropped += 1
            continue
        attached.append({**record, "response": teacher_row["response"]})
    return attached, dropped
