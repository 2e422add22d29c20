"""The adaptive competence estimate in one process (paced_ds.distill.estimate with
curriculum.rollouts_min > 0) and its stopping rule (paced_ds.curriculum.stopping): a stand-in
generator whose rollouts follow a known pattern per problem, so that every round's prompts,
counts and decisions can be checked exactly."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from paced_ds import verify
from paced_ds.config import load_config
from paced_ds.curriculum import stopping
from paced_ds.curriculum.competence import CompetenceTable
from paced_ds.distill import estimate
from paced_ds.errors import UserError
from paced_ds.models import generation, server

RECIPE = Path(__file__).resolve().parent.parent / "ds_configs" / "recipes" / "tiny_arith.yaml"
SEED = 5


class PatternRollouts:
    """Stands in for a generator: the t-th rollout ever made of problem i is right when
    ``patterns[i][t % len(patterns[i])]`` is "1" (so "0" never, "1" always, "10" half the time).
    Each call is recorded: its problems, n, the torch seed it ran under, and what it rolled out."""

    def __init__(self, patterns: list[str]):
        self.patterns = patterns
        self.made = [0] * len(patterns)
        self.calls: list[dict] = []

    def complete(self, prompts, *, n, **sampling):
        assert not sampling["greedy"]
        problems = [prompt[0] for prompt in prompts]
        outcomes = {}
        for problem in problems:
            outcomes[problem] = [self.patterns[problem][(self.made[problem] + k) % len(self.patterns[problem])] == "1"
                                 for k in range(n)]
            self.made[problem] += n
        self.calls.append({"problems": problems, "n": n, "seed": torch.initial_seed(), "outcomes": outcomes})
        # A right rollout answers its own problem's answer, so a text mapped to the wrong problem counts wrong.
        texts = {j * n + k: f"{problem}" if right else "wrong"
                 for j, problem in enumerate(problems) for k, right in enumerate(outcomes[problem])}
        return generation.Completions(texts, tokens=len(texts) * 5, generated=len(texts) * 3, padded=len(texts) * 6)


class PatternServer:
    """Stands in for ``server.Client``: the same patterns' rollouts as token ids ([i]: problem i's
    answer, [-1]: a wrong one), for a ``server.ServerGenerator`` to shard and decode."""

    def __init__(self, patterns: list[str]):
        self.rollouts = PatternRollouts(patterns)

    def complete(self, prompts, *, n, max_new_tokens, greedy, temperature, top_p, top_k, stop_id, per_request,
                 progress):
        texts = self.rollouts.complete(prompts, n=n, greedy=greedy).texts
        return [[[-1] if texts[j * n + k] == "wrong" else [int(texts[j * n + k])] for k in range(n)]
                for j in range(len(prompts))]


class DigitTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens):
        return "wrong" if ids == [-1] else str(ids[0])


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    """Prompt i is [i]; an answer is right when it is the record's answer (no checker processes)."""
    monkeypatch.setattr(generation, "prompt_ids", lambda tokenizer, records, data: [[i] for i in range(len(records))])
    monkeypatch.setattr(verify, "is_correct_many",
                        lambda pairs, workers=None: [text == answer for text, answer in pairs])


def run(patterns: list[str], *overrides: str, levels: list[str] | None = None):
    """An estimate over ``patterns`` (K = 8 unless overridden; problem i of difficulty ``levels[i]``
    if given): the result, the table, the stand-in."""
    records = [{"id": f"p{i}", "answer": str(i)} for i in range(len(patterns))]
    for record, level in zip(records, levels or []):
        record["difficulty"] = level
    cfg = load_config(RECIPE, ["curriculum.rollouts=8", *overrides])
    table = CompetenceTable([r["id"] for r in records])
    rollouts = PatternRollouts(patterns)
    result = estimate.estimate(rollouts, None, records, table, cfg, seed=SEED)
    return result, table, rollouts, cfg


# Mostly unanimous problems, as on a task the student either solves or does not: 20 never right,
# 20 always, one right half the time ("10") and one a quarter ("1000"; both start 1/2). The first round fits a
# U-shaped prior, Beta(1/19, 1/19), under which a problem seen 0/2 or 2/2 stays near 0 or 1 (its
# weight's rms change to K = 8: 0.188 of the peak), while one seen 1/2 could go anywhere (0.326).
MOSTLY_UNANIMOUS = ["0"] * 20 + ["1"] * 20 + ["10", "1000"]


