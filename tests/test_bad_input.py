"""Bad input through the command line: one line naming the culprit, exit 2, nothing written.

Config, data and model problems are caught by `paced-ds train` before any rank starts, so
these run in-process (``cli.main``) except one that checks the real process exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from paced_ds import cli

from launch import RECIPE, REPO, cpu_env, explain, run, small_overrides, write_problems


def train(tmp_path: Path, *overrides: str, capsys) -> tuple[int, str]:
    code = cli.main(["train", "--config", str(RECIPE), "--nproc", "2",
                     f"train.output_dir={tmp_path / 'run'}", f"data.responses_dir={tmp_path / 'responses'}",
                     *overrides])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(tmp_path: Path, code: int, err: str, *expected: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("paced-ds: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "run").exists()  # no run directory, so no checkpoint either


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    data = write_problems(tmp_path / "train.jsonl", per_level=2, with_response=True)
    lines = data.read_text().splitlines()
    lines[4] = '{"id": "x", "prompt": "1+1=", "answer": '
    data.write_text("\n".join(lines) + "\n")
    code, err = train(tmp_path, f"data.train={data}", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.jsonl:5", "not valid JSON")


def test_missing_field_names_the_field_and_its_mapping(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "1+1="}) + "\n")
    code, err = train(tmp_path, f"data.train={data}", "data.fields.prompt=question", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.jsonl:1", "answer")


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("\n\n")
    code, err = train(tmp_path, f"data.train={data}", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.jsonl", "no problems")


def test_missing_data_file(tmp_path, capsys):
    code, err = train(tmp_path, f"data.train={tmp_path / 'nope.jsonl'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "nope.jsonl", "not found")


def test_unknown_config_key(tmp_path, capsys):
    code, err = train(tmp_path, "train.learning_rate=1e-4", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.learning_rate")


def test_wrong_type(tmp_path, capsys):
    code, err = train(tmp_path, "train.steps=many", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.steps", "integer")


def test_unknown_key_in_a_recipe_names_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  steps: 3\n  stpes: 4\n")
    code = cli.main(["train", "--config", str(recipe), f"train.output_dir={tmp_path / 'run'}"])
    assert_refused(tmp_path, code, capsys.readouterr().err.strip(), "recipe.yaml", "train.stpes")


def test_nonexistent_model_path(tmp_path, capsys):
    code, err = train(tmp_path, f"model.teacher={tmp_path / 'no-such-teacher'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "model.teacher", "no-such-teacher")


def test_teacher_with_a_different_tokenizer(tmp_path, capsys, train_tokenizer):
    prose = train_tokenizer("prose-for-cli", [f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)])
    teacher = tmp_path / "teacher"
    shutil.copytree(REPO / "paced_ds" / "assets" / "tiny-teacher", teacher)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (teacher / name).unlink(missing_ok=True)
        if (prose / name).exists():
            shutil.copy(prose / name, teacher / name)
    code, err = train(tmp_path, f"model.teacher={teacher}", capsys=capsys)
    assert_refused(tmp_path, code, err, "model.teacher", "model.student", "different tokenizers")


def test_nvme_offload_without_a_path(tmp_path, capsys):
    code, err = train(tmp_path, "teacher.offload=nvme", capsys=capsys)
    assert_refused(tmp_path, code, err, "teacher.nvme_path")


def test_process_exit_code_and_single_line(tmp_path):
    """The installed command itself: exit status 2 and one line on stderr."""
    result = run([sys.executable, "-m", "paced_ds.cli", "train", "--config", str(RECIPE),
                  f"train.output_dir={tmp_path / 'run'}", "loss.kind=kl"], env=cpu_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "paced-ds: error: config key loss.kind: 'kl' is not one of forward_kl, reverse_kl, jsd, tvd, skew_kl, "
        "skew_reverse_kl, akl"]
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_5").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_5")
    code = cli.main(["train", "--config", str(RECIPE), f"train.output_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.resume=auto" in err and "train.output_dir" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_5"]


def test_nvme_offload_says_what_to_install_when_async_io_cannot_build(tmp_path, capsys, monkeypatch):
    """Where libaio is missing; faked where it is installed, so the message is always checked."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    code, err = train(tmp_path, "teacher.offload=nvme", f"teacher.nvme_path={tmp_path / 'nvme'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "teacher.offload=nvme", "libaio")


