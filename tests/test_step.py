"""One optimizer step in this process, on a real ZeRO-3 engine (a world of one): its
normalisation, accumulation, weights, teacher grouping, zero-weight and non-finite rules,
against the gradient computed directly from the formula with plain torch."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from paced_ds.config import load_config
from paced_ds.data import arith
from paced_ds.distill.inputs import tokenize_problems
from paced_ds.distill.losses import forward_kl
from paced_ds.distill.step import optimizer_step
from paced_ds.distill.teachers import EngineTeacher
from paced_ds.models import engines
from paced_ds.models.generation import plain_copy
from paced_ds.runtime import dist
from paced_ds.runtime.faults import NONE, Faults, parse

from launch import REPO

ASSETS = REPO / "paced_ds" / "assets"
LR = 0.5
WEIGHTS = torch.tensor([0.0, 0.5, 1.0, 2.5])  # one problem weighs nothing; the others differ


@pytest.fixture(scope="module")
def world_of_one():
    """A process group of this one process (gloo), removed afterwards with its environment."""
    saved = dict(os.environ)
    dist.init(60)
    yield
    dist.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def setup(world_of_one, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step")
    ds_json = json.loads((REPO / "ds_configs" / "student_zero3.json").read_text())
    ds_json["optimizer"] = {"type": "SGD", "params": {}}  # an update proportional to the gradient
    ds_json["zero_allow_untested_optimizer"] = True
    (tmp / "sgd.json").write_text(json.dumps(ds_json))
    cfg = load_config(REPO / "ds_configs" / "recipes" / "tiny_arith.yaml",
                      [f"train.ds_config={tmp / 'sgd.json'}", f"train.lr={LR}", "train.warmup_steps=0",
                       "train.decay=constant", "train.clip_grad=0", "model.dtype=fp32",
                       "curriculum.normalize=dataset_mean"])
    tokenizer = engines.load_tokenizer(cfg)
    records = arith.dataset("train", 2)[:4]  # responses of different lengths
    examples = tokenize_problems(cfg.data, tokenizer, records)
    teacher_model = engines._from_pretrained(str(ASSETS / "tiny-teacher"), {}, torch.float32, False, "model.teacher")
    vocab = len(tokenizer)
    teacher = EngineTeacher(SimpleNamespace(module=teacher_model.eval()), vocab)
    return SimpleNamespace(cfg=cfg, tokenizer=tokenizer, examples=examples, teacher=teacher, vocab=vocab,
                           teacher_model=teacher_model)


def full_state(engine) -> dict:
    return {name: t.detach().clone() for name, t in plain_copy(engine).state_dict().items()}


def run_step(setup, micro_batch: int, accumulation: int, weights=WEIGHTS, forward_micro_batches: int = 0,
             faults=NONE, **extra):
    cfg = setup.cfg
    cfg.train.micro_batch_size, cfg.train.grad_accum = micro_batch, accumulation
    cfg.teacher.forward_micro_batches = forward_micro_batches
    for key, value in extra.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    student, _ = engines.build_student(cfg)
    before = full_state(student)
    outcome = optimizer_step(cfg, student, setup.teacher, setup.examples, list(range(4)), weights, kind="forward_kl",
                             vocab=setup.vocab, pad_id=setup.tokenizer.pad_token_id, number=1, faults=faults)
    after = full_state(student)
    return outcome, {name: after[name] - before[name] for name in before}, before


def expected_update(setup, weights) -> tuple[dict, float]:
    """-lr x the gradient of sum_i w_i sum_t FKL_it / (all response tokens), plain torch, and the loss."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-student", dtype=torch.float32)
    total_tokens = sum(len(e["input_ids"]) - e["response_start"] for e in setup.examples)
    loss = 0.0
    for example, weight in zip(setup.examples, weights):
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            teacher_logits = setup.teacher_model(input_ids=ids).logits[0, :, :setup.vocab]
        student_logits = student(input_ids=ids).logits[0, :, :setup.vocab]
        # position t predicts token t + 1: the response tokens are predicted from response_start - 1 on
        rows = slice(example["response_start"] - 1, len(example["input_ids"]) - 1)
        loss = loss + weight * forward_kl(student_logits[rows], teacher_logits[rows]).sum()
    loss = loss / total_tokens
    loss.backward()
    return {name: -LR * p.grad for name, p in student.named_parameters()}, loss.item()


