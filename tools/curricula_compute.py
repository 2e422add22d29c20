"""The compute accounting of tools/compare_curricula.py: what a run's training compute is, and
how many steps give each method forward KL's compute. Pure functions of metrics and eval rows.

**Training compute** of a run, up to an evaluation, is what the run's own meter counted
(paced_ds/distill/compute.py, in every eval.jsonl row): ``flops_student`` (6 N_S a token
trained) + ``flops_teacher`` (2 N_T a token scored) + ``flops_rollout`` (2 N_S a token of
competence estimates and on-policy rollouts), plus, for a run that read its step-0 pass rates
from the seed's shared estimate (``curriculum.competence``) instead of rolling out itself, that
estimate's rollouts: 2 N_S x its ``forward_tokens``. Evaluations (held-out, retention) and the
gradient-SNR probes of the paced runs are measurement: not counted (the probe's forward and
backward are in flops_student and flops_teacher, and are taken out again, from snr.jsonl).
The step-0 evaluation is the base student, before any compute: 0.

**Step budgets.** Forward KL's run of S steps spends B. The pilot (a short run per method,
no evaluation) measures a method's cost: one competence estimate (the shared one it reads, or
its own rollouts before its first step) and its compute per off-policy and per on-policy step
(student, teacher, and an on-policy step's rollouts). A run of n steps plans its estimates (1,
and its refreshes: each taken to cost what the step-0 one did) plus its steps, off- and
on-policy as its schedule splits them; the method trains the most steps whose planned compute
is at most B, and is not run when even its fewest steps do not fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paced_ds.distill.compute import PHASES  # noqa: E402  (after the checkout is on the path)


def params_of_run(row: dict) -> dict[str, float]:
    """N_S and N_T as the run's meter counted them, from one metrics.jsonl row: its FLOPs over its
    tokens (the same ``memory.model_shape(...).flop_params``, without building the models again)."""
    student = row["flops_student"] / (PHASES["student"] * row["tokens_student"])
    teacher = row["flops_teacher"] / (PHASES["teacher"] * row["tokens_teacher"]) if row["tokens_teacher"] else 0.0
    return {"student": student, "teacher": teacher}


def estimate_flops(forward_tokens: int, params: dict[str, float]) -> float:
    """A competence estimate's compute: 2 N_S a rollout token (prompt and generated)."""
    return PHASES["rollout"] * params["student"] * forward_tokens


def probe_flops(snr_rows: list[dict], step: int, params: dict[str, float]) -> float:
    """The gradient-SNR probes made up to and including ``step``: a forward and backward of the
    student and a teacher forward per probed token, as the trainer counts them."""
    tokens = sum(row["forward_tokens"] for row in snr_rows if row["step"] <= step)
    return tokens * (PHASES["student"] * params["student"] + PHASES["teacher"] * params["teacher"])


def training_flops(evals: list[dict], snr_rows: list[dict], charged: float, params: dict[str, float]) -> list[float]:
    """The training compute at each evaluation of a run (module doc). ``charged``: the shared
    step-0 estimate's compute, for a run that read it, else 0."""
    out = []
    for row in evals:
        if row["step"] == 0:
            out.append(0.0)
            continue
        out.append(row["flops_student"] + row["flops_teacher"] + row["flops_rollout"] + charged
                   - probe_flops(snr_rows, row["step"], params))
    return out


def pilot_costs(metrics: list[dict], charged: float) -> dict[str, float]:
    """A method's cost from its pilot's metrics.jsonl (a row per step, no evaluation, no probe,
    no refresh): one competence ``estimate``, and the compute of an off-policy and of an
    on-policy step (student, teacher, and an on-policy step's own rollouts).

    Off-policy steps roll nothing out, so the rollouts of their rows are the run's own estimate
    (the step-0 one lands in step 1's row); ``charged``: the shared estimate the pilot read.
    """
    off = [row for row in metrics if not row.get("on_policy")]
    on = [row for row in metrics if row.get("on_policy")]

    def mean(rows: list[dict], phases: tuple[str, ...]) -> float:
        return sum(row[f"flops_{phase}_step"] for row in rows for phase in phases) / len(rows) if rows else 0.0

    return {"estimate": charged + sum(row["flops_rollout_step"] for row in off),
            "off_policy_step": mean(off, ("student", "teacher")),
            "on_policy_step": mean(on, ("student", "teacher", "rollout"))}


def planned_flops(cost: dict[str, float], shape: dict[str, int]) -> float:
    """The compute ``cost`` (``pilot_costs``) plans for a run of ``shape``: its ``steps``, the
    last ``on_policy_steps`` of them on-policy, and its competence ``estimates`` (0 for a run that
    weights nothing: its estimate costs 0)."""
    off_policy_steps = shape["steps"] - shape["on_policy_steps"]
    return (shape["estimates"] * cost["estimate"] + off_policy_steps * cost["off_policy_step"]
            + shape["on_policy_steps"] * cost["on_policy_step"])


def steps_within(budget: float, cost: dict[str, float], shape_of, least: int, most: int) -> int | None:
    """The most steps in [least, most] whose planned compute is at most ``budget``; None when none
    fits. ``shape_of(steps)``: the run of that many steps (``planned_flops``). Every length is
    tried: a refreshing run's estimates are whole, so its compute need not grow with its steps."""
    fitting = [steps for steps in range(least, most + 1) if planned_flops(cost, shape_of(steps)) <= budget]
    return max(fitting, default=None)
