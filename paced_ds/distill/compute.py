"""Compute accounting: the FLOPs of a run by phase, per step and cumulative.

The convention (Kaplan et al. 2020, and the MFU counts of nanoGPT and TRL): a token through
a model of N parameters costs 2N FLOPs forward and 4N backward. N is the model's matmul
weights: every linear layer, the output projection included (tied or not), and not the
embedding lookup, which multiplies nothing (``memory.Shape.matmul_params``). Attention's
score and value products (a forward costs about 4 x layers x width x the mean causal
context a token) are left out everywhere, the same way for every phase and method: about
2% more on the reference task's sequences of at most 48 tokens, about 16% more at 8k
tokens of a 7B model.

Phases (tokens are counted over every rank, padding excluded):

- ``student``: 6 N_S per token of every sequence the student trains on, prompt positions
  included, and of the gradient-SNR probe's forward and backward;
- ``teacher``: 2 N_T per token the teacher scores (the probe's too). Counted where it is
  used, whatever the placement: a top-k cache or a server spent the same forward elsewhere.
  The teacher's responses, generated once before training and stored for every run on the
  same data, are not counted;
- ``rollout``: 2 N_S per prompt or generated token of competence estimates and on-policy
  rollouts (decoding with a key/value cache runs each token through the model once);
- ``eval``: 2 N_S per prompt or generated token of held-out and retention evaluations.

``flops_total`` is their sum. A metrics.jsonl row carries each cumulative count
(``flops_student`` ...) and what was added since the previous row (``flops_student_step``
...: the step, and the work done between it and the previous logged step), so the cumulative
fields are the sums of the per-step ones.
"""

from __future__ import annotations

PHASES = {"student": 6, "teacher": 2, "rollout": 2, "eval": 2}  # FLOPs a token, per matmul parameter


class ComputeMeter:
    def __init__(self, student_params: int, teacher_params: int):
        self.params = {"student": student_params, "teacher": teacher_params, "rollout": student_params,
                       "eval": student_params}
        self.tokens = {phase: 0 for phase in PHASES}
        self.generated = 0  # of the rollout and eval tokens, those generated (the rest are prompts)
        self.logged = self.flops()  # the cumulative counts at the last metrics row

    def add(self, phase: str, tokens: int, generated: int = 0) -> None:
        """``tokens`` more of ``phase`` (global counts, alike on every rank)."""
        self.tokens[phase] += int(tokens)
        self.generated += int(generated)

    def flops(self) -> dict[str, float]:
        """The cumulative FLOPs of each phase and their total."""
        out = {f"flops_{phase}": float(PHASES[phase] * self.params[phase] * self.tokens[phase]) for phase in PHASES}
        out["flops_total"] = sum(out.values())
        return out

    def row(self) -> dict[str, float]:
        """The fields of a metrics row: cumulative, since the previous row, and token counts."""
        now = self.flops()
        out = dict(now)
        out.update({f"{key}_step": now[key] - self.logged[key] for key in now})
        out.update({f"tokens_{phase}": self.tokens[phase] for phase in PHASES})
        out["tokens_generated"] = self.generated
        self.logged = now
        return out

    def state_dict(self) -> dict:
        return {"tokens": dict(self.tokens), "generated": self.generated, "logged": dict(self.logged)}

    def load_state_dict(self, state: dict) -> None:
        self.tokens.update(state["tokens"])
        self.generated = state["generated"]
        self.logged = dict(state["logged"])


# ---- projection (paced-ds plan --config RECIPE) ---------------------------------------------

def project_run(cfg, student_params: int, teacher_params: int, *, ranks: int, problems: int, mean_tokens: int,
                zero_share: float) -> dict[str, float]:
    """The FLOPs of a recipe's run, by the same convention, before it runs.

    Every sequence (training, rollout) is taken to be ``mean_tokens`` long. A step trains
    ``ranks x train.micro_batch_size x train.grad_accum`` sequences; the competence estimate
    rolls out ``problems x curriculum.rollouts`` (an upper bound with the adaptive estimate),
    once, or once per ``curriculum.refresh_every`` steps with ``refresh=every``.
    ``zero_share``: the share of problems at w = 0, which a draw over every problem would
    have trained on at weight 0, and the support-only draw does not.
    """
    sequences = ranks * cfg.train.micro_batch_size * cfg.train.grad_accum
    student_step = PHASES["student"] * student_params * sequences * mean_tokens
    teacher_step = PHASES["teacher"] * teacher_params * sequences * mean_tokens
    estimates = 0
    if cfg.curriculum.mode != "uniform" and not cfg.curriculum.competence:
        estimates = 1
        if cfg.curriculum.refresh == "every" and cfg.curriculum.refresh_every:
            estimates += (cfg.train.steps - 1) // cfg.curriculum.refresh_every
    estimate = PHASES["rollout"] * student_params * problems * cfg.curriculum.rollouts * mean_tokens
    training = cfg.train.steps * (student_step + teacher_step)
    return {"sequences_per_step": sequences, "student_step": student_step, "teacher_step": teacher_step,
            "estimate": estimate, "estimates": estimates, "training": training,
            "run": training + estimates * estimate,
            "weight_zero_saved": zero_share * training if cfg.curriculum.mode != "uniform" else 0.0}
