"""The offline teacher: top-k log-probabilities computed once, read memory-mapped by every run.

``paced-ds cache-teacher`` runs the teacher over the training problems' responses and
stores, for every response token, the teacher's top-k token ids and log-probabilities
and the probability mass left outside them (the tail), in safetensors shards (one per
rank) beside a manifest naming the teacher, tokenizer, k, problems and paced-ds version.
``teacher.backend=cache`` reads them back and refuses a cache whose manifest does not
match the run.

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
from pathlib import Path

import torch

from paced_ds import __version__
from paced_ds.distill.answers import TopKAnswer
from paced_ds.errors import UserError

MANIFEST = "manifest.json"
STORED_TEMPERATURE = 1.0  # the temperature of the stored log-probabilities
CHECKED_KEYS = ("teacher", "tokenizer", "k", "vocab", "data", "temperature")


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
            "data": examples_digest(records, examples), "temperature": STORED_TEMPERATURE, "paced_ds": __version__}


def write_shard(directory: Path, rank: int, ids: list[str], top_ids, top_logp, tail, offsets) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"shard-{rank:05d}.safetensors"
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


class TeacherCache:
    """Memory-mapped reader: ``answer(problem_ids)`` -> the problems' ``TopKAnswer``."""

    def __init__(self, directory: str | Path, expected: dict):
        from safetensors import safe_open

        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"config key teacher.cache: no teacher cache at {directory} (missing {MANIFEST}); "
                            "make one with `paced-ds cache-teacher`")
        manifest = json.loads(manifest_path.read_text())
        if "temperature" not in manifest:
            raise UserError(f"{manifest_path}: this cache was made by paced-ds 0.1, which stored log-probabilities "
                            "at loss.temperature (training then tempered them twice); run `paced-ds cache-teacher` "
                            "again")
        differing = [key for key in CHECKED_KEYS if manifest.get(key) != expected[key]]
        if differing:
            details = ", ".join(f"{key}: {manifest.get(key)!r} there, {expected[key]!r} here" for key in differing)
            raise UserError(f"{manifest_path}: this cache was made for another run ({details}); "
                            "run `paced-ds cache-teacher` again")
        self.vocab = manifest["vocab"]
        self.index: dict[str, tuple] = {}
        for shard in range(manifest["shards"]):
            handle = safe_open(str(self.directory / f"shard-{shard:05d}.safetensors"), framework="pt")
            ids = json.loads(handle.metadata()["ids"])
            tensors = {name: handle.get_tensor(name) for name in ("top_ids", "top_logp", "tail", "offsets")}
            for i, problem_id in enumerate(ids):
                start, stop = int(tensors["offsets"][i]), int(tensors["offsets"][i + 1])
                self.index[problem_id] = (tensors, start, stop)

    def answer(self, problem_ids: list[str]) -> TopKAnswer:
        """The stored top-k of each problem's response tokens, in order (no copy of the rest)."""
        parts = []
        for problem_id in problem_ids:
            tensors, start, stop = self.index[problem_id]
            parts.append(TopKAnswer(tensors["top_ids"][start:stop], tensors["top_logp"][start:stop],
                                    tensors["tail"][start:stop], torch.tensor([stop - start]), self.vocab))
        return TopKAnswer.concat(parts)
