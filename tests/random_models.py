"""Small random-weight models of real architectures, built at test time from transformers configs.

Tiny widths (hidden 64, 2 layers) but each family's own model_type and features: grouped-query
attention (fewer key/value heads than heads), Llama 3's rope scaling, Mistral's sliding window,
Qwen2's q/k/v biases, Qwen3's q/k norms and a head_dim that is not hidden / heads, tied and
untied embeddings. ``save`` writes one next to a real tokenizer's files, so that
``model.teacher`` / ``model.student`` can name the directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}

# The features that make each family itself, at a tiny width.
ARCHITECTURES = {
    "llama": {"num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 256}},
    "mistral": {"num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": False, "sliding_window": 128,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    "qwen2": {"num_key_value_heads": 2, "tie_word_embeddings": False, "use_sliding_window": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True, "use_sliding_window": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}


def config(model_type: str, vocab_rows: int, special_ids: dict):
    """The transformers config of a tiny ``model_type`` with ``vocab_rows`` embedding rows."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=vocab_rows, **COMMON, **ARCHITECTURES[model_type],
                                **special_ids)


def save(out: Path, model_type: str, tokenizer_dir: Path, *, vocab_rows: int, seed: int = 0,
         loud_rows_from: int | None = None) -> Path:
    """A random-weight ``model_type`` with ``vocab_rows`` embedding rows (at least the tokenizer's;
    more = padded, as Qwen pads its embedding), saved in fp32 with ``tokenizer_dir``'s tokenizer.

    ``loud_rows_from``: the output-embedding rows from this index on are 20x larger, so that
    padding rows hold a large share of the probability (which rows a loss scores then shows)."""
    import torch
    from transformers import AutoModelForCausalLM

    real = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    special_ids = {key: real[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in real}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(model_type, vocab_rows, special_ids), dtype=torch.float32)
    assert type(model).__name__ == CLASSES[model_type]
    if loud_rows_from is not None:
        with torch.no_grad():
            model.get_output_embeddings().weight[loud_rows_from:] *= 20
    out = Path(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out
