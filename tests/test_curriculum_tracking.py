"""What TensorBoard shows of the curriculum: per-level pass rates and weight shares at each
estimate, the picture of the frontier moving, and the charts that gather the per-level curves."""

from __future__ import annotations

import re

import pytest
import torch

from paced_ds.config import load_config
from paced_ds.curriculum.curriculum import Curriculum
from paced_ds.runtime.tracking import CHARTS

from launch import RECIPE

RECORDS = [{"id": f"p{i}", "prompt": "", "answer": "", "difficulty": level}
           for i, level in enumerate(["L1"] * 4 + ["L2"] * 4 + ["Level 10"] * 2)]


def curriculum_with(correct: list[int], trials: int = 4) -> Curriculum:
    curriculum = Curriculum(load_config(RECIPE), RECORDS)
    curriculum.table.correct = torch.tensor(correct, dtype=torch.float64)
    curriculum.table.trials = torch.full((len(correct),), float(trials), dtype=torch.float64)
    return curriculum


def test_each_level_s_share_of_the_weight_by_hand():
    curriculum = curriculum_with([4, 4, 2, 3, 1, 2, 0, 2, 0, 1])
    weights = curriculum.weights()
    # w = p(1 - p) at p = c/4: L1 0, 0, 1/4, 3/16; L2 3/16, 1/4, 0, 1/4; Level 10 0, 3/16
    raw = {"L1": 1 / 4 + 3 / 16, "L2": 3 / 16 + 1 / 4 + 1 / 4, "Level 10": 3 / 16}
    total = sum(raw.values())
    shares = curriculum.level_weight_shares(weights)
    assert shares == pytest.approx({level: value / total for level, value in raw.items()})
    summary = curriculum.summary(weights)
    assert summary["curriculum/weight_share_Level 10"] == pytest.approx(raw["Level 10"] / total)
    assert summary["curriculum/pass_rate_L1"] == pytest.approx((4 + 4 + 2 + 3) / 16)


def test_the_picture_follows_each_level_across_estimates():
    curriculum = curriculum_with([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    curriculum.record_estimate(0, curriculum.weights())
    curriculum.table.correct = torch.tensor([4, 4, 3, 4, 2, 2, 1, 2, 0, 1], dtype=torch.float64)
    curriculum.record_estimate(50, curriculum.weights())
    (first_step, _, first), (second_step, _, second) = curriculum.history
    assert (first_step, second_step) == (0, 50)
    assert first["L1"][0] == pytest.approx(3 / 16) and second["L1"][0] == pytest.approx(15 / 16)
    assert first["L2"][1] == 0.0 and second["L2"][1] > 0.5  # the frontier moved to L2
    picture = curriculum.picture()
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[1] > 2 * picture.shape[0]


@pytest.mark.parametrize("chart, tag, shown", [
    ("pass rate per level", "curriculum/pass_rate_L3", True),
    ("pass rate per level", "curriculum/pass_rate_Level 10", True),
    ("pass rate per level", "curriculum/pass_rate_mean", False),
    ("share of the weight per level", "curriculum/weight_share_L1", True),
    ("share of the weight per level", "curriculum/weight_share_p0", False),
    ("FLOPs by phase (cumulative)", "train/flops_teacher", True),
    ("FLOPs by phase (cumulative)", "train/flops_teacher_step", False),
])
def test_the_charts_gather_the_tags_they_name(chart, tag, shown):
    patterns = next(spec[1] for section in CHARTS.values() for name, spec in section.items() if name == chart)
    assert any(re.fullmatch(pattern, tag) for pattern in patterns) == shown
