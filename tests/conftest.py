"""Fixtures shared by the test modules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# The shipped tokenizer's config (tools/build_tiny_models.py), so test tokenizers load the same way.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
    "model_max_length": 64,
}


@pytest.fixture(scope="session")
def train_tokenizer(tmp_path_factory):
    """``train_tokenizer(name, lines) -> Path``: a SentencePiece BPE tokenizer trained on
    ``lines`` with the shipped special ids, saved in Hugging Face form. Built once per name."""
    sentencepiece = pytest.importorskip("sentencepiece")
    built: dict[str, Path] = {}

    def build(name: str, lines: list[str], vocab_size: int = 300) -> Path:
        if name in built:
            return built[name]
        out = tmp_path_factory.mktemp(f"tokenizer-{name}")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(out / "sp"), vocab_size=vocab_size,
            model_type="bpe", split_digits=True, byte_fallback=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
            add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
        )
        shutil.move(out / "sp.model", out / "tokenizer.model")
        (out / "sp.vocab").unlink()
        (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        built[name] = out
        return out

    return build
