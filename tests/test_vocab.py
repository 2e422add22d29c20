"""Teacher/student vocabulary checks and model name resolution (config files only, no DeepSpeed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from paced_ds.config import RunConfig
from paced_ds.data import arith
from paced_ds.errors import UserError
from paced_ds.models.engines import ASSETS, load_tokenizer, resolve_model, shared_vocab_size

transformers = pytest.importorskip("transformers")

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "Sphinx of black quartz, judge my vow.",
] * 20


@pytest.fixture(scope="module")
def arith_tokenizer_dir(train_tokenizer) -> Path:
    return train_tokenizer("arith", [r["prompt"] + r["response"] for r in arith.dataset("train", 20, seed=0)])


@pytest.fixture(scope="module")
def prose_tokenizer_dir(train_tokenizer) -> Path:
    return train_tokenizer("prose", PROSE)


def save_tiny_llama(out: Path, tokenizer_dir: Path, extra_rows: int = 0) -> Path:
    """A 1-layer, hidden-16 Llama with ``len(tokenizer) + extra_rows`` embedding rows."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + extra_rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_config(teacher: Path, student: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.model.teacher, cfg.model.student = str(teacher), str(student)
    return cfg


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_tokenizers_differ(arith_tokenizer_dir, prose_tokenizer_dir):
    # The premise of the mismatch test below.
    arith_vocab = transformers.AutoTokenizer.from_pretrained(arith_tokenizer_dir).get_vocab()
    prose_vocab = transformers.AutoTokenizer.from_pretrained(prose_tokenizer_dir).get_vocab()
    assert arith_vocab != prose_vocab


def test_same_tokenizer_same_rows_shares_the_whole_vocab(tmp_path, arith_tokenizer_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", arith_tokenizer_dir)
    student = save_tiny_llama(tmp_path / "student", arith_tokenizer_dir)
    cfg = run_config(teacher, student)
    tokenizer = load_tokenizer(cfg)
    assert shared_vocab_size(cfg, tokenizer) == len(tokenizer)


def test_teacher_padding_rows_are_not_shared(tmp_path, arith_tokenizer_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", arith_tokenizer_dir, extra_rows=64)
    student = save_tiny_llama(tmp_path / "student", arith_tokenizer_dir)
    cfg = run_config(teacher, student)
    tokenizer = load_tokenizer(cfg)
    assert transformers.AutoConfig.from_pretrained(teacher).vocab_size == len(tokenizer) + 64
    assert shared_vocab_size(cfg, tokenizer) == len(tokenizer)


def test_padding_on_both_sides_shares_the_smaller(tmp_path, arith_tokenizer_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", arith_tokenizer_dir, extra_rows=64)
    student = save_tiny_llama(tmp_path / "student", arith_tokenizer_dir, extra_rows=16)
    cfg = run_config(teacher, student)
    assert shared_vocab_size(cfg, load_tokenizer(cfg)) == len(load_tokenizer(cfg)) + 16


def test_fewer_rows_than_tokens_is_an_error(tmp_path, arith_tokenizer_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", arith_tokenizer_dir, extra_rows=-8)
    student = save_tiny_llama(tmp_path / "student", arith_tokenizer_dir)
    cfg = run_config(teacher, student)
    message = user_error(shared_vocab_size, cfg, load_tokenizer(cfg))
    assert "model.teacher" in message and "model.student" in message


def test_different_tokenizers_are_an_error(tmp_path, arith_tokenizer_dir, prose_tokenizer_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", prose_tokenizer_dir)
    student = save_tiny_llama(tmp_path / "student", arith_tokenizer_dir)
    cfg = run_config(teacher, student)
    message = user_error(shared_vocab_size, cfg, load_tokenizer(cfg))
    assert "model.teacher" in message and "model.student" in message
    assert "tokenizer" in message


def test_missing_teacher_directory_names_the_key(tmp_path, arith_tokenizer_dir):
    student = save_tiny_llama(tmp_path / "student", arith_tokenizer_dir)
    cfg = run_config(tmp_path / "no_such_teacher", student)
    message = user_error(shared_vocab_size, cfg, load_tokenizer(cfg))
    assert "model.teacher" in message and "no_such_teacher" in message


def test_resolve_model_on_a_missing_directory_names_the_key(tmp_path):
    missing = tmp_path / "absent"
    message = user_error(resolve_model, str(missing), "model.student")
    assert "model.student" in message and str(missing) in message


def test_resolve_model_on_a_directory_without_config_names_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    message = user_error(resolve_model, str(tmp_path / "empty"), "model.teacher")
    assert "model.teacher" in message and "config.json" in message


def test_resolve_model_keeps_local_directories_and_hub_names(tmp_path, arith_tokenizer_dir):
    model = save_tiny_llama(tmp_path / "m", arith_tokenizer_dir)
    assert resolve_model(str(model), "model.student") == str(model)
    assert resolve_model("org/model-name", "model.student") == "org/model-name"


@pytest.mark.parametrize("name", ["tiny-teacher", "tiny-student"])
def test_shipped_names_resolve_into_the_assets(name):
    resolved = Path(resolve_model(name, "model.teacher"))
    assert resolved == ASSETS / name
    assert resolved.parent.name == "assets" and resolved.parent.parent.name == "paced_ds"
    assert (resolved / "config.json").is_file()


def test_shipped_models_share_their_vocab():
    cfg = RunConfig()
    tokenizer = load_tokenizer(cfg)
    assert shared_vocab_size(cfg, tokenizer) == len(tokenizer)
