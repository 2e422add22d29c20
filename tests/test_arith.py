"""The generated reference task: levels, splits, answers and the reference response."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from paced_ds.data import arith
from paced_ds.verify import is_correct

PROMPT = re.compile(r"(\d+)([+-])(\d+)=")
TRAIN_COUNT, EVAL_COUNT = 300, 50


def operands(record: dict) -> tuple[int, str, int]:
    match = PROMPT.fullmatch(record["prompt"])
    assert match, record["prompt"]
    return int(match.group(1)), match.group(2), int(match.group(3))


@pytest.fixture(scope="module")
def splits():
    """Each level's train and eval problems (seed 0)."""
    return {level.name: (arith.problems(level, "train", TRAIN_COUNT, seed=0),
                         arith.problems(level, "eval", EVAL_COUNT, seed=0))
            for level in arith.LEVELS}


# ---------------------------------------------------------------------------------------
# count_carries, by hand

@pytest.mark.parametrize("a, b, op, expected", [
    (999, 1, "+", 3),
    (123, 456, "+", 0),
    (5, 5, "+", 1),
    (4, 5, "+", 0),
    (19, 1, "+", 1),
    (95, 5, "+", 2),
    (909, 191, "+", 3),
    (100, 1, "-", 2),
    (1000, 1, "-", 3),
    (52, 27, "-", 1),
    (99, 11, "-", 0),
    (0, 0, "+", 0),
    (7, 7, "-", 0),
])
def test_count_carries_hand_checked(a, b, op, expected):
    assert arith.count_carries(a, b, op) == expected


# ---------------------------------------------------------------------------------------
# determinism and splits

def test_same_seed_same_problems():
    level = arith.LEVELS_BY_NAME["L3"]
    assert arith.problems(level, "train", 50, seed=3) == arith.problems(level, "train", 50, seed=3)
    assert arith.dataset("eval", 10, seed=3) == arith.dataset("eval", 10, seed=3)


def test_different_seed_different_problems():
    level = arith.LEVELS_BY_NAME["L3"]
    first, second = arith.problems(level, "train", 50, seed=0), arith.problems(level, "train", 50, seed=1)
    assert [r["prompt"] for r in first] != [r["prompt"] for r in second]
    assert {r["prompt"] for r in first} != {r["prompt"] for r in second}


def test_every_level_is_large_and_its_splits_hold_what_the_recipe_draws():
    # >= 5,000 distinct problems per level; >= 600 train, >= 200 of each other split, disjoint.
    for level in arith.LEVELS:
        assert level.size() >= 5000, level
        # size() is an upper bound under a carry band: count the distinct problems themselves.
        assert sum(len(arith.problems(level, split, 5000)) for split in arith.SPLITS) >= 5000, level
        drawn = {split: arith.problems(level, split, 600 if split == "train" else 200, seed=0)
                 for split in arith.SPLITS}
        assert {split: len(r) for split, r in drawn.items()} == {"train": 600, "val": 200, "eval": 200, "retain": 200}
        pairs = {split: {operands(r) for r in records} for split, records in drawn.items()}
        assert all(len(pairs[split]) == len(drawn[split]) for split in drawn)  # distinct within a split
        names = list(pairs)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                assert not pairs[first] & pairs[second], (level.name, first, second)


def test_split_shares_sum_to_one_and_every_pair_has_one_split():
    assert sum(arith.SPLITS.values()) == pytest.approx(1.0)
    level = arith.LEVELS_BY_NAME["L1"]
    counts = Counter(arith.split_of(a, b, level) for a in range(10, 100) for b in range(10, 100))
    assert sum(counts.values()) == 8100
    for split, share in arith.SPLITS.items():
        assert abs(counts[split] / 8100 - share) < 0.02, (split, counts)


def test_a_small_level_runs_out_instead_of_looping():
    level = arith.Level("T", "+", 1)  # 100 operand pairs in all
    found = sum(len(arith.problems(level, split, 1000)) for split in arith.SPLITS)
    assert found == 100


def test_train_and_eval_operand_pairs_are_disjoint_for_every_level(splits):
    for name, (train, held_out) in splits.items():
        train_pairs, eval_pairs = {operands(r) for r in train}, {operands(r) for r in held_out}
        assert train_pairs and eval_pairs, name
        assert not train_pairs & eval_pairs, name