def test_fixed_k_is_one_round_of_k_rollouts_of_every_problem_as_before():
    result, table, rollouts, _ = run(["0", "1", "10", "110"])
    assert [(call["problems"], call["n"]) for call in rollouts.calls] == [([0, 1, 2, 3], 8)]
    assert rollouts.calls[0]["seed"] == SEED * 1_000_003  # rank 0, round 0: the seed fixed K always had
    assert table.trials.tolist() == [8] * 4 and table.correct.tolist() == [0, 8, 4, 6]
    assert result["rollouts"] == result["fixed_rollouts"] == 32 and result["rounds"] == 1
    assert result["generated_tokens"] == result["fixed_generated_tokens"] == 32 * 3
    assert result["forward_tokens"] == 32 * 5 and result["fixed_seconds"] == pytest.approx(result["seconds"])


def test_later_rounds_roll_out_only_the_problems_the_rule_keeps():
    result, table, rollouts, cfg = run(MOSTLY_UNANIMOUS + ["1100", "110", "1000"], "curriculum.rollouts_min=2",
                                       "curriculum.rollouts_round=2", "curriculum.rollouts_tol=0.16")
    cur = cfg.curriculum
    problems = len(MOSTLY_UNANIMOUS) + 3
    assert rollouts.calls[0]["problems"] == list(range(problems)) and rollouts.calls[0]["n"] == 2
    # Replay: the counts after each round, and the rule on them, give the next round's problems.
    correct, trials = torch.zeros(problems, dtype=torch.float64), torch.zeros(problems, dtype=torch.float64)
    prior = None
    for call, following in zip(rollouts.calls, rollouts.calls[1:] + [None]):
        for problem, outcomes in call["outcomes"].items():
            correct[problem] += sum(outcomes)
            trials[problem] += len(outcomes)
        prior = prior or stopping.fit_prior(correct, trials)
        done = stopping.settled(correct[call["problems"]], trials[call["problems"]], 8, prior, cur.alpha, cur.beta,
                                cur.rollouts_tol)
        kept = [p for p, stop in zip(call["problems"], done.tolist()) if not stop]
        if following is None:
            assert kept == []
        else:
            assert following["problems"] == kept and following["n"] == min(2, 8 - int(trials[kept[0]]))
    assert len(rollouts.calls) == result["rounds"] >= 3
    assert len({call["seed"] for call in rollouts.calls}) == len(rollouts.calls)  # a seed per round
    assert rollouts.calls[0]["seed"] == SEED * 1_000_003


def test_unanimous_problems_stop_first_and_split_ones_once_their_weight_has_settled():
    result, table, rollouts, _ = run(MOSTLY_UNANIMOUS, "curriculum.rollouts_min=2", "curriculum.rollouts_round=2",
                                     "curriculum.rollouts_tol=0.19")
    # "10" is at 2/4 after round 2: w = 0.25 at the kernel's flat peak, rms 0.139 of it: it stops.
    # "1000" is at 1/4 there, on the kernel's steep flank (rms 0.231): it goes on, and stops at 2/6 (0.109).
    assert [(call["problems"], call["n"]) for call in rollouts.calls] == [(list(range(42)), 2), ([40, 41], 2),
                                                                          ([41], 2)]
    assert table.trials.tolist() == [2] * 40 + [4, 6]
    assert table.correct.tolist() == [0] * 20 + [2] * 20 + [2, 2]
    assert result["rollouts"] == 40 * 2 + 4 + 6 and result["fixed_rollouts"] == 42 * 8 and result["rounds"] == 3


def test_the_default_tolerance_and_a_tighter_one():
    # The prior fitted here is piled up at 0 and 1 (Beta(0.053, 0.053)). At the default, 0.4 of the peak, the
    # first round settles every problem: 0/2 and 2/2 would move by 0.19 of it (rms), 1/2 by 0.33.
    _, table, rollouts, cfg = run(MOSTLY_UNANIMOUS, "curriculum.rollouts_min=2")
    assert cfg.curriculum.rollouts_tol == 0.4 and cfg.curriculum.rollouts_round == 2
    assert table.trials.tolist() == [2] * 42 and [call["n"] for call in rollouts.calls] == [2]
    # At 0.12: 0/4 moves by 0.109 and stops; "10" goes on at 2/4 (0.139) and stops at 3/6 (0.047), "1000" at 2/6.
    _, table, rollouts, cfg = run(MOSTLY_UNANIMOUS, "curriculum.rollouts_min=2", "curriculum.rollouts_tol=0.12")
    assert table.trials.tolist() == [4] * 40 + [6, 6]
    assert [call["n"] for call in rollouts.calls] == [2, 2, 2]


