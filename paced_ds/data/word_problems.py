"""Generated GSM8K-style word problems: a story of whole-number steps, a worked solution
with ``<<calculation>>`` annotations and a final ``#### N``, as GSM8K writes them.

A problem follows one person's stock of something through a chain of events (buying
packs, giving some away, doubling, halving, sharing out); its level is the number of
events, so ``W1`` takes one calculation and ``W4`` five or more. Every intermediate
result is a positive whole number. Problems are deterministic by seed, and each belongs
to one split by a hash of its text, never of the seed, so no seed draws a held-out
problem into training (the arithmetic task's rule, ``paced_ds.data.arith``).

The stories and wording are this project's own; they are a testbed in GSM8K's format for
real models on a CPU, not a substitute for GSM8K itself (load that through ``datasets``
with ``data.layout=gsm8k``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from paced_ds.data.arith import SPLITS

# name, subject pronoun, possessive
PEOPLE = (("Maya", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Tariq", "he", "his"),
          ("Ines", "she", "her"), ("Kenji", "he", "his"), ("Priya", "she", "her"), ("Felix", "he", "his"),
          ("Amara", "she", "her"), ("Diego", "he", "his"), ("Sofia", "she", "her"), ("Jonas", "he", "his"))
# plural item, what it comes in
ITEMS = (("apples", "bags"), ("stickers", "sheets"), ("pencils", "boxes"), ("marbles", "jars"),
         ("cookies", "trays"), ("stamps", "books"), ("beads", "strings"), ("cards", "packs"),
         ("eggs", "cartons"), ("shells", "buckets"), ("buttons", "tins"), ("crayons", "cases"))
FRIENDS = ("a neighbour", "a classmate", "a cousin", "a friend", "the school fair", "a younger brother")
RELATIVES = ("grandmother", "uncle", "aunt", "older sister")


@dataclass(frozen=True)
class Level:
    name: str
    events: int  # events after the starting amount; the question is one more step when it shares


LEVELS: tuple[Level, ...] = (Level("W1", 1), Level("W2", 2), Level("W3", 3), Level("W4", 4))
LEVELS_BY_NAME = {level.name: level for level in LEVELS}


@dataclass
class _Story:
    name: str
    they: str
    their: str
    item: str
    container: str
    amount: int
    sentences: list[str]
    steps: list[str]


def _calc(expression: str, value: int) -> str:
    """``12 + 15 = <<12+15=27>>27``, GSM8K's annotation."""
    return f"{expression} = <<{expression.replace(' ', '')}={value}>>{value}"


def _buy_packs(s: _Story, rng: random.Random) -> bool:
    packs, each = rng.randint(2, 6), rng.randint(3, 12)
    bought = packs * each
    s.sentences.append(f"{s.they.capitalize()} buys {packs} {s.container} of {s.item} with {each} {s.item} in each.")
    s.steps.append(f"The {s.container} hold {_calc(f'{packs} * {each}', bought)} {s.item}.")
    s.steps.append(f"So {s.name} has {_calc(f'{s.amount} + {bought}', s.amount + bought)} {s.item}.")
    s.amount += bought
    return True


def _find_more(s: _Story, rng: random.Random) -> bool:
    found = rng.randint(3, 40)
    s.sentences.append(f"Then {s.they} gets {found} more {s.item}.")
    s.steps.append(f"After that {s.name} has {_calc(f'{s.amount} + {found}', s.amount + found)} {s.item}.")
    s.amount += found
    return True


def _give_away(s: _Story, rng: random.Random) -> bool:
    if s.amount < 4:
        return False
    given = rng.randint(1, max(1, s.amount * 2 // 3))
    s.sentences.append(f"{s.they.capitalize()} gives {given} {s.item} to {rng.choice(FRIENDS)}.")
    s.steps.append(f"{s.name} has {_calc(f'{s.amount} - {given}', s.amount - given)} {s.item} left.")
    s.amount -= given
    return True


def _double(s: _Story, rng: random.Random) -> bool:
    if s.amount > 150:
        return False
    s.sentences.append(f"{s.their.capitalize()} {rng.choice(RELATIVES)} gives {s.name} as many {s.item} "
                       f"as {s.they} already has.")
    s.steps.append(f"That doubles them: {_calc(f'{s.amount} * 2', s.amount * 2)} {s.item}.")
    s.amount *= 2
    return True


def _half(s: _Story, rng: random.Random) -> bool:
    if s.amount % 2 or s.amount < 4:
        return False
    s.sentences.append(f"{s.they.capitalize()} uses half of {s.their} {s.item} for a project.")
    s.steps.append(f"Half are used, so {_calc(f'{s.amount} / 2', s.amount // 2)} {s.item} remain.")
    s.amount //= 2
    return True


EVENTS: tuple[Callable[[_Story, random.Random], bool], ...] = (_buy_packs, _find_more, _give_away, _double, _half)


def _question(s: _Story, rng: random.Random) -> tuple[str, int]:
    """The last sentence: the stock now, or an equal share of it (one more step) when it divides."""
    divisors = [n for n in range(2, 7) if s.amount % n == 0 and s.amount // n > 1]
    if divisors and rng.random() < 0.5:
        friends = rng.choice(divisors)
        share = s.amount // friends
        s.sentences.append(f"{s.they.capitalize()} shares all of {s.their} {s.item} equally among {friends} "
                           f"friends. How many {s.item} does each friend get?")
        s.steps.append(f"Each friend gets {_calc(f'{s.amount} / {friends}', share)} {s.item}.")
        return s.sentences[-1], share
    s.sentences.append(f"How many {s.item} does {s.name} have now?")
    return s.sentences[-1], s.amount


def _draw(rng: random.Random, level: Level) -> dict:
    name, they, their = rng.choice(PEOPLE)
    item, container = rng.choice(ITEMS)
    start = rng.randint(5, 60)
    story = _Story(name, they, their, item, container, start, [f"{name} has {start} {item}."],
                   [f"{name} starts with {start} {item}."])
    done = 0
    while done < level.events:
        if rng.choice(EVENTS)(story, rng):
            done += 1
    _, answer = _question(story, rng)
    return {"prompt": " ".join(story.sentences), "answer": str(answer),
            "response": "\n".join(story.steps) + f"\n#### {answer}"}


def split_of(prompt: str) -> str:
    """The split a problem belongs to, by a hash of its text."""
    u = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") / 2**32
    for split, share in SPLITS.items():
        if u < share:
            return split
        u -= share
    return split


def problems(level: Level, split: str, count: int, seed: int = 0) -> list[dict]:
    """``count`` distinct problems of ``level`` from ``split``: records with id, prompt,
    answer, response (the worked solution) and difficulty."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"{seed}:words:{level.name}:{split}")
    seen: set[str] = set()
    records = []
    while len(records) < count:
        record = _draw(rng, level)
        if record["prompt"] in seen or split_of(record["prompt"]) != split:
            continue
        seen.add(record["prompt"])
        digest = hashlib.sha256(record["prompt"].encode()).hexdigest()[:10]
        records.append({"id": f"{level.name}-{split}-{digest}", **record, "difficulty": level.name})
    return records


def dataset(split: str, per_level: int, seed: int = 0, levels: tuple[Level, ...] = LEVELS) -> list[dict]:
    """Problems of every level, interleaved deterministically by ``seed``."""
    records = [r for level in levels for r in problems(level, split, per_level, seed=seed)]
    random.Random(f"{seed}:words:shuffle:{split}").shuffle(records)
    return records
