"""The GPU recipes (ds_configs/recipes/*.yaml beside tiny_arith.yaml): each resolves, fits by
``paced-ds plan --config`` on one node of 8 x 80 GB GPUs with the placement it chose, and trains
2 optimizer steps on 2 CPU ranks as written, with tiny random models of its architectures.

The launched runs swap in only what the CPU or random weights cannot do:
- the models: tiny random-weight models of the recipe's architectures (built from the shipped
  config.json with hidden 64, 2-3 layers, the shipped tiny tokenizer), since the hub cannot
  be reached and a 70B does not fit here;
- the student's DeepSpeed JSON, with ``torch_adam`` added: FusedAdam is a CUDA kernel (on the
  CPU accelerator DeepSpeed would first JIT-compile a stand-in, a minute per machine);
- the sizes: sequence and generation lengths, 2 steps (so no warmup), a few problems written
  in the recipe's own field layout (with reference responses), a small held-out set;
- pass rates given (``curriculum.competence``): a random student solves nothing, so every
  PACED weight would be 0.
Everything else runs as the recipe says: bf16, ZeRO-3 with overlap_comm, contiguous gradients
and its bucket sizes, the teacher's own JSON and placement (CPU offload included), gradient
checkpointing, the schedule (two-stage, on-policy self-distillation), micro-batch and
accumulation, teacher.forward_micro_batches, the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paced_ds import cli
from paced_ds.config import load_config, resolve_path
from paced_ds.data import arith
from paced_ds.runtime import memory

from launch import REPO, explain, paced_ds, read_jsonl

RECIPES = REPO / "ds_configs" / "recipes"
GPU_RECIPES = ["qwen3_8b_to_1.7b.yaml", "qwen3_8b_to_1.7b_16k.yaml", "qwen3_8b_to_1.7b_32k.yaml",
               "llama70b_to_8b.yaml", "qwen2.5_math_7b_self_distill.yaml"]
PIPELINED = ["teacher.backend=pipelined", "teacher.ranks=3", "teacher.offload=none", "teacher.topk=64",
             "eval.batch_size=6"]  # the 70B recipe's documented variant: the teacher on GPUs of its own
TOKENIZER = REPO / "paced_ds" / "assets" / "tiny-student"
TINY_WIDTH = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16}


def recipe(name: str) -> Path:
    return RECIPES / name


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_resolves_and_names_gpu_settings(name, capsys):
    assert cli.main(["config", "--config", str(recipe(name))]) == 0
    assert "model:" in capsys.readouterr().out
    cfg = load_config(recipe(name))
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    for model in (cfg.model.student, cfg.model.teacher):
        assert memory.architecture_dir(model) is not None, f"{model}: no shipped architecture"
    student_json = json.loads(resolve_path(cfg.train.ds_config).read_text())
    assert cfg.train.ds_config.startswith("ds_configs/gpu/")
    zero = student_json["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert student_json["bf16"] == {"enabled": True}
    assert student_json["optimizer"]["type"] == "AdamW" and "torch_adam" not in student_json["optimizer"]["params"]
    teacher_json = json.loads(resolve_path(cfg.teacher.ds_config).read_text())
    assert cfg.teacher.ds_config.startswith("ds_configs/gpu/") and teacher_json["zero_optimization"]["stage"] == 3


def test_every_shipped_architecture_builds_on_the_meta_device():
    """The public config.json facts: parameter counts as the model cards give them."""
    expected_billions = {"Qwen/Qwen3-8B": 8.19, "Qwen/Qwen3-1.7B": 1.72, "meta-llama/Llama-3.1-70B-Instruct": 70.55,
                         "meta-llama/Llama-3.1-8B-Instruct": 8.03, "Qwen/Qwen2.5-Math-7B-Instruct": 7.62}
    assert memory.shipped_architectures() == sorted(expected_billions)
    for hub_id, billions in expected_billions.items():
        shape = memory.model_shape(hub_id, flag="--teacher")
        assert shape.params / 1e9 == pytest.approx(billions, abs=0.01), hub_id
        assert shape.kv_bytes_per_token > 0


@pytest.mark.parametrize("name, overrides, placement", [
    ("qwen3_8b_to_1.7b.yaml", [], "teacher.offload=none"),
    ("qwen3_8b_to_1.7b_16k.yaml", [], "teacher.offload=none"),
    ("qwen3_8b_to_1.7b_32k.yaml", [], "teacher.offload=none"),
    ("llama70b_to_8b.yaml", [], "teacher.offload=cpu"),
    ("llama70b_to_8b.yaml", PIPELINED, "teacher.backend=pipelined teacher.ranks=3"),
    ("qwen2.5_math_7b_self_distill.yaml", [], "teacher.offload=none"),
])
def test_plan_says_the_recipe_fits_one_node_of_8_80gb(name, overrides, placement, capsys):
    code = cli.main(["plan", "--config", str(recipe(name)), "--nodes", "1", "--gpus-per-node", "8",
                     "--gpu-mem", "80GB", *overrides])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"recipe placement: {placement}, train.offload_optimizer=none:" in out
    assert "does not fit" not in out.split("recommended:")[1]
    assert "verdict: the recipe fits on 1 node of 8 GPUs of 80GB" in out


def test_plan_of_a_recipe_that_does_not_fit_exits_1(capsys):
    """The 70B teacher resident beside the 8B student trains, but its rollouts and its response
    generation do not fit: why the recipe offloads it."""
    code = cli.main(["plan", "--config", str(recipe("llama70b_to_8b.yaml")), "teacher.offload=none"])
    out = capsys.readouterr().out
    assert code == 1
    assert "recipe placement: teacher.offload=none, train.offload_optimizer=none:" in out and ": fits" in out
    assert "student rollouts:" in out and "does not fit" in out
    assert "verdict: the recipe does not fit" in out


def test_plan_flags_still_work_and_take_hub_ids(capsys):
    assert cli.main(["plan", "--teacher", "Qwen/Qwen3-8B", "--student", "Qwen/Qwen3-1.7B", "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("teacher 8.2B params (hidden 4096, 36 layers), student 1.7B (hidden 2048, 28 layers)")
    assert "recommended: resident teacher" in out and "verdict" not in out
    assert cli.main(["plan", "--teacher", "acme/NoSuchModel-9B", "--student", "7B"]) == 2
    assert "no architecture shipped for that hub id" in capsys.readouterr().err


# ---- 2 optimizer steps on 2 CPU ranks -------------------------------------------------------------------------

def tiny_model(hub_id: str, out: Path, layers: int, seed: int) -> Path:
    """A random-weight model of ``hub_id``'s architecture (its shipped config.json: family,
    rope, tied or untied embeddings, q/k norms) at hidden 64 and ``layers`` layers, with the
    shipped tiny tokenizer and a vocabulary of its size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    facts = json.loads((memory.architecture_dir(hub_id) / "config.json").read_text())
    facts.update(TINY_WIDTH, num_hidden_layers=layers, max_window_layers=layers, vocab_size=len(tokenizer),
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(facts.pop("model_type"), **facts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cpu_student_json(cfg, out: Path) -> Path:
    """The recipe's student JSON with the one change the CPU accelerator needs: torch's AdamW."""
    ds_config = json.loads(resolve_path(cfg.train.ds_config).read_text())
    ds_config["optimizer"]["params"]["torch_adam"] = True
    out.write_text(json.dumps(ds_config, indent=2))
    return out


def write_problems(cfg, path: Path, split: str, per_level: int) -> Path:
    """Generated problems in the recipe's field layout (data.fields), with reference responses."""
    source = {"prompt": "prompt", "answer": "answer", "difficulty": "difficulty", **cfg.data.fields}
    rows = []
    for record in arith.dataset(split, per_level, seed=0):
        row = {source[name]: record[name] for name in ("prompt", "answer", "difficulty")}
        rows.append({"id": record["id"], **row, "response": record["response"]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_competence(problems: Path, path: Path) -> Path:
    """Pass rates between 0 and 1 for every problem (so every PACED weight is positive)."""
    rows = [{"id": row["id"], "correct": 1 + i % 7, "trials": 8} for i, row in enumerate(read_jsonl(problems))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def small_run(name: str, tmp_path: Path) -> list[str]:
    cfg = load_config(recipe(name))
    student = tiny_model(cfg.model.student, tmp_path / "student", layers=2, seed=1)
    teacher = student if cfg.teacher.self_distill else tiny_model(cfg.model.teacher, tmp_path / "teacher",
                                                                 layers=3, seed=2)
    problems = write_problems(cfg, tmp_path / "train.jsonl", "train", per_level=4)
    values = {
        "model.student": student, "model.teacher": teacher,
        "train.ds_config": cpu_student_json(cfg, tmp_path / "student_cpu.json"),
        "data.train": problems, "data.eval": write_problems(cfg, tmp_path / "eval.jsonl", "eval", per_level=2),
        "data.responses_dir": tmp_path / "responses", "curriculum.competence": write_competence(
            problems, tmp_path / "competence.jsonl"),
        "data.max_length": 128, "rollout.max_new_tokens": 8, "eval.max_new_tokens": 8,
        "data.generate_max_new_tokens": 8, "train.steps": 2, "train.warmup_steps": 0,
        "train.output_dir": tmp_path / "run", "logging.progress": "false",
    }
    return [f"{key}={value}" for key, value in values.items()]


@pytest.mark.distributed
@pytest.mark.parametrize("name, on_policy", [
    ("qwen3_8b_to_1.7b.yaml", [False, True]),          # two_stage: forward KL, then reverse KL on rollouts
    ("llama70b_to_8b.yaml", [False, False]),            # forward KL, the teacher offloaded to CPU
    ("qwen2.5_math_7b_self_distill.yaml", [True, True]),  # on-policy self-distillation
])
def test_recipe_trains_two_steps_on_cpu_at_tiny_width(name, on_policy, tmp_path):
    cfg = load_config(recipe(name))
    result = paced_ds("train", "--config", recipe(name), "--nproc", 2, *small_run(name, tmp_path), timeout=600)
    assert result.returncode == 0, explain(result)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert [m["on_policy"] for m in metrics] == on_policy
    assert all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in metrics)  # finite, and it trained
    # 2 ranks x micro-batch x accumulation problems per step, as the recipe has them.
    assert metrics[-1]["samples"] == 2 * 2 * cfg.train.micro_batch_size * cfg.train.grad_accum
    assert f"offload={cfg.teacher.offload}" in result.stdout
    exported = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert exported["model_type"] == json.loads(
        (memory.architecture_dir(cfg.model.student) / "config.json").read_text())["model_type"]
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]


def test_plan_names_the_sequence_parallel_size_that_fits(capsys):
    """Traces too long for one GPU a sequence: the planner says which train.sequence_parallel fits."""
    code = cli.main(["plan", "--teacher", "Qwen/Qwen3-8B", "--student", "Qwen/Qwen3-1.7B", "--seq-len", "524288",
                     "--gpu-mem", "80GB"])
    out = capsys.readouterr().out
    assert code == 0 and "nothing fits on 8 GPUs: train.sequence_parallel=2 fits" in out
    cli.main(["plan", "--teacher", "Qwen/Qwen3-8B", "--student", "Qwen/Qwen3-1.7B", "--seq-len", "524288",
              "--gpu-mem", "80GB", "--sequence-parallel", "2"])
    assert "each split over 2 GPUs (sequence parallel)" in capsys.readouterr().out
