"""Every artefact a run reads back is checked before it is used: a truncated or inconsistent
teacher cache, competence file, stored responses file, DeepSpeed JSON or recipe is one line
naming the file (and line or key) and what is wrong. One process, the readers called directly;
one test goes through `paced-ds train` to show a broken cache refused before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paced_ds import cli
from paced_ds.config import load_config, load_ds_config
from paced_ds.curriculum.competence import CompetenceTable
from paced_ds.data.responses import load_responses, problems_sha256, save_responses
from paced_ds.distill import cache
from paced_ds.errors import UserError

from launch import RECIPE

K, VOCAB = 4, 9
SHARDS = {0: (["a", "b"], [0, 2, 5]), 1: (["c"], [0, 3])}  # rank: (problem ids, offsets)
MANIFEST = {"teacher": "t", "tokenizer": "x", "k": K, "vocab": VOCAB, "data": "d", "temperature": 1.0,
            "paced_ds": "test", "problems": 3}


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def make_cache(directory: Path) -> Path:
    torch.manual_seed(0)
    for rank, (ids, offsets) in SHARDS.items():
        tokens = offsets[-1]
        cache.write_shard(directory, rank, ids, torch.randint(0, VOCAB, (tokens, K), dtype=torch.int32),
                          torch.randn(tokens, K), torch.rand(tokens), offsets)
    cache.write_manifest(directory, MANIFEST, len(SHARDS))
    return directory


def test_a_whole_cache_passes_and_answers(tmp_path):
    make_cache(tmp_path)
    assert cache.check_cache(tmp_path)["shards"] == 2
    answer = cache.TeacherCache(tmp_path, MANIFEST).answer(["c", "a"])
    assert answer.per_sample.tolist() == [3, 2] and answer.ids.shape == (5, K)


def shard(directory: Path, rank: int) -> Path:
    return directory / f"shard-{rank:05d}.safetensors"


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def rewrite_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def rewrite_shard(directory: Path, rank: int, **tensors) -> None:
    """Shard ``rank`` written again with some of its tensors (or its ids) replaced."""
    from safetensors.torch import load_file, save_file

    path = shard(directory, rank)
    ids = tensors.pop("ids", SHARDS[rank][0])
    save_file({**load_file(str(path)), **tensors}, str(path), metadata={"ids": json.dumps(ids)})


@pytest.mark.parametrize("damage, file, fragment", [
    (lambda d: cut(d / "manifest.json", 40), "manifest.json", "not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "manifest.json", "not a JSON object"),
    (lambda d: rewrite_manifest(d, k="4"), "manifest.json", "key 'k' must be a positive integer (got '4')"),
    (lambda d: rewrite_manifest(d, shards=None), "manifest.json", "key 'shards' must be a positive integer"),
    (lambda d: rewrite_manifest(d, k=VOCAB + 1), "manifest.json", "is more than key 'vocab'"),
    (lambda d: rewrite_manifest(d, problems=4), "manifest.json", "key 'problems' is 4 but its 2 shards hold 3"),
    (lambda d: rewrite_manifest(d, shards=3), "shard-00002.safetensors", "missing (the manifest lists 3 shards)"),
    (lambda d: shard(d, 1).unlink(), "shard-00001.safetensors", "missing"),
    (lambda d: cut(shard(d, 0), shard(d, 0).stat().st_size - 4), "shard-00000.safetensors", "truncated"),
    (lambda d: cut(shard(d, 1), 30), "shard-00001.safetensors", "truncated"),
    (lambda d: shard(d, 1).write_bytes(b"not a shard at all, but long enough"), "shard-00001.safetensors",
     "truncated"),
    (lambda d: rewrite_manifest(d, k=K - 1), "shard-00000.safetensors",
     "tensor 'top_ids' should be I32 [5, 3] (k=3 in manifest.json, 2 problems), found I32 [5, 4]"),
    (lambda d: rewrite_shard(d, 1, top_logp=torch.zeros(3, K, dtype=torch.float64)), "shard-00001.safetensors",
     "tensor 'top_logp' should be F32 [3, 4]"),
    (lambda d: rewrite_shard(d, 1, ids=["c", "d"]), "shard-00001.safetensors", "tensor 'offsets' should be I64 [3]"),
    (lambda d: rewrite_shard(d, 0, offsets=torch.tensor([0, 3, 4])), "shard-00000.safetensors",
     "offsets (from 0 to 4) do not split its 5 token rows among its 2 problems"),
    (lambda d: rewrite_shard(d, 1, ids=["a"]), "shard-00001.safetensors", "problem 'a' is in shard-00000"),
])
def test_a_broken_cache_is_refused_naming_the_file(tmp_path, damage, file, fragment):
    make_cache(tmp_path)
    damage(tmp_path)
    message = one_line_error(cache.check_cache, tmp_path)
    assert message.startswith(f"{tmp_path / file}: ") and fragment in message, message
    assert message.endswith("run `paced-ds cache-teacher` again")
    assert one_line_error(cache.TeacherCache, tmp_path, MANIFEST) == message  # every rank checks it too


def test_a_cache_for_another_run_or_other_problems_is_refused(tmp_path):
    make_cache(tmp_path)
    message = one_line_error(cache.TeacherCache, tmp_path, {**MANIFEST, "k": 2, "tokenizer": "y"})
    assert message.startswith(f"{tmp_path / 'manifest.json'}: this cache was made for another run")
    assert "tokenizer: 'x' there, 'y' here" in message and "k: 4 there, 2 here" in message
    message = one_line_error(cache.TeacherCache, tmp_path, {**MANIFEST, "problems": 4})
    assert message.startswith(f"{tmp_path}: its shards hold 3 problems, this run has 4")


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("row, fragment", [
    ({"id": "b", "correct": 3, "trials": 2}, "'correct' (3) is more than 'trials' (2)"),
    ({"id": "b", "correct": 1, "trials": 2.5}, "field 'trials' must be a whole number of rollouts, got 2.5"),
    ({"id": "b", "correct": 0.5, "trials": 2}, "field 'correct' must be a whole number of rollouts, got 0.5"),
    ({"id": "b", "correct": 1, "trials": 4, "pass_rate": 0.75}, "'pass_rate' (0.75) is not 'correct' / 'trials'"),
    ({"id": "b", "correct": 0, "trials": 0, "pass_rate": 0.0}, "'pass_rate' (0.0) is not 'correct' / 'trials'"),
    ({"id": "b", "correct": 1, "trials": 2, "pass_rate": 2}, "field 'pass_rate' must be a number in [0, 1]"),
    ('{"id": "b", "correct": NaN, "trials": 2}', "field 'correct' must be a number, got nan"),
    ({"id": "b", "correct": 1, "trials": -1}, "field 'trials' must not be negative"),
    ('{"id": "b", "correct": 1, "tri', "not valid JSON"),
    ({"id": "a", "correct": 0, "trials": 2}, "duplicate id 'a' (first at line 1)"),
])
def test_a_competence_row_that_cannot_be_a_pass_rate_names_file_and_line(tmp_path, row, fragment):
    path = write_lines(tmp_path / "competence.jsonl", [{"id": "a", "correct": 1, "trials": 2}, row])
    message = one_line_error(CompetenceTable.read_jsonl, path, ["a", "b"])
    assert message.startswith(f"{path}:2: ") and fragment in message, message


def test_competence_files_as_written_are_read_back(tmp_path):
    """An untried problem (0 of 0, pass rate null), a rounded pass rate beside its counts, and a
    fractional count made from a pass rate all read; the table's own file reads back as written."""
    path = write_lines(tmp_path / "given.jsonl", [{"id": "a", "correct": 0, "trials": 0, "pass_rate": None},
                                                  {"id": "b", "correct": 1, "trials": 3, "pass_rate": 0.333},
                                                  {"id": "c", "pass_rate": 0.33, "trials": 3}])
    table = CompetenceTable.read_jsonl(path, ["a", "b", "c"])
    assert table.trials.tolist() == [0, 3, 3] and table.correct[:2].tolist() == [0, 1]
    assert table.correct[2].item() == pytest.approx(0.99)
    written = table.write_jsonl(tmp_path / "competence.jsonl")
    again = CompetenceTable.read_jsonl(written, ["a", "b", "c"])
    assert again.digest() == table.digest()


