"""The competence table: the student's pass rate per problem, from K verified rollouts each.

Counts live in two places. ``correct`` / ``trials`` are the merged totals, identical on
every rank; everything that reads the table (``pass_rates``, ``digest``, ``state_dict``,
``write_jsonl``) reads them. ``record`` adds this rank's counts to ``pending_correct`` /
``pending_trials`` instead, and ``all_reduce_`` sums the pending counts over ranks, folds
them into the totals and zeroes them, so a count is merged exactly once however often
``all_reduce_`` is called. An estimate from K rollouts: ``reset_``, each rank records its
shard of the problems, ``all_reduce_``.

On disk (``competence.jsonl``, and the file ``curriculum.competence=PATH`` reads) the table
is one JSON object per problem: ``{"id", "correct", "trials", "pass_rate", "weight"}``,
``pass_rate`` null for an untried problem, ``weight`` null when none was given.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from paced_ds.errors import UserError
from paced_ds.runtime.dist import all_reduce_sum, is_main
from paced_ds.runtime.files import read_jsonl, write_jsonl_atomic

Counts = list[int] | list[float] | torch.Tensor
# How far a stored pass_rate may be from correct / trials (it may be rounded to 3 decimals).
PASS_RATE_TOLERANCE = 1e-3


class CompetenceTable:
    def __init__(self, ids: list[str]):
        self.ids = [str(problem_id) for problem_id in ids]
        self._index = {problem_id: i for i, problem_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("competence table ids must be unique")
        size = len(self.ids)
        self.correct = torch.zeros(size, dtype=torch.float64)
        self.trials = torch.zeros(size, dtype=torch.float64)
        self.pending_correct = torch.zeros(size, dtype=torch.float64)
        self.pending_trials = torch.zeros(size, dtype=torch.float64)
        self.unmatched = 0  # set by read_jsonl: ids in the file that this run does not have

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, problem_id) -> int:
        try:
            return self._index[str(problem_id)]
        except KeyError:
            raise KeyError(f"problem id {problem_id!r} is not in the competence table") from None

    def record(self, indices: list[int], correct: Counts, trials: Counts) -> None:
        """Add this rank's counts (problem ``indices[i]``: ``correct[i]`` of ``trials[i]``
        rollouts verified); a problem may appear more than once. Merged by ``all_reduce_``."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        correct = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
        trials = torch.as_tensor(trials, dtype=torch.float64).reshape(-1)
        if not len(index) == len(correct) == len(trials):
            raise ValueError(f"record needs as many counts as indices: {len(index)} indices, "
                             f"{len(correct)} correct, {len(trials)} trials")
        if len(index) and (index.min() < 0 or index.max() >= len(self.ids)):
            raise IndexError(f"problem index out of range 0..{len(self.ids) - 1}: {index.tolist()}")
        if (correct < 0).any() or (correct > trials).any():
            raise ValueError("counts must satisfy 0 <= correct <= trials")
        self.pending_correct.index_add_(0, index, correct)
        self.pending_trials.index_add_(0, index, trials)

    def pass_rates(self) -> torch.Tensor:
        """correct / trials of the merged totals; NaN where a problem has no trials."""
        rates = torch.full_like(self.trials, math.nan)
        tried = self.trials > 0
        rates[tried] = self.correct[tried] / self.trials[tried]
        return rates

    def all_reduce_(self) -> None:
        """Collective: sum every rank's pending counts into the totals of every rank.

        One all-reduce of both count vectors stacked; in a single process (no process
        group) the pending counts are folded in as they are. Every rank must call it.
        """
        summed = all_reduce_sum(torch.stack([self.pending_correct, self.pending_trials]))
        self.correct += summed[0]
        self.trials += summed[1]
        self.pending_correct.zero_()
        self.pending_trials.zero_()

    def reset_(self) -> None:
        """Forget every count, merged and pending (a fresh estimate replaces the old one)."""
        for counts in (self.correct, self.trials, self.pending_correct, self.pending_trials):
            counts.zero_()

    def state_dict(self) -> dict:
        """The merged totals as plain lists (JSON-able), for checkpoints.

        Pending counts are this rank's alone and would be lost or double counted on
        resume, so there must be none: call ``all_reduce_`` (on every rank) first.
        """
        if self.pending_trials.any() or self.pending_correct.any():
            raise RuntimeError("competence table has counts not yet merged; call all_reduce_() "
                               "on every rank before state_dict()")
        return {"ids": list(self.ids), "correct": _plain(self.correct), "trials": _plain(self.trials)}

    def load_state_dict(self, state: dict) -> None:
        """Replace every count with ``state``'s; refuse a state made for other problems."""
        if state["ids"] != self.ids:
            difference = _id_difference(state["ids"], self.ids)
            raise UserError(f"the saved competence table is for other problems: {difference}; resume with "
                            "the data the checkpoint was trained on, or start afresh (train.resume=never)")
        self.correct = torch.tensor(state["correct"], dtype=torch.float64)
        self.trials = torch.tensor(state["trials"], dtype=torch.float64)
        self.pending_correct.zero_()
        self.pending_trials.zero_()

    def digest(self) -> str:
        """A short hash of the ids and merged counts (ranks compare it to detect disagreement)."""
        sha = hashlib.sha256(json.dumps(self.ids).encode())
        sha.update(self.correct.numpy().tobytes())
        sha.update(self.trials.numpy().tobytes())
        return sha.hexdigest()[:16]

    def write_jsonl(self, path, weights: torch.Tensor | None = None) -> Path:
        """Write the table, one problem a line, atomically (a temporary file beside ``path``
        replaces it only once complete). A NaN weight is written as null."""
        path = Path(path)
        if weights is not None and len(weights) != len(self.ids):
            raise ValueError(f"{len(weights)} weights for {len(self.ids)} problems")
        weight_values = [None] * len(self.ids) if weights is None else [float(w) for w in weights]
        rates = self.pass_rates().tolist()
        rows = ({"id": problem_id, "correct": _plain_number(self.correct[i].item()),
                 "trials": _plain_number(self.trials[i].item()),
                 "pass_rate": None if math.isnan(rates[i]) else rates[i],
                 "weight": weight_values[i] if weight_values[i] is not None and math.isfinite(weight_values[i])
                 else None}
                for i, problem_id in enumerate(self.ids))
        return write_jsonl_atomic(path, rows)

    @classmethod
    def read_jsonl(cls, path, ids: list[str]) -> CompetenceTable:
        """A table for ``ids`` from counts produced elsewhere (``curriculum.competence=PATH``).

        Each line: ``id``, ``trials`` and ``correct``, or ``pass_rate`` in place of
        ``correct`` (then correct = pass_rate * trials); other fields are ignored. Counts are
        whole, 0 <= correct <= trials, and a ``pass_rate`` beside ``correct`` equals correct /
        trials. Problems of the run absent from the file have no trials; ids in the file that
        the run lacks are skipped and counted in ``.unmatched``. A malformed line is a
        ``UserError`` naming file:line.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such competence file (curriculum.competence)")
        table = cls(ids)
        seen: dict[str, int] = {}
        unmatched_example = None
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            problem_id, correct, trials = _count_row(where, row)
            if problem_id in seen:
                raise UserError(f"{where}: duplicate id {problem_id!r} (first at line {seen[problem_id]})")
            seen[problem_id] = number
            i = table._index.get(problem_id)
            if i is None:
                table.unmatched += 1
                unmatched_example = unmatched_example or problem_id
                continue
            table.correct[i] = correct
            table.trials[i] = trials
        if seen and table.unmatched == len(seen):
            raise UserError(f"{path}: none of its {len(seen)} ids is a problem of this run "
                            f"(e.g. {unmatched_example!r}); is curriculum.competence the file for data.train?")
        if table.unmatched and is_main():
            print(f"paced-ds: {path}: {table.unmatched} of its {len(seen)} ids are not problems of this run "
                  f"(e.g. {unmatched_example!r}); ignored")
        return table


def level_pass_rates(table: CompetenceTable, difficulties: list[str]) -> dict[str, float]:
    """The mean pass rate per difficulty level (``difficulties[i]`` is problem i's level),
    over the problems with trials; a level with none estimated is left out."""
    if len(difficulties) != len(table.ids):
        raise ValueError(f"{len(difficulties)} difficulty levels for {len(table.ids)} problems")
    rates = table.pass_rates().tolist()
    by_level: dict[str, list[float]] = {}
    for level, rate in zip(difficulties, rates):
        if not math.isnan(rate):
            by_level.setdefault(str(level), []).append(rate)
    return {level: sum(values) / len(values) for level, values in by_level.items()}


def _count_row(where: str, row: dict) -> tuple[str, float, float]:
    """``(id, correct, trials)`` of one line of a competence file: whole counts with
    0 <= correct <= trials (trials 0: an untried problem), and a ``pass_rate``, where a row
    has one beside ``correct``, equal to correct / trials."""
    if "id" not in row:
        raise UserError(f"{where}: missing field 'id'")
    problem_id = row["id"]
    if isinstance(problem_id, bool) or not isinstance(problem_id, (str, int)):
        raise UserError(f"{where}: field 'id' must be a string, got {problem_id!r}")
    if "trials" not in row:
        raise UserError(f"{where}: missing field 'trials' (the number of rollouts verified)")
    trials = _count(where, row, "trials")
    pass_rate = row.get("pass_rate")
    if pass_rate is not None and (not _is_number(pass_rate) or not 0 <= pass_rate <= 1):
        raise UserError(f"{where}: field 'pass_rate' must be a number in [0, 1] or null, got {pass_rate!r}")
    if "correct" in row:
        correct = _count(where, row, "correct")
        if correct > trials:
            raise UserError(f"{where}: 'correct' ({row['correct']}) is more than 'trials' ({row['trials']})")
        if pass_rate is not None and (trials == 0 or abs(pass_rate - correct / trials) > PASS_RATE_TOLERANCE):
            raise UserError(f"{where}: 'pass_rate' ({pass_rate}) is not 'correct' / 'trials' "
                            f"({row['correct']} / {row['trials']})")
    elif "pass_rate" in row:
        if pass_rate is None and trials > 0:
            raise UserError(f"{where}: field 'pass_rate' must be a number in [0, 1] where 'trials' is "
                            f"{row['trials']}, got None")
        correct = (pass_rate or 0.0) * trials
    else:
        raise UserError(f"{where}: missing field 'correct' (or 'pass_rate')")
    return str(problem_id), float(correct), float(trials)


def _count(where: str, row: dict, key: str) -> float:
    """A count: a whole number >= 0 (``correct`` may be fractional where ``pass_rate`` made it)."""
    value = row[key]
    if not _is_number(value):
        raise UserError(f"{where}: field {key!r} must be a number, got {value!r}")
    if value < 0:
        raise UserError(f"{where}: field {key!r} must not be negative, got {value!r}")
    if not float(value).is_integer() and not (key == "correct" and row.get("pass_rate") is not None):
        raise UserError(f"{where}: field {key!r} must be a whole number of rollouts, got {value!r}")
    return float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain_number(value: float) -> int | float:
    """A count as JSON: an int when whole (the usual case), else the float itself."""
    return int(value) if value.is_integer() else value


def _plain(counts: torch.Tensor) -> list:
    return [_plain_number(value) for value in counts.tolist()]


def _id_difference(saved: list[str], current: list[str]) -> str:
    """How two id lists differ, in a few words with one example."""
    saved_set, current_set = set(saved), set(current)
    missing = [i for i in current if i not in saved_set]
    extra = [i for i in saved if i not in current_set]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of this run's {len(current)} ids are not in it (e.g. {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} of its {len(saved)} ids are not in this run (e.g. {extra[0]!r})")
    if parts:
        return " and ".join(parts)
    if len(saved) != len(current):  # same ids, some repeated
        return f"it holds {len(saved)} ids for this run's {len(current)} distinct ones"
    moved = [i for i, (a, b) in enumerate(zip(saved, current)) if a != b]
    return (f"{len(moved)} ids are in another order (e.g. position {moved[0]} holds "
            f"{saved[moved[0]]!r} there, {current[moved[0]]!r} here)")
