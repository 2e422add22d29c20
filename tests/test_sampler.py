"""ProblemSampler: one plan per epoch shared by every rank, sharded, resumable exactly."""

from __future__ import annotations

import pytest
import torch

from paced_ds.curriculum.sampler import ProblemSampler

# (world_size, micro_batch_size, grad_accum)
LAYOUTS = [(w, m, g) for w in (1, 2, 3) for m, g in ((1, 1), (4, 1), (2, 3), (3, 2))]


def ranks(num_problems: int, world_size: int, micro_batch_size: int, grad_accum: int,
          seed: int = 0) -> list[ProblemSampler]:
    return [ProblemSampler(num_problems, seed=seed, world_size=world_size, rank=rank,
                           micro_batch_size=micro_batch_size, grad_accum=grad_accum)
            for rank in range(world_size)]


def global_plan(num_problems: int, seed: int, epochs: int) -> list[int]:
    """The plan one rank-0, world-1, batch-1 sampler walks: the reference order."""
    reference = ProblemSampler(num_problems, seed=seed, world_size=1, rank=0, micro_batch_size=1, grad_accum=1)
    return [reference.next_step()[0][0] for _ in range(num_problems * epochs)]


def step_of_all_ranks(samplers: list[ProblemSampler]) -> list[list[list[int]]]:
    """Every rank's micro-batches of one step: shards[rank][micro]."""
    return [sampler.next_step() for sampler in samplers]


@pytest.mark.parametrize("world_size, micro_batch_size, grad_accum", LAYOUTS)
def test_shards_of_a_step_are_disjoint_and_cover_the_global_batch(world_size, micro_batch_size, grad_accum):
    global_batch = world_size * micro_batch_size * grad_accum
    num_problems = global_batch * 5
    samplers = ranks(num_problems, world_size, micro_batch_size, grad_accum, seed=7)
    plan = global_plan(num_problems, seed=7, epochs=1)
    for step in range(5):
        shards = step_of_all_ranks(samplers)
        for rank_shards in shards:
            assert len(rank_shards) == grad_accum
            assert all(len(micro) == micro_batch_size for micro in rank_shards)
        drawn = [i for rank_shards in shards for micro in rank_shards for i in micro]
        assert len(drawn) == len(set(drawn)) == global_batch
        # The union is exactly this step's slice of the plan.
        assert sorted(drawn) == sorted(plan[step * global_batch:(step + 1) * global_batch])
        # Micro-batch m of every rank comes from the m-th block of the step, rank r from slot r.
        per_micro = world_size * micro_batch_size
        for m in range(grad_accum):
            block = plan[step * global_batch + m * per_micro:step * global_batch + (m + 1) * per_micro]
            for rank in range(world_size):
                assert shards[rank][m] == block[rank * micro_batch_size:(rank + 1) * micro_batch_size]


@pytest.mark.parametrize("world_size, micro_batch_size, grad_accum", LAYOUTS)
def test_an_epoch_draws_every_problem_exactly_once(world_size, micro_batch_size, grad_accum):
    global_batch = world_size * micro_batch_size * grad_accum
    num_problems = global_batch * 4
    samplers = ranks(num_problems, world_size, micro_batch_size, grad_accum, seed=1)
    drawn = [i for _ in range(4) for shards in step_of_all_ranks(samplers)
             for micro in shards for i in micro]
    assert sorted(drawn) == list(range(num_problems))
    assert all(s.epoch == 0 and s.position == num_problems for s in samplers)
    # The next step starts epoch 1, again without repeats.
    drawn = [i for _ in range(4) for shards in step_of_all_ranks(samplers)
             for micro in shards for i in micro]
    assert sorted(drawn) == list(range(num_problems))
    assert all(s.epoch == 1 for s in samplers)