def test_each_difficulty_level_has_its_own_prior():
    """The same first round, 0/2, settles a problem of a level that is never solved and not one of a
    level whose problems are split: the prior is fitted per level (``stopping.fit_priors``)."""
    patterns = ["0"] * 20 + ["0"] * 4 + ["10", "01", "1", "1"] * 4
    levels = ["hard"] * 20 + ["mixed"] * 20
    _, table, _, _ = run(patterns, "curriculum.rollouts_min=2", "curriculum.rollouts_tol=0.3", levels=levels)
    assert table.trials[:20].tolist() == [2] * 20  # the hard level's prior is piled up at 0: settled
    assert (table.trials[20:24] > 2).all()  # the mixed level's 0/2 could still be anything
    _, pooled, _, _ = run(patterns, "curriculum.rollouts_min=2", "curriculum.rollouts_tol=0.3")
    assert not torch.equal(pooled.trials, table.trials)  # one prior for all problems decides otherwise


def test_the_table_holds_exactly_what_was_generated():
    patterns = MOSTLY_UNANIMOUS + ["1100", "110", "1000", "11110"]
    result, table, rollouts, _ = run(patterns, "curriculum.rollouts_min=3", "curriculum.rollouts_round=2",
                                     "curriculum.rollouts_tol=0.19")
    made_correct = [0] * len(patterns)
    for call in rollouts.calls:
        for problem, outcomes in call["outcomes"].items():
            made_correct[problem] += sum(outcomes)
    assert table.trials.tolist() == rollouts.made and table.correct.tolist() == made_correct
    assert set(table.trials.tolist()) == {3, 5, 7}  # problems stopped after the first, second and third rounds
    generated = sum(len(call["problems"]) * call["n"] for call in rollouts.calls)
    assert result["rollouts"] == generated == sum(rollouts.made)
    assert result["generated_tokens"] == generated * 3 and result["forward_tokens"] == generated * 5
    # Fixed K's generated tokens projected from the first round (every problem alike): 3 per rollout, as here.
    assert result["fixed_generated_tokens"] == len(patterns) * 8 * 3
    assert result["pass_rate_mean"] == pytest.approx(sum(c / n for c, n in zip(made_correct, rollouts.made))
                                                     / len(patterns))


def test_a_server_generator_serves_the_rounds_alike():
    """Only the ``complete`` protocol is used: the vLLM path's generator gives the same rounds and counts."""
    settings = ["curriculum.rollouts_min=2", "curriculum.rollouts_tol=0.19"]
    _, table, rollouts, cfg = run(MOSTLY_UNANIMOUS, *settings)
    records = [{"id": f"p{i}", "answer": str(i)} for i in range(len(MOSTLY_UNANIMOUS))]
    served_table = CompetenceTable([r["id"] for r in records])
    client = PatternServer(MOSTLY_UNANIMOUS)
    estimate.estimate(server.ServerGenerator(client, DigitTokenizer()), None, records, served_table, cfg, seed=SEED)
    assert [(c["problems"], c["n"]) for c in client.rollouts.calls] == [(c["problems"], c["n"]) for c in rollouts.calls]
    assert torch.equal(served_table.trials, table.trials) and torch.equal(served_table.correct, table.correct)


def test_a_round_adds_at_most_what_is_left_to_k():
    _, table, rollouts, _ = run(["10"] * 4 + ["0"] * 4, "curriculum.rollouts_min=3", "curriculum.rollouts_round=2",
                                "curriculum.rollouts_tol=0.01")
    assert [call["n"] for call in rollouts.calls] == [3, 2, 2, 1]
    assert table.trials.max() == 8


def test_describe_says_what_adaptive_saved_and_what_fixed_k_did():
    adaptive, *_ = run(MOSTLY_UNANIMOUS, "curriculum.rollouts_min=2", "curriculum.rollouts_tol=0.19")
    assert re.fullmatch(r"90 rollouts in 3 rounds \(27% of fixed K=8's 336\), 270 generated tokens, \d+\.\d s "
                        r"\(generation \d+\.\d s, answer checks \d+\.\d s, 17% of the generated positions padding\); "
                        r"fixed K=8 ~ \d+\.\d s, 1008 tokens", estimate.describe(adaptive))
    fixed, *_ = run(MOSTLY_UNANIMOUS)
    assert re.fullmatch(r"336 rollouts \(K=8\), 1008 generated tokens, \d+\.\d s \(.*\)", estimate.describe(fixed))


# ---- the stopping rule against hand computations ----

