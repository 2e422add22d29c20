"""On-policy distillation: the student's own rollouts as the sequences the loss scores.

Each on-policy step samples one response per problem from the current student, then the
teacher and the student are both run on it (reverse KL on y ~ pi_theta, PACED's second
stage). For self-distillation the teacher is a frozen copy of the initial student that
reads a privileged prompt (the reference answer shown) followed by the same response,
so its sequences differ from the student's; :func:`aligned` pairs their response tokens.
"""

from __future__ import annotations

import torch

from paced_ds import verify
from paced_ds.curriculum.estimate import plain_copy
from paced_ds.distill import generation


def rollouts(student_engine, tokenizer, prompts: list[list[int]], cfg) -> list[list[int]]:
    """One sampled response (token ids, without eos) per prompt, from the current student.

    Collective with ``rollout.gather=false`` (every rank has the same number of
    prompts per step, so ZeRO-3's synced generation lines up).
    """
    rollout = cfg.rollout
    sampling = dict(max_new_tokens=rollout.max_new_tokens, do_sample=True, temperature=rollout.temperature,
                    top_p=rollout.top_p, batch_size=rollout.batch_size)
    if rollout.gather:
        model = plain_copy(student_engine)
        return generation.generate(model, tokenizer, prompts, synced=False, **sampling)
    return generation.generate(student_engine.module, tokenizer, prompts, synced=True, **sampling)


def example(prompt: list[int], response: list[int], eos_id: int, max_length: int) -> dict:
    """A training example from a prompt and a generated response (eos appended, truncated)."""
    ids = (prompt + response + [eos_id])[:max(max_length, len(prompt) + 1)]
    return {"input_ids": ids, "response_start": len(prompt)}


def teacher_example(privileged_prompt: list[int], student_example: dict) -> dict:
    """The same response behind the teacher's own prompt, never truncated (so it stays aligned)."""
    response = student_example["input_ids"][student_example["response_start"]:]
    return {"input_ids": privileged_prompt + response, "response_start": len(privileged_prompt)}


def outcomes(tokenizer, responses: list[list[int]], answers: list[str]) -> list[int]:
    """1 where a rollout's answer verifies, else 0 (the free competence signal)."""
    return [int(verify.is_correct(tokenizer.decode(ids, skip_special_tokens=True), answer))
            for ids, answer in zip(responses, answers)]


def aligned(student_logits: torch.Tensor, student_mask: torch.Tensor, teacher_logits: torch.Tensor,
            teacher_mask: torch.Tensor, weights: torch.Tensor):
    """Response-token logits of both models paired row by row, as ``[tokens, 1, V]`` with a
    per-token weight, ready for ``distillation_loss`` (each example scores as many response
    tokens in both, in the same order)."""
    counts = student_mask.sum(1)
    if not torch.equal(counts, teacher_mask.sum(1)):
        raise RuntimeError("student and teacher sequences score different numbers of response tokens")
    student_rows = student_logits[student_mask][:, None]
    teacher_rows = teacher_logits[teacher_mask][:, None]
    token_weights = weights.repeat_interleave(counts)
    mask = torch.ones(student_rows.shape[:2], dtype=torch.bool, device=student_rows.device)
    return student_rows, teacher_rows, mask, token_weights