def test_plan_is_not_the_identity():
    plan = global_plan(50, seed=0, epochs=1)
    assert sorted(plan) == list(range(50))
    assert plan != list(range(50))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_derives_the_same_plan(world_size):
    samplers = ranks(97, world_size, 4, 2, seed=11)
    assert len({s.plan_digest() for s in samplers}) == 1
    for _ in range(97 // (world_size * 8) + 1):  # across an epoch boundary
        step_of_all_ranks(samplers)
    assert {s.epoch for s in samplers} == {1}
    assert len({s.plan_digest() for s in samplers}) == 1


def test_plan_depends_on_seed_and_epoch():
    digests = {ranks(64, 1, 8, 1, seed=seed)[0].plan_digest() for seed in range(5)}
    assert len(digests) == 5
    sampler = ranks(64, 1, 8, 1, seed=0)[0]
    first = sampler.plan_digest()
    for _ in range(9):
        sampler.next_step()
    assert sampler.epoch == 1 and sampler.plan_digest() != first


def test_different_seed_different_order():
    assert global_plan(40, seed=0, epochs=1) != global_plan(40, seed=1, epochs=1)
    assert global_plan(40, seed=0, epochs=1) == global_plan(40, seed=0, epochs=1)


@pytest.mark.parametrize("world_size, micro_batch_size, grad_accum", [(1, 3, 1), (2, 2, 2), (3, 1, 3)])
def test_epoch_rollover_inside_a_step(world_size, micro_batch_size, grad_accum):
    # 10 problems are not a multiple of the global batch: some step holds the tail of
    # epoch 0 and the head of epoch 1, and every later step follows the concatenated plans.
    num_problems = 10
    global_batch = world_size * micro_batch_size * grad_accum
    samplers = ranks(num_problems, world_size, micro_batch_size, grad_accum, seed=5)
    plan = global_plan(num_problems, seed=5, epochs=4)
    steps = (3 * num_problems) // global_batch + 1
    for step in range(steps):
        shards = step_of_all_ranks(samplers)
        expected = plan[step * global_batch:(step + 1) * global_batch]
        interleaved = [i for m in range(grad_accum) for rank in range(world_size) for i in shards[rank][m]]
        assert interleaved == expected, step
    consumed = steps * global_batch
    # The next epoch's plan is made when it is first needed, so an exact end stays at position n.
    epoch, position = divmod(consumed, num_problems)
    expected_state = (epoch, position) if position else (epoch - 1, num_problems)
    assert all((s.epoch, s.position) == expected_state for s in samplers)


def test_global_batch_larger_than_the_epoch_spans_epochs():
    sampler = ranks(3, 1, 4, 2)[0]
    plan = global_plan(3, seed=0, epochs=4)
    assert [i for micro in sampler.next_step() for i in micro] == plan[:8]
    assert (sampler.epoch, sampler.position) == (2, 2)


@pytest.mark.parametrize("world_size, micro_batch_size, grad_accum", [(1, 4, 1), (2, 3, 2), (3, 2, 1)])
@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_state_dict_resume_continues_exactly(world_size, micro_batch_size, grad_accum, k):
    num_problems, m = 23, 6  # 23 is no multiple of any global batch: resume lands mid-epoch
    straight = ranks(num_problems, world_size, micro_batch_size, grad_accum, seed=4)
    expected = [step_of_all_ranks(straight) for _ in range(k + m)]

    first_half = ranks(num_problems, world_size, micro_batch_size, grad_accum, seed=4)
    got = [step_of_all_ranks(first_half) for _ in range(k)]
    states = [s.state_dict() for s in first_half]
    resumed = ranks(num_problems, world_size, micro_batch_size, grad_accum, seed=999)
    for sampler, state in zip(resumed, states):
        sampler.load_state_dict(state)
    assert [s.plan_digest() for s in resumed] == [s.plan_digest() for s in first_half]
    got += [step_of_all_ranks(resumed) for _ in range(m)]
    assert got == expected
    assert [s.state_dict() for s in resumed] == [s.state_dict() for s in straight]


def test_state_dict_is_plain_data():
    sampler = ranks(10, 1, 3, 1, seed=2)[0]
    for _ in range(4):
        sampler.next_step()
    assert sampler.state_dict() == {"seed": 2, "epoch": 1, "position": 2, "num_problems": 10, "version": 0,
                                    "apply": "weight"}


def test_load_state_dict_with_a_different_problem_count_raises():
    state = ranks(10, 1, 2, 1)[0].state_dict()
    other = ranks(11, 1, 2, 1)[0]
    with pytest.raises(ValueError, match="10.*11"):
        other.load_state_dict(state)


def test_resume_on_a_different_world_size_keeps_the_global_order():
    # The plan depends on (seed, epoch) only: 2 ranks resumed as 1 continue the same sequence.
    two = ranks(24, 2, 2, 1, seed=3)
    for _ in range(2):
        step_of_all_ranks(two)
    one = ranks(24, 1, 4, 1, seed=0)[0]
    one.load_state_dict(two[0].state_dict())
    assert [i for micro in one.next_step() for i in micro] == global_plan(24, seed=3, epochs=1)[8:12]


def test_weights_default_to_ones():
    sampler = ranks(17, 2, 2, 1)[1]
    assert sampler.weights.shape == (17,)
    assert sampler.weights.dtype == torch.float32
    assert torch.equal(sampler.weights, torch.ones(17))


def test_given_weights_are_kept_as_float32():
    weights = torch.arange(5, dtype=torch.float64)
    sampler = ProblemSampler(5, seed=0, world_size=1, rank=0, micro_batch_size=1, grad_accum=1,
                             weights=weights)
    assert sampler.weights.dtype == torch.float32
    assert torch.equal(sampler.weights, torch.arange(5, dtype=torch.float32))


def test_no_problems_raises():
    with pytest.raises(ValueError):
        ProblemSampler(0, seed=0, world_size=1, rank=0, micro_batch_size=1, grad_accum=1)


# ---------------------------------------------------------------------------------------
# weights: the curriculum's two ways of applying them

def weighted(apply: str, weights, seed: int = 0, world: int = 2, rank: int = 0, mb: int = 5):
    return ProblemSampler(len(weights), seed=seed, world_size=world, rank=rank, micro_batch_size=mb,
                          grad_accum=1, weights=torch.tensor(weights, dtype=torch.float32), apply=apply)


def test_sample_mode_draws_in_proportion_to_the_weights_and_never_a_zero():
    weights = [0.0, 1.0, 2.0, 3.0, 0.0, 4.0]
    sampler = weighted("sample", weights, world=1, mb=6)
    counts = torch.zeros(len(weights))
    for _ in range(3000):
        for index in sampler.next_step()[0]:
            counts[index] += 1
    assert counts[0] == 0 and counts[4] == 0
    expected = torch.tensor(weights) / sum(weights)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.01)
    assert sampler.loss_weights([1, 2, 3]).tolist() == [1.0, 1.0, 1.0]  # the draw did the weighting


