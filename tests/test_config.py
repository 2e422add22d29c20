"""The run configuration: defaults, YAML recipe, dotted overrides, one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from paced_ds.config import REPO_ROOT, RunConfig, describe, load_config, load_ds_config, parse_override, validate
from paced_ds.errors import UserError

SHIPPED_RECIPE = REPO_ROOT / "ds_configs" / "recipes" / "tiny_arith.yaml"


def user_error(fn, *args, **kwargs) -> str:
    """The message of the UserError ``fn`` raises; it must be one line."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# defaults, recipe, overrides

def test_defaults_load_and_equal_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 100 and cfg.loss.kind == "forward_kl"
    assert cfg.data.fields == {} and cfg.teacher.offload == "none"


def test_dict_defaults_are_not_shared_between_configs():
    first = load_config(overrides=["data.fields.prompt=question"])
    assert first.data.fields == {"prompt": "question"}
    assert RunConfig().data.fields == {}
    assert load_config().data.fields == {}


def test_recipe_sets_nested_keys_and_leaves_the_rest_default(tmp_path):
    path = recipe(tmp_path, """
train:
  lr: 3.0e-3
  steps: 40
  export: false
loss:
  kind: jsd
  jsd_beta: 0.25
data:
  fields:
    prompt: question
    answer: final
""")
    cfg = load_config(path)
    assert cfg.train.lr == 3e-3 and cfg.train.steps == 40 and cfg.train.export is False
    assert cfg.loss.kind == "jsd" and cfg.loss.jsd_beta == 0.25
    assert cfg.data.fields == {"prompt": "question", "answer": "final"}
    # Untouched keys keep their defaults.
    assert cfg.train.micro_batch_size == RunConfig().train.micro_batch_size
    assert cfg.model == RunConfig().model


def test_empty_recipe_is_the_defaults(tmp_path):
    assert load_config(recipe(tmp_path, "# nothing differs\n")) == RunConfig()


def test_overrides_win_over_the_recipe(tmp_path):
    path = recipe(tmp_path, "train:\n  lr: 3.0e-3\n  steps: 40\nloss:\n  kind: jsd\n")
    cfg = load_config(path, ["train.lr=5e-4", "loss.kind=akl"])
    assert cfg.train.lr == 5e-4
    assert cfg.loss.kind == "akl"
    assert cfg.train.steps == 40  # not overridden: the recipe's value stays


def test_later_override_wins_over_earlier():
    assert load_config(overrides=["train.steps=20", "train.steps=30"]).train.steps == 30


def test_override_strings_are_coerced_to_the_field_types():
    cfg = load_config(overrides=["train.lr=1e-4", "train.steps=10", "train.warmup_steps=2",
                                 "train.export=false", "logging.progress=true", "loss.temperature=2",
                                 "train.output_dir=123"])
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.steps == 10 and type(cfg.train.steps) is int
    assert cfg.train.export is False and cfg.logging.progress is True
    assert cfg.loss.temperature == 2.0 and type(cfg.loss.temperature) is float
    assert cfg.train.output_dir == "123" and type(cfg.train.output_dir) is str


@pytest.mark.parametrize("text, expected", [("True", True), ("FALSE", False), ("yes", True), ("no", False)])
def test_bool_spellings(text, expected):
    assert load_config(overrides=[f"train.export={text}"]).train.export is expected


def test_recipe_string_values_are_coerced(tmp_path):
    # YAML reads 1e-3 (no dot) as a string: it must still become a float.
    cfg = load_config(recipe(tmp_path, "train:\n  lr: 1e-3\n  steps: '12'\n  export: 'false'\n"))
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.steps == 12 and cfg.train.export is False


def test_override_of_a_dict_sub_key_adds_to_the_recipe_mapping(tmp_path):
    path = recipe(tmp_path, "data:\n  fields:\n    answer: final\n")
    cfg = load_config(path, ["data.fields.prompt=question"])
    assert cfg.data.fields == {"answer": "final", "prompt": "question"}


def test_override_value_keeps_text_after_the_first_equals_sign():
    cfg = load_config(overrides=["data.system_prompt=a=b"])
    assert cfg.data.system_prompt == "a=b"


