"""Ulysses sequence parallelism (models/ulysses.py, train.sequence_parallel): S = 2 on 2 ranks
trains exactly as S = 1 with the same global batch, for the shipped tiny models and a random
Qwen3-architecture pair; shards, and the settings it refuses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from paced_ds.config import load_config
from paced_ds.errors import UserError
from paced_ds.models.ulysses import SequenceParallel

import random_models
from launch import RECIPE, REPO, paced_ds, read_jsonl, small_overrides

TINY = REPO / "paced_ds" / "assets" / "tiny-student"


def losses(tmp_path, nproc: int, size: int, models: dict) -> list[float]:
    out = tmp_path / f"s{size}"
    result = paced_ds("train", "--config", RECIPE, "--nproc", nproc, *small_overrides(out, **{
        "train.sequence_parallel": size, "train.steps": 5, "train.warmup_steps": 0, "train.micro_batch_size": 3,
        "train.grad_accum": 2, "curriculum.mode": "uniform", "data.eval": "", "data.retain": "",
        "data.responses_dir": tmp_path / "responses", **models}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [row["loss"] for row in read_jsonl(out / "run" / "metrics.jsonl") if "loss" in row]


@pytest.mark.distributed
@pytest.mark.parametrize("pair", ["tiny", "qwen3"])
def test_two_ranks_splitting_each_sequence_train_as_one_rank(pair, tmp_path):
    """The same problems in the same order (one data-parallel group either way), each sequence
    split over the 2 ranks of the group: the per-step losses of 5 steps agree to 1e-4 (the
    student's and the teacher's attention computed on gathered heads, the divergence on each
    rank's own positions, normalised by the step's response tokens)."""
    models = {"model.gradient_checkpointing": "true"}  # the split attention recomputed in backward too
    if pair == "qwen3":
        teacher = random_models.save(tmp_path / "teacher", "qwen3", TINY, vocab_rows=320, seed=1)
        student = random_models.save(tmp_path / "student", "qwen3", TINY, vocab_rows=320, seed=2)
        # A random teacher's responses are wrong, and as long as generation allows: kept.
        models.update({"model.teacher": teacher, "model.student": student, "data.keep_incorrect": "true",
                       "data.generate_max_new_tokens": 32, "snr.every": 3, "snr.per_bucket": 2,
                       "curriculum.rollouts": 2})  # the SNR probe alongside (on whole sequences), kept small
    whole, split = losses(tmp_path, 1, 1, models), losses(tmp_path, 2, 2, models)
    assert len(whole) == len(split) == 5
    assert split == pytest.approx(whole, abs=1e-4, rel=1e-4)


def test_a_shard_is_a_slice_of_positions_padded_to_a_multiple():
    batch = {"input_ids": torch.arange(14).reshape(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "loss_mask": torch.arange(7).expand(2, 7) >= 3}
    shards = [SequenceParallel(2, rank, None).shard(batch) for rank in (0, 1)]
    assert [s["input_ids"].shape for s in shards] == [(2, 4), (2, 4)]  # 7 positions padded to 8
    assert shards[1]["input_ids"][0].tolist() == [4, 5, 6, 0] and shards[1]["attention_mask"][0, -1] == 0
    assert shards[1]["position_ids"][1].tolist() == [4, 5, 6, 7]
    assert sum(int(s["loss_mask"].sum()) for s in shards) == int(batch["loss_mask"].sum())


def model_with(heads: int, kv_heads: int, implementation: str = "sdpa"):
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads,
                             _attn_implementation=implementation)
    return SimpleNamespace(config=config)


def test_heads_it_cannot_split_and_other_attention_are_one_line_errors():
    three = SequenceParallel(3, 0, None)
    with pytest.raises(UserError, match=r"^config key train.sequence_parallel: 3 must divide model.student's 4 "):
        three.check(model_with(4, 4), "model.student")
    SequenceParallel(2, 0, None).check(model_with(4, 1), "model.student")  # key-value heads replicated: fine
    with pytest.raises(UserError, match="model.teacher uses eager attention"):
        SequenceParallel(2, 0, None).check(model_with(4, 4, "eager"), "model.teacher")


@pytest.mark.parametrize("override, key", [("teacher.backend=cache", "teacher.backend"),
                                           ("loss.schedule=two_stage", "loss.schedule"),
                                           ("teacher.self_distill=true", "teacher.self_distill"),
                                           ("train.sequence_parallel=0", None)])
def test_what_it_does_not_split_yet_is_refused_before_any_rank_starts(override, key):
    extra = ["teacher.cache=/tmp/nowhere"] if "cache" in override else []
    size = [] if "sequence_parallel" in override else ["train.sequence_parallel=2"]
    with pytest.raises(UserError, match=f"^config key {key or 'train.sequence_parallel'}:"):
        load_config(RECIPE, [*size, override, *extra])


def test_tiled_mlps_give_the_gradients_of_whole_ones(monkeypatch):
    """model.tiled_mlp: 40 positions at width 16 run in 3 slices, recomputed slice by slice in
    backward; every gradient is the untiled model's. Out of training the MLP runs whole."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    from transformers import LlamaConfig, LlamaForCausalLM

    from paced_ds.models.ulysses import tile_mlps

    slices = []
    apply = TiledMLP.apply
    monkeypatch.setattr(TiledMLP, "apply", lambda fn, module, x, shards, params: slices.append(shards) or apply(
        fn, module, x, shards, params))
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 32, (2, 40), generator=torch.Generator().manual_seed(0))
    grads, outputs = [], []
    for tiled in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).float().train()
        if tiled:
            assert tile_mlps(model) == 2
        model(input_ids=ids).logits.pow(2).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=ids).logits)
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert slices == [3, 3]  # one tiled call per layer, in training only