def test_weight_mode_draws_only_the_support_once_per_pass_and_weights_the_loss():
    weights = [0.0, 0.5, 1.0, 0.0, 0.25, 2.0, 0.0, 1.0]
    support = [i for i, w in enumerate(weights) if w > 0]
    sampler = weighted("weight", weights, seed=3, world=1, mb=5)
    assert sampler.support == len(support)
    drawn = [i for _ in range(len(support)) for part in sampler.next_step() for i in part]  # 5 passes
    for start in range(0, len(drawn), len(support)):  # every pass: each problem of the support once
        assert sorted(drawn[start:start + len(support)]) == support
    assert drawn[:len(support)] != drawn[len(support):2 * len(support)]  # a new order each pass
    assert sampler.loss_weights([2, 5, 4]).tolist() == [1.0, 2.0, 0.25]


def test_weight_mode_with_every_weight_positive_keeps_the_plain_order():
    plain = ProblemSampler(6, seed=3, world_size=1, rank=0, micro_batch_size=3, grad_accum=1)
    sampler = weighted("weight", [1.0, 0.5, 1.0, 0.25, 2.0, 1.0], seed=3, world=1, mb=3)
    assert [sampler.next_step() for _ in range(4)] == [plain.next_step() for _ in range(4)]


def support_only_update(weights: torch.Tensor, gradients: torch.Tensor, normalize: str) -> torch.Tensor:
    """The mean update of one pass of the sampler over its plan (every drawn problem once):
    sum over the pass of loss weight x gradient, over the problems drawn."""
    sampler = ProblemSampler(len(weights), seed=0, world_size=1, rank=0, micro_batch_size=1, grad_accum=1,
                             weights=weights)
    drawn = [sampler.next_step()[0][0] for _ in range(sampler.support)]
    assert sorted(drawn) == (weights > 0).nonzero().flatten().tolist()
    loss_weights = sampler.loss_weights(drawn)
    if normalize == "dataset_mean":  # over the support, as Curriculum.weights does
        loss_weights = loss_weights / weights[weights > 0].mean()
    return (loss_weights[:, None] * gradients[drawn]).sum(0) / len(drawn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_support_only_draw_has_the_expected_update_of_the_uniform_draw_with_zeros(seed):
    """The old weight-mode plan drew every problem uniformly and multiplied by w (0 for many):
    its expected update is mean_i(w_i g_i) / mean_i(w_i) with dataset_mean. The support-only
    draw gives the same exactly; with raw weights (normalize=none) N / |support| times it."""
    generator = torch.Generator().manual_seed(seed)
    pass_rates = torch.randint(0, 9, (40,), generator=generator).double() / 8
    weights = (pass_rates * (1 - pass_rates)).float()  # w = p (1 - p): 0 at p = 0 and 1
    assert 0 < int((weights > 0).sum()) < 40
    gradients = torch.randn(40, 3, generator=generator, dtype=torch.float32)
    uniform_with_zeros = (weights[:, None] * gradients).mean(0)  # E over a uniform draw of all 40
    raw = support_only_update(weights, gradients, "none")
    support = int((weights > 0).sum())
    assert torch.allclose(raw, uniform_with_zeros * 40 / support, atol=1e-6)
    normalised = support_only_update(weights, gradients, "dataset_mean")
    assert torch.allclose(normalised, uniform_with_zeros / weights.mean(), atol=1e-6)


def test_a_refresh_in_weight_mode_draws_from_the_new_support_and_resumes_exactly():
    sampler = weighted("weight", [1.0] * 10, world=2, mb=2)
    sampler.next_step()
    new_weights = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 2.0, 0.0, 0.0, 0.25])
    sampler.set_weights(new_weights)
    sampler.next_step()
    state = sampler.state_dict()
    after = [sampler.next_step() for _ in range(6)]
    assert {i for step in after for part in step for i in part} <= {1, 3, 6, 9}
    fresh = weighted("weight", [1.0] * 10, world=2, mb=2)
    fresh.set_weights(new_weights)
    fresh.load_state_dict(state)
    assert [fresh.next_step() for _ in range(6)] == after