def test_weight_change_rms_by_hand():
    # K = 4, prior Beta(1, 1). Seen 1/2: X ~ BetaBinomial(2, 2, 2) = (0.3, 0.4, 0.3); w is 0.25 now and
    # w(1/4) = w(3/4) = 0.1875 after X = 0 or 2, so rms = sqrt(0.6 * 0.0625^2).
    # Seen 0/2: X ~ BetaBinomial(2, 1, 3) = (0.6, 0.3, 0.1); w is 0 now, w(1/4) = 0.1875, w(2/4) = 0.25.
    rms = stopping.weight_change_rms(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([2.0, 2.0, 4.0]), 4, (1.0, 1.0))
    assert rms.dtype == torch.float64
    assert rms.tolist() == pytest.approx([math.sqrt(0.6 * 0.0625 ** 2), math.sqrt(0.3 * 0.1875 ** 2 + 0.1 * 0.25 ** 2),
                                          0.0], abs=1e-12)
    # alpha = 2, beta = 1: w = p^2 (1 - p). Seen 1/2 -> now w(1/2) = 0.125; X = 0, 1, 2 -> w(1/4), w(2/4), w(3/4).
    rms = stopping.weight_change_rms(torch.tensor([1.0]), torch.tensor([2.0]), 4, (1.0, 1.0), alpha=2.0, beta=1.0)
    later = [0.25 ** 2 * 0.75, 0.125, 0.75 ** 2 * 0.25]
    assert rms.item() == pytest.approx(math.sqrt(sum(p * (w - 0.125) ** 2 for p, w in zip((0.3, 0.4, 0.3), later))))


def test_settled_compares_with_tol_times_the_kernels_peak():
    one_of_two = math.sqrt(0.6 * 0.0625 ** 2) / 0.25  # the rms above, as a share of the peak 0.25
    for tol, expected in ((one_of_two * 1.01, True), (one_of_two * 0.99, False)):
        assert stopping.settled(torch.tensor([1.0]), torch.tensor([2.0]), 4, (1.0, 1.0), 1.0, 1.0, tol).tolist() == [
            expected]
    # The peak of p^2 (1 - p) is at p = 2/3: 4/27.
    rms = stopping.weight_change_rms(torch.tensor([1.0]), torch.tensor([2.0]), 4, (1.0, 1.0), 2.0, 1.0).item()
    assert stopping.settled(torch.tensor([1.0]), torch.tensor([2.0]), 4, (1.0, 1.0), 2.0, 1.0,
                            rms / (4 / 27) * 1.01).item()
    assert not stopping.settled(torch.tensor([1.0]), torch.tensor([2.0]), 4, (1.0, 1.0), 2.0, 1.0,
                                rms / (4 / 27) * 0.99).item()
    # K rollouts made: settled whatever the tolerance.
    assert stopping.settled(torch.tensor([2.0]), torch.tensor([4.0]), 4, (1.0, 1.0), 1.0, 1.0, 1e-9).item()


def test_fit_prior_by_hand():
    # Rates 0, 1/2, 1, 1 of 2 trials: mean 5/8, Var(c/n) = 11/64, Var p = 2 * 11/64 - 15/64 = 7/64,
    # a0 + b0 = (15/64) / (7/64) - 1 = 8/7: Beta(5/7, 3/7).
    prior = stopping.fit_prior(torch.tensor([0.0, 1.0, 2.0, 2.0]), torch.full((4,), 2.0))
    assert prior == pytest.approx((5 / 7, 3 / 7))
    # Every problem alike: no spread beyond the binomial's, the strongest prior at their mean.
    a0, b0 = stopping.fit_prior(torch.full((10,), 2.0), torch.full((10,), 4.0))
    assert a0 + b0 == pytest.approx(stopping.PRIOR_STRENGTH_RANGE[1]) and a0 / (a0 + b0) == pytest.approx(0.5)
    # Half never right, half always: as U-shaped as allowed.
    a0, b0 = stopping.fit_prior(torch.tensor([0.0, 0.0, 3.0, 3.0]), torch.full((4,), 3.0))
    assert a0 + b0 == pytest.approx(stopping.PRIOR_STRENGTH_RANGE[0]) and a0 == pytest.approx(b0)
    # Unequal trials (an adaptive estimate's final counts): 0/2, 2/2, 3/4, and a problem never rolled out,
    # which is left out. m = 5/8; mean (r - m)^2 = (25 + 9 + 1) / 64 / 3 = 35/192; mean 1/n = 5/12;
    # Var p = (35/192 - (15/64)(5/12)) / (7/12) = 65/448; a0 + b0 = (15/64) / (65/448) - 1 = 8/13.
    prior = stopping.fit_prior(torch.tensor([0.0, 2.0, 3.0, 0.0]), torch.tensor([2.0, 2.0, 4.0, 0.0]))
    assert prior == pytest.approx((5 / 13, 3 / 13))
    with pytest.raises(ValueError):
        stopping.fit_prior(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))  # one trial each: no spread to fit


