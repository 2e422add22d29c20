"""Problem records, prompt formatting, collate semantics and stored teacher responses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from paced_ds.data import arith
from paced_ds.data.collate import collate_prompts, collate_train, encode
from paced_ds.data.prompts import format_prompt, privileged_prompt
from paced_ds.data.records import CANONICAL_FIELDS, load_problems
from paced_ds.data.responses import attach_responses, load_responses, problems_sha256, responses_path, save_responses
from paced_ds.errors import UserError

# Rows as a user's data might name them: question / final / solution / level.
ROWS = [
    {"uid": "a", "question": "1+2=", "final": "3", "solution": "rev 3 = 3", "level": "L1"},
    {"uid": 7, "question": "12+30=", "final": 42, "solution": "rev 24 = 42", "level": "L2"},
    {"uid": "c", "question": "5+5=", "final": "10", "level": "L1", "extra": [1, 2]},
]
FIELDS = {"id": "uid", "prompt": "question", "answer": "final", "response": "solution",
          "difficulty": "level"}
EXPECTED = [
    {"id": "a", "prompt": "1+2=", "answer": "3", "response": "rev 3 = 3", "difficulty": "L1"},
    {"id": "7", "prompt": "12+30=", "answer": "42", "response": "rev 24 = 42", "difficulty": "L2"},
    {"id": "c", "prompt": "5+5=", "answer": "10", "difficulty": "L1"},
]

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------
# A real SentencePiece tokenizer, built here like tools/build_tiny_models.py builds the
# shipped one (same special ids and config), on a few lines of the reference task.

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    lines = [r["prompt"] + r["response"] for r in arith.dataset("train", 20, seed=0)]
    lines += ["The answer is 3.\n1+2=", "<|user|> <|assistant|> <|system|> Add the numbers."]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "sp"), vocab_size=320,
        model_type="bpe", split_digits=True, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
        add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
    )
    shutil.copy(out / "sp.model", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": False,
    }))
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture
def chat_tokenizer(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = CHAT_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = original


# ---------------------------------------------------------------------------------------
# records: every format, with a field mapping

def test_load_jsonl_with_mapping_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], "", "   ", ROWS[1], ROWS[2]])
    assert load_problems(str(path), fields=FIELDS) == EXPECTED


def test_load_json_list_with_mapping(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert load_problems(str(path), fields=FIELDS) == EXPECTED


def test_load_parquet_written_by_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet columns are typed: answers stay numbers, a missing solution becomes null.
    rows = [{"uid": str(r["uid"]), "question": r["question"], "final": int(r["final"]),
             "solution": r.get("solution"), "level": r["level"]} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert load_problems(str(tmp_path / "train.parquet"), fields=FIELDS) == EXPECTED


def test_load_parquet_written_by_datasets_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"question": r["question"], "final": str(r["final"])} for r in ROWS]
    mapping = {"prompt": "question", "answer": "final"}
    expected = [{"id": f"{stem}-{i}", "prompt": r["question"], "answer": r["final"]}
                for stem in ["train"] for i, r in enumerate(rows)]
    dataset = datasets.Dataset.from_list(rows)

    dataset.to_parquet(str(tmp_path / "train.parquet"))
    assert load_problems(str(tmp_path / "train.parquet"), fields=mapping) == expected

    dataset.save_to_disk(str(tmp_path / "train"))
    assert load_problems(str(tmp_path / "train"), fields=mapping) == expected

    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([2])})
    splits.save_to_disk(str(tmp_path / "both"))
    assert load_problems(str(tmp_path / "both"), fields=mapping, split="test") == [
        {"id": "both-0", "prompt": "5+5=", "answer": "10"}]
    message = user_error(load_problems, str(tmp_path / "both"), fields=mapping, split="eval")
    assert "both" in message and "no split 'eval'" in message


def test_datasets_name_goes_to_load_dataset_without_remote_code(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"question": "1+1=", "final": 2}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_problems("someone/arith", fields={"prompt": "question", "answer": "final"},
                            split="test")
    assert records == [{"id": "arith-0", "prompt": "1+1=", "answer": "2"}]
    assert calls == [(("someone/arith",), {"split": "test"})]
    load_problems("someone/arith", fields={"prompt": "question", "answer": "final"}, split="train", subset="main")
    assert calls[-1] == (("someone/arith", "main"), {"split": "train"})

    def failing_load_dataset(*args, **kwargs):
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    message = user_error(load_problems, "someone/arith")
    assert "someone/arith" in message and "offline" in message


def test_ids_generated_unless_mapped_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(5)])
    records = load_problems(str(path))
    assert [r["id"] for r in records] == [f"train-{i}" for i in range(5)]
    assert load_problems(str(path), limit=2) == records[:2]
    assert all(set(r) == {"id", "prompt", "answer"} for r in records)
    # Naming the id field makes it required.
    message = user_error(load_problems, str(path), fields={"id": "uid"})
    assert "train.jsonl:1" in message and "'id'" in message and "data.fields.id" in message


def test_arith_records_load_unchanged(tmp_path):
    records = arith.dataset("train", 5, seed=1)
    path = arith.write_jsonl(records, tmp_path / "arith.jsonl")
    assert load_problems(str(path)) == records
    assert set(records[0]) == set(CANONICAL_FIELDS)


# ---------------------------------------------------------------------------------------
# records: every error names the file, the line or row, and the field

GOOD = {"id": "g", "prompt": "1+1=", "answer": "2"}


@pytest.mark.parametrize("bad_line, fields, expected", [
    ('{"id": "x", "prompt": "1+1=", ', None, ["train.jsonl:2:", "not valid JSON"]),
    ('[1, 2]', None, ["train.jsonl:2:", "not an object", "list"]),
    ({"id": "x", "prompt": "1+1="}, None, ["train.jsonl:2:", "missing field 'answer'", "data.fields.answer"]),
    ({"id": "x", "question": "1+1=", "solution": "2"}, {"prompt": "question", "answer": "final"},
     ["train.jsonl:2:", "missing field 'answer'", "data.fields.answer maps it to 'final'"]),
    ({"id": "x", "prompt": 11, "answer": "2"}, None, ["train.jsonl:2:", "'prompt'", "non-empty string"]),
    ({"id": "x", "prompt": "  ", "answer": "2"}, None, ["train.jsonl:2:", "'prompt'", "empty"]),
    ({"id": "x", "prompt": "1+1=", "answer": [2]}, None, ["train.jsonl:2:", "'answer'", "a list"]),
    ({"id": "x", "prompt": "1+1=", "answer": True}, None, ["train.jsonl:2:", "'answer'", "boolean"]),
    ({"id": "x", "prompt": "1+1=", "answer": None}, None, ["train.jsonl:2:", "'answer'", "null"]),
    ({"id": "x", "q": 5, "answer": "2"}, {"prompt": "q"}, ["train.jsonl:2:", "'prompt' (from 'q')"]),
    ({"id": "x", "prompt": "1+1=", "answer": "2", "response": 5}, None, ["train.jsonl:2:", "'response'"]),
    ({"id": {"a": 1}, "prompt": "1+1=", "answer": "2"}, None, ["train.jsonl:2:", "'id'"]),
    ({"id": "g", "prompt": "2+2=", "answer": "4"}, None, ["train.jsonl:2:", "duplicate id 'g'", "line 1"]),
])
def test_bad_jsonl_records(tmp_path, bad_line, fields, expected):
    good = {(fields or {}).get(name, name): value for name, value in GOOD.items()}
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad_line, good | {"id": "h"}])
    message = user_error(load_problems, str(path), fields=fields)
    for part in expected:
        assert part in message, (part, message)


def test_duplicate_id_across_int_and_str_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD | {"id": 5}, "", GOOD | {"id": "6"}, GOOD | {"id": "5"}])
    message = user_error(load_problems, str(path))
    assert "train.jsonl:4:" in message and "'5'" in message and "line 1" in message


def test_bad_rows_in_json_and_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD | {"id": "h", "prompt": ""}]))
    message = user_error(load_problems, str(tmp_path / "train.json"))
    assert "train.json: row 1" in message and "'prompt'" in message

    (tmp_path / "broken.json").write_text('[\n{"id": "a",\n  "prompt" "x"}\n]')
    message = user_error(load_problems, str(tmp_path / "broken.json"))
    assert "broken.json:3:" in message and "not valid JSON" in message

    (tmp_path / "object.json").write_text(json.dumps({"data": [GOOD]}))
    assert "expected a JSON list" in user_error(load_problems, str(tmp_path / "object.json"))

    pq.write_table(pa.Table.from_pylist([GOOD, GOOD | {"id": "h"}, GOOD]), tmp_path / "train.parquet")
    message = user_error(load_problems, str(tmp_path / "train.parquet"))
    assert "train.parquet: row 2" in message and "duplicate id 'g'" in message and "row 0" in message

    (tmp_path / "fake.parquet").write_text("not parquet")
    assert "fake.parquet" in user_error(load_problems, str(tmp_path / "fake.parquet"))


def test_empty_missing_and_unsupported_sources(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["", "  "])
    assert user_error(load_problems, str(path)) == f"{path}: no problems"
    (tmp_path / "empty.json").write_text("[]")
    assert user_error(load_problems, str(tmp_path / "empty.json")).endswith("empty.json: no problems")

    for missing in [tmp_path / "nope.jsonl", tmp_path / "sub" / "nope", Path("nope.parquet")]:
        assert user_error(load_problems, str(missing)) == f"data file not found: {missing}"

    (tmp_path / "train.csv").write_text("prompt,answer\n1+1=,2\n")
    assert "unsupported data file" in user_error(load_problems, str(tmp_path / "train.csv"))

    (tmp_path / "notadataset").mkdir()
    assert "save_to_disk" in user_error(load_problems, str(tmp_path / "notadataset"))


def test_bad_field_mapping_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    assert user_error(load_problems, str(path), fields={"question": "q"}).startswith("data.fields.question:")
    assert user_error(load_problems, str(path), fields={"answer": ""}).startswith("data.fields.answer:")


# ---------------------------------------------------------------------------------------
# prompts

def test_plain_templates(tokenizer):
    assert tokenizer.chat_template is None
    assert format_prompt(tokenizer, "1+2=") == "1+2="
    assert format_prompt(tokenizer, "1+{2}=", template="Q: {prompt}\nA:") == "Q: 1+{2}=\nA:"
    assert format_prompt(tokenizer, "1+2=", system="Add.") == "Add.\n1+2="
    assert format_prompt(tokenizer, "1+2=", system="Add.", template="[{system}] {prompt}") == "[Add.] 1+2="
    for template, part in [("Q: {question}", "unknown placeholder {question}"),
                           ("no placeholder", "must contain {prompt}"),
                           ("{prompt} }", "literal braces")]:
        message = user_error(format_prompt, tokenizer, "1+2=", template=template)
        assert message.startswith("data.prompt_template:") and part in message


def test_chat_template_is_used_when_present(chat_tokenizer):
    assert (format_prompt(chat_tokenizer, "1+2=", system="Add.")
            == "<s><|system|>Add.\n<|user|>1+2=\n<|assistant|>")
    assert format_prompt(chat_tokenizer, "1+2=") == "<s><|user|>1+2=\n<|assistant|>"
    assert format_prompt(chat_tokenizer, "1+2=", template="Q: {prompt}", use_chat_template=False) == "Q: 1+2="
    with pytest.raises(UserError, match="data.prompt_template"):
        format_prompt(chat_tokenizer, "1+2=", template="Q:")


def test_privileged_prompt():
    assert privileged_prompt("1+2=", "3") == "The answer is 3.\n1+2="
    assert privileged_prompt("1+2=", "3", template="{prompt} (hint: {answer})") == "1+2= (hint: 3)"
    with pytest.raises(UserError, match="must contain {answer}"):
        privileged_prompt("1+2=", "3", template="{prompt}")


# ---------------------------------------------------------------------------------------
# collate

def test_encode_adds_bos_once_and_ends_with_eos(tokenizer, chat_tokenizer):
    plain = encode(tokenizer, "12+30=", "rev 24 = 42", max_length=64)
    prompt_ids = tokenizer("12+30=", add_special_tokens=False).input_ids
    response_ids = tokenizer("rev 24 = 42", add_special_tokens=False).input_ids
    assert plain["input_ids"] == [tokenizer.bos_token_id] + prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert plain["response_start"] == 1 + len(prompt_ids)

    chat_text = format_prompt(chat_tokenizer, "12+30=")
    chat = encode(chat_tokenizer, chat_text, "rev 24 = 42", max_length=64)
    assert chat["input_ids"][0] == tokenizer.bos_token_id != chat["input_ids"][1]
    assert chat["input_ids"].count(tokenizer.bos_token_id) == 1
    assert chat["input_ids"][chat["response_start"]:] == response_ids + [tokenizer.eos_token_id]

    prompt_only = encode(tokenizer, "12+30=", None, max_length=64)
    assert prompt_only == {"input_ids": plain["input_ids"][: plain["response_start"]],
                           "response_start": plain["response_start"]}


def test_encode_truncates_the_response_not_the_prompt(tokenizer):
    full = encode(tokenizer, "12+30=", "rev 24 = 42", max_length=64)
    start = full["response_start"]
    cut = encode(tokenizer, "12+30=", "rev 24 = 42", max_length=start + 2)
    assert cut == {"input_ids": full["input_ids"][: start + 2], "response_start": start}
    exact = encode(tokenizer, "12+30=", "rev 24 = 42", max_length=start)
    assert exact["input_ids"] == full["input_ids"][:start]
    message = user_error(encode, tokenizer, "12+30=", "rev 24 = 42", max_length=start - 1, problem_id="L2-7")
    assert "'L2-7'" in message and str(start) in message


def test_collate_train_loss_mask_predicts_exactly_the_response(tokenizer):
    texts = [("1+2=", "rev 3 = 3"), ("12+30=", "rev 24 = 42"), ("5+5=", "")]
    examples = [encode(tokenizer, p, r, max_length=64) for p, r in texts]
    batch = collate_train(examples, pad_id=tokenizer.pad_token_id, pad_to_multiple=8)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (3, -(-width // 8) * 8) and batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool
    for b, (example, (_, response)) in enumerate(zip(examples, texts)):
        n = len(example["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == example["input_ids"]
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        positions = batch["loss_mask"][b].nonzero().flatten()
        targets = batch["input_ids"][b, positions + 1].tolist()
        assert targets == tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert positions[0] == example["response_start"] - 1 and positions[-1] == n - 2


def test_collate_train_truncated_row_masks_only_kept_tokens():
    batch = collate_train([{"input_ids": [1, 5, 6, 7], "response_start": 2},
                           {"input_ids": [1, 5, 6], "response_start": 3}], pad_id=0)
    assert batch["loss_mask"].tolist() == [[False, True, True, False], [False, False, False, False]]


def test_collate_prompts_left_pads():
    batch = collate_prompts([[1, 5, 6], [1, 7], [1, 8, 9, 10]], pad_id=3)
    assert batch["input_ids"].tolist() == [[3, 1, 5, 6], [3, 3, 1, 7], [1, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


# ---------------------------------------------------------------------------------------
# responses

RECORDS = [{"id": "a", "prompt": "1+2=", "answer": "3"},
           {"id": "b", "prompt": "2+2=", "answer": "4"},
           {"id": "c", "prompt": "3+3=", "answer": "6", "response": "rev 6 = 6"}]
TEACHER_ROWS = [{"id": "a", "response": "rev 3 = 3", "correct": True},
                {"id": "b", "response": "rev 5 = 5", "correct": False},
                {"id": "c", "response": "rev 6 = 6 teacher", "correct": True}]


def test_responses_path(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    path = responses_path(str(data), "/models/Llama 3/70B-Instruct/", str(tmp_path / "cache"))
    assert path.parent == tmp_path
    assert path.name.startswith("train.teacher-70B-Instruct-") and path.suffix == ".jsonl"
    assert len(path.name.split("-")[-1]) == len("12345678.jsonl")
    other = responses_path(str(data), "/other/70B-Instruct", str(tmp_path / "cache"))
    assert other != path and other.parent == tmp_path

    hub = responses_path("openai/gsm8k", "meta/Llama:3?", str(tmp_path / "cache"), split="test")
    assert hub.parent == tmp_path / "cache"
    assert hub.name.startswith("openai--gsm8k.test.teacher-Llama_3-")
    assert all(c.isalnum() or c in "._-" for c in hub.name)


def test_responses_round_trip_atomically(tmp_path):
    sha = problems_sha256(RECORDS)
    path = tmp_path / "train.teacher-t.jsonl"
    assert load_responses(path, teacher="t", data_sha256=sha) is None
    save_responses(path, TEACHER_ROWS, teacher="t", data_sha256=sha)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    header = json.loads(path.read_text().splitlines()[0])
    assert header == {"paced_ds_responses": 1, "teacher": "t", "data_sha256": sha, "count": 3}
    assert load_responses(path, teacher="t", data_sha256=sha) == {r["id"]: r for r in TEACHER_ROWS}

    # A write that fails half way leaves the old file and no temporary file behind.
    with pytest.raises(KeyError):
        save_responses(path, TEACHER_ROWS + [{"id": "d"}], teacher="t", data_sha256=sha)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert len(load_responses(path, teacher="t", data_sha256=sha)) == 3


def test_responses_mismatch_and_malformed_refused(tmp_path):
    sha = problems_sha256(RECORDS)
    path = tmp_path / "r.jsonl"
    save_responses(path, TEACHER_ROWS, teacher="t", data_sha256=sha)
    message = user_error(load_responses, path, teacher="other", data_sha256=sha)
    assert str(path) in message and "'teacher'" in message
    message = user_error(load_responses, path, teacher="t", data_sha256="0" * 64)
    assert str(path) in message and "'data_sha256'" in message

    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    assert f"{path}:3:" in user_error(load_responses, path, teacher="t", data_sha256=sha)
    path.write_text("\n".join(lines[:2] + [json.dumps({"id": "b", "response": "x"})] + lines[3:]) + "\n")
    assert "'correct'" in user_error(load_responses, path, teacher="t", data_sha256=sha)
    path.write_text("\n".join(lines[:3]) + "\n")
    assert "'count'" in user_error(load_responses, path, teacher="t", data_sha256=sha)
    path.write_text(json.dumps({"id": "a"}) + "\n")
    assert "not a paced-ds responses file" in user_error(load_responses, path, teacher="t", data_sha256=sha)


def test_problems_sha256_ignores_order_but_not_content():
    sha = problems_sha256(RECORDS)
    assert problems_sha256(list(reversed(RECORDS))) == sha
    assert problems_sha256([{**RECORDS[0], "answer": "4"}] + RECORDS[1:]) != sha
    assert problems_sha256(RECORDS[:2]) != sha
    assert len(sha) == 64


def test_attach_responses():
    responses = {r["id"]: r for r in TEACHER_ROWS}
    records, dropped = attach_responses(RECORDS, responses)
    assert dropped == 1
    assert records == [{**RECORDS[0], "response": "rev 3 = 3"}, RECORDS[2]]
    assert "response" not in RECORDS[0]
    kept, dropped = attach_responses(RECORDS, responses, keep_incorrect=True)
    assert dropped == 0 and [r["response"] for r in kept] == ["rev 3 = 3", "rev 5 = 5", "rev 6 = 6"]
    untouched, dropped = attach_responses(RECORDS, {})
    assert untouched == RECORDS and dropped == 0