def assert_updates_equal(got: dict, want: dict):
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-7, msg=name)


def test_one_global_token_count_whatever_the_accumulation(setup):
    """1 x 4 = 2 x 2 = 4 x 1, and each equals the update from the formula: the weights are
    applied once and the loss divided once, by the step's response tokens."""
    want, want_loss = expected_update(setup, WEIGHTS)
    for micro_batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        outcome, delta, _ = run_step(setup, micro_batch, accumulation)
        assert outcome.status == "applied", (micro_batch, accumulation)
        assert outcome.tokens == sum(len(e["input_ids"]) - e["response_start"] for e in setup.examples)
        # compute: the student trains on whole sequences, the teacher scores the same tokens
        assert outcome.student_tokens == outcome.teacher_tokens == sum(len(e["input_ids"]) for e in setup.examples)
        assert outcome.loss == pytest.approx(want_loss, rel=1e-5)
        assert_updates_equal(delta, want)


def test_teacher_requests_grouping_changes_nothing(setup):
    want, _ = expected_update(setup, WEIGHTS)
    for group in (1, 2, 4):  # one teacher forward per 1, 2 or 4 micro-batches
        outcome, delta, _ = run_step(setup, 1, 4, forward_micro_batches=group)
        assert outcome.status == "applied"
        assert_updates_equal(delta, want)


def test_batch_mean_rescales_the_weights_to_average_one(setup):
    want, _ = expected_update(setup, WEIGHTS / WEIGHTS.mean())
    outcome, delta, _ = run_step(setup, 2, 2, curriculum__normalize="batch_mean")
    assert outcome.weight_mean == pytest.approx(1.0)
    assert_updates_equal(delta, want)
    setup.cfg.curriculum.normalize = "dataset_mean"


@pytest.mark.parametrize("normalize", ["dataset_mean", "batch_mean"])
def test_a_step_whose_weights_are_all_zero_does_nothing(setup, normalize):
    """Skipped before any teacher call; under batch_mean, never a 0/0 scale."""
    calls = []
    teacher = setup.teacher

    class Counting(EngineTeacher):
        def answers(self, requests):
            calls.append(len(requests))
            return super().answers(requests)

    setup.teacher = Counting(teacher.engine, teacher.vocab)
    try:
        outcome, delta, _ = run_step(setup, 2, 2, weights=torch.zeros(4), curriculum__normalize=normalize)
    finally:
        setup.teacher = teacher
        setup.cfg.curriculum.normalize = "dataset_mean"
    assert outcome.status == "zero_weight" and calls == []
    assert all(not d.any() for d in delta.values())


def test_a_non_finite_loss_skips_the_update_and_names_the_rank(setup):
    outcome, delta, _ = run_step(setup, 2, 2, faults=Faults(parse("nan:step=1"), rank=0))
    assert outcome.status == "nonfinite" and outcome.nonfinite_ranks == [0] and not outcome.applied_anyway
    assert all(not d.any() for d in delta.values())


def test_plain_copy_is_the_student_and_generates_as_its_shards(setup):
    """The gathered copy (filled one parameter at a time) holds the student's exact weights and
    buffers, keeps the embedding tied, and greedy evaluation from it (unsynced) gives what
    the ZeRO-3 shards give (synced)."""
    from transformers import AutoModelForCausalLM

    from paced_ds.models import generation

    cfg = setup.cfg
    student, _ = engines.build_student(cfg)
    reference = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-student", dtype=torch.float32)
    copy = plain_copy(student)
    assert copy.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(copy.named_buffers())[name], buffer), name
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()

    records = arith.dataset("eval", 6)
    from_copy = generation.evaluate(generation.HFGenerator(copy, setup.tokenizer, synced=False), setup.tokenizer,
                                    records, cfg.data, cfg.eval)
    from_shards = generation.evaluate(generation.HFGenerator(student.module, setup.tokenizer, synced=True),
                                      setup.tokenizer, records, cfg.data, cfg.eval)
    assert from_copy == from_shards and from_copy["count"] == len(records)
    assert generation.generating_model(student, gather=False) == (student.module, True)


