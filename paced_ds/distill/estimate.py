"""Competence from student rollouts: K sampled answers per problem, verified, counted.

The samples come from a generator (``models/generators.py``: Hugging Face on a gathered copy
or on the ZeRO-3 shards, or a vLLM server); each rank gets its share of the ``problems x K``
completions and records its (correct, trials) counts; one all-reduce merges them so that
every rank holds the same competence table, from which every rank computes the same weights
and sampler plan, whichever engine generated.

Each rank checks its own rollouts' answers with ``verify.is_correct_many``: math-verify in
worker processes, this node's CPUs shared among its ranks. The result reports, beside the
whole time, this rank's generation time and answer-checking time.
"""

from __future__ import annotations

import os
import time

import torch

from paced_ds import verify
from paced_ds.curriculum.competence import CompetenceTable
from paced_ds.models import generation
from paced_ds.runtime import dist


def estimate(generator, tokenizer, records: list[dict], table: CompetenceTable, cfg, *, seed: int,
             progress=None) -> dict:
    """Replace ``table``'s counts with fresh ones from ``curriculum.rollouts`` samples per problem.

    Collective: every rank calls it with the same records. Returns timing (``seconds`` in
    all, of which this rank's ``generate_s`` and ``verify_s``), counts, and the share of the
    positions Hugging Face generation computed that were padding (``padding_share``).
    """
    cur, rollout = cfg.curriculum, cfg.rollout
    started = time.time()
    prompts = generation.prompt_ids(tokenizer, records, cfg.data)
    torch.manual_seed(seed * 1_000_003 + dist.rank())
    completions = generator.complete(prompts, n=cur.rollouts, max_new_tokens=rollout.max_new_tokens,
                                     batch_size=rollout.batch_size, greedy=False, temperature=rollout.temperature,
                                     top_p=rollout.top_p, top_k=rollout.top_k, progress=progress)
    generate_s = time.time() - started
    problem_indices = [index // cur.rollouts for index in completions.texts]
    pairs = [(text, records[problem]["answer"]) for text, problem in zip(completions.texts.values(), problem_indices)]
    # One checker process per CPU of this rank's share of the node (the ranks check at once).
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    workers = max(1, min(verify.MAX_WORKERS, (os.cpu_count() or 1) // ranks_here))
    verify_started = time.time()
    correct = [int(verdict) for verdict in verify.is_correct_many(pairs, workers=workers)]
    verify_s = time.time() - verify_started
    table.reset_()
    table.record(problem_indices, correct, [1] * len(correct))
    table.all_reduce_()
    counts = dist.all_reduce_sum(torch.tensor([float(completions.tokens), float(completions.padded)],
                                              dtype=torch.float64))
    forward_tokens, padded = int(counts[0].item()), counts[1].item()
    return {"rollouts": len(prompts) * cur.rollouts, "seconds": time.time() - started, "generate_s": generate_s,
            "verify_s": verify_s, "verify_workers": workers, "forward_tokens": forward_tokens,
            "padding_share": 1.0 - forward_tokens / padded if padded else 0.0,
            "pass_rate_mean": float(table.correct.sum() / table.trials.sum().clamp(min=1))}


def describe_time(result: dict) -> str:
    """An estimate's time for a message (this rank's parts): "9.1 s (generation 8.2 s, answer
    checks 0.4 s)", and the padding share of Hugging Face generation's batches when there was any."""
    padding = f", {result['padding_share']:.0%} of the generated positions padding" if result.get("padding_share") \
        else ""
    return (f"{result['seconds']:.1f} s (generation {result['generate_s']:.1f} s, "
            f"answer checks {result['verify_s']:.1f} s{padding})")