def test_fit_priors_fits_each_level_alone_and_falls_back_to_uniform():
    correct, trials = torch.tensor([0.0, 1.0, 2.0, 2.0, 0.0, 0.0, 1.0]), torch.tensor([2.0] * 4 + [2.0, 2.0, 1.0])
    groups = ["L1"] * 4 + ["L3", "L3", "L2"]
    a0, b0 = stopping.fit_priors(correct, trials, groups)
    assert (a0[:4].tolist(), b0[:4].tolist()) == (pytest.approx([5 / 7] * 4), pytest.approx([3 / 7] * 4))
    # L3, 0/2 twice: the mean clamped to 1%, no spread beyond the binomial's, the strongest prior there.
    assert a0[4].item() == pytest.approx(0.01 * stopping.PRIOR_STRENGTH_RANGE[1])
    assert (a0[6].item(), b0[6].item()) == (1.0, 1.0)  # L2 has one trial: nothing to fit


def test_fitted_posterior_weights_and_the_floor():
    """Weights as a run computes them (curriculum.posterior, .prior, .weight_floor) against the
    closed form by hand: E[p(1 - p)] under Beta(A, B) is AB / ((A + B)(A + B + 1))."""
    from paced_ds.curriculum.curriculum import Curriculum
    records = [{"id": str(i), "difficulty": "L1"} for i in range(4)]
    cfg = load_config(RECIPE, ["curriculum.posterior=true", "curriculum.prior=fitted", "curriculum.normalize=none"])
    curriculum = Curriculum(cfg, records)
    curriculum.table.record([0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 1, 1, 1], [2, 1, 1, 1, 1, 1, 1])
    curriculum.table.all_reduce_()
    a, b = 5 / 7, 3 / 7  # the fit above: counts 0/2, 1/2, 2/2, 2/2
    by_hand = [(a + c) * (b + 2 - c) / ((a + b + 2) * (a + b + 3)) for c in (0, 1, 2, 2)]
    assert curriculum.weights().tolist() == pytest.approx(by_hand, rel=1e-6)
    # A floor of 60% of the peak keeps only 1/2 (75% of it; 0/2 is at 53%, 2/2 at 36%).
    cfg = load_config(RECIPE, ["curriculum.posterior=true", "curriculum.prior=fitted", "curriculum.normalize=none",
                               "curriculum.weight_floor=0.6"])
    floored = Curriculum(cfg, records)
    floored.table.load_state_dict(curriculum.table.state_dict())
    assert [w > 0 for w in floored.weights().tolist()] == [w >= 0.6 * 0.25 for w in by_hand] == [False, True,
                                                                                                   False, False]


# ---- configuration ----

@pytest.mark.parametrize("override, allowed, got", [
    ("curriculum.weight_floor=1", "must be in [0, 1)", "got 1.0"),
    ("curriculum.rollouts_min=1", "must be 0 (off) or in [2, curriculum.rollouts = 8]", "got 1"),
    ("curriculum.rollouts_min=9", "must be 0 (off) or in [2, curriculum.rollouts = 8]", "got 9"),
    ("curriculum.rollouts_min=-2", "must be >= 0", "got -2"),
    ("curriculum.rollouts_round=0", "must be >= 1", "got 0"),
    ("curriculum.rollouts_tol=0", "must be in (0, 1)", "got 0.0"),
    ("curriculum.rollouts_tol=1", "must be in (0, 1)", "got 1.0"),
])
def test_the_adaptive_settings_are_range_checked_in_one_line(override, allowed, got):
    key = override.split("=")[0]
    with pytest.raises(UserError) as info:
        load_config(RECIPE, [override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config key {key}: {allowed}") and message.endswith(got)


@pytest.mark.parametrize("overrides", [["curriculum.rollouts_min=0"], ["curriculum.rollouts_min=2"],
                                       ["curriculum.rollouts_min=8", "curriculum.rollouts_round=1",
                                        "curriculum.rollouts_tol=0.999"]])
def test_the_adaptive_settings_accept_their_boundaries(overrides):
    load_config(RECIPE, overrides)