def test_a_copy_that_does_not_fit_falls_back_to_the_shards(setup, monkeypatch, capsys):
    from paced_ds.models import generation

    student, _ = engines.build_student(setup.cfg)
    need = sum(p.ds_numel * p.element_size() for p in student.module.parameters())
    assert generation.free_bytes() > need  # this machine's own reading
    monkeypatch.setattr(generation, "free_bytes", lambda: int(need / generation.COPY_FIT_SHARE) + 1)
    assert generation.copy_fits(student)
    assert generation.generating_model(student, gather=True)[1] is False
    monkeypatch.setattr(generation, "free_bytes", lambda: int(need / generation.COPY_FIT_SHARE) - 1)
    assert generation.generating_model(student, gather=True) == (student.module, True)
    assert "does not fit" in capsys.readouterr().out


def test_frozen_embeddings_stay_and_the_rest_learns(setup):
    """model.freeze_embeddings: the step leaves the (tied) embedding exactly as it was and moves
    the other weights."""
    setup.cfg.model.freeze_embeddings = True
    try:
        outcome, delta, before = run_step(setup, micro_batch=2, accumulation=2)
    finally:
        setup.cfg.model.freeze_embeddings = False
    assert outcome.loss > 0
    assert not delta["model.embed_tokens.weight"].any()
    moved = [name for name, change in delta.items() if change.abs().max() > 0]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.norm.weight" in moved


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "whole_logits"])
def test_every_parameter_partitioned_fused_or_not(setup, tmp_path, fused):
    """With no parameter kept whole (stage3_param_persistence_threshold 0), ZeRO-3 gathers the
    tied output layer for the fused loss through its own hooks, in forward and backward: the
    update is still the formula's, fused (loss.fused, the default) or from whole logits."""
    ds_json = json.loads(open(setup.cfg.train.ds_config).read())
    ds_json["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "partitioned.json").write_text(json.dumps(ds_json))
    saved = setup.cfg.train.ds_config
    setup.cfg.train.ds_config = str(tmp_path / "partitioned.json")
    try:
        want, want_loss = expected_update(setup, WEIGHTS)
        outcome, delta, _ = run_step(setup, 2, 2, loss__fused=fused)
    finally:
        setup.cfg.train.ds_config, setup.cfg.loss.fused = saved, True
    assert outcome.loss == pytest.approx(want_loss, rel=1e-5)
    assert_updates_equal(delta, want)


def test_a_partitioned_teacher_engine_answers_from_its_hidden_states(setup, tmp_path):
    """A ZeRO-3 teacher with every parameter partitioned: its dense answer (hidden states and a
    copy of the gathered output weight) and its top-k answer are those of its whole logits."""
    from paced_ds.data.collate import collate_train
    from paced_ds.distill.answers import compress

    ds_json = json.loads((REPO / "ds_configs" / "teacher_zero3.json").read_text())
    ds_json["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "teacher.json").write_text(json.dumps(ds_json))
    saved = setup.cfg.teacher.ds_config
    setup.cfg.teacher.ds_config = str(tmp_path / "teacher.json")
    try:
        engine = engines.build_teacher(setup.cfg, name=str(ASSETS / "tiny-teacher"))
    finally:
        setup.cfg.teacher.ds_config = saved
    assert engine.module.lm_head.weight.numel() == 0  # partitioned between forwards
    batch = collate_train(setup.examples, setup.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = setup.teacher_model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits[..., :setup.vocab]
    dense = EngineTeacher(engine, setup.vocab).answer(batch)
    torch.testing.assert_close(torch.nn.functional.linear(dense.hidden, dense.weight), logits[batch["loss_mask"]],
                               rtol=1e-5, atol=1e-5)
    sparse = EngineTeacher(engine, setup.vocab, topk=5).answer(batch)
    want = compress(logits, batch["loss_mask"], 5)
    assert torch.equal(sparse.ids, want.ids)
    torch.testing.assert_close(sparse.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


def test_tiled_mlps_under_zero3_are_the_formula(setup):
    """model.tiled_mlp on the ZeRO-3 student (DeepSpeed's TiledMLP, its weights gathered by
    ZeRO-3 a slice at a time): the update is the formula's."""
    want, want_loss = expected_update(setup, WEIGHTS)
    try:
        outcome, delta, _ = run_step(setup, 2, 2, model__tiled_mlp=True)
    finally:
        setup.cfg.model.tiled_mlp = False
    assert outcome.loss == pytest.approx(want_loss, rel=1e-5)
    assert_updates_equal(delta, want)
