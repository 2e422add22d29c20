"""Generation under ZeRO-3: held-out evaluation, teacher reference responses, rollouts, and
the gathered plain copy of a sharded model that generation without collectives runs on.

Every rank generates for its own shard of the prompts. A ZeRO-3 forward all-gathers
parameters collectively, so all ranks must run the same number of forward passes: each
rank runs the same number of batches (a rank with a short shard repeats a prompt and
discards it) and Hugging Face ``generate`` runs with ``synced_gpus`` so that a rank whose
sequences finished keeps stepping until every rank is done.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from paced_ds import verify
from paced_ds.data.collate import collate_prompts, encode
from paced_ds.data.prompts import format_prompt
from paced_ds.runtime import dist
from paced_ds.runtime.log import say


def plain_copy(engine):
    """A full, non-partitioned copy of the engine's model on this rank, for generation.

    Collective under ZeRO-3. The copy is filled one gathered parameter at a time, so the
    peak is the copy plus one parameter, not the copy plus a gathered model.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM

    module = engine.module
    if not engine.zero_optimization_partition_weights():
        return module
    # Built with its usual initialisation, then overwritten: the initialisation draws from the
    # CPU random stream, and the rollouts seeded before a copy is made (estimates, on-policy
    # steps) sample from what follows; a meta-device build would change every such stream.
    copy = AutoModelForCausalLM.from_config(module.config, dtype=next(module.parameters()).dtype)
    params, buffers = dict(copy.named_parameters()), dict(copy.named_buffers())
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            params[name].data.copy_(param.data)
    for name, buffer in module.named_buffers():  # never partitioned (rotary frequencies, ...)
        buffers[name].copy_(buffer)
    copy.tie_weights()
    copy.config.use_cache = True
    return copy.to(dist.device()).eval()


class _PositionsReminder(logging.Filter):
    """transformers reminds, once per process, that a generation ran past the model's
    ``max_position_embeddings`` (the shipped tiny models: 64). Rotary models extrapolate, the
    verifier judges what comes out, and a line per rank and generation phase says nothing a
    user can act on: dropped here, at its source."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "friendly reminder" not in record.getMessage()


logging.getLogger("transformers.generation.stopping_criteria").addFilter(_PositionsReminder())

COPY_FIT_SHARE = 0.8  # a gathered copy may take this share of the memory free for it
_SAID_SHORT: set[int] = set()  # the model sizes already reported as not fitting


def free_bytes() -> int:
    """Memory this rank may still use: free memory on its GPU, or on the CPU its share of the
    node's available memory (MemAvailable over the local ranks)."""
    device = dist.device()
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return available_kib * 1024 // max(1, int(os.environ.get("LOCAL_SIZE", "1")))


def copy_fits(engine) -> bool:
    """Whether every rank can hold a full copy of the engine's model (within ``COPY_FIT_SHARE``
    of its free memory). Collective, and the same answer on every rank."""
    need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in engine.module.parameters())
    short = float(need > COPY_FIT_SHARE * free_bytes())
    fits = dist.all_reduce_sum(torch.tensor([short], dtype=torch.float64)).item() == 0
    if not fits and need not in _SAID_SHORT:
        _SAID_SHORT.add(need)
        say(f"rollout.gather: a full copy of the model ({need / 2**30:.1f} GiB) does not fit in "
            f"{COPY_FIT_SHARE:.0%} of every rank's free memory; generating from the ZeRO-3 shards")
    return fits


def generating_model(engine, gather: bool, keep_random_stream: bool = False):
    """What to generate from, and whether it generates synced: a plain copy when ``gather``
    (``rollout.gather``: no collective per layer and token) and the copy fits on every rank
    (:func:`copy_fits`), else the ZeRO-3 shards. Collective. ``keep_random_stream``: making
    the copy leaves the CPU random stream where it was (for greedy generation between steps,
    which must not move the rollouts that follow)."""
    if not gather or not copy_fits(engine):
        return engine.module, True
    if keep_random_stream:
        with torch.random.fork_rng(devices=[]):
            return plain_copy(engine), False
    return plain_copy(engine), False


