"""The retention set and the forgetting it measures (paced_ds.distill.retention), in one process."""

from __future__ import annotations

import json
import os

import pytest
import torch

from paced_ds.config import DataConfig, EvalConfig
from paced_ds.data import arith
from paced_ds.distill.retention import Retention
from paced_ds.models.generation import HFGenerator
from paced_ds.runtime.tracking import Tracker
from paced_ds.verify import is_correct

os.environ.setdefault("DS_ACCELERATOR", "cpu")
DATA, EVAL = DataConfig(), EvalConfig(max_new_tokens=16, batch_size=64)


@pytest.fixture(scope="module")
def student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = "paced_ds/assets/tiny-student"
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def solved_ids(model, tokenizer, records) -> set[str]:
    """Greedy answers checked one prompt at a time: an independent reading of what is solved."""
    solved = set()
    for record in records:
        ids = tokenizer(record["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if is_correct(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), record["answer"]):
            solved.add(record["id"])
    return solved


def damaged(model, scale: float):
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for param in copy.parameters():
            param.add_(scale * param.std() * torch.randn_like(param))
    return copy.eval()


def test_the_set_is_what_the_student_solves_first_and_forgetting_is_measured_on_it(student, tmp_path):
    model, tokenizer = student
    records = arith.dataset("retain", 10, seed=0)
    retention = Retention(records, tmp_path)
    first = retention.measure(HFGenerator(model, tokenizer, synced=False), tokenizer, DATA, EVAL)
    expected = solved_ids(model, tokenizer, records)
    assert 0 < len(expected) < len(records)  # the shipped student solves some, not all
    tokens = first.pop("retention_tokens"), first.pop("retention_generated_tokens")
    assert first == {"retention_set": len(expected), "retained": 1.0, "forgotten": 0.0}
    assert tokens[0] > tokens[1] > 0  # its compute: every prompt, and what it generated
    saved = json.loads((tmp_path / "retention.json").read_text())
    assert saved == {"offered": len(records), "ids": [r["id"] for r in records if r["id"] in expected]}

    # The same student forgets nothing; a damaged one forgets what it no longer solves.
    assert retention.measure(HFGenerator(model, tokenizer, synced=False), tokenizer, DATA, EVAL)["forgotten"] == 0.0
    worse = damaged(model, 0.5)
    kept = solved_ids(worse, tokenizer, [r for r in records if r["id"] in expected])
    later = retention.measure(HFGenerator(worse, tokenizer, synced=False), tokenizer, DATA, EVAL)
    assert later["retention_set"] == len(expected)
    assert later["forgotten"] == pytest.approx(1 - len(kept) / len(expected))
    assert later["forgotten"] > 0  # the damage was large enough to show
    assert later["retained"] == pytest.approx(1 - later["forgotten"])

    # A resumed run measures against the saved set, not against what it solves now.
    resumed = Retention(records, tmp_path)
    resumed.resume()
    assert resumed.measure(HFGenerator(worse, tokenizer, synced=False), tokenizer, DATA, EVAL) == later
    # A resumed run that saved no set measures none.
    (tmp_path / "retention.json").unlink()
    unsaved = Retention(records, tmp_path)
    unsaved.resume()
    assert unsaved.measure(HFGenerator(worse, tokenizer, synced=False), tokenizer, DATA, EVAL) == {}
    assert not (tmp_path / "retention.json").exists()


def test_no_retention_problems_no_fields(student, tmp_path):
    model, tokenizer = student
    retention = Retention([], tmp_path)
    assert not retention.active
    assert retention.measure(HFGenerator(model, tokenizer, synced=False), tokenizer, DATA, EVAL) == {}
    assert not (tmp_path / "retention.json").exists()


def test_eval_rows_carry_the_forgetting_fields(tmp_path):
    tracker = Tracker(tmp_path, tensorboard=False)
    tracker.log_eval(0, {"accuracy": 0.5, "by_difficulty": {"L1": 0.5}, "count": 2,
                         "retention_set": 4, "retained": 0.75, "forgotten": 0.25})
    tracker.log_eval(5, {"accuracy": 0.5, "by_difficulty": {"L1": 0.5}, "count": 2})
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows[0]["forgotten"] == 0.25 and rows[0]["retention_set"] == 4 and rows[0]["retained"] == 0.75
    assert "forgotten" not in rows[1]
