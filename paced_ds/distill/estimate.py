"""Competence from student rollouts: sampled answers per problem, verified, counted.

The samples come from a generator (``models/generators.py``: Hugging Face on a gathered copy
or on the ZeRO-3 shards, or a vLLM server); each rank gets its share of every ``complete``
call's completions and records its (correct, trials) counts; an all-reduce merges them so that
every rank holds the same competence table, from which every rank computes the same weights
and sampler plan, whichever engine generated.

Fixed K (``curriculum.rollouts_min`` = 0): one round, K = ``curriculum.rollouts`` rollouts for
every problem. Adaptive (``rollouts_min`` > 0): a first round of ``rollouts_min`` rollouts for
every problem, then rounds of ``rollouts_round`` more for the problems whose weight could still
move (``curriculum/stopping.py``), until none is left or they have K. The counts are merged
after every round, so every rank sees the same counts, takes the same decisions, and asks its
generator for the same still-active prompts; a rollout no problem needs is never generated.

Each rank checks its own rollouts' answers with ``verify.is_correct_many``: math-verify in
worker processes, this node's CPUs shared among its ranks. The result reports, beside the
whole time, this rank's generation time and answer-checking time.
"""

from __future__ import annotations

import os
import time

import torch

from paced_ds import verify
from paced_ds.curriculum import stopping
from paced_ds.curriculum.competence import CompetenceTable
from paced_ds.models import generation
from paced_ds.runtime import dist

# Round r of an estimate seeded s samples from seed s * 1_000_003 + r * ROUND_SEED_STRIDE + rank: round 0 is
# the fixed-K estimate's seed, and the stride, a prime above any world size, keeps every (round, rank) apart.
ROUND_SEED_STRIDE = 10_007


