"""The offline teacher: top-k log-probabilities computed once, read memory-mapped by every run.

``paced-ds cache-teacher`` runs the teacher over the training problems' responses and
stores, for every response token, the teacher's top-k token ids and log-probabilities
and the probability mass left outside them (the tail), in safetensors shards (one per
rank) beside a manifest naming the teacher, tokenizer, k, problems and paced-ds version.
``teacher.backend=cache`` reads them back and refuses a cache whose manifest does not
match the run, or whose manifest or shards are malformed, missing or truncated
(``check_cache``: headers and sizes, which the launcher checks before any rank starts).

The stored distributions are at temperature 1 (the manifest says so, and a cache that
does not is refused): the loss applies ``loss.temperature`` once, as it does to a live
teacher. The cache answers ``TopKAnswer``s, which the divergences read sparse: the
top-k probabilities as stored, the tail mass spread evenly over the other V - k tokens.
Forward KL then differs from the exact one only through the tail's shape, by at most
tail * log((V - k) * max tail token probability / tail); with ``teacher.topk=0`` the
whole distribution is stored (k = V) and nothing is approximated.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from paced_ds import __version__
from paced_ds.distill.answers import TopKAnswer
from paced_ds.errors import UserError

MANIFEST = "manifest.json"
STORED_TEMPERATURE = 1.0  # the temperature of the stored log-probabilities
CHECKED_KEYS = ("teacher", "tokenizer", "k", "vocab", "data", "temperature")
SHARD_TENSORS = {"top_ids": "I32", "top_logp": "F32", "tail": "F32", "offsets": "I64"}  # as write_shard stores them
_DTYPE_BYTES = {"I32": 4, "F32": 4, "I64": 8}
REDO = "run `paced-ds cache-teacher` again"


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def examples_digest(records: list[dict], examples: list[dict]) -> str:
    """The problems and the exact token sequences the cache scores."""
    digest = hashlib.sha256()
    for record, example in zip(records, examples):
        digest.update(json.dumps([record["id"], example["input_ids"], example["response_start"]]).encode())
    return digest.hexdigest()[:16]


def expected_manifest(*, teacher: str, tokenizer, topk: int, vocab: int, records, examples) -> dict:
    return {"teacher": teacher, "tokenizer": tokenizer_digest(tokenizer), "k": topk or vocab, "vocab": vocab,
            "data": examples_digest(records, examples), "temperature": STORED_TEMPERATURE, "paced_ds": __version__,
            "problems": len(records)}


def shard_path(directory: Path, rank: int) -> Path:
    return directory / f"shard-{rank:05d}.safetensors"


def write_shard(directory: Path, rank: int, ids: list[str], top_ids, top_logp, tail, offsets) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = shard_path(directory, rank)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"top_ids": top_ids.contiguous(), "top_logp": top_logp.contiguous(), "tail": tail.contiguous(),
               "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp),
              metadata={"ids": json.dumps(ids)})
    tmp.replace(path)
    return path


def write_manifest(directory: Path, manifest: dict, shards: int) -> Path:
    path = directory / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({**manifest, "shards": shards}, indent=1))
    tmp.replace(path)
    return path


def check_cache(directory: str | Path) -> dict:
    """The manifest of the cache in ``directory``, after checking it and every shard's header
    against it (keys and types; each shard present, whole, with the tensors, shapes and dtypes
    ``write_shard`` stores); a ``UserError`` naming the file otherwise. Cheap: headers and
    offsets are read, not the log-probabilities, so the launcher runs it before any rank starts."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"config key teacher.cache: no teacher cache at {directory} (missing {MANIFEST}); "
                        "make one with `paced-ds cache-teacher`")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except OSError as err:
        raise UserError(f"{manifest_path}: cannot be read ({err.strerror})") from None
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"{manifest_path}: not valid JSON ({str(err).splitlines()[0]}), truncated or not a "
                        f"teacher cache manifest; {REDO}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path}: not a JSON object; {REDO}")
    if "temperature" not in manifest:
        raise UserError(f"{manifest_path}: this cache was made by paced-ds 0.1, which stored log-probabilities "
                        f"at loss.temperature (training then tempered them twice); {REDO}")
    for key, kind, wanted in (("teacher", str, "a string"), ("tokenizer", str, "a string"), ("data", str, "a string"),
                              ("k", int, "a positive integer"), ("vocab", int, "a positive integer"),
                              ("shards", int, "a positive integer"), ("temperature", (int, float), "a number")):
        value = manifest.get(key)
        if key not in manifest or isinstance(value, bool) or not isinstance(value, kind) or \
                (kind is int and value < 1):
            got = "missing" if key not in manifest else f"got {value!r}"
            raise UserError(f"{manifest_path}: key {key!r} must be {wanted} ({got}); {REDO}")
    if manifest["k"] > manifest["vocab"]:
        raise UserError(f"{manifest_path}: key 'k' ({manifest['k']}) is more than key 'vocab' "
                        f"({manifest['vocab']}); {REDO}")
    owner: dict[str, Path] = {}
    for shard in range(manifest["shards"]):
        path = shard_path(directory, shard)
        for problem_id in check_shard(path, k=manifest["k"], shards=manifest["shards"]):
            if problem_id in owner:
                raise UserError(f"{path}: problem {problem_id!r} is in {owner[problem_id].name} too; {REDO}")
            owner[problem_id] = path
    if manifest.get("problems", len(owner)) != len(owner):  # older caches do not say
        raise UserError(f"{manifest_path}: key 'problems' is {manifest['problems']!r} but its {manifest['shards']} "
                        f"shards hold {len(owner)}; {REDO}")
    return manifest