def test_split_is_fixed_across_seeds():
    # A train set drawn with one seed never contains a held-out problem drawn with another.
    level = arith.LEVELS_BY_NAME["L3"]
    train = {operands(r) for seed in (0, 1, 2) for r in arith.problems(level, "train", 200, seed=seed)}
    held_out = {operands(r) for seed in (0, 1, 2) for r in arith.problems(level, "eval", 50, seed=seed)}
    assert len(held_out) > 50  # the seeds drew different held-out problems
    assert not train & held_out


def test_no_pair_is_train_in_one_level_and_eval_in_another(splits):
    train = {operands(r) for train, _ in splits.values() for r in train}
    held_out = {operands(r) for _, held in splits.values() for r in held}
    assert not train & held_out


def test_counts_ids_and_difficulty(splits):
    for name, (train, held_out) in splits.items():
        assert (len(train), len(held_out)) == (TRAIN_COUNT, EVAL_COUNT)
        for split, records in (("train", train), ("eval", held_out)):
            assert len({r["id"] for r in records}) == len(records)
            assert len({r["prompt"] for r in records}) == len(records)
            assert {r["difficulty"] for r in records} == {name}
            assert all(r["id"].startswith(f"{name}-{split}-") for r in records)


# ---------------------------------------------------------------------------------------
# every problem is what its level says, and its answer is right

def test_problems_have_the_level_digits_and_carry_band(splits):
    for name, (train, held_out) in splits.items():
        level = arith.LEVELS_BY_NAME[name]
        for record in train + held_out:
            a, op, b = operands(record)
            assert op == level.op
            assert len(str(a)) == level.digits and len(str(b)) == level.second_digits, record
            carries = arith.count_carries(a, b, op)
            assert level.min_carries <= carries <= level.max_carries, record


def test_difficulty_rises_across_levels_and_varies_within_each(splits):
    """Across levels: more digits to add, or as many with more carries. Within a level: at
    least two carry counts, each common enough to spread the student's pass rates."""
    hardness = []
    for level in arith.LEVELS:
        train, _ = splits[level.name]
        carries = Counter(arith.count_carries(*operands(r)[::2], "+") for r in train)
        common = [c for c, n in carries.items() if n >= 0.1 * len(train)]
        assert len(common) >= 2, (level.name, carries)
        hardness.append((level.digits + level.second_digits, sum(c * n for c, n in carries.items()) / len(train)))
    assert hardness == sorted(hardness) and len(set(hardness)) == len(hardness), hardness


def test_a_carry_band_is_respected():
    level = arith.Level("B", "+", 3, min_carries=2)
    assert all(arith.count_carries(*operands(r)[::2], "+") >= 2 for r in arith.problems(level, "train", 50))


def test_answers_are_right(splits):
    for train, held_out in splits.values():
        for record in train + held_out:
            a, op, b = operands(record)
            expected = a + b if op == "+" else a - b
            assert record["answer"] == str(expected), record


def test_reference_response_format(splits):
    for train, held_out in splits.values():
        for record in train + held_out:
            answer = record["answer"]
            assert record["response"] == f"rev {answer[::-1]} = {answer}"


def test_format_response_by_hand():
    assert arith.format_response(1032) == "rev 2301 = 1032"
    assert arith.format_response(0) == "rev 0 = 0"
    assert arith.format_response(-5) == "rev -5 = -5"
    assert arith.format_response(-120) == "rev -021 = -120"


def test_subtraction_level_never_goes_negative():
    level = arith.Level("S2", "-", 2, min_carries=1)
    for record in arith.problems(level, "train", 100):
        a, op, b = operands(record)
        assert op == "-" and a >= b and int(record["answer"]) == a - b >= 0
        assert arith.count_carries(a, b, op) == 1


def test_verify_accepts_the_reference_response_and_rejects_a_wrong_answer(splits):
    records = [r for train, _ in splits.values() for r in train[:20]]
    for record in records:
        assert is_correct(record["response"], record["answer"]), record
        wrong = str(int(record["answer"]) + 1)
        assert not is_correct(record["response"], wrong), record
        # The reversed digits are working, not the answer.
        assert not is_correct(f"rev {record['answer'][::-1]} = {wrong}", record["answer"]), record


def test_verify_does_not_read_the_reversed_digits_as_the_answer():
    # 1032 reversed is 2301; only the text after '=' counts.
    assert is_correct("rev 2301 = 1032", "1032")
    assert not is_correct("rev 2301 = 1032", "2301")