def estimate(generator, tokenizer, records: list[dict], table: CompetenceTable, cfg, *, seed: int,
             progress=None) -> dict:
    """Replace ``table``'s counts with fresh ones from student rollouts: K = ``curriculum.rollouts``
    per problem, or adaptively in rounds with ``curriculum.rollouts_min`` > 0 (module doc).

    Collective: every rank calls it with the same records. Returns, over all ranks, the
    ``rollouts`` generated in ``rounds`` rounds (``fixed_rollouts``: problems x K), the
    ``forward_tokens`` (prompt + generated, per rollout) and ``generated_tokens``, and the share of
    the positions Hugging Face generation computed that were padding (``padding_share``); the
    time: ``seconds`` in all, of which this rank's ``generate_s`` and ``verify_s``; and
    ``fixed_generated_tokens`` / ``fixed_seconds``, a projection of what fixed K would have
    cost (the measured values themselves for fixed K): the generated tokens per rollout of the
    first round, which rolls out every problem alike as fixed K does, and the seconds per rollout
    of all rounds (the first alone carries one-off costs, such as starting the answer checkers),
    times ``fixed_rollouts``. ``pass_rate_mean``: the mean of the problems' correct / trials.
    """
    cur, rollout = cfg.curriculum, cfg.rollout
    started = time.time()
    prompts = generation.prompt_ids(tokenizer, records, cfg.data)
    # One checker process per CPU of this rank's share of the node (the ranks check at once).
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    workers = max(1, min(verify.MAX_WORKERS, (os.cpu_count() or 1) // ranks_here))
    table.reset_()
    active = list(range(len(prompts)))  # the problems still sampling, each with `trials` rollouts after this round
    first_n = n = trials = cur.rollouts_min or cur.rollouts
    prior, rounds = None, 0
    rounds_s, generate_s, verify_s = 0.0, 0.0, 0.0
    tokens = torch.zeros(4, dtype=torch.float64)  # this rank's forward, generated, padded, first round's generated
    while active:
        round_started = time.time()
        torch.manual_seed(seed * 1_000_003 + rounds * ROUND_SEED_STRIDE + dist.rank())
        completions = generator.complete([prompts[i] for i in active], n=n, max_new_tokens=rollout.max_new_tokens,
                                         batch_size=rollout.batch_size, greedy=rollout.temperature == 0,
                                         temperature=rollout.temperature,
                                         top_p=rollout.top_p, top_k=rollout.top_k, progress=progress)
        generate_s += time.time() - round_started
        problem_indices = [active[index // n] for index in completions.texts]
        pairs = [(text, records[problem]["answer"])
                 for text, problem in zip(completions.texts.values(), problem_indices)]
        verify_started = time.time()
        correct = [int(verdict) for verdict in verify.is_correct_many(pairs, workers=workers)]
        verify_s += time.time() - verify_started
        table.record(problem_indices, correct, [1] * len(correct))
        table.all_reduce_()
        tokens += torch.tensor([completions.tokens, completions.generated, completions.padded,
                                completions.generated if rounds == 0 else 0], dtype=torch.float64)
        rounds += 1
        rounds_s += time.time() - round_started
        if trials >= cur.rollouts:
            break
        if prior is None:  # the first round's counts: every problem, rollouts_min trials each
            prior = stopping.fit_priors(table.correct, table.trials,
                                        [str(record.get("difficulty", "all")) for record in records])
        index = torch.tensor(active)
        done = stopping.settled(table.correct[index], table.trials[index], cur.rollouts,
                                (prior[0][index], prior[1][index]), cur.alpha, cur.beta, cur.rollouts_tol)
        active = [problem for problem, stop in zip(active, done.tolist()) if not stop]
        n = min(cur.rollouts_round, cur.rollouts - trials)
        trials += n
    forward_tokens, generated_tokens, padded, first_generated = (value.item() for value in dist.all_reduce_sum(tokens))
    seconds = time.time() - started
    rollouts, fixed_rollouts = int(table.trials.sum().item()), len(prompts) * cur.rollouts
    rates = table.pass_rates()
    return {"rollouts": rollouts, "rounds": rounds, "rollouts_max": cur.rollouts,
            "fixed_rollouts": fixed_rollouts, "seconds": seconds, "generate_s": generate_s, "verify_s": verify_s,
            "verify_workers": workers, "forward_tokens": int(forward_tokens), "generated_tokens": int(generated_tokens),
            "padding_share": 1.0 - forward_tokens / padded if padded else 0.0,
            "fixed_generated_tokens": round(first_generated * cur.rollouts / first_n),
            "fixed_seconds": seconds - rounds_s + (rounds_s * fixed_rollouts / rollouts if rollouts else 0.0),
            "pass_rate_mean": float(rates.nanmean()) if len(rates) else 0.0}


def describe(result: dict) -> str:
    """An estimate in one line: "6120 rollouts in 4 rounds (43% of fixed K=8's 14368), 412k generated
    tokens, 4.1 s (generation 3.2 s, answer checks 0.4 s); fixed K=8 ~ 9.6 s, 960k tokens", or, for
    fixed K, "14368 rollouts (K=8), 960k generated tokens, 9.6 s (...)". The fixed-K cost of an
    adaptive estimate is a projection (``estimate``)."""
    k, tokens = result["rollouts_max"], _thousands(result["generated_tokens"])
    if result["rounds"] <= 1:
        return f"{result['rollouts']} rollouts (K={k}), {tokens} generated tokens, {describe_time(result)}"
    share = result["rollouts"] / result["fixed_rollouts"]
    return (f"{result['rollouts']} rollouts in {result['rounds']} rounds ({share:.0%} of fixed K={k}'s "
            f"{result['fixed_rollouts']}), {tokens} generated tokens, {describe_time(result)}; fixed K={k} ~ "
            f"{result['fixed_seconds']:.1f} s, {_thousands(result['fixed_generated_tokens'])} tokens")


def describe_time(result: dict) -> str:
    """An estimate's time for a message (this rank's parts): "9.1 s (generation 8.2 s, answer
    checks 0.4 s)", and the padding share of Hugging Face generation's batches when there was any."""
    padding = f", {result['padding_share']:.0%} of the generated positions padding" if result.get("padding_share") \
        else ""
    return (f"{result['seconds']:.1f} s (generation {result['generate_s']:.1f} s, "
            f"answer checks {result['verify_s']:.1f} s{padding})")


def _thousands(count: int) -> str:
    """412 -> "412", 412_345 -> "412k", 12_345_678 -> "12.3M"."""
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.0f}k" if count >= 1e4 else str(count)
