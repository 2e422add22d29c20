"""Problem sources and the stored teacher responses a run reuses."""

from __future__ import annotations

from paced_ds.config import DataConfig
from paced_ds.data import sources


def test_arith_sources_carry_no_response_and_are_limited_per_level():
    cfg = DataConfig(arith_train_per_level=5, arith_eval_per_level=3)
    train, held_out = sources.load_train(cfg), sources.load_eval(cfg)
    assert len(train) == 15 and len(held_out) == 9
    assert all("response" not in r for r in train)  # the teacher writes them
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held_out)
    limited = sources.limit_per_level(held_out, 2)
    assert sorted(r["difficulty"] for r in limited) == ["L1", "L1", "L2", "L2", "L3", "L3"]


def test_validation_and_retention_sources_are_their_own_splits():
    import pytest

    from paced_ds.errors import UserError

    cfg = DataConfig(arith_train_per_level=5, arith_eval_per_level=3, arith_retain_per_level=4,
                     eval="arith:val", retain="arith:retain")
    train, val, retain = sources.load_train(cfg), sources.load_eval(cfg), sources.load_retain(cfg)
    assert (len(val), len(retain)) == (9, 12)
    held_out = sources.load_eval(DataConfig(arith_eval_per_level=3))
    ids = [{r["id"] for r in part} for part in (train, val, retain, held_out)]
    assert all(ids[i].isdisjoint(ids[j]) for i in range(4) for j in range(i + 1, 4))
    assert all("-val-" in i for i in ids[1]) and all("-retain-" in i for i in ids[2])
    assert sources.load_retain(DataConfig()) == []  # off unless asked for
    with pytest.raises(UserError, match="unknown generated source 'arith:test': use arith:train, arith:val"):
        sources.load_eval(DataConfig(eval="arith:test"))


def test_teacher_identity_follows_the_weights(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "model.safetensors").write_bytes(b"weights-1")
    first = sources.teacher_identity(str(teacher))
    assert first == sources.teacher_identity(str(teacher))
    (teacher / "model.safetensors").write_bytes(b"weights-2")
    assert sources.teacher_identity(str(teacher)) != first
    assert sources.teacher_identity("org/hub-model") == "org/hub-model"


def test_stored_responses_are_reused_only_for_the_same_problems_and_teacher(tmp_path):
    cfg = DataConfig(arith_train_per_level=2, responses_dir=str(tmp_path))
    records = sources.load_train(cfg)
    rows = [{"id": r["id"], "response": f"rev 0 = {r['answer']}", "correct": i != 0} for i, r in enumerate(records)]
    assert sources.with_stored_responses(records, cfg, "teacher@1") is None  # nothing stored yet
    sources.store_responses(records, rows, cfg, "teacher@1")
    attached, dropped = sources.with_stored_responses(records, cfg, "teacher@1")
    assert dropped == 1 and len(attached) == len(records) - 1
    assert all(r["response"].endswith(r["answer"]) for r in attached)
    assert sources.with_stored_responses(records, cfg, "teacher@2") is None  # another teacher
    # Same file, other problems (the data changed): stale, so regenerated rather than misapplied.
    assert sources.with_stored_responses(records[1:], cfg, "teacher@1") is None