def test_parse_override_leaves_typing_to_the_field():
    assert parse_override("train.lr=1e-4") == ("train.lr", "1e-4")
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override(" data.eval =") == ("data.eval", "")


@pytest.mark.parametrize("override, key, expected", [
    ("data.prompt_template={prompt}", "prompt_template", "{prompt}"),
    ("data.prompt_template=Question: {prompt}", "prompt_template", "Question: {prompt}"),
    ("data.system_prompt=Note: be brief", "system_prompt", "Note: be brief"),
    ("data.train=010", "train", "010"),
    ("data.eval=2024-01-01", "eval", "2024-01-01"),
    ("data.system_prompt=[x]", "system_prompt", "[x]"),
])
def test_string_fields_keep_the_text_as_typed(override, key, expected):
    # YAML would read these as a mapping, a number, a date or a list.
    assert getattr(load_config(overrides=[override]).data, key) == expected


def test_dict_override_accepts_a_flow_mapping_and_text_sub_keys():
    assert load_config(overrides=["data.fields={prompt: question}"]).data.fields == {"prompt": "question"}
    assert load_config(overrides=["data.fields.prompt=q: a"]).data.fields == {"prompt": "q: a"}


def test_empty_override_value_clears_a_string_field():
    assert load_config(overrides=["data.eval="]).data.eval == ""


# ---------------------------------------------------------------------------------------
# errors: one line, naming the key

