"""Tokenisation and batching. The trainer relies on these exact semantics:

- ``encode`` gives ``prompt ids + response ids + eos`` and ``response_start``, the index of
  the first response token;
- ``collate_train`` right-pads, and ``loss_mask[b, t]`` is True iff the logits at position
  ``t`` predict a response token: the targets are ``input_ids[:, t + 1]``, so
  ``logits[:, t]`` pairs with ``loss_mask[:, t]`` without any shifting by the caller;
- ``collate_prompts`` left-pads prompts, so that generation continues every row from the
  same (last) column.
"""

from __future__ import annotations

import torch

from paced_ds.errors import UserError


def encode(tokenizer, prompt_text: str, response_text: str | None, max_length: int,
           problem_id: str | None = None) -> dict:
    """``{"input_ids": list[int], "response_start": int}`` for one problem.

    The prompt is tokenised with the tokenizer's special tokens (its BOS, if it adds one),
    unless the text already starts with the BOS text, as a chat template's output may; the
    response is tokenised without special tokens and followed by ``eos_token_id``. With
    ``response_text`` None the ids are the prompt's alone (for generation). A sequence
    longer than ``max_length`` loses the end of its response; a prompt longer than
    ``max_length`` on its own is a ``UserError`` naming ``problem_id``.
    """
    bos = tokenizer.bos_token
    has_bos_text = bool(bos) and prompt_text.startswith(bos)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=not has_bos_text).input_ids)
    if len(prompt_ids) > max_length:
        raise UserError(f"problem {problem_id!r}: its prompt is {len(prompt_ids)} tokens, more than "
                        f"data.max_length ({max_length}); shorten the prompt or raise data.max_length")
    if response_text is None:
        return {"input_ids": prompt_ids, "response_start": len(prompt_ids)}
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; set one in its tokenizer_config.json")
    response_ids = list(tokenizer(response_text, add_special_tokens=False).input_ids)
    response_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + response_ids)[:max_length]
    return {"input_ids": input_ids, "response_start": len(prompt_ids)}


def collate_train(examples: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` [B, T] long, and ``loss_mask`` [B, T]
    bool, True where ``response_start - 1 <= t < len(ids) - 1`` (see the module docstring).
    T is the longest example rounded up to a multiple of ``pad_to_multiple``."""
    if not examples:
        raise ValueError("collate_train needs at least one example")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    longest = max(len(example["input_ids"]) for example in examples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        # Position 0 predicts nothing before it, so a response starting at 0 loses its first token.
        loss_mask[row, max(example["response_start"] - 1, 0): len(ids) - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_prompts(prompt_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` [B, T] long, for batched generation."""
    if not prompt_ids:
        raise ValueError("collate_prompts needs at least one prompt")
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