def test_nvme_offload_config_names_the_path(tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("libaio is not installed (apt-get install libaio-dev)")
    from paced_ds.config import load_config
    from paced_ds.models.engines import teacher_ds_config

    nvme = f"teacher.nvme_path={tmp_path / 'nvme'}"
    ds_config = teacher_ds_config(load_config(RECIPE, ["teacher.offload=nvme", nvme]))
    assert ds_config["zero_optimization"]["offload_param"] == {
        **ds_config["zero_optimization"]["offload_param"], "device": "nvme", "nvme_path": str(tmp_path / "nvme")}


# ---- checkpoints and resume: refused before any rank starts, the checkpoint untouched ----

def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def saved_run(tmp_path: Path, *overrides: str, step: int = 2) -> Path:
    """A run directory with one checkpoint made by this test's config (plus ``overrides``)."""
    from paced_ds.config import load_config

    cfg = load_config(RECIPE, [f"train.output_dir={tmp_path / 'run'}", f"data.responses_dir={tmp_path / 'responses'}",
                               *overrides])
    tag = tmp_path / "run" / "checkpoints" / f"step_{step}"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (tag / "paced_ds.json").write_text(json.dumps({"step": step, "world_size": 2, "config": cfg.to_dict()}))
    (tag.parent / "latest").write_text(tag.name)
    return tmp_path / "run"


def assert_refused_untouched(run_dir: Path, before: dict, code: int, err: str, *expected: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("paced-ds: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert snapshot(run_dir) == before  # nothing written, no checkpoint overwritten


def test_config_change_on_resume_lists_the_keys(tmp_path, capsys):
    run_dir = saved_run(tmp_path)
    before = snapshot(run_dir)
    code, err = train(tmp_path, "train.resume=auto", "train.lr=0.5", "loss.kind=jsd", "train.steps=400",
                      capsys=capsys)
    assert_refused_untouched(run_dir, before, code, err, "made with another config",
                             "train.lr 0.001 -> 0.5", "loss.kind \"forward_kl\" -> \"jsd\"")
    assert "train.steps 300" not in err  # extending a run is allowed


def test_resume_path_that_does_not_exist(tmp_path, capsys):
    code, err = train(tmp_path, f"train.resume={tmp_path / 'gone' / 'step_4'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.resume", "gone/step_4")


STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short


# How a saved run is damaged, and what the refusal names.
DAMAGED = {
    "truncated latest": (lambda run: (run / "checkpoints" / "latest").write_text(""),
                         ("checkpoints/latest", "names ''")),
    "latest naming a missing checkpoint": (lambda run: (run / "checkpoints" / "latest").write_text("step_9"),
                                           ("checkpoints/latest", "'step_9'")),
    "corrupt checkpoint file": (lambda run: cut_short(run / "checkpoints" / "step_2" / STATES),
                                (STATES, "truncated or damaged")),
    "damaged checkpoint state file": (
        lambda run: (run / "checkpoints" / "step_2" / "paced_ds.json").write_text('{"step": 2, "wor'),
        ("step_2/paced_ds.json", "damaged")),
    "checkpoint without model states": (lambda run: (run / "checkpoints" / "step_2" / STATES).unlink(),
                                        ("step_2", "no DeepSpeed model states")),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_checkpoint_is_refused_and_left_as_it_is(tmp_path, capsys, case):
    damage, expected = DAMAGED[case]
    run_dir = saved_run(tmp_path)
    damage(run_dir)
    before = snapshot(run_dir)
    # An explicit checkpoint root (through its latest): train.resume=auto would fall back to an older
    # complete checkpoint instead (tests/test_checkpoint_integrity.py).
    code, err = train(tmp_path, f"train.resume={run_dir / 'checkpoints'}", capsys=capsys)
    assert_refused_untouched(run_dir, before, code, err, *expected)


def test_resume_from_an_unfinished_checkpoint(tmp_path, capsys):
    run_dir = saved_run(tmp_path)
    partial = run_dir / "checkpoints" / ".tmp-step_4"
    partial.mkdir()
    before = snapshot(run_dir)
    code, err = train(tmp_path, f"train.resume={partial}", capsys=capsys)
    assert_refused_untouched(run_dir, before, code, err, ".tmp-step_4", "unfinished")


def test_another_world_size_than_the_checkpoint(tmp_path, capsys):
    run_dir = saved_run(tmp_path)  # written by 2 ranks
    before = snapshot(run_dir)
    code = cli.main(["train", "--config", str(RECIPE), "--nproc", "3", f"train.output_dir={run_dir}",
                     f"data.responses_dir={tmp_path / 'responses'}", "train.resume=auto"])
    assert_refused_untouched(run_dir, before, code, capsys.readouterr().err.strip(),
                             "written by 2 ranks, this run has 3", "ds_to_universal")


def test_train_steps_below_the_checkpoint(tmp_path, capsys):
    run_dir = saved_run(tmp_path, step=40)
    before = snapshot(run_dir)
    code, err = train(tmp_path, "train.resume=auto", "train.steps=20", capsys=capsys)
    assert_refused_untouched(run_dir, before, code, err, "train.steps: 20 is below", "step_40")


def test_bad_yaml_names_the_recipe_and_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  steps: 3\n  lr: [1e-3\n")
    code = cli.main(["train", "--config", str(recipe), f"train.output_dir={tmp_path / 'run'}"])
    assert_refused(tmp_path, code, capsys.readouterr().err.strip(), "recipe.yaml:", "not valid YAML")


def test_missing_deepspeed_json(tmp_path, capsys):
    code, err = train(tmp_path, f"train.ds_config={tmp_path / 'nope.json'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.ds_config", "nope.json")


def test_out_of_range_value(tmp_path, capsys):
    code, err = train(tmp_path, "train.max_nonfinite_steps=0", capsys=capsys)
    assert_refused(tmp_path, code, err, "train.max_nonfinite_steps", "must be >= 1, got 0")


# Settings only the models or a parser can check, refused on the launcher before any rank starts
# (inside a rank they failed in a library call, or steps into the run at the first SNR probe).
@pytest.mark.parametrize("overrides, expected", [
    (["teacher.topk=1000000"], ("config key teacher.topk: must be <= the vocabulary", "got 1000000")),
    (["rollout.top_k=1000000"], ("config key rollout.top_k: must be <= the vocabulary",)),
    (["data.prompt_template=Q: {prompt} {level}"], ("data.prompt_template: unknown placeholder {level}",)),
    (["snr.every=5", "snr.buckets=0,0.7,0.5,1"], ("snr.buckets '0,0.7,0.5,1'",)),
    (["loss.schedule=on_policy", "teacher.self_distill=true", "teacher.privileged_template={answer} {prompt} {x}"],
     ("teacher.privileged_template: unknown placeholder {x}",)),
])
def test_settings_checked_against_the_models_and_parsers(tmp_path, capsys, overrides, expected):
    code, err = train(tmp_path, *overrides, capsys=capsys)
    assert_refused(tmp_path, code, err, *expected)


def test_missing_competence_file(tmp_path, capsys):
    code, err = train(tmp_path, f"curriculum.competence={tmp_path / 'competence.jsonl'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "curriculum.competence", "competence.jsonl")


def test_nproc_below_one(tmp_path, capsys):
    code = cli.main(["train", "--config", str(RECIPE), "--nproc", "0", f"train.output_dir={tmp_path / 'run'}",
                     f"data.responses_dir={tmp_path / 'responses'}"])
    assert_refused(tmp_path, code, capsys.readouterr().err.strip(), "--nproc", "0")


def test_malformed_fault_injection_spec(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACED_DS_FAULT", "kill:rank=1")
    code, err = train(tmp_path, capsys=capsys)
    assert_refused(tmp_path, code, err, "PACED_DS_FAULT", "step=N or save=N")


# ---------------------------------------------------------------------------------------
# Output locations, checked on the launcher before any rank starts

def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    code = cli.main(["train", "--config", str(RECIPE), f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"paced-ds: error: config key train.output_dir: {tmp_path / 'run'} is a file, not a directory"
    assert (tmp_path / "run").read_text() == "not a directory"  # left as it was


def test_an_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = train(tmp_path, f"train.output_dir={tmp_path / 'file' / 'run'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "config key train.output_dir", f"{tmp_path / 'file'} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_dir_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = train(tmp_path, f"train.output_dir={locked / 'run'}", capsys=capsys)
    assert_refused(tmp_path, code, err, "config key train.output_dir", "no write permission")


def test_a_teacher_cache_to_write_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = cli.main(["cache-teacher", "--config", str(RECIPE), f"train.output_dir={tmp_path / 'run'}",
                     f"teacher.cache={tmp_path / 'file' / 'cache'}", "teacher.topk=4"])
    assert_refused(tmp_path, code, capsys.readouterr().err.strip(), "config key teacher.cache", "is a file")


# ---------------------------------------------------------------------------------------
# Failures inside the ranks: a user error is one line from its rank, a bug keeps its traceback

@pytest.mark.distributed
def test_a_user_error_on_one_rank_is_one_line_and_its_peer_stays_quiet(tmp_path):
    """Rank 0 (which serves the job's stores) fails after step 2 while rank 1 waits in a
    collective: before, rank 1 added a gloo "Connection reset by peer" traceback."""
    overrides = small_overrides(tmp_path, **{"train.export": "false", "data.eval": "", "curriculum.mode": "uniform"})
    result = run([sys.executable, "-m", "paced_ds.cli", "train", "--config", str(RECIPE), "--nproc", "2", *overrides],
                 env=cpu_env(PACED_DS_FAULT="error:rank=0:step=2"), timeout=300)
    assert result.returncode == 2, explain(result)
    assert result.stderr.strip() == "paced-ds: error (rank 0): PACED_DS_FAULT: a user error injected after step 2", \
        explain(result)
    assert "Traceback" not in result.stdout and "Connection" not in result.stdout, explain(result)


def test_a_bug_in_a_rank_keeps_its_traceback_and_says_it_is_a_bug(capsys):
    from paced_ds.errors import BUG_NOTE, UserError
    from paced_ds.train import report_failure

    def broken_invariant():
        raise ValueError("optimizer_step: 3 sequences, 2 problems")

    try:
        broken_invariant()
    except ValueError as err:
        assert report_failure(err) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken_invariant" in err
    assert err.rstrip().endswith(BUG_NOTE) and "ValueError: optimizer_step: 3 sequences" in err
    assert report_failure(UserError("data.train: no problems")) == 2
    assert capsys.readouterr().err == "paced-ds: error: data.train: no problems\n"


def test_a_bug_on_the_launcher_keeps_its_traceback(monkeypatch, capsys):
    from paced_ds.errors import BUG_NOTE

    def broken(*args, **kwargs):
        raise KeyError("an invariant")

    monkeypatch.setattr(cli, "check_before_launch", broken)
    assert cli.main(["eval", "--config", str(RECIPE)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'an invariant'" in err and BUG_NOTE in err
