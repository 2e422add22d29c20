"""Competence from student rollouts: K sampled answers per problem, verified, counted.

Each rank rolls out its strided share of the ``problems x K`` prompts and records its
(correct, trials) counts; one all-reduce merges them so that every rank holds the same
competence table, from which every rank computes the same weights and sampler plan.

``rollout.gather=true`` rolls out from a full, plain copy of the student on each rank
(its ZeRO-3 partitions gathered once per generation phase): no collective per token, and
ranks may finish at different times. ``false`` generates from the shards, every forward
all-gathering each layer, with all ranks stepping together; use it when a full copy of
the student does not fit on one device.

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


def estimate(engine, tokenizer, records: list[dict], table: CompetenceTable, cfg, *, seed: int,
             progress=None) -> dict:
    """Replace ``table``'s counts with fresh ones from ``curriculum.rollouts`` samples per problem.

    Collective: every rank calls it with the same records. Returns timing (``seconds`` in
    all, of which this rank's ``generate_s`` and ``verify_s``) and counts.
    """
    cur, rollout = cfg.curriculum, cfg.rollout
    started = time.time()
    prompts = generation.prompt_ids(tokenizer, records, cfg.data)
    expanded = [ids for ids in prompts for _ in range(cur.rollouts)]  # problem i -> K copies
    torch.manual_seed(seed * 1_000_003 + dist.rank())
    sampling = dict(max_new_tokens=rollout.max_new_tokens, do_sample=True, temperature=rollout.temperature,
                    top_p=rollout.top_p)
    if rollout.gather and generation.copy_fits(engine):
        model = generation.plain_copy(engine)
        indices = list(range(dist.rank(), len(expanded), dist.world_size()))
        outputs = generation.generate(model, tokenizer, [expanded[i] for i in indices],
                                      batch_size=rollout.batch_size, synced=False, progress=progress, **sampling)
        outputs = dict(zip(indices, outputs))
        del model
    else:
        outputs = generation.sharded_generate(engine.module, tokenizer, expanded, batch_size=rollout.batch_size,
                                              progress=progress, **sampling)
    generate_s = time.time() - started
    local_tokens = sum(len(expanded[index]) + len(ids) for index, ids in outputs.items())
    problem_indices = [index // cur.rollouts for index in outputs]
    pairs = [(tokenizer.decode(ids, skip_special_tokens=True), records[problem]["answer"])
             for ids, problem in zip(outputs.values(), problem_indices)]
    # One checker process per CPU of this rank's share of the node (the ranks check at once).
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    workers = max(1, min(verify.MAX_WORKERS, (os.cpu_count() or 1) // ranks_here))
    verify_started = time.time()
    correct = [int(verdict) for verdict in verify.is_correct_many(pairs, workers=workers)]
    verify_s = time.time() - verify_started
    table.reset_()
    table.record(problem_indices, correct, [1] * len(correct))
    table.all_reduce_()
    forward_tokens = int(dist.all_reduce_sum(torch.tensor([float(local_tokens)], dtype=torch.float64)).item())
    return {"rollouts": len(expanded), "seconds": time.time() - started, "generate_s": generate_s,
            "verify_s": verify_s, "verify_workers": workers, "forward_tokens": forward_tokens,
            "pass_rate_mean": float(table.correct.sum() / table.trials.sum().clamp(min=1))}


def describe_time(result: dict) -> str:
    """An estimate's time for a message (this rank's parts): "9.1 s (generation 8.2 s, answer checks 0.4 s)"."""
    return (f"{result['seconds']:.1f} s (generation {result['generate_s']:.1f} s, "
            f"answer checks {result['verify_s']:.1f} s)")
