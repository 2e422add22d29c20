"""CompetenceTable: counts, pass rates, checkpoint state, the jsonl file, and the 2-rank merge."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as torch_mp

from paced_ds.curriculum.competence import CompetenceTable, level_pass_rates
from paced_ds.errors import UserError
from paced_ds.runtime import files

IDS = ["p0", "p1", "p2", "p3", "p4", "p5"]


def merged(ids=IDS, indices=(), correct=(), trials=()) -> CompetenceTable:
    table = CompetenceTable(list(ids))
    table.record(list(indices), list(correct), list(trials))
    table.all_reduce_()
    return table


def write_lines(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_record_and_pass_rates():
    table = CompetenceTable(IDS)
    assert table.index("p3") == 3 and len(table) == 6
    table.record([0, 2, 0], [1, 8, 2], [4, 8, 4])  # p0 twice: summed
    assert torch.isnan(table.pass_rates()).all()  # recorded counts are pending until merged
    table.all_reduce_()  # no process group: folds the pending counts
    assert table.correct.tolist() == [3, 0, 8, 0, 0, 0] and table.trials.tolist() == [8, 0, 8, 0, 0, 0]
    assert table.correct.dtype == table.trials.dtype == torch.float64
    rates = table.pass_rates()
    assert rates[0] == 3 / 8 and rates[2] == 1.0
    assert torch.isnan(rates[[1, 3, 4, 5]]).all()  # untried
    assert not table.pending_trials.any() and not table.pending_correct.any()
    table.record(torch.tensor([1]), torch.tensor([0]), torch.tensor([4]))  # tensors too
    table.all_reduce_()
    table.all_reduce_()  # nothing new: nothing added
    assert table.trials.tolist() == [8, 4, 8, 0, 0, 0] and table.pass_rates()[1] == 0.0


def test_record_refuses_inconsistent_counts():
    table = CompetenceTable(IDS)
    with pytest.raises(ValueError, match="as many counts"):
        table.record([0, 1], [1], [2, 2])
    with pytest.raises(ValueError, match="correct <= trials"):
        table.record([0], [3], [2])
    with pytest.raises(IndexError):
        table.record([6], [0], [1])
    with pytest.raises(KeyError, match="nope"):
        table.index("nope")
    assert not table.pending_trials.any()


def test_reset_forgets_merged_and_pending_counts():
    table = merged(indices=[0], correct=[1], trials=[2])
    table.record([1], [1], [1])
    table.reset_()
    table.all_reduce_()
    assert not table.trials.any() and not table.correct.any() and torch.isnan(table.pass_rates()).all()


def test_state_dict_round_trip_through_json():
    table = merged(indices=[0, 3], correct=[2, 0.5], trials=[8, 1])
    state = json.loads(json.dumps(table.state_dict()))
    assert state == {"ids": IDS, "correct": [2, 0, 0, 0.5, 0, 0], "trials": [8, 0, 0, 1, 0, 0]}
    assert isinstance(state["correct"][0], int)
    restored = CompetenceTable(IDS)
    restored.record([5], [1], [1])  # pending counts are replaced too
    restored.load_state_dict(state)
    restored.all_reduce_()
    assert torch.equal(restored.correct, table.correct) and torch.equal(restored.trials, table.trials)
    assert restored.digest() == table.digest()


def test_state_dict_refuses_unmerged_counts():
    table = CompetenceTable(IDS)
    table.record([0], [1], [1])
    with pytest.raises(RuntimeError, match="all_reduce_"):
        table.state_dict()


@pytest.mark.parametrize("saved_ids, expected", [
    (["p0", "p1", "p2", "p3", "p4", "q9"], ["1 of this run's 6 ids are not in it (e.g. 'p5')",
                                            "1 of its 6 ids are not in this run (e.g. 'q9')"]),
    (["p0", "p1", "p2"], ["3 of this run's 6 ids are not in it (e.g. 'p3')"]),
    (["p1", "p0", "p2", "p3", "p4", "p5"],
     ["2 ids are in another order (e.g. position 0 holds 'p1' there, 'p0' here)"]),
])
def test_load_state_dict_refuses_other_problems(saved_ids, expected):
    state = merged(ids=saved_ids).state_dict()
    table = CompetenceTable(IDS)
    with pytest.raises(UserError) as error:
        table.load_state_dict(state)
    message = str(error.value)
    assert "\n" not in message and "train.resume=never" in message
    for fragment in expected:
        assert fragment in message


def test_digest_changes_with_counts_and_ids():
    empty = CompetenceTable(IDS).digest()
    assert len(empty) == 16 and empty == CompetenceTable(IDS).digest()
    one = merged(indices=[0], correct=[1], trials=[2]).digest()
    assert one != empty
    assert merged(indices=[0], correct=[2], trials=[2]).digest() != one  # correct alone
    assert merged(indices=[0], correct=[1], trials=[3]).digest() != one  # trials alone
    assert merged(indices=[1], correct=[1], trials=[2]).digest() != one  # which problem
    assert CompetenceTable(IDS[::-1]).digest() != empty


def test_jsonl_round_trip_is_exact(tmp_path):
    table = merged(indices=[0, 1, 2, 4], correct=[0, 3, 8, 1 / 3], trials=[8, 8, 8, 1])
    weights = torch.tensor([0.0, 0.234375, 0.0, 2 / 9, math.nan, math.nan], dtype=torch.float64)
    path = table.write_jsonl(tmp_path / "out" / "competence.jsonl", weights)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in rows] == IDS
    assert rows[1] == {"id": "p1", "correct": 3, "trials": 8, "pass_rate": 0.375, "weight": 0.234375}
    assert isinstance(rows[0]["correct"], int) and isinstance(rows[0]["trials"], int)
    assert rows[3] == {"id": "p3", "correct": 0, "trials": 0, "pass_rate": None, "weight": 2 / 9}
    assert rows[4]["correct"] == 1 / 3 and rows[4]["weight"] is None  # NaN weight -> null
    read = CompetenceTable.read_jsonl(path, IDS)
    assert torch.equal(read.correct, table.correct) and torch.equal(read.trials, table.trials)
    assert read.digest() == table.digest() and read.unmatched == 0
    assert torch.equal(read.pass_rates().nan_to_num(-1), table.pass_rates().nan_to_num(-1))
    unweighted = table.write_jsonl(path)  # replaces the file
    assert all(json.loads(line)["weight"] is None for line in unweighted.read_text().splitlines())
    assert sorted(os.listdir(path.parent)) == ["competence.jsonl"]  # no temporary file left


def test_write_jsonl_is_atomic(tmp_path, monkeypatch):
    path = merged(indices=[0], correct=[1], trials=[1]).write_jsonl(tmp_path / "competence.jsonl")
    before = path.read_text()

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        merged(indices=[1], correct=[1], trials=[2]).write_jsonl(path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["competence.jsonl"]


def test_read_jsonl_accepts_pass_rates_and_numeric_ids(tmp_path):
    path = write_lines(tmp_path / "rates.jsonl", [
        {"id": "p0", "pass_rate": 0.25, "trials": 8},
        "",  # blank lines are skipped
        {"id": "p1", "pass_rate": None, "trials": 0},
        {"id": "p2", "correct": 2, "trials": 4, "pass_rate": 0.5, "weight": 0.25, "extra": "ignored"},
        {"id": 7, "correct": 1, "trials": 2},
    ])
    table = CompetenceTable.read_jsonl(path, IDS + ["7"])
    assert table.correct.tolist() == [2, 0, 2, 0, 0, 0, 1] and table.trials.tolist() == [8, 0, 4, 0, 0, 0, 2]


def test_read_jsonl_counts_unmatched_ids_and_leaves_missing_ones_untried(tmp_path, capsys):
    path = write_lines(tmp_path / "c.jsonl", [
        {"id": "p0", "correct": 1, "trials": 2},
        {"id": "other-1", "correct": 1, "trials": 2},
        {"id": "other-2", "correct": 0, "trials": 2},
    ])
    table = CompetenceTable.read_jsonl(path, IDS)
    assert table.unmatched == 2
    assert table.trials.tolist() == [2, 0, 0, 0, 0, 0]
    assert "2 of its 3 ids are not problems of this run (e.g. 'other-1')" in capsys.readouterr().out


def test_read_jsonl_refuses_a_file_for_other_problems(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"id": "q1", "correct": 1, "trials": 2}])
    with pytest.raises(UserError, match=r"none of its 1 ids is a problem of this run \(e.g. 'q1'\)"):
        CompetenceTable.read_jsonl(path, IDS)
    with pytest.raises(UserError, match="no such competence file"):
        CompetenceTable.read_jsonl(tmp_path / "missing.jsonl", IDS)


GOOD = {"id": "p0", "correct": 1, "trials": 2}


@pytest.mark.parametrize("bad_line, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"correct": 1, "trials": 2}, "missing field 'id'"),
    ({"id": None, "correct": 1, "trials": 2}, "field 'id' must be a string"),
    ({"id": "p1", "correct": 1}, "missing field 'trials'"),
    ({"id": "p1", "pass_rate": 0.5}, "missing field 'trials'"),
    ({"id": "p1", "trials": 2}, "missing field 'correct' (or 'pass_rate')"),
    ({"id": "p1", "correct": "1", "trials": 2}, "field 'correct' must be a number, got '1'"),
    ({"id": "p1", "correct": 1, "trials": True}, "field 'trials' must be a number"),
    ({"id": "p1", "correct": -1, "trials": 2}, "field 'correct' must not be negative"),
    ({"id": "p1", "correct": 0, "trials": -2}, "field 'trials' must not be negative"),
    ({"id": "p1", "correct": 3, "trials": 2}, "'correct' (3) is more than 'trials' (2)"),
    ({"id": "p1", "pass_rate": 1.5, "trials": 2}, "field 'pass_rate' must be a number in [0, 1]"),
    ({"id": "p1", "pass_rate": None, "trials": 2}, "field 'pass_rate' must be a number in [0, 1]"),
    (GOOD, "duplicate id 'p0' (first at line 1)"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, fragment):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, "", bad_line])
    with pytest.raises(UserError) as error:
        CompetenceTable.read_jsonl(path, IDS)
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and fragment in message and "\n" not in message


def test_level_pass_rates_average_estimated_problems_per_level():
    table = merged(indices=[0, 1, 2, 3], correct=[1, 0, 3, 4], trials=[2, 2, 4, 4])
    levels = ["L1", "L1", "L2", "L2", "L1", "L3"]  # p4 untried (L1), p5 untried (only L3)
    assert level_pass_rates(table, levels) == {"L1": 0.25, "L2": 0.875}
    with pytest.raises(ValueError):
        level_pass_rates(table, levels[:2])


# The all-reduce merge on 2 CPU ranks (gloo, no launcher). Rank r's records per round:
# (indices, correct, trials); p2 is recorded by both ranks, p0 twice by rank 0.
ROUNDS = [
    {0: ([0, 1, 2, 0], [1, 2, 3, 1], [4, 4, 4, 4]), 1: ([2, 3], [1, 0], [4, 4])},
    {0: ([4], [2], [8]), 1: ([2, 5], [1, 8], [8, 8])},
]
EXPECTED = [  # (correct, trials) on every rank after each round's merge
    ([2, 2, 4, 0, 0, 0], [8, 4, 8, 4, 0, 0]),
    ([2, 2, 5, 0, 2, 8], [8, 4, 16, 4, 8, 8]),
]


def merge_on_rank(rank: int, tmp_dir: str) -> None:
    """One rank of the 2-rank merge test (module level, so spawned children can import it)."""
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    # deepspeed before the process group, as dist.init() does: imported after it (by
    # all_reduce_sum), gloo's teardown aborts the process at exit one time in three.
    import deepspeed  # noqa: F401

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/store", rank=rank, world_size=2)
    try:
        table = CompetenceTable(IDS)
        after_rounds = []
        for records in ROUNDS:
            table.record(*records[rank])
            table.all_reduce_()
            after_rounds.append(table.state_dict())
        table.all_reduce_()  # nothing pending anywhere: the totals stay
        result = {"rounds": after_rounds, "final": table.state_dict(), "digest": table.digest()}
        with open(f"{tmp_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        torch_dist.destroy_process_group()


def test_all_reduce_merges_two_ranks_without_double_counting(tmp_path):
    context = torch_mp.start_processes(merge_on_rank, args=(str(tmp_path),), nprocs=2, join=False,
                                       start_method="spawn")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank merge did not finish within 60 s")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # every rank holds the same table
    for state, (correct, trials) in zip(results[0]["rounds"], EXPECTED):
        assert state == {"ids": IDS, "correct": correct, "trials": trials}
    assert results[0]["final"] == results[0]["rounds"][-1]
    assert results[0]["digest"] == merged(indices=[0, 1, 2, 3, 4, 5], correct=EXPECTED[-1][0],
                                          trials=EXPECTED[-1][1]).digest()
