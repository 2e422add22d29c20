"""Generated GSM8K-style word problems (``words:``) and the gsm8k / MATH field layouts."""

from __future__ import annotations

import re

import pytest

from paced_ds import verify
from paced_ds.config import DataConfig, load_config
from paced_ds.data import sources, word_problems
from paced_ds.errors import UserError

CALC = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def worked(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else (a // b if a % b == 0 else -1)


# What each sentence of a story does to the stock, read from the question alone.
EVENTS = [(re.compile(r"buys (\d+) \w+ of \w+ with (\d+) \w+ in each"), lambda n, a, b: n + int(a) * int(b)),
          (re.compile(r"gets (\d+) more"), lambda n, a: n + int(a)),
          (re.compile(r"gives (\d+) \w+ to"), lambda n, a: n - int(a)),
          (re.compile(r"as many \w+ as s?he already has"), lambda n: 2 * n),
          (re.compile(r"uses half of"), lambda n: n // 2),
          (re.compile(r"equally among (\d+) friends"), lambda n, a: n // int(a))]


def solve_from_the_question(question: str) -> int:
    sentences = re.split(r"(?<=[.?]) ", question)
    stock = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0])[1])
    for sentence in sentences[1:]:
        for pattern, apply in EVENTS:
            if found := pattern.search(sentence):
                stock = apply(stock, *found.groups())
                break
        else:
            assert sentence.startswith("How many"), sentence
    return stock


def test_every_calculation_of_every_solution_is_right_and_ends_in_the_answer():
    records = word_problems.dataset("train", 60, seed=3)
    assert len(records) == 60 * len(word_problems.LEVELS)
    for record in records:
        steps = CALC.findall(record["response"])
        level = word_problems.LEVELS_BY_NAME[record["difficulty"]]
        assert len(steps) >= level.events, record
        for a, op, b, shown, written in steps:
            assert int(shown) == int(written) == worked(int(a), op, int(b)) > 0, record
        assert record["response"].endswith(f"\n#### {record['answer']}")
        assert int(steps[-1][3]) == int(record["answer"])
        assert solve_from_the_question(record["prompt"]) == int(record["answer"]), record


def test_levels_grow_in_steps_and_the_checker_reads_the_solutions():
    records = word_problems.dataset("eval", 25, seed=0)
    mean_steps = {level.name: sum(len(CALC.findall(r["response"])) for r in records
                                  if r["difficulty"] == level.name) / 25 for level in word_problems.LEVELS}
    assert list(mean_steps.values()) == sorted(mean_steps.values()), mean_steps
    pairs = [(r["response"], r["answer"]) for r in records]
    assert all(verify.is_correct(*pair) for pair in pairs[:40])
    assert not any(verify.is_correct(response, str(int(answer) + 1)) for response, answer in pairs[:40])


def test_deterministic_distinct_and_splits_disjoint():
    first = word_problems.dataset("train", 30, seed=1)
    assert first == word_problems.dataset("train", 30, seed=1)
    assert first != word_problems.dataset("train", 30, seed=2)
    prompts = {split: {r["prompt"] for seed in (0, 1) for r in word_problems.dataset(split, 40, seed=seed)}
               for split in ("train", "eval", "retain")}
    assert len({r["id"] for r in first}) == len(first)
    assert not prompts["train"] & prompts["eval"] and not prompts["train"] & prompts["retain"]
    assert not prompts["eval"] & prompts["retain"]


def test_words_source_loads_like_arith_without_responses():
    cfg = DataConfig(train="words:train", arith_train_per_level=4, arith_seed=5)
    records = sources.load_train(cfg)
    assert len(records) == 4 * len(word_problems.LEVELS)
    assert all(set(r) == {"id", "prompt", "answer", "difficulty"} for r in records)
    with pytest.raises(UserError, match=r"unknown generated source 'words:test'.*words:train"):
        sources.load("words:test", cfg, split="train", per_level=1)
    assert "words-train-4-seed5" in str(sources.stored_responses_path(cfg, "teacher"))


# Rows in the public layouts (written here, in each dataset's format).
GSM8K_ROWS = [
    {"question": "Ana has 3 boxes of 12 pens. She gives away 5 pens. How many pens are left?",
     "answer": "She has 3*12=<<3*12=36>>36 pens.\nThen 36-5=<<36-5=31>>31 are left.\n#### 31"},
    {"question": "A farm sells 1,250 eggs a day. How many in 2 days?",
     "answer": "It sells 1250*2=<<1250*2=2500>>2500 eggs.\n#### 2,500"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{3}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "Over a common denominator, $\\frac{3}{6} + \\frac{2}{6} = \\boxed{\\frac{5}{6}}$."},
    {"problem": "Solve $x^2 = 9$ for $x > 0$.", "level": "Level 2", "type": "Algebra",
     "solution": "We have $x = \\pm 3$, and since $x > 0$, $x = \\boxed{3}$."},
]


@pytest.mark.parametrize("layout, rows, wrong", [("gsm8k", GSM8K_ROWS, ["30", "2,501"]),
                                                 ("math", MATH_ROWS, ["\\frac{1}{6}", "-3"])])
def test_public_layouts_load_through_datasets_with_whole_solutions_as_gold(tmp_path, layout, rows, wrong):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / layout))
    cfg = DataConfig(train=str(tmp_path / layout), layout=layout)
    records = sources.load_train(cfg)
    assert [r["prompt"] for r in records] == [r[sources.LAYOUTS[layout]["prompt"]] for r in rows]
    # The gold answer is the whole solution; the checker reads its '#### N' or its box.
    for record, wrong_answer in zip(records, wrong):
        assert record["response"] == record["answer"]
        final = record["answer"].rsplit("####", 1)[-1] if layout == "gsm8k" else re.findall(
            r"\\boxed\{(.*)\}\$", record["answer"])[0]
        assert verify.is_correct(f"Working it out, the answer is {final.strip()}.", record["answer"])
        assert not verify.is_correct(f"The answer is {wrong_answer}.", record["answer"])
    if layout == "math":
        assert [r["difficulty"] for r in records] == ["Level 1", "Level 2"]


def test_fields_override_the_layout_and_layouts_are_the_configs_choices(tmp_path):
    import datasets

    rows = [{**row, "short": "31"} for row in GSM8K_ROWS[:1]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "gsm"))
    cfg = DataConfig(train=str(tmp_path / "gsm"), layout="gsm8k", fields={"answer": "short"})
    (record,) = sources.load_train(cfg)
    assert record["answer"] == "31" and record["response"] == rows[0]["answer"]
    choices = DataConfig.__dataclass_fields__["layout"].metadata["choices"]
    assert set(choices) == {"", *sources.LAYOUTS}
    with pytest.raises(UserError, match="data.layout"):
        load_config(None, ["data.layout=gsm8"])
