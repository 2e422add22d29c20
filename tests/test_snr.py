"""The gradient-SNR probe against a brute-force single-process computation, on 1 and 2 ranks."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from launch import RECIPE, REPO, explain, paced_ds, read_jsonl, run, small_overrides, write_problems

pytestmark = pytest.mark.distributed

PROBE_SCRIPT = r"""
import json, sys
import torch
from paced_ds.config import load_config
from paced_ds.curriculum.calibrate import bucket_edges
from paced_ds.distill import inputs, probe
from paced_ds.distill.teachers import EngineTeacher
from paced_ds.models import engines
from paced_ds.runtime import dist
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out, recipe, overrides = args[0], args[1], args[2:]
cfg = load_config(recipe, overrides)
tokenizer, vocab, records, _ = inputs.load_inputs(cfg)
dist.init(cfg.train.timeout_s)
teacher = engines.build_teacher(cfg)
student, _ = engines.build_student(cfg)
examples = inputs.tokenize_problems(cfg.data, tokenizer, records)
pass_rates = torch.tensor([PASS_RATES[i % len(PASS_RATES)] for i in range(len(records))], dtype=torch.float64)
result = probe.probe(student, EngineTeacher(teacher, vocab), tokenizer, examples, pass_rates,
                     bucket_edges(cfg.snr.buckets), cfg, vocab=vocab, seed=3, loss_params={})
if dist.is_main():
    json.dump({"result": result, "pass_rates": pass_rates.tolist()}, open(out, "w"))
