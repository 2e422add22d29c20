"""Competence from student rollouts: K sampled answers per problem, verified, counted.

Each rank rolls out its strided share of the ``problems x K`` prompts and records its
(correct, trials) counts; one all-reduce merges them so that every rank holds the same
competence table, from which every rank computes the same weights and sampler plan.

``rollout.gather=true`` rolls out from a full, plain copy of the student on each rank
(its ZeRO-3 partitions gathered once per generation phase): no collective per token, and
ranks may finish at different times. ``false`` generates from the shards, every forward
all-gathering each layer, with all ranks stepping together; use it when a full copy of
the student does not fit on one device.
"""

from __future__ import annotations

import time

import torch

from paced_ds import verify
from paced_ds.curriculum.competence import CompetenceTable
from paced_ds.models import generation
from paced_ds.runtime import dist


def estimate(engine, tokenizer, records: list[dict], table: CompetenceTable, cfg, *, seed: int,
             progress=None) -> dict:
    """Replace ``table``'s counts with fresh ones from ``curriculum.rollouts`` samples per problem.

    Collective: every rank calls it with the same records. Returns timing and counts.
    """
    cur, rollout = cfg.curriculum, cfg.rollout
    started = time.time()
    prompts = generation.prompt_ids(tokenizer, records, cfg.data)
    expanded = [ids for ids in prompts for _ in range(cur.rollouts)]  # problem i -> K copies
    torch.manual_seed(seed * 1_000_003 + dist.rank())
    sampling = dict(max_new_tokens=rollout.max_new_tokens, do_sample=True, temperature=rollout.temperature,
                    top_p=rollout.top_p)
    if rollout.gather:
        model = generation.plain_copy(engine)
        indices = list(range(dist.rank(), len(expanded), dist.world_size()))
        outputs = generation.generate(model, tokenizer, [expanded[i] for i in indices],
                                      batch_size=rollout.batch_size, synced=False, progress=progress, **sampling)
        outputs = dict(zip(indices, outputs))
        del model
    else:
        outputs = generation.sharded_generate(engine.module, tokenizer, expanded, batch_size=rollout.batch_size,
                                              progress=progress, **sampling)
    problem_indices, correct = [], []
    local_tokens = sum(len(expanded[index]) + len(ids) for index, ids in outputs.items())
    for index, ids in outputs.items():
        problem = index // cur.rollouts
        text = tokenizer.decode(ids, skip_special_tokens=True)
        problem_indices.append(problem)
        correct.append(int(verify.is_correct(text, records[problem]["answer"])))
    table.reset_()
    table.record(problem_indices, correct, [1] * len(correct))
    table.all_reduce_()
    forward_tokens = int(dist.all_reduce_sum(torch.tensor([float(local_tokens)], dtype=torch.float64)).item())
    return {"rollouts": len(expanded), "seconds": time.time() - started, "forward_tokens": forward_tokens,
            "pass_rate_mean": float(table.correct.sum() / table.trials.sum().clamp(min=1))}