# ---------------------------------------------------------------------------------------
# Level validation

@pytest.mark.parametrize("kwargs, says", [
    (dict(name="X", op="*", digits=2), "op"),
    (dict(name="X", op="+", digits=0), "digits"),
    (dict(name="X", op="+", digits=10), "digits"),
    (dict(name="X", op="+", digits=2, min_carries=3), "carries"),
    (dict(name="X", op="+", digits=3, min_carries=2, max_carries=1), "carries"),
    # Subtraction (a >= b) borrows at most digits - 1 times.
    (dict(name="X", op="-", digits=1, min_carries=1), "carries"),
    (dict(name="X", op="-", digits=3, min_carries=3), "carries"),
    (dict(name="X", op="+", digits=2, b_digits=3), "b_digits"),
])
def test_level_validation(kwargs, says):
    with pytest.raises(ValueError, match=says) as info:
        arith.Level(**kwargs)
    assert "'X'" in str(info.value)


@pytest.mark.parametrize("op, digits, carries", [("+", 1, 1), ("+", 3, 3), ("-", 2, 1), ("-", 3, 2)])
def test_the_most_carries_a_level_allows_are_reachable(op, digits, carries):
    level = arith.Level("X", op, digits, min_carries=carries)
    records = arith.problems(level, "train", 5)
    assert records
    assert all(arith.count_carries(*operands(r)[::2], op) == carries for r in records)


def test_problems_rejects_an_unknown_split():
    with pytest.raises(ValueError, match="split"):
        arith.problems(arith.LEVELS[0], "test", 5)


def test_a_mixed_length_level():
    level = arith.Level("M", "+", 3, b_digits=2)
    assert level.size() == 900 * 90
    for record in arith.problems(level, "train", 30):
        a, _, b = operands(record)
        assert 100 <= a <= 999 and 10 <= b <= 99


# ---------------------------------------------------------------------------------------
# dataset, files, corpus

def test_dataset_counts_per_level_and_interleaves():
    records = arith.dataset("train", 30, seed=0)
    counts = Counter(r["difficulty"] for r in records)
    assert counts == {"L1": 30, "L2": 30, "L3": 30}
    levels_in_order = [r["difficulty"] for r in records]
    # Interleaved: not one block per level.
    changes = sum(1 for x, y in zip(levels_in_order, levels_in_order[1:]) if x != y)
    assert changes > 20
    assert len({r["id"] for r in records}) == len(records)


def test_dataset_per_level_dict():
    counts = {"L1": 3, "L2": 0, "L3": 7}
    records = arith.dataset("eval", counts, seed=2)
    assert Counter(r["difficulty"] for r in records) == {"L1": 3, "L3": 7}


def test_dataset_with_chosen_levels():
    levels = (arith.LEVELS_BY_NAME["L2"], arith.Level("S2", "-", 2))
    records = arith.dataset("train", 5, levels=levels)
    assert Counter(r["difficulty"] for r in records) == {"L2": 5, "S2": 5}


def test_dataset_order_depends_on_seed_only_through_the_shuffle():
    first, second = arith.dataset("train", 20, seed=0), arith.dataset("train", 20, seed=1)
    assert [r["id"] for r in first] != [r["id"] for r in second]


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    records = arith.dataset("eval", 4, seed=0)
    path = arith.write_jsonl(records, tmp_path / "sub" / "eval.jsonl")
    assert path == tmp_path / "sub" / "eval.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.jsonl"]  # no .tmp left behind


def test_write_jsonl_replaces_and_can_drop_responses(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("old contents\n")
    records = arith.dataset("train", 2, seed=0)
    arith.write_jsonl(records, path, with_response=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(records)
    assert all("response" not in row for row in rows)
    assert all("response" in record for record in records)  # the caller's records are untouched
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_corpus_lines_are_prompts_and_responses():
    lines = list(arith.corpus_lines(seed=0))
    assert len(lines) > 1000
    assert all(line for line in lines)
    assert all(PROMPT.match(line) and " = " in line and "rev " in line for line in lines)
    # Every shipped level is in it.
    assert {len(PROMPT.match(line).group(1)) for line in lines} == {lv.digits for lv in arith.LEVELS}
    assert {len(PROMPT.match(line).group(3)) for line in lines} == {lv.second_digits for lv in arith.LEVELS}