@dataclass
class Completions:
    """This rank's share of the completions of a list of prompts, ``n`` per prompt: decoded
    texts keyed ``prompt index * n + sample``, the tokens they took (prompt + generated, per
    sample) and the generated ones alone. ``padded``: positions generation computed, padding
    included (Hugging Face; 0 for a server)."""

    texts: dict[int, str]
    tokens: int
    generated: int = 0
    padded: int = 0


class HFGenerator:
    """Hugging Face ``generate`` on ``module``: a plain copy (``synced=False``) or the ZeRO-3
    shards (``synced=True``, every rank stepping together). The K samples of a prompt are K
    rows of the batch; the rows are shared among the ranks by stride."""

    def __init__(self, module, tokenizer, synced: bool):
        self.module, self.tokenizer, self.synced = module, tokenizer, synced

    def complete(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int, batch_size: int,
                 greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 progress=None) -> Completions:
        expanded = [ids for ids in prompts for _ in range(n)]  # prompt i -> rows i * n .. i * n + n - 1
        outputs, padded = sharded_generate(self.module, self.tokenizer, expanded, batch_size=batch_size,
                                           synced=self.synced, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                           temperature=temperature, top_p=top_p, top_k=top_k, progress=progress)
        texts = {index: self.tokenizer.decode(ids, skip_special_tokens=True) for index, ids in outputs.items()}
        generated = sum(len(ids) for ids in outputs.values())
        tokens = sum(len(expanded[index]) for index in outputs) + generated
        return Completions(texts, tokens, generated, padded)


def prompt_texts(tokenizer, records: list[dict], data_cfg) -> list[str]:
    """Each record's prompt as the model sees it (chat template or data.prompt_template)."""
    return [format_prompt(tokenizer, record["prompt"], system=data_cfg.system_prompt or None,
                          template=data_cfg.prompt_template, use_chat_template=data_cfg.use_chat_template)
            for record in records]


def prompt_ids(tokenizer, records: list[dict], data_cfg) -> list[list[int]]:
    """Token ids of each record's formatted prompt (with BOS when the tokenizer adds one)."""
    return [encode(tokenizer, text, None, data_cfg.max_length, problem_id=record["id"])["input_ids"]
            for text, record in zip(prompt_texts(tokenizer, records, data_cfg), records)]


@torch.no_grad()
def generate(module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             synced: bool = True, progress=None) -> tuple[list[list[int]], int]:
    """Generated token ids (eos and padding stripped) for this rank's ``prompts``, and the
    positions computed (rows x (prompt width + generated width)), padding included.

    With ``synced`` (ZeRO-3), every rank must call this with the same ``len(prompts)``
    rounded up to batches: use :func:`sharded_generate`, which arranges that. ``top_k`` 0:
    no top-k truncation.
    """
    was_training = module.training
    module.eval()
    device = dist.device()
    results: list[list[int]] = []
    padded = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = collate_prompts(chunk, tokenizer.pad_token_id)
        out = module.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, synced_gpus=synced, use_cache=True)
        padded += out.numel()
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            results.append([t for t in row if t != tokenizer.pad_token_id])
        if progress is not None:
            progress.update(len(chunk))
    module.train(was_training)
    return results, padded


def sharded_generate(module, tokenizer, prompts: list[list[int]], *, batch_size: int, synced: bool = True,
                     **kwargs) -> tuple[dict[int, list[int]], int]:
    """Generate for this rank's strided shard; returns ``{global index: ids}`` for that shard
    and the positions computed (as :func:`generate`'s).

    ``synced`` (``module`` is ZeRO-3-partitioned): every rank runs the same number of
    batches of the same size so that the collective parameter gathers line up, whatever the
    shard sizes. A plain copy (:func:`plain_copy`) generates its shard alone: ``synced=False``.
    """
    world, rank = dist.world_size(), dist.rank()
    indices = list(range(rank, len(prompts), world))
    mine = [prompts[i] for i in indices]
    if not synced:
        outputs, padded = generate(module, tokenizer, mine, batch_size=batch_size, synced=False, **kwargs)
        return dict(zip(indices, outputs)), padded
    per_rank = math.ceil(len(prompts) / world) if prompts else 0
    batches = math.ceil(per_rank / batch_size) if per_rank else 0
    filler = prompts[0] if prompts else [tokenizer.bos_token_id or 0]
    rows = mine + [filler] * (batches * batch_size - len(mine)) if batches else []
    # Equal-size batches: short ranks pad with a repeated prompt, discarded below.
    outputs, padded = generate(module, tokenizer, rows, batch_size=batch_size,
                               synced=dist.world_size() > 1, **kwargs) if rows else ([], 0)
    return {index: ids for index, ids in zip(indices, outputs)}, padded


