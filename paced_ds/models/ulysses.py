"""Long sequences: Ulysses sequence parallelism (``train.sequence_parallel`` = S: each sequence
split over S ranks) and tiled MLPs (``model.tiled_mlp``, ``tile_mlps``), from DeepSpeed's ALST.

The S ranks of a sequence-parallel group hold the same sequences, each a contiguous S-th of
their positions. In every attention layer DeepSpeed's ``UlyssesSPAttentionHF`` (ALST,
``deepspeed.runtime.sequence_parallel.ulysses_sp``) exchanges, with one all-to-all, the
sequence-sharded queries, keys and values for head-sharded whole sequences, runs the model's
own attention (sdpa, causal) on them, and exchanges the result back. Everything else (the
MLPs, norms, the output layer and the divergence) runs on the rank's own positions, so a
sequence's activations, logits included, are split S ways.

We use DeepSpeed's attention class, not its ``register_with_transformers``: that puts one
wrapper, built for one model's head counts and one micro-batch size, in the place of the
process's sdpa, active in every forward. Here the student and the teacher differ in both,
and generation (rollouts, evaluation) must not be split. So a gate takes sdpa's place
(``install``); it routes to a ``UlyssesSPAttentionHF`` per (model, batch size) only inside
``SequenceParallel.split()``, and to the original sdpa everywhere else.

Padding: batches are right-padded to a multiple of S positions (``shard``); attention is
causal with no mask (as in DeepSpeed's wrapper, which drops masks), which right padding
never needs: no real position attends to a pad after it. Positions are passed explicitly
(``position_ids``), the global ones, as rotary embeddings and DeepSpeed's class require.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from paced_ds.errors import UserError

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("paced_ds_ulysses", default=None)
_ORIGINAL = {}  # "sdpa" -> the attention function the gate stands in for


def _gate(module, query, key, value, attention_mask, *args, **kwargs):
    sequence_parallel = _ACTIVE.get()
    if sequence_parallel is None:
        return _ORIGINAL["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    return sequence_parallel.attention(module.config, query.shape[0])(module, query, key, value, None, *args, **kwargs)


def install() -> None:
    """Put the gate in the place of transformers' sdpa attention (once per process)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "sdpa" not in _ORIGINAL:
        _ORIGINAL["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _gate


class SequenceParallel:
    """This rank's sequence-parallel group: ``size`` ranks, this one at ``rank`` in it."""

    def __init__(self, size: int, rank: int, group):
        self.size, self.rank, self.group = size, rank, group
        self._attention = {}

    @classmethod
    def create(cls, size: int) -> SequenceParallel | None:
        """Collective: groups of ``size`` consecutive ranks (None for size 1). The world must be a
        multiple of ``size``."""
        if size == 1:
            return None
        import torch.distributed as torch_dist

        world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
        if world % size:
            raise UserError(f"config key train.sequence_parallel: {size} does not divide the {world} ranks")
        install()
        mine = None
        for first in range(0, world, size):  # every rank makes every group, in the same order
            group = torch_dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                mine = group
        return cls(size, rank % size, mine)

    def check(self, model, key: str) -> None:
        """A UserError naming ``train.sequence_parallel`` and ``key`` (the model's config key) when
        ``model`` cannot be split: attention other than sdpa, or head counts S does not divide."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) \
            or config.num_attention_heads
        implementation = getattr(config, "_attn_implementation", None)
        if implementation != "sdpa":
            raise UserError(f"config key train.sequence_parallel: {key} uses {implementation} attention; Ulysses "
                            "sequence parallelism here splits sdpa attention only")
        if heads % self.size or not (kv_heads % self.size == 0 or self.size % kv_heads == 0):
            raise UserError(f"config key train.sequence_parallel: {self.size} must divide {key}'s {heads} attention "
                            f"heads and divide or be divided by its {kv_heads} key-value heads")

    def attention(self, config, batch_size: int):
        """DeepSpeed's Ulysses attention for ``config``'s model at ``batch_size`` sequences (cached)."""
        key = (id(config), batch_size)
        if key not in self._attention:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            attention = UlyssesSPAttentionHF(
                attn=_ORIGINAL["sdpa"], batch_size=batch_size, attn_head_count=config.num_attention_heads,
                attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                kv_head_count=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                num_hidden_layers=config.num_hidden_layers, process_group=self.group, seq_length_is_variable=True)
            attention.core_attn_implementation = "sdpa"
            self._attention[key] = attention
        return self._attention[key]

    @contextlib.contextmanager
    def split(self):
        """Within it, sdpa attention is Ulysses over this group (module doc)."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def shard(self, batch: dict) -> dict:
        """This rank's positions of a collated batch (input_ids, attention_mask, loss_mask, [B, T]),
        with their global ``position_ids``; T is first right-padded to a multiple of S (pad
        positions: token 0, attention and loss mask 0)."""
        length = -(-batch["input_ids"].shape[1] // self.size) * self.size
        batch = {key: torch.nn.functional.pad(batch[key], (0, length - batch[key].shape[1]))
                 for key in ("input_ids", "attention_mask", "loss_mask")}
        part = length // self.size
        window = slice(self.rank * part, (self.rank + 1) * part)
        out = {key: value[:, window] for key, value in batch.items()}
        positions = torch.arange(window.start, window.stop, device=batch["input_ids"].device)
        out["position_ids"] = positions.expand(batch["input_ids"].shape[0], -1)
        return out


def tile_mlps(model) -> int:
    """``model.tiled_mlp``: every gated MLP of ``model`` (gate_proj, up_proj, down_proj, act_fn, as
    Llama, Qwen and Mistral have) runs through DeepSpeed's ``TiledMLP`` while training: a slice of
    the positions at a time, recomputed slice by slice in backward, so its [tokens, intermediate]
    activations exist for one slice only. Slices: ceil(positions / hidden), the largest over
    the ranks (ZeRO-3 gathers the MLP's weights once a slice, the same number on every rank).
    Evaluation and generation run the MLP whole. Returns how many MLPs were tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def whole(module, x):
        return module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))

    def tiled(module, x):
        if not (module.training and torch.is_grad_enabled()):
            return whole(module, x)
        shards = torch.tensor(-(-x.shape[1] // x.shape[-1]), device=x.device)
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.all_reduce(shards, op=torch_dist.ReduceOp.MAX)
        params = [module.down_proj.weight, module.gate_proj.weight, module.up_proj.weight]
        return TiledMLP.apply(whole, module, x, int(shards.item()), params)

    count = 0
    for module in model.modules():
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = (lambda m: lambda x: tiled(m, x))(module)
            count += 1
    return count
