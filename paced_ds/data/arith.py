"""The reference task: verifiable arithmetic with controlled difficulty.

Each difficulty level fixes the operator, the operand digit counts and a band of
carries (or borrows), so a level is a genuine step in difficulty rather than a label.
Problems are deterministic by seed; the held-out split of every level is drawn from a
disjoint set of operand pairs, so evaluation never sees a training problem.

The reference response writes the result's digits least-significant first, then the
answer (``"rev 2301 = 1032"``): a small transformer can produce the reversed digits
one column at a time, which is what makes a 1M-parameter teacher reliable here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Iterator

from paced_ds.runtime.files import write_jsonl_atomic


@dataclasses.dataclass(frozen=True)
class Level:
    """One difficulty level: ``digits``-digit operands combined by ``op``."""

    name: str
    op: str
    digits: int
    min_carries: int = 0
    max_carries: int = 99

    def __post_init__(self):
        if self.op not in ("+", "-"):
            raise ValueError(f"arith level {self.name!r}: op must be '+' or '-', got {self.op!r}")
        if not 1 <= self.digits <= 9:
            raise ValueError(f"arith level {self.name!r}: digits must be in 1..9, got {self.digits}")
        # With a >= b the top column of a subtraction never borrows: d digits borrow at most
        # d - 1 times. An impossible band would make _draw_operands loop forever.
        most_carries = self.digits if self.op == "+" else self.digits - 1
        if self.min_carries > min(self.max_carries, most_carries):
            raise ValueError(f"arith level {self.name!r}: no problem has {self.min_carries} carries")


# The recipe's levels, easiest first. The shipped student solves L1, little of L4.
LEVELS: tuple[Level, ...] = (
    Level("L1", "+", 1),
    Level("L2", "+", 2, max_carries=0),
    Level("L3", "+", 2, min_carries=1),
    Level("L4", "+", 3, min_carries=2),
)
LEVELS_BY_NAME = {level.name: level for level in LEVELS}


def count_carries(a: int, b: int, op: str) -> int:
    """Number of column carries of ``a + b`` (or borrows of ``a - b`` with a >= b)."""
    carries, carry = 0, 0
    while a or b:
        da, db = a % 10, b % 10
        if op == "+":
            carry = 1 if da + db + carry >= 10 else 0
        else:
            carry = 1 if da - db - carry < 0 else 0
        carries += carry
        a, b = a // 10, b // 10
    return carries


def evaluate(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def format_prompt(a: int, b: int, op: str) -> str:
    return f"{a}{op}{b}="


def format_response(answer: int) -> str:
    """The reference solution: reversed digits, then the answer."""
    sign = "-" if answer < 0 else ""
    return f"rev {sign}{str(abs(answer))[::-1]} = {answer}"


def _is_held_out(a: int, b: int, level: Level, held_out_share: float) -> bool:
    # A hash of the operands, not of the seed: the split is fixed for every seed, so
    # a train set drawn with one seed never leaks into a held-out set drawn with another.
    digest = hashlib.sha256(f"{level.name}:{a}{level.op}{b}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < held_out_share


def _draw_operands(rng: random.Random, level: Level) -> tuple[int, int]:
    low = 0 if level.digits == 1 else 10 ** (level.digits - 1)
    high = 10**level.digits - 1
    while True:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if level.op == "-" and a < b:
            a, b = b, a
        if level.min_carries <= count_carries(a, b, level.op) <= level.max_carries:
            return a, b


def problems(level: Level, split: str, count: int, seed: int = 0,
             held_out_share: float = 0.2) -> list[dict]:
    """``count`` distinct problems of ``level`` from ``split`` ("train" or "eval").

    Returns problem records (DESIGN.md): id, prompt, answer, response, difficulty.
    Fewer than ``count`` come back only when the level has fewer distinct problems.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}:{level.name}:{split}")
    want_held_out = split == "eval"
    seen: set[tuple[int, int]] = set()
    records = []
    attempts = 0
    # 1-digit levels have only ~100 operand pairs; stop when the draws stop finding new ones.
    while len(records) < count and attempts < 50 * count + 1000:
        attempts += 1
        a, b = _draw_operands(rng, level)
        if (a, b) in seen or _is_held_out(a, b, level, held_out_share) != want_held_out:
            continue
        seen.add((a, b))
        answer = evaluate(a, b, level.op)
        records.append({
            "id": f"{level.name}-{split}-{a}{level.op}{b}",
            "prompt": format_prompt(a, b, level.op),
            "answer": str(answer),
            "response": format_response(answer),
            "difficulty": level.name,
        })
    return records


def dataset(split: str, per_level: int | dict[str, int], seed: int = 0,
            levels: tuple[Level, ...] = LEVELS) -> list[dict]:
    """Problems of every level, interleaved deterministically by ``seed``."""
    records = []
    for level in levels:
        count = per_level[level.name] if isinstance(per_level, dict) else per_level
        records.extend(problems(level, split, count, seed=seed))
    random.Random(f"{seed}:shuffle:{split}").shuffle(records)
    return records


def write_jsonl(records: list[dict], path: str | Path, with_response: bool = True) -> Path:
    rows = records if with_response else [{k: v for k, v in r.items() if k != "response"} for r in records]
    return write_jsonl_atomic(path, rows)


def corpus_lines(seed: int = 0) -> Iterator[str]:
    """Text the tokenizer is trained on: every level's prompts and responses."""
    for record in dataset("train", 2000, seed=seed):
        yield record["prompt"] + record["response"]