def test_a_support_smaller_than_the_batch_repeats_problems_within_a_step():
    sampler = weighted("weight", [0.0, 1.0, 0.0, 1.0, 1.0, 0.0], world=2, mb=4)  # 8 a step, 3 drawable
    step = [i for part in sampler.next_step() for i in part] + [i for part in weighted(
        "weight", [0.0, 1.0, 0.0, 1.0, 1.0, 0.0], world=2, rank=1, mb=4).next_step() for i in part]
    assert sorted(set(step)) == [1, 3, 4] and len(step) == 8


def test_sample_mode_plan_is_shared_by_ranks_and_shards_are_disjoint():
    weights = [float(i % 4) for i in range(40)]
    samplers = [weighted("sample", weights, world=2, rank=r) for r in range(2)]
    assert samplers[0].plan_digest() == samplers[1].plan_digest()
    first, second = samplers[0].next_step()[0], samplers[1].next_step()[0]
    plan = samplers[0]._plan[:10].tolist()
    assert first + second == plan


def test_refresh_in_sample_mode_redraws_and_resumes_exactly():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    sampler = weighted("sample", weights.tolist(), world=1, mb=3)
    sampler.next_step()
    new_weights = torch.tensor([8.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    sampler.set_weights(new_weights)
    state = sampler.state_dict()
    after = [sampler.next_step() for _ in range(5)]
    assert {i for step in after for part in step for i in part} <= {0, 3, 7}  # only non-zero weights
    fresh = weighted("sample", weights.tolist(), world=1, mb=3)
    fresh.set_weights(new_weights)
    fresh.load_state_dict(state)
    assert [fresh.next_step() for _ in range(5)] == after


@pytest.mark.parametrize("apply", ["weight", "sample"])
def test_all_zero_weights_are_refused(apply):
    with pytest.raises(ValueError, match="every weight is 0"):
        weighted(apply, [0.0, 0.0, 0.0])


def test_peek_shows_the_next_step_without_moving():
    """What a pipelined teacher is sent ahead: exactly the next step, across epoch ends too."""
    sampler = ProblemSampler(10, seed=4, world_size=2, rank=1, micro_batch_size=2, grad_accum=2)
    for _ in range(6):  # 8 problems a step over 10: steps cross epoch ends
        peeked = sampler.peek_step()
        assert sampler.peek_step() == peeked and sampler.next_step() == peeked
