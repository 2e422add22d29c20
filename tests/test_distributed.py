"""Real multi-rank runs on the CPU accelerator: the deepspeed launcher, torchrun, ZeRO-3.

Each launch costs ~30-60 s here (imports and process start), so every test checks many
things about one run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from launch import RECIPE, REPO, explain, paced_ds, read_jsonl, run, small_overrides, write_problems

pytestmark = pytest.mark.distributed


def scalar_tags(event_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_two_rank_zero3_run_with_cpu_offloaded_teacher(tmp_path):
    """The spine: teacher responses generated and stored, a 2-rank ZeRO-3 student distilled
    from a ZeRO-3 teacher offloaded to CPU, logs, evals, checkpoints and both exports."""
    data = write_problems(tmp_path / "problems.jsonl", per_level=6, with_response=False)
    result = paced_ds("train", "--config", RECIPE, "--nproc", 2, "data.train=" + str(data),
                      *small_overrides(tmp_path, **{"teacher.offload": "cpu", "train.steps": 6,
                                                    "train.grad_accum": 2, "eval.every": 3,
                                                    "train.save_every": 3, "train.lr": 3e-4,
                                                    "curriculum.mode": "uniform"}))
    assert result.returncode == 0, explain(result)
    run_dir = tmp_path / "run"

    # Teacher responses were generated once, verified and stored beside the data.
    stored = list(tmp_path.glob("problems.teacher-*.jsonl"))
    assert len(stored) == 1, list(tmp_path.iterdir())
    header, *rows = read_jsonl(stored[0])
    assert header["count"] == len(rows) == 18 and all("correct" in row for row in rows)

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens", "samples", "grad_norm", "tokens_per_s"):
        assert all(key in m for m in metrics), key
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert metrics[-1]["samples"] == 6 * 2 * 4 * 2  # steps * ranks * micro-batch * accumulation
    assert all(b["tokens"] > a["tokens"] for a, b in zip(metrics, metrics[1:]))
    assert metrics[0]["lr"] < metrics[1]["lr"]  # warmup, then decay
    assert metrics[-1]["lr"] < metrics[1]["lr"]
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert set(evals[0]["by_difficulty"]) == {"L1", "L2", "L3"}
    assert all(0.0 <= v <= 1.0 for e in evals for v in e["by_difficulty"].values())
    # The retention set: the retention problems (6 per level) the student solved at step 0.
    retention = json.loads((run_dir / "retention.json").read_text())
    assert retention["offered"] == 18 and 0 < len(retention["ids"]) <= 18
    assert all(e["retention_set"] == len(retention["ids"]) for e in evals)
    assert evals[0]["forgotten"] == 0.0 and all(0.0 <= e["forgotten"] <= 1.0 for e in evals)
    assert all(e["retained"] == pytest.approx(1 - e["forgotten"]) for e in evals)

    tags = scalar_tags(run_dir / "tensorboard")
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/accuracy_L1"} <= tags

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_6"
    assert (checkpoints / "step_3").is_dir() and (checkpoints / "step_6").is_dir()

    # The exported student loads with transformers and matches the offline export of the
    # final checkpoint (ZeRO partitions merged in one process).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    offline = paced_ds("export", "--run", run_dir, "--out", tmp_path / "offline")
    assert offline.returncode == 0, explain(offline)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "offline")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    ids = tokenizer(["12+34=", "345+678="], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
        shipped = AutoModelForCausalLM.from_pretrained(REPO / "paced_ds" / "assets" / "tiny-student")
        assert not torch.allclose(exported(ids).logits, shipped(ids).logits)  # it did train

    # A bf16 export (train.export_dtype / --dtype): half the bytes, loads as bf16, the same model.
    half = paced_ds("export", "--run", run_dir, "--out", tmp_path / "bf16", "--dtype", "bf16")
    assert half.returncode == 0, explain(half)
    in_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(in_bf16.parameters()).dtype == torch.bfloat16
    sizes = [(d / "model.safetensors").stat().st_size for d in (tmp_path / "offline", tmp_path / "bf16")]
    assert sizes[1] == pytest.approx(sizes[0] / 2, rel=0.02)
    with torch.no_grad():
        torch.testing.assert_close(in_bf16(ids).logits.float(), merged(ids).logits, rtol=0.05, atol=0.1)

    # train.resume=auto continues from checkpoints/latest and appends to the logs.
    resumed = paced_ds("train", "--config", RECIPE, "--nproc", 2, "data.train=" + str(data),
                       *small_overrides(tmp_path, **{"teacher.offload": "cpu", "train.steps": 8,
                                                     "train.grad_accum": 2, "eval.every": 3,
                                                     "train.save_every": 3, "train.lr": 3e-4,
                                                     "curriculum.mode": "uniform", "train.resume": "auto"}))
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout and "generating teacher responses" not in resumed.stdout
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert metrics[-1]["samples"] == 8 * 2 * 4 * 2
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6, 8]
    assert (checkpoints / "latest").read_text().strip() == "step_8"
    # Measured against the same retention set after the resume.
    assert json.loads((run_dir / "retention.json").read_text()) == retention
    assert evals[-1]["retention_set"] == len(retention["ids"])


ACCUMULATION_SCRIPT = r"""
import json, sys
from paced_ds.config import load_config
from paced_ds.distill.trainer import train
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out, common = args[0], args[1:]
runs = [("mb4x1", 4, 1, []), ("mb2x2", 2, 2, []), ("mb1x4", 1, 4, []),
        ("padded", 4, 1, [f"model.teacher={out}/padded-teacher"])]