RECORDS = [{"id": i, "prompt": f"{i}?", "answer": "1"} for i in ("a", "b", "c")]
ROWS = [{"id": i, "response": f"{i} = 1", "correct": True} for i in ("a", "b", "c")]


def stored_responses(tmp_path: Path) -> tuple[Path, str]:
    sha = problems_sha256(RECORDS)
    return save_responses(tmp_path / "train.teacher-t.jsonl", ROWS, teacher="t", data_sha256=sha), sha


def test_stored_responses_truncated_or_for_other_ids_name_file_and_line(tmp_path):
    path, sha = stored_responses(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3][:25]]))  # the last line cut short
    message = one_line_error(load_responses, path, teacher="t", data_sha256=sha)
    assert message.startswith(f"{path}:4: not valid JSON")

    path.write_text("\n".join(lines[:2] + [json.dumps({"id": "b", "correct": True})] + lines[3:]) + "\n")
    assert one_line_error(load_responses, path, teacher="t", data_sha256=sha).startswith(
        f"{path}:3: field 'response' must be a str")

    needed = ["a", "b", "c"]
    path.write_text("\n".join(lines[:3] + [json.dumps({"id": "z", "response": "z", "correct": True})]) + "\n")
    message = one_line_error(load_responses, path, teacher="t", data_sha256=sha, needed=needed)
    assert message.startswith(f"{path}:4: id 'z' is not a problem of the data")

    header = json.loads(lines[0])
    path.write_text("\n".join([json.dumps({**header, "count": 2})] + lines[1:3]) + "\n")
    message = one_line_error(load_responses, path, teacher="t", data_sha256=sha, needed=needed)
    assert message.startswith(f"{path}: no response for 1 of the 3 problems that need one (e.g. 'c')")

    path.write_text("\n".join(lines) + "\n")
    assert sorted(load_responses(path, teacher="t", data_sha256=sha, needed=needed)) == needed