def check_shard(path: Path, *, k: int, shards: int) -> list[str]:
    """The problem ids of one shard, after checking its safetensors header and offsets."""
    if not path.is_file():
        raise UserError(f"{path}: missing (the manifest lists {shards} shards); {REDO}")
    size = path.stat().st_size
    with path.open("rb") as f:
        start = f.read(8)
        header_bytes = int.from_bytes(start, "little") if len(start) == 8 else size
        if 8 + header_bytes > size:
            raise UserError(f"{path}: truncated ({size} bytes, its header cut short); {REDO}")
        try:
            header = json.loads(f.read(header_bytes))
            ids = json.loads(header["__metadata__"]["ids"])
            tokens = header["tail"]["shape"][0]
        except (ValueError, KeyError, TypeError, IndexError):
            raise UserError(f"{path}: not a teacher cache shard (its safetensors header lacks the problem ids or "
                            f"the tail); {REDO}") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise UserError(f"{path}: its problem ids are not a list of strings; {REDO}")
        shapes = {"top_ids": [tokens, k], "top_logp": [tokens, k], "tail": [tokens], "offsets": [len(ids) + 1]}
        data_bytes = 0
        for name, dtype in SHARD_TENSORS.items():
            entry = header.get(name)
            found = f"{entry.get('dtype')} {entry.get('shape')}" if isinstance(entry, dict) else "none"
            if found != f"{dtype} {shapes[name]}":
                raise UserError(f"{path}: tensor {name!r} should be {dtype} {shapes[name]} (k={k} in {MANIFEST}, "
                                f"{len(ids)} problems), found {found}; {REDO}")
            begin, end = entry.get("data_offsets", (0, 0))
            if end - begin != math.prod(shapes[name]) * _DTYPE_BYTES[dtype]:
                raise UserError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shapes[name]}; {REDO}")
            data_bytes = max(data_bytes, end)
        if size < 8 + header_bytes + data_bytes:
            raise UserError(f"{path}: truncated ({size} bytes of {8 + header_bytes + data_bytes}); {REDO}")
        f.seek(8 + header_bytes + header["offsets"]["data_offsets"][0])  # len(ids) + 1 int64s: read them
        offsets = torch.frombuffer(bytearray(f.read(8 * (len(ids) + 1))), dtype=torch.int64).tolist()
    if offsets[0] != 0 or offsets[-1] != tokens or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise UserError(f"{path}: its offsets (from {offsets[0]} to {offsets[-1]}) do not split its {tokens} "
                        f"token rows among its {len(ids)} problems; {REDO}")
    return ids


class TeacherCache:
    """Memory-mapped reader: ``answer(problem_ids)`` -> the problems' ``TopKAnswer``."""

    def __init__(self, directory: str | Path, expected: dict):
        from safetensors import safe_open

        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        manifest = check_cache(self.directory)
        differing = [key for key in CHECKED_KEYS if manifest.get(key) != expected[key]]
        if differing:
            details = ", ".join(f"{key}: {manifest.get(key)!r} there, {expected[key]!r} here" for key in differing)
            raise UserError(f"{manifest_path}: this cache was made for another run ({details}); {REDO}")
        self.vocab = manifest["vocab"]
        self.index: dict[str, tuple] = {}
        for shard in range(manifest["shards"]):
            handle = safe_open(str(shard_path(self.directory, shard)), framework="pt")
            ids = json.loads(handle.metadata()["ids"])
            tensors = {name: handle.get_tensor(name) for name in SHARD_TENSORS}
            for i, problem_id in enumerate(ids):
                start, stop = int(tensors["offsets"][i]), int(tensors["offsets"][i + 1])
                self.index[problem_id] = (tensors, start, stop)
        if expected.get("problems", len(self.index)) != len(self.index):
            raise UserError(f"{self.directory}: its shards hold {len(self.index)} problems, this run has "
                            f"{expected['problems']}; {REDO}")

    def answer(self, problem_ids: list[str]) -> TopKAnswer:
        """The stored top-k of each problem's response tokens, in order (no copy of the rest)."""
        parts = []
        for problem_id in problem_ids:
            tensors, start, stop = self.index[problem_id]
            parts.append(TopKAnswer(tensors["top_ids"][start:stop], tensors["top_logp"][start:stop],
                                    tensors["tail"][start:stop], torch.tensor([stop - start]), self.vocab))
        return TopKAnswer.concat(parts)
