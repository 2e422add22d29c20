"""The pipelined teacher: a teacher job on its own ranks answering the student job ahead of time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from paced_ds.distill import pipeline
from paced_ds.distill.answers import DenseAnswer, TopKAnswer, compress
from paced_ds.errors import UserError
from paced_ds.runtime.dist import free_port, parse_address

from launch import RECIPE, REPO, cpu_env, explain, paced_ds, read_jsonl, run, small_overrides

VOCAB = 11
TABLE = torch.randn(VOCAB + 3, VOCAB + 3, generator=torch.Generator().manual_seed(0))  # a fake model: a bigram table
CONTRACT = {"teacher": "bigram", "vocab": VOCAB, "topk": 0}


def bigram(input_ids, attention_mask):
    return TABLE[input_ids] * attention_mask[..., None]


def batch(seed: int, rows: int = 2, length: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.int64)
    mask[0, length - 2:] = 0  # a shorter row: right padding
    loss_mask = mask.bool() & (torch.arange(length) >= 3)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def in_threads(teacher_ranks: int, students: list, *, topk: int = 0, teacher_contract=None, timeout_s: int = 20):
    """Teacher ranks and student ranks as threads of this process, joined by a real bridge.
    ``students[s](client)`` runs on student rank s; returns {name: result or exception}."""
    address = f"127.0.0.1:{free_port()}"
    results: dict = {}

    def teacher(rank):
        try:
            bridge = pipeline.Bridge(address, side="teacher", rank=rank, ranks=teacher_ranks,
                                     contract=teacher_contract or {**CONTRACT, "topk": topk}, timeout_s=timeout_s)
            results[f"teacher{rank}"] = pipeline.serve(bridge, pipeline.logits_scorer(bigram), vocab=VOCAB, topk=topk)
        except Exception as err:  # reported to the test
            results[f"teacher{rank}"] = err

    def student(rank, body):
        try:
            bridge = pipeline.Bridge(address, side="student", rank=rank, ranks=len(students),
                                     contract={**CONTRACT, "topk": topk}, timeout_s=timeout_s)
            client = pipeline.StudentClient(bridge, vocab=VOCAB, topk=topk, timeout_s=timeout_s)
            results[f"student{rank}"] = body(client)
            client.close()
        except Exception as err:
            results[f"student{rank}"] = err

    threads = [threading.Thread(target=teacher, args=(r,)) for r in range(teacher_ranks)]
    threads[0].start()
    time.sleep(0.2)  # the store is up before the others knock
    threads += [threading.Thread(target=student, args=(s, body)) for s, body in enumerate(students)]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a bridge thread hung"
    return results


def test_answers_come_back_in_order_asked_ahead_or_now():
    def body(offset):
        def go(client):
            got = []
            first = [batch(offset + 0), batch(offset + 1)]
            assert not client.asked(first)
            answers = client.answers(first, reuse=False)  # nothing asked ahead: asked now
            ahead = [batch(offset + 2), batch(offset + 3)]
            client.ask(ahead)  # while step 1 is consumed
            got += [(b, next(answers)) for b in first]
            assert client.asked(ahead)
            # The plan changed: what was asked for step 2 is dropped and the new batches asked.
            changed = [batch(offset + 5), batch(offset + 6)]
            assert not client.asked(changed)
            got += list(zip(changed, client.answers(changed, reuse=False)))
            client.ask([batch(offset + 7)])
            got.append((batch(offset + 7), next(client.answers([batch(offset + 7)], reuse=True))))
            got.append((batch(offset + 8), next(client.answers([batch(offset + 8)], reuse=False))))  # synchronous
            client.ask([batch(offset + 9)])
            with pytest.raises(UserError, match="other batches than were sent ahead"):
                client.answers([batch(offset + 10)], reuse=True)
            return got

        return go

    results = in_threads(1, [body(0), body(100)])
    for s in range(2):
        got = results[f"student{s}"]
        assert not isinstance(got, Exception), got
        for sent, answer in got:
            assert isinstance(answer, DenseAnswer) and torch.equal(answer.mask, sent["loss_mask"])
            assert torch.equal(answer.logits, bigram(sent["input_ids"], sent["attention_mask"])[..., :VOCAB])
    # Each student asked 9 times (2 + 2 dropped + 2 + 1 + 1 + 1 dropped at close): 9 rounds of one forward.
    assert results["teacher0"]["requests"] == 18 and results["teacher0"]["forwards"] == 9


def test_top_k_answers_match_the_cache_form_and_two_teacher_ranks_share_the_students():
    k = 3

    def go(client):
        b = batch(7)
        return b, next(client.answers([b], reuse=False))

    results = in_threads(2, [go, go, go], topk=k)
    assert results["teacher0"]["requests"] == 2 and results["teacher1"]["requests"] == 1  # s mod T
    for s in range(3):
        sent, got = results[f"student{s}"]
        full = bigram(sent["input_ids"], sent["attention_mask"])[..., :VOCAB]
        expected = compress(full, sent["loss_mask"], k)  # what a cache stores, at temperature 1
        assert isinstance(got, TopKAnswer) and got.k == k and got.vocab == VOCAB
        for name in ("ids", "logprobs", "tail", "per_sample"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_a_teacher_for_another_run_is_refused_by_both_sides():
    results = in_threads(1, [lambda client: None], teacher_contract={**CONTRACT, "teacher": "another"})
    assert isinstance(results["student0"], UserError)
    assert "teacher: 'another' there, 'bigram' here" in str(results["student0"])
    assert isinstance(results["teacher0"], UserError) and "refused this teacher" in str(results["teacher0"])


def test_no_teacher_at_the_address_is_a_clear_error():
    with pytest.raises(UserError, match=r"teacher.address: no teacher job answered at 127.0.0.1:\d+ within 1 s"):
        pipeline.Bridge(f"127.0.0.1:{free_port()}", side="student", rank=0, ranks=1, contract=CONTRACT, timeout_s=1)
    with pytest.raises(UserError, match="expected HOST:PORT"):
        parse_address("node0")


@pytest.mark.distributed
def test_pipelined_teacher_trains_exactly_like_the_colocated_engine(tmp_path):
    common = small_overrides(tmp_path, **{"curriculum.rollouts": 2, "train.export": "false", "train.steps": 4})
    engine = paced_ds("train", "--config", RECIPE, "--nproc", 2, *common, f"train.output_dir={tmp_path / 'engine'}")
    assert engine.returncode == 0, explain(engine)
    piped = paced_ds("train", "--config", RECIPE, "--nproc", 2, *common, f"train.output_dir={tmp_path / 'piped'}",
                     "teacher.backend=pipelined", "teacher.ranks=1", "teacher.topk=0")
    assert piped.returncode == 0, explain(piped)
    assert "serving 2 student ranks" in piped.stdout and "teacher job done" in piped.stdout
    metrics = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("engine", "piped")}
    assert [m["step"] for m in metrics["piped"]] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics["piped"]] == pytest.approx([m["loss"] for m in metrics["engine"]], rel=1e-5)
    piped, engine = (tmp_path / name / "competence.jsonl" for name in ("piped", "engine"))
    assert piped.read_text() == engine.read_text()


@pytest.mark.distributed
def test_killing_the_teacher_stops_the_students_with_an_error_naming_it(tmp_path):
    common = small_overrides(tmp_path, **{"curriculum.mode": "uniform", "train.export": "false", "train.steps": 6,
                                          "train.timeout_s": 60})
    started = time.time()
    command = [sys.executable, "-m", "paced_ds.cli", "train", "--config", str(RECIPE), "--nproc", "2", *common,
               "teacher.backend=pipelined", "teacher.ranks=1"]
    result = run(command, env=cpu_env(PACED_DS_FAULT="kill:answers=3"))
    assert result.returncode != 0, explain(result)
    assert "teacher rank 0 (teacher job at 127.0.0.1:" in result.stderr, explain(result)
    assert "it stopped (connection closed)" in result.stderr
    assert "the teacher job failed" in result.stderr
    assert time.time() - started < 240
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.distributed
def test_teacher_serve_and_a_student_job_started_apart_meet_at_the_address(tmp_path):
    """The cluster form: `paced-ds teacher-serve` on its own, the students naming teacher.address;
    a self-distilling two-stage run, so the teacher also scores on-policy rollouts (asked when
    they exist, not ahead) under its privileged prompts."""
    common = small_overrides(tmp_path, **{"curriculum.mode": "uniform", "train.export": "false", "train.steps": 3,
                                          "teacher.topk": 8, "train.timeout_s": 120, "loss.schedule": "two_stage",
                                          "loss.switch_at": 2, "teacher.self_distill": "true"})
    address = f"teacher.address=127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "paced_ds.cli"]
    teacher = subprocess.Popen([*cli, "teacher-serve", "--config", str(RECIPE), "--nproc", "1", *common, address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=REPO)
    try:
        students = run([*cli, "train", "--config", str(RECIPE), "--nproc", "2", *common, address,
                        "teacher.backend=pipelined"])
        served = teacher.communicate(timeout=120)
    finally:
        teacher.kill()
    assert students.returncode == 0, explain(students)
    assert teacher.returncode == 0, served[1][-3000:]
    assert "serving 2 student ranks" in served[0] and "teacher job done: 6 requests" in served[0]
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(m["step"], m["on_policy"]) for m in metrics] == [(1, 0), (2, 0), (3, 1)]


def test_teacher_serve_needs_an_address_and_a_valid_one(tmp_path):
    missing = paced_ds("teacher-serve", "--config", RECIPE, *small_overrides(tmp_path))
    assert missing.returncode == 2 and "config key teacher.address: name the HOST:PORT" in missing.stderr
    malformed = paced_ds("train", "--config", RECIPE, *small_overrides(tmp_path), "teacher.backend=pipelined",
                         "teacher.address=node0")
    assert malformed.returncode == 2 and "teacher.address: expected HOST:PORT, got 'node0'" in malformed.stderr
    assert not (tmp_path / "run").exists()