@pytest.mark.parametrize("override, names", [
    ("nosuch.lr=1", "nosuch.lr"),
    ("train.nosuch=1", "train.nosuch"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=true", "train.lr"),
    ("train.export=maybe", "train.export"),
    ("train.export=1", "train.export"),
    ("data.fields=question", "data.fields"),
    ("data.max_length.x=1", "data.max_length"),
    ("loss.kind=kl", "loss.kind"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("teacher.offload=disk", "teacher.offload"),
    ("train=3", "train"),
])
def test_bad_override_names_the_key(override, names):
    message = user_error(load_config, None, [override])
    assert names in message


def test_wrong_type_in_recipe_names_file_and_key(tmp_path):
    path = recipe(tmp_path, "data:\n  prompt_template: [1, 2]\n")
    message = user_error(load_config, path)
    assert str(path) in message and "data.prompt_template" in message


@pytest.mark.parametrize("text, names", [
    ("nosuch:\n  x: 1\n", "nosuch"),
    ("train:\n  nosuch: 1\n", "train.nosuch"),
    ("train:\n  steps: 1.5\n", "train.steps"),
    ("train:\n  export: 3\n", "train.export"),
    ("loss:\n  kind: kl\n", "loss.kind"),
    ("data:\n  fields: [prompt]\n", "data.fields"),
    ("train: 5\n", "train"),
])
def test_bad_recipe_key_names_file_and_key(tmp_path, text, names):
    path = recipe(tmp_path, text)
    message = user_error(load_config, path)
    assert str(path) in message and names in message


def test_unknown_key_lists_the_known_ones():
    message = user_error(load_config, None, ["train.learning_rate=1"])
    assert "train.learning_rate" in message and "lr" in message


def test_override_without_equals_sign():
    message = user_error(load_config, None, ["train.lr"])
    assert "train.lr" in message and "key=value" in message


def test_override_without_key():
    assert "no key" in user_error(load_config, None, ["=3"])


@pytest.mark.parametrize("text, line", [
    ("train:\n\tlr: 1\n", 2),
    ("train:\n  lr: 1\n bad: 2\n", 3),
    ("model:\n  dtype: auto\ntrain:\n  steps: 5\n  lr: : 3\n", 5),
])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = recipe(tmp_path, text)
    message = user_error(load_config, path)
    assert f"{path}:{line}:" in message and "YAML" in message


@pytest.mark.parametrize("text", ["- train\n- loss\n", "just words\n", "42\n"])
def test_recipe_that_is_not_a_mapping(tmp_path, text):
    path = recipe(tmp_path, text)
    message = user_error(load_config, path)
    assert str(path) in message and "mapping" in message


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = user_error(load_config, missing)
    assert str(missing) in message and "not found" in message


# ---------------------------------------------------------------------------------------
# validate: impossible combinations

@pytest.mark.parametrize("overrides, names", [
    (["teacher.offload=nvme"], "teacher.nvme_path"),
    (["train.steps=0", "train.warmup_steps=0"], "train.steps"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.grad_accum=-1"], "train.grad_accum"),
    (["data.max_length=0"], "data.max_length"),
    (["loss.chunk_tokens=-1"], "loss.chunk_tokens"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1e-3"], "train.lr"),
    (["loss.temperature=0"], "loss.temperature"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.save_every=-5"], "train.save_every"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
    (["loss.jsd_beta=1.1"], "loss.jsd_beta"),
    (["loss.skew_alpha=1"], "loss.skew_alpha"),
    (["loss.akl_mu=0"], "loss.akl_mu"),
    (["data.prompt_template=Q: {question}"], "data.prompt_template"),
    (["train.offload_optimizer=cpu", "train.zero_stage=1"], "train.offload_optimizer"),
    (["train.output_dir="], "train.output_dir"),
    (["data.train="], "data.train"),
    (["rollout.overlap=true"], "rollout.overlap"),
])
def test_validate_rejects_impossible_combinations(overrides, names):
    message = user_error(load_config, None, overrides)
    assert names in message


@pytest.mark.parametrize("overrides", [
    ["teacher.offload=nvme", "teacher.nvme_path=/local_nvme"],
    ["train.steps=6", "train.warmup_steps=6"],
    ["train.steps=2", "train.warmup_steps=10"],  # clipped by the schedule, with a warning
    ["train.offload_optimizer=cpu", "train.zero_stage=2"],
    ["train.warmup_steps=0", "train.save_every=0", "loss.skew_alpha=0", "loss.akl_mu=1"],
    ["data.prompt_template=Q: {prompt}\nA:"],
])
def test_validate_accepts_the_boundaries(overrides):
    load_config(overrides=overrides)


# One out-of-range value per section: one line naming the key, the value and the range.
@pytest.mark.parametrize("override, line", [
    ("data.max_length=1", "config key data.max_length: must be >= 2, got 1"),
    ("loss.temperature=0", "config key loss.temperature: must be > 0, got 0.0"),
    ("curriculum.rollouts_tol=1", "config key curriculum.rollouts_tol: must be in (0, 1), got 1.0"),
    ("curriculum.band_hi=1.5", "config key curriculum.band_hi: must be in (0, 1], got 1.5"),
    ("snr.per_bucket=1", "config key snr.per_bucket: must be >= 2, got 1"),
    ("rollout.top_p=0", "config key rollout.top_p: must be in (0, 1], got 0.0"),
    ("teacher.topk=-1", "config key teacher.topk: must be >= 0, got -1"),
    ("train.lr=.nan", "config key train.lr: must be > 0, got nan"),
    ("train.clip_grad=.inf", "config key train.clip_grad: must be >= 0, got inf"),
    ("eval.every=-1", "config key eval.every: must be >= 0, got -1"),
    ("logging.log_every=0", "config key logging.log_every: must be >= 1, got 0"),
    ("model.dtype=fp16", "config key model.dtype: 'fp16' is not one of auto, fp32, bf16"),
])
def test_an_out_of_range_setting_of_each_section_is_one_line(override, line):
    assert user_error(load_config, None, [override]) == line


def test_every_number_has_a_range_or_choices():
    for section in dataclasses.fields(RunConfig):
        for spec in dataclasses.fields(section.default_factory):
            if spec.type in ("int", "float", int, float):
                assert spec.metadata["bounds"] or spec.metadata["choices"], f"{section.name}.{spec.name}"
                default = getattr(section.default_factory(), spec.name)
                assert spec.metadata["choices"] or default in spec.metadata["bounds"], f"{section.name}.{spec.name}"


def test_a_regular_expression_that_does_not_compile_is_refused():
    assert "config key snr.params: '(layers' is not a regular expression" in user_error(
        load_config, None, ["snr.params=(layers"])


def test_validate_checks_a_config_built_in_code():
    cfg = RunConfig()
    validate(cfg)
    cfg.train.warmup_steps = -1
    assert "train.warmup_steps" in user_error(validate, cfg)


def test_a_warmup_longer_than_the_run_is_clipped_with_one_warning(capsys):
    from paced_ds.models.engines import lr_lambda

    factor = lr_lambda(load_config(overrides=["train.steps=2", "train.warmup_steps=10", "train.min_lr_ratio=0"]).train)
    out = capsys.readouterr().out
    assert out == ("paced-ds: warning: train.warmup_steps (10) exceeds train.steps (2); warming up over all 2 "
                   "steps instead\n")
    assert [factor(step) for step in range(2)] == pytest.approx([1 / 3, 2 / 3])  # the two steps warm up


AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(AVX2_EPYC, False), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True)])
def test_bf16_instructions_are_read_from_cpuinfo(tmp_path, cpuinfo, native):
    from paced_ds.models.engines import cpu_has_native_bf16

    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is True  # cannot tell: no warning


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(monkeypatch, capsys):
    import torch

    from paced_ds.models import engines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(engines, "_WARNED_BF16_CPU", False)
    bf16, fp32 = load_config(overrides=["model.dtype=bf16"]), load_config(overrides=["model.dtype=auto"])
    assert [engines.compute_dtype(bf16) for _ in range(3)] == [torch.bfloat16] * 3  # warned, still honoured
    assert engines.compute_dtype(fp32) is torch.float32
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("paced-ds: warning: model.dtype=bf16 on a CPU without bf16")
    monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(engines, "_WARNED_BF16_CPU", False)
    engines.compute_dtype(bf16)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------
# describe

def test_describe_covers_every_field_exactly_once():
    rows = describe()
    keys = [row[0] for row in rows]
    expected = [f"{section.name}.{spec.name}" for section in dataclasses.fields(RunConfig)
                for spec in dataclasses.fields(section.default_factory)]
    assert len(keys) == len(set(keys))
    assert keys == expected
    assert "train.lr" in keys and "data.fields" in keys and "teacher.nvme_path" in keys


def test_describe_rows_carry_type_default_help_and_choices():
    rows = {key: (kind, default, help_text) for key, kind, default, help_text in describe()}
    assert rows["train.lr"][:2] == ("float", "0.0001")
    assert rows["train.steps"][:2] == ("int", "100")
    assert rows["data.fields"][:2] == ("dict", "{}")
    assert rows["train.export"][:2] == ("bool", "true")
    assert "forward_kl | reverse_kl" in rows["loss.kind"][2]
    assert all(help_text.strip() for _, _, help_text in rows.values())


# ---------------------------------------------------------------------------------------
# DeepSpeed JSON

def test_load_ds_config_reads_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert load_ds_config(str(path), "train.ds_config") == {"zero_optimization": {"stage": 3}}


def test_load_ds_config_resolves_repo_relative_paths():
    loaded = load_ds_config("ds_configs/student_zero3.json", "train.ds_config")
    assert loaded == json.loads((REPO_ROOT / "ds_configs" / "student_zero3.json").read_text())


def test_load_ds_config_missing_names_key_and_path(tmp_path):
    missing = tmp_path / "absent.json"
    message = user_error(load_ds_config, str(missing), "teacher.ds_config")
    assert "teacher.ds_config" in message and str(missing) in message


def test_load_ds_config_bad_json_names_key_and_file_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 1,\n  "zero_optimization": {stage: 3}\n}\n')
    message = user_error(load_ds_config, str(path), "train.ds_config")
    assert f"{path}:3:" in message and "train.ds_config" in message


# ---------------------------------------------------------------------------------------
# the shipped recipe

def test_shipped_recipe_loads_with_the_values_it_names():
    cfg = load_config(SHIPPED_RECIPE)
    written = yaml.safe_load(SHIPPED_RECIPE.read_text())
    assert cfg.train.steps == written["train"]["steps"] == 300
    assert cfg.train.lr == pytest.approx(1.0e-3)
    assert cfg.data.max_length == 48
    assert cfg.teacher.offload == "cpu"
    # Every key the recipe names has the recipe's value in the loaded config.
    for section, values in written.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