for name, mb, gas, extra in runs:
    cfg = load_config(None, common + extra + [f"train.output_dir={out}/{name}", f"train.micro_batch_size={mb}",
                                              f"train.grad_accum={gas}"])
    train(cfg)
from paced_ds.runtime import dist as _dist
_dist.shutdown()
"""


def save_padded_teacher(out: Path, extra_rows: int = 64) -> Path:
    """The shipped teacher with padding rows appended to its vocabulary (as Qwen pads its)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = REPO / "paced_ds" / "assets" / "tiny-teacher"
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(model.config.vocab_size + extra_rows, mean_resizing=False)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path):
    """Loss normalised once by the global token count: 4 problems per rank as 1x4, 2x2 or
    4x1 micro-batches give the same training trajectory on 2 ZeRO-3 ranks. A teacher whose
    vocabulary has padding rows appended scores the shared range exactly like the original."""
    data = write_problems(tmp_path / "problems.jsonl", per_level=8, with_response=True)
    save_padded_teacher(tmp_path / "padded-teacher")
    script = tmp_path / "accumulate.py"
    script.write_text(ACCUMULATION_SCRIPT)
    overrides = small_overrides(tmp_path, **{
        "data.train": data, "data.eval": "", "train.steps": 3, "train.export": "false",
        "train.lr": 1e-2, "train.warmup_steps": 0, "loss.kind": "akl", "train.clip_grad": 0})
    result = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                  str(_port()), str(script), str(tmp_path), *overrides])
    assert result.returncode == 0, explain(result)
    runs = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("mb4x1", "mb2x2", "mb1x4", "padded")}
    reference = [m["loss"] for m in runs["mb4x1"]]
    assert len(reference) == 3 and reference[-1] != reference[0]
    for name in ("mb2x2", "mb1x4", "padded"):
        assert [m["loss"] for m in runs[name]] == pytest.approx(reference, rel=1e-5), name
        assert [m["grad_norm"] for m in runs[name]] == pytest.approx(
            [m["grad_norm"] for m in runs["mb4x1"]], rel=1e-4), name


def test_deepspeed_and_torchrun_entry_points(tmp_path):
    """`deepspeed --module paced_ds.train` (generate) and `torchrun -m paced_ds.train` (eval)."""
    data = write_problems(tmp_path / "problems.jsonl", per_level=3, with_response=False)
    overrides = small_overrides(tmp_path, **{"data.train": data})
    deepspeed = shutil.which("deepspeed") or "deepspeed"
    generated = run([deepspeed, "--num_gpus", "2", "--master_port", str(_port()), "--module", "paced_ds.train",
                     "--task", "generate", "--config", str(RECIPE), *overrides])
    assert generated.returncode == 0, explain(generated)
    stored = list(tmp_path.glob("problems.teacher-*.jsonl"))
    assert len(stored) == 1
    assert "teacher solved" in generated.stdout

    evaluated = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", str(_port()), "-m", "paced_ds.train", "--task", "eval",
                     "--config", str(RECIPE), "--result-json", str(tmp_path / "eval.json"), *overrides])
    assert evaluated.returncode == 0, explain(evaluated)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["count"] == 3 * 6 and set(result["by_difficulty"]) == {"L1", "L2", "L3"}


def _port() -> int:
    from paced_ds.runtime.dist import free_port

    return free_port()
