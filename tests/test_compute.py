"""Compute accounting (paced_ds.distill.compute): N from a model's config, FLOPs by phase
against a hand computation, per-row increments that add up to the cumulative counts."""

from __future__ import annotations

import pytest

from paced_ds.distill.compute import ComputeMeter
from paced_ds.distill.teachers import Privileged, Teacher, requests_for
from paced_ds.runtime.memory import model_shape

from launch import REPO

ASSETS = REPO / "paced_ds" / "assets"


def test_n_is_the_matmul_weights_of_the_config_counted_by_hand():
    # tiny-student: 4 Llama layers of width 96 (4 heads of 24, as many key/value heads), MLP 288,
    # vocabulary 300, output projection tied to the embedding.
    attention = 4 * 96 * 96  # q, k, v, o
    mlp = 3 * 96 * 288  # gate, up, down
    lm_head = 300 * 96  # counted: every token is multiplied by it, tied or not
    shape = model_shape(str(ASSETS / "tiny-student"))
    assert shape.matmul_params == 4 * (attention + mlp) + lm_head == 508_032
    # params counts the tied matrix once as the embedding, and the norms: not the same number
    assert shape.params != shape.matmul_params
    assert model_shape("7B").flop_params == 7_000_000_000  # a bare size: every parameter


def test_flops_by_phase_match_a_hand_computation():
    student_n, teacher_n = 1_000, 5_000
    meter = ComputeMeter(student_n, teacher_n)
    meter.add("rollout", 300, generated=200)  # a competence estimate: 100 prompt + 200 generated tokens
    meter.add("eval", 50, generated=20)
    meter.add("student", 120)  # a step: 120 tokens of sequences, prompts included
    meter.add("teacher", 120)
    first = meter.row()
    assert first["flops_rollout"] == 2 * 1_000 * 300
    assert first["flops_eval"] == 2 * 1_000 * 50
    assert first["flops_student"] == 6 * 1_000 * 120
    assert first["flops_teacher"] == 2 * 5_000 * 120
    assert first["flops_total"] == 600_000 + 100_000 + 720_000 + 1_200_000
    assert first["tokens_generated"] == 220
    meter.add("student", 80)
    meter.add("teacher", 90)  # a privileged teacher prompt is longer than the student's
    second = meter.row()
    assert second["flops_student_step"] == 6 * 1_000 * 80 and second["flops_teacher_step"] == 2 * 5_000 * 90
    assert second["flops_rollout_step"] == 0
    for key in ("flops_student", "flops_teacher", "flops_rollout", "flops_eval", "flops_total"):
        assert first[f"{key}_step"] + second[f"{key}_step"] == second[key]


def test_the_meter_resumes_where_it_stopped():
    meter = ComputeMeter(10, 20)
    meter.add("student", 7)
    meter.row()
    meter.add("teacher", 3)
    resumed = ComputeMeter(10, 20)
    resumed.load_state_dict(meter.state_dict())
    assert resumed.row() == meter.row()


@pytest.mark.parametrize("privileged", [False, True])
def test_the_teacher_scores_the_tokens_of_its_own_prompts(privileged):
    examples = [{"input_ids": [5, 6, 7, 8, 9], "response_start": 2}, {"input_ids": [5, 6, 7], "response_start": 1}]
    requests = requests_for(examples, [0, 1], per_request=2, pad_id=0)
    teacher = Teacher()
    if privileged:  # the teacher's prompts (the answer shown) are 4 and 6 tokens long
        teacher = Privileged(teacher, prompts=[[1] * 4, [1] * 6], pad_id=0)
        assert teacher.scored_tokens(requests) == (4 + 3) + (6 + 2)
        rewritten = teacher.rewrite(requests)
        assert Teacher().scored_tokens(rewritten) == teacher.scored_tokens(requests)
    else:
        assert teacher.scored_tokens(requests) == 5 + 3


def test_a_recipe_run_is_projected_by_the_same_convention():
    from paced_ds.config import load_config
    from paced_ds.distill.compute import project_run

    cfg = load_config(REPO / "ds_configs" / "recipes" / "tiny_arith.yaml",
                      ["train.steps=10", "train.micro_batch_size=4", "train.grad_accum=2", "curriculum.rollouts=8",
                       "curriculum.refresh=every", "curriculum.refresh_every=4"])
    flops = project_run(cfg, 100, 1_000, ranks=2, problems=50, mean_tokens=30, zero_share=0.5)
    sequences = 2 * 4 * 2
    assert flops["student_step"] == 6 * 100 * sequences * 30
    assert flops["teacher_step"] == 2 * 1_000 * sequences * 30
    assert flops["estimate"] == 2 * 100 * 50 * 8 * 30
    assert flops["estimates"] == 3  # before step 1, after steps 4 and 8
    assert flops["run"] == 10 * (flops["student_step"] + flops["teacher_step"]) + 3 * flops["estimate"]
    assert flops["weight_zero_saved"] == 0.5 * flops["training"]


def test_plan_prints_the_compute_of_a_recipe(capsys):
    from paced_ds import cli

    recipe = str(REPO / "ds_configs" / "recipes" / "llama70b_to_8b.yaml")
    cli.main(["plan", "--config", recipe, "--mean-tokens", "4096", "--zero-share", "0.5"])
    out = capsys.readouterr().out
    assert "a step of 64 sequences: student" in out and "competence estimate, 7500 x 8 rollouts" in out
    assert "a draw over every problem would have spent" in out
    assert cli.main(["plan", "--config", recipe, "--mfu", "1.5"]) == 2
    assert "--mfu 1.5: must be in (0, 1]" in capsys.readouterr().err
