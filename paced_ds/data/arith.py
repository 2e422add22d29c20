"""The reference task: verifiable arithmetic with controlled difficulty.

Each difficulty level fixes the operator and the operands' digit counts; within a level
the number of carries (or borrows) varies from none to every column, so difficulty rises
both across levels and within each one. Every shipped level holds at least 8,100
distinct problems. Problems are deterministic by seed.

Every operand pair belongs to exactly one split, by a hash of the pair (never of the
seed): ``train``, ``val`` (choosing hyperparameters), ``eval`` (the reported held-out
set) and ``retain`` (the retention set: which of these problems the initial student
solves is its "general ability", and the share it loses measures forgetting). So no
seed ever draws one problem into two splits.

The reference response writes the result's digits least-significant first, then the
answer (``"rev 2301 = 1032"``): a small transformer can produce the reversed digits
one column at a time, which is what makes a 1M-parameter teacher reliable here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

from paced_ds.runtime.files import write_jsonl_atomic

# split -> share of every level's operand pairs; the shares sum to 1.
SPLITS: dict[str, float] = {"train": 0.7, "val": 0.1, "eval": 0.1, "retain": 0.1}


@dataclasses.dataclass(frozen=True)
class Level:
    """One difficulty level: a ``digits``-digit operand ``op`` a ``b_digits``-digit one
    (``b_digits`` defaults to ``digits``), optionally banded by the number of carries."""

    name: str
    op: str
    digits: int
    min_carries: int = 0
    max_carries: int = 99
    b_digits: int = 0

    def __post_init__(self):
        if self.op not in ("+", "-"):
            raise ValueError(f"arith level {self.name!r}: op must be '+' or '-', got {self.op!r}")
        if not 1 <= self.digits <= 9:
            raise ValueError(f"arith level {self.name!r}: digits must be in 1..9, got {self.digits}")
        if not 0 <= self.b_digits <= self.digits:
            raise ValueError(f"arith level {self.name!r}: b_digits must be in 0..{self.digits}, got {self.b_digits}")
        # With a >= b the top column of a subtraction never borrows: d digits borrow at most
        # d - 1 times. An impossible band would make _draw_operands loop forever.
        most_carries = self.digits if self.op == "+" else self.digits - 1
        if self.min_carries > min(self.max_carries, most_carries):
            raise ValueError(f"arith level {self.name!r}: no problem has {self.min_carries} carries")

    @property
    def second_digits(self) -> int:
        return self.b_digits or self.digits

    def operand_range(self, digits: int) -> tuple[int, int]:
        return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1

    def size(self) -> int:
        """Distinct operand pairs of the level before any carry band (an upper bound with one)."""
        (a_low, a_high), (b_low, b_high) = self.operand_range(self.digits), self.operand_range(self.second_digits)
        return (a_high - a_low + 1) * (b_high - b_low + 1)


# The recipe's levels, easiest first: 2+2, 3+2 and 3+3 digit sums, each with every number
# of carries. The shipped student solves most of L1, about half of L2, little of L3.
LEVELS: tuple[Level, ...] = (
    Level("L1", "+", 2),
    Level("L2", "+", 3, b_digits=2),
    Level("L3", "+", 3),
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


def split_of(a: int, b: int, level: Level) -> str:
    """The split an operand pair belongs to. A hash of the operands, not of the seed: the
    split is fixed for every seed, so no seed's train set holds another's held-out problem."""
    digest = hashlib.sha256(f"{level.name}:{a}{level.op}{b}".encode()).digest()
    u = int.from_bytes(digest[:4], "big") / 2**32
    for split, share in SPLITS.items():
        if u < share:
            return split
        u -= share
    return split


def _draw_operands(rng: random.Random, level: Level) -> tuple[int, int]:
    (a_low, a_high), (b_low, b_high) = level.operand_range(level.digits), level.operand_range(level.second_digits)
    while True:
        a, b = rng.randint(a_low, a_high), rng.randint(b_low, b_high)
        if level.op == "-" and a < b:
            a, b = b, a
        if level.min_carries <= count_carries(a, b, level.op) <= level.max_carries:
            return a, b


def problems(level: Level, split: str, count: int, seed: int = 0) -> list[dict]:
    """``count`` distinct problems of ``level`` from ``split`` (one of ``SPLITS``).

    Returns problem records (``data/records.py``): id, prompt, answer, response, difficulty.
    Fewer than ``count`` come back only when the split has fewer distinct problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"{seed}:{level.name}:{split}")
    seen: set[tuple[int, int]] = set()
    records = []
    attempts = 0
    # A small level runs out of new pairs: stop when the draws stop finding them.
    while len(records) < count and attempts < 50 * count + 1000:
        attempts += 1
        a, b = _draw_operands(rng, level)
        if (a, b) in seen or split_of(a, b, level) != split:
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