def evaluate(generator, tokenizer, records: list[dict], data_cfg, eval_cfg, progress=None) -> dict:
    """Greedy held-out accuracy, overall and per difficulty level, identical on every rank.
    Collective. ``generator``: an ``HFGenerator`` or a ``server.ServerGenerator``."""
    if not records:
        return {"accuracy": float("nan"), "by_difficulty": {}, "count": 0, "tokens": 0, "generated_tokens": 0}
    prompts = prompt_ids(tokenizer, records, data_cfg)
    completions = generator.complete(prompts, max_new_tokens=eval_cfg.max_new_tokens,
                                     batch_size=eval_cfg.batch_size, progress=progress)
    outputs = completions.texts
    levels = sorted({str(r.get("difficulty", "all")) for r in records})
    counts = torch.zeros(len(levels) + 1, 2, dtype=torch.float64)  # correct, total per level; then the tokens
    counts[-1] = torch.tensor([float(completions.tokens), float(completions.generated)], dtype=torch.float64)
    solved = []
    for index, text in outputs.items():
        record = records[index]
        level = levels.index(str(record.get("difficulty", "all")))
        correct = verify.is_correct(text, record["answer"])
        counts[level, 0] += float(correct)
        counts[level, 1] += 1
        if correct and eval_cfg.record_problems:
            solved.append(record["id"])
    counts = dist.all_reduce_sum(counts)
    tokens, counts = counts[-1], counts[:-1]
    by_level = {level: counts[i, 0].item() / max(counts[i, 1].item(), 1) for i, level in enumerate(levels)}
    total = counts.sum(0)
    # tokens: prompt and generated tokens of every rank (the compute the evaluation cost)
    result = {"accuracy": total[0].item() / max(total[1].item(), 1), "by_difficulty": by_level,
              "count": int(total[1].item()), "tokens": int(tokens[0].item()), "generated_tokens": int(tokens[1].item())}
    if eval_cfg.record_problems:  # which problems were solved (for forgetting), gathered from every rank
        result["solved"] = sorted(i for part in dist.all_gather_objects(solved) for i in part)
    return result


def teacher_responses(generator, tokenizer, records: list[dict], data_cfg, *, batch_size: int,
                      progress=None) -> list[dict]:
    """Greedy teacher responses for ``records``, verified; the full list on every rank.
    ``generator`` as for :func:`evaluate`."""
    prompts = prompt_ids(tokenizer, records, data_cfg)
    outputs = generator.complete(prompts, max_new_tokens=data_cfg.generate_max_new_tokens, batch_size=batch_size,
                                 progress=progress).texts
    mine = []
    for index, text in outputs.items():
        mine.append({"id": records[index]["id"], "response": text,
                     "correct": verify.is_correct(text, records[index]["answer"])})
    merged = {row["id"]: row for part in dist.all_gather_objects(mine) for row in part}
    return [merged[r["id"]] for r in records]


def accuracy_table(by_difficulty: dict) -> dict[str, float]:
    """Per-level accuracy with level names sorted naturally (L1, L2, ..., L10)."""
    def key(name: str):
        digits = "".join(ch for ch in name if ch.isdigit())
        return (name.rstrip("0123456789"), int(digits) if digits else 0, name)

    return {name: by_difficulty[name] for name in sorted(by_difficulty, key=key)}