@pytest.mark.parametrize("text, fragment", [
    ("[{\"train_micro_batch_size_per_gpu\": 8}]", "a DeepSpeed config is a JSON object, got a list"),
    ('{"zero_optimization": {"stage": 3', "not valid JSON"),
    ('{"optimizer": "AdamW"}', "key 'optimizer' must be a JSON object, got \"AdamW\""),
    ('{"optimizer": {"type": "AdamW", "params": null}}', "key 'optimizer.params' must be a JSON object, got null"),
    ('{"zero_optimization": {"offload_param": "cpu"}}', "key 'zero_optimization.offload_param' must be a JSON obj"),
    ('{"zero_optimization": {"offload_param": {"buffer_size": "1e8"}}}', "buffer_size' must be a number"),
    (b'{"steps_per_print": 1, "note": "caf\xe9"}', "not valid JSON"),
])
def test_a_deepspeed_json_of_the_wrong_shape_names_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "ds.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    message = one_line_error(load_ds_config, str(path), "train.ds_config")
    assert message.startswith(str(path)) and fragment in message and message.endswith("(config key train.ds_config)")
    assert "is a directory" in one_line_error(load_ds_config, str(tmp_path), "train.ds_config")


def test_a_recipe_that_is_a_directory_or_not_utf8_is_one_line(tmp_path):
    assert one_line_error(load_config, tmp_path) == f"recipe {tmp_path} is a directory; name its YAML file"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"train:\n  steps: 3  # caf\xe9\n")
    assert one_line_error(load_config, recipe) == f"{recipe}:2: not UTF-8 text (invalid continuation byte at byte 24)"


def test_train_refuses_a_truncated_cache_before_any_rank_starts(tmp_path, capsys):
    make_cache(tmp_path / "cache")
    cut(tmp_path / "cache" / "manifest.json", 30)
    code = cli.main(["train", "--config", str(RECIPE), "--nproc", "2", f"train.output_dir={tmp_path / 'run'}",
                     f"data.responses_dir={tmp_path / 'responses'}", "teacher.backend=cache",
                     f"teacher.cache={tmp_path / 'cache'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"paced-ds: error: {tmp_path / 'cache' / 'manifest.json'}: not valid JSON")
    assert not (tmp_path / "run").exists()