from paced_ds.runtime import dist as _dist
_dist.shutdown()
"""
# Buckets: p=0 (many), (0,.25] (many), (.25,.5] (many), (.5,.75] (one problem only), p=1 (many).
PASS_RATES = [0.0, 0.25, 0.5, 1.0, 0.125, 0.375, 0.0, 0.25, 0.5, 1.0, 0.125, 0.375]


def run_probe(tmp_path, nproc: int) -> dict:
    data = write_problems(tmp_path / "problems.jsonl", per_level=6, with_response=True)
    records = read_jsonl(data)
    # Exactly one problem in (0.5, 0.75]: its bucket must report no value.
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT.replace("PASS_RATES[i % len(PASS_RATES)]",
                                           f"(0.6 if i == {len(records) - 1} else PASS_RATES[i % len(PASS_RATES)])")
                      .replace("pass_rates = torch", f"PASS_RATES = {PASS_RATES}\npass_rates = torch"))
    from paced_ds.runtime.dist import free_port

    overrides = small_overrides(tmp_path, **{"data.train": data, "data.eval": "", "snr.per_bucket": 5,
                                             "curriculum.mode": "uniform", "model.dtype": "fp32"})
    result = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                  str(free_port()), str(script), str(tmp_path / "snr.json"), str(RECIPE), *overrides])
    assert result.returncode == 0, explain(result)
    return json.loads((tmp_path / "snr.json").read_text()), data


def brute_force(data, pass_rates: list[float], per_bucket: int) -> dict:
    """Per-problem gradients of the plain (unsharded) models, stacked, and SNR from them."""
    from transformers import AutoModelForCausalLM

    from paced_ds.config import load_config
    from paced_ds.curriculum import snr
    from paced_ds.curriculum.calibrate import bucket_edges
    from paced_ds.data import sources
    from paced_ds.data.collate import collate_train
    from paced_ds.distill.inputs import tokenize_problems
    from paced_ds.distill.losses import distillation_loss
    from paced_ds.models import engines

    cfg = load_config(RECIPE, [f"data.train={data}", "data.eval="])
    tokenizer = engines.load_tokenizer(cfg)
    records = sources.load_train(cfg.data)
    examples = tokenize_problems(cfg.data, tokenizer, records)
    student = AutoModelForCausalLM.from_pretrained(REPO / "paced_ds" / "assets" / "tiny-student").double()
    teacher = AutoModelForCausalLM.from_pretrained(REPO / "paced_ds" / "assets" / "tiny-teacher").double()
    buckets = bucket_edges(cfg.snr.buckets)
    chosen = snr.choose_problems(torch.tensor(pass_rates), buckets, per_bucket, seed=3)
    params = list(student.parameters())
    grads: dict[int, list[torch.Tensor]] = {}
    for bucket, index in chosen:
        batch = collate_train([examples[index]], tokenizer.pad_token_id)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"]).logits
        s_logits = student(input_ids=batch["input_ids"]).logits
        loss, _ = distillation_loss(s_logits, t_logits, batch["loss_mask"], None, kind="forward_kl")
        grads.setdefault(bucket, []).append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    expected = {}
    for b, bucket in enumerate(buckets):
        stacked = torch.stack(grads[b]) if b in grads else torch.zeros(0, 1)
        n = stacked.shape[0]
        if n < 2:
            expected[bucket.name] = None
            continue
        mean = stacked.mean(0)
        noise = float(((stacked - mean) ** 2).sum() / (n - 1))  # tr Cov, unbiased
        signal = max(float(mean @ mean) - noise / n, 0.0)
        expected[bucket.name] = {"snr": signal / noise, "signal": signal, "noise": noise, "count": n}
    return expected


@pytest.mark.parametrize("nproc", [1, 2])
def test_probe_matches_brute_force(tmp_path, nproc):
    measured, data = run_probe(tmp_path, nproc)
    expected = brute_force(data, measured["pass_rates"], per_bucket=5)
    buckets = measured["result"]["buckets"]
    assert set(buckets) == set(expected)
    assert buckets["(0.5,0.75]"] is None and expected["(0.5,0.75]"] is None  # one problem: no value
    assert buckets["(0.75,1)"] is None  # empty
    valued = [name for name, v in expected.items() if v is not None]
    assert len(valued) >= 3
    for name in valued:
        got, want = buckets[name], expected[name]
        assert got["count"] == want["count"]
        for key in ("noise", "signal", "snr"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-12), (name, key, got, want)


def test_two_rank_run_logs_finite_snr_for_two_buckets_and_calibrates(tmp_path):
    result = paced_ds("train", "--config", RECIPE, "--nproc", 2,
                      *small_overrides(tmp_path, **{"snr.every": 5, "train.steps": 10, "data.eval": "",
                                                    "snr.per_bucket": 6, "curriculum.kernel": "calibrated",
                                                    "data.arith_train_per_level": 12, "curriculum.rollouts": 4,
                                                    "rollout.max_new_tokens": 16, "train.export": "false"}))
    assert result.returncode == 0, explain(result)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    snr_keys = [k for k in metrics[-1] if k.startswith("snr/") and k != "snr/probe_time_s"]
    finite = [k for k in snr_keys if math.isfinite(metrics[-1][k])]
    assert len(finite) >= 2, metrics[-1]
    probes = read_jsonl(tmp_path / "run" / "snr.jsonl")
    assert [p["step"] for p in probes] == [0, 5, 10]
    assert "calibrated kernel: alpha" in result.stdout
    assert {"curriculum/alpha", "curriculum/beta"} <= set(metrics[-1])
    # `paced-ds snr` on that run's checkpoint: merged offline, probed on 2 ranks, a table and snr.json.
    probed = paced_ds("snr", "--config", RECIPE, "--nproc", 2, "--run", tmp_path / "run",
                      *small_overrides(tmp_path, **{"train.output_dir": tmp_path / "probe", "snr.per_bucket": 4,
                                                    "data.arith_train_per_level": 12, "curriculum.rollouts": 4,
                                                    "rollout.max_new_tokens": 16, "data.eval": ""}))
    assert probed.returncode == 0, explain(probed)
    assert "| bucket | problems | mean pass rate | SNR |" in probed.stdout
    saved = json.loads((tmp_path / "probe" / "snr.json").read_text())
    assert set(saved["buckets"]) == {"p=0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "p=1"}
    assert (tmp_path / "run" / "student-step_10" / "config.json").is_file()
