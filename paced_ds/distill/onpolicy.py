"""On-policy distillation: the student's own rollouts as the sequences the loss scores.

Each on-policy step samples one response per problem from the current student, then the
teacher and the student are both run on it (reverse KL on y ~ pi_theta, PACED's second
stage). For self-distillation the teacher reads the same response behind its privileged
prompt (``teachers.Privileged``).
"""

from __future__ import annotations

from paced_ds import verify
from paced_ds.config import RolloutConfig
from paced_ds.models import generation


def rollouts(student_engine, tokenizer, prompts: list[list[int]], rollout_cfg: RolloutConfig) -> list[list[int]]:
    """One sampled response (token ids, without eos) per prompt, from the current student
    (greedy at rollout.temperature 0), with Hugging Face.

    Collective with ``rollout.gather=false`` (every rank has the same number of
    prompts per step, so ZeRO-3's synced generation lines up).
    """
    sampling = dict(max_new_tokens=rollout_cfg.max_new_tokens, do_sample=rollout_cfg.temperature > 0,
                    temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
                    batch_size=rollout_cfg.batch_size)
    model, synced = generation.generating_model(student_engine, rollout_cfg.gather)
    responses, _ = generation.generate(model, tokenizer, prompts, synced=synced, **sampling)
    return responses


def served_rollouts(client, prompts: list[list[int]], rollout_cfg: RolloutConfig, eos_id: int) -> list[list[int]]:
    """The same from a server holding the current student (``server.Client``): this rank's own
    prompts, asked concurrently with the other ranks' (the server batches across them)."""
    return [samples[0] for samples in client.complete(
        prompts, n=1, max_new_tokens=rollout_cfg.max_new_tokens, greedy=rollout_cfg.temperature == 0,
        temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, stop_id=eos_id,
        per_request=rollout_cfg.batch_size)]


def example(prompt: list[int], response: list[int], eos_id: int, max_length: int) -> dict:
    """A training example from a prompt and a generated response (eos appended, truncated)."""
    ids = (prompt + response + [eos_id])[:max(max_length, len(prompt) + 1)]
    return {"input_ids": ids, "response_start": len(prompt)}


def outcomes(tokenizer, responses: list[list[int]], answers: list[str]) -> list[int]:
    """1 where a rollout's answer verifies, else 0 (the free competence signal)."""
    return [int(verify.is_correct(tokenizer.decode(ids, skip_special_tokens=True), answer))
            for ids, answer in zip(responses, answers)]
