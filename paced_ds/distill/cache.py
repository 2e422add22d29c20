"""The offline teacher: top-k log-probabilities computed once, read memory-mapped by every run.

``paced-ds cache-teacher`` runs the teacher over the training problems' responses and
stores, for every response token, the teacher's top-k token ids and log-probabilities
and the probability mass left outside them (the tail), in safetensors shards (one per
rank) beside a manifest naming the teacher, tokenizer, k, problems and paced-ds version.
``teacher.backend=cache`` reads them back and refuses a cache whose manifest does not
match the run.

The divergences need a full teacher distribution; the cache's is rebuilt per token as
the top-k probabilities plus the tail mass spread evenly over the other V - k tokens.
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
from paced_ds.errors import UserError

MANIFEST = "manifest.json"


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
            "data": examples_digest(records, examples), "paced_ds": __version__}


def compress(teacher_logits: torch.Tensor, loss_mask: torch.Tensor, k: int, temperature: float = 1.0):
    """Top-k ids (int32), log-probs (float32) and tail mass of every masked-in position, in order."""
    rows = teacher_logits[loss_mask].float() / temperature
    log_probs = torch.log_softmax(rows, dim=-1)
    top_logp, top_ids = log_probs.topk(min(k, rows.shape[-1]), dim=-1)
    tail = (1.0 - top_logp.exp().sum(-1)).clamp(min=0.0)
    return top_ids.to(torch.int32), top_logp, tail


def expand(top_ids: torch.Tensor, top_logp: torch.Tensor, tail: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full log-probabilities [tokens, vocab]: the top-k as stored, the tail mass spread evenly."""
    rest = vocab - top_ids.shape[-1]
    fill = torch.log((tail / max(rest, 1)).clamp(min=1e-30)) if rest > 0 else torch.zeros_like(tail)
    full = fill[:, None].expand(-1, vocab).clone()
    full.scatter_(1, top_ids.long(), top_logp)
    return full


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
    """Memory-mapped reader: ``logprobs(problem_id)`` -> [response tokens, vocab] log-probs."""

    def __init__(self, directory: str | Path, expected: dict):
        from safetensors import safe_open

        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"config key teacher.cache: no teacher cache at {directory} (missing {MANIFEST}); "
                            "make one with `paced-ds cache-teacher`")
        manifest = json.loads(manifest_path.read_text())
        differing = [key for key in ("teacher", "tokenizer", "k", "vocab", "data") if manifest.get(key) != expected[key]]
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

    def logprobs(self, problem_id: str) -> torch.Tensor:
        tensors, start, stop = self.index[problem_id]
        return expand(tensors["top_ids"][start:stop], tensors["top_logp"][start:stop], tensors["tail"][start:stop],
                      self.vocab)

    def batch_logits(self, problem_ids: list[str], loss_mask: torch.Tensor) -> torch.Tensor:
        """Teacher log-probs laid out like the batch: [B, T, V], zeros off the response positions
        (log-probs are valid logits: softmax gives back the same distribution)."""
        out = torch.zeros(*loss_mask.shape, self.vocab)
        for row, problem_id in enumerate(problem_ids):
            out[row][loss_mask[row].cpu()] = self.logprobs(problem_id)
        return out.to(loss_mask.device)
