"""Checkpoints are read without arbitrary unpickling: a planted payload is refused, never run."""

from __future__ import annotations

import os

import pytest
import torch

from paced_ds.errors import UserError
from paced_ds.runtime.checkpoint import verify_safe


class Payload:
    """What an attacker pickles: unpickling it would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_tensors_and_deepspeeds_own_classes_are_accepted(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"module": {"w": torch.ones(3)}, "step": 4, "ds_config": {"zero": 3}},
               tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"zero_stage": ZeroStageEnum(3), "state": [torch.zeros(2)]},
               tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    verify_safe(tmp_path)


def test_a_pickled_payload_in_a_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(3)}}, tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"client_state": Payload(str(marker))}, tmp_path / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt: refusing to load"):
        verify_safe(tmp_path)
    assert not marker.exists()


def test_competence_files_are_parsed_as_json_never_evaluated(tmp_path):
    """The other files a run reads back are JSON lines, parsed, never evaluated: a line that is a
    Python expression running a command (valid Python, not JSON) is refused, naming the file and
    line, and the command never runs; an ``eval``-based reader would run it and accept the row."""
    from paced_ds.curriculum.competence import CompetenceTable

    marker = tmp_path / "pwned"
    path = tmp_path / "competence.jsonl"
    path.write_text('{"id": "a", "correct": 1, "trials": 2}\n'
                    f'{{"id": "b", "correct": __import__("os").system("touch {marker}") + 1, "trials": 2}}\n')
    with pytest.raises(UserError, match=r"competence\.jsonl:2: not valid JSON"):
        CompetenceTable.read_jsonl(path, ["a", "b"])
    assert not marker.exists()
    path.write_text('{"id": "a", "correct": 1, "trials": 2}\n')  # and a JSON row is read as it stands
    table = CompetenceTable.read_jsonl(path, ["a"])
    assert table.correct.tolist() == [1.0] and table.trials.tolist() == [2.0]
