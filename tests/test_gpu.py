"""On a CUDA GPU: the divergences and the chunked loss on bf16 logits against a CPU float64
computation, and a 1-rank ``paced-ds train`` in bf16 over NCCL.

Skipped where torch sees no GPU; ``tools/gpu_check.sh`` runs them on a GPU machine
(``pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from paced_ds.distill.losses import DIVERGENCES, distillation_loss

from launch import RECIPE, explain, gpu_env, read_jsonl, run, small_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}, "akl": {"mu": 0.5}}


def bf16_logits(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_divergence_on_cuda_bf16_matches_cpu_float64(kind, temperature):
    student, teacher = bf16_logits(64, 512, seed=1), bf16_logits(64, 512, seed=2)
    divergence = DIVERGENCES[kind]
    params = dict(PARAMS.get(kind, {}), temperature=temperature)
    on_cuda = divergence(student.cuda(), teacher.cuda(), **params)
    # The same bf16 values, upcast: the reference sees exactly the GPU's inputs.
    reference = divergence(student.double(), teacher.double(), **params)
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float32
    torch.testing.assert_close(on_cuda.cpu().double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, grad_tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "akl"])  # closed-form and autograd gradients
def test_chunked_loss_and_gradient_on_cuda_match_cpu(kind, dtype, grad_tolerance):
    batch, tokens, vocab = 3, 20, 512
    # Logits wider than the shared vocabulary, sliced as the trainer does: strided views.
    student_full = bf16_logits(batch, tokens, vocab + 8, seed=3).to(dtype)
    teacher_full = bf16_logits(batch, tokens, vocab + 8, seed=4).to(dtype)
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand(batch, tokens, generator=generator) < 0.6
    weights = torch.rand(batch, generator=generator) + 0.5
    kwargs = dict(kind=kind, temperature=1.5, normalizer=41.0, **PARAMS.get(kind, {}))

    def loss_and_grad(device, precision, chunk_tokens):
        student = student_full.to(device, precision).clone().requires_grad_(True)
        teacher = teacher_full.to(device, precision)
        loss, stats = distillation_loss(student[..., :vocab], teacher[..., :vocab], mask.to(device),
                                        weights.to(device), chunk_tokens=chunk_tokens, **kwargs)
        loss.backward()
        assert student.grad.dtype == precision and student.grad.device.type == torch.device(device).type
        assert not student.grad[..., vocab:].any()  # the padding columns get no gradient
        return loss.detach().cpu().double(), student.grad.cpu().double(), stats

    loss, grad, stats = loss_and_grad("cuda", dtype, chunk_tokens=7)
    ref_loss, ref_grad, _ = loss_and_grad("cpu", torch.float64, chunk_tokens=7)
    assert stats["tokens"].item() == mask.sum().item()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad, ref_grad, rtol=grad_tolerance, atol=grad_tolerance * scale)

    whole_loss, whole_grad, _ = loss_and_grad("cuda", dtype, chunk_tokens=10**6)  # one chunk
    torch.testing.assert_close(whole_loss, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(whole_grad, grad, rtol=grad_tolerance, atol=grad_tolerance * scale)


def test_one_rank_bf16_training_run_on_cuda(tmp_path):
    """`paced-ds train --nproc 1` on the GPU in bf16: NCCL, ZeRO-3 student and teacher,
    teacher responses and evaluation generated on the GPU, checkpoint and export."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    overrides = small_overrides(tmp_path, **{
        "model.dtype": "bf16", "train.steps": 4, "train.grad_accum": 2,
        "data.keep_incorrect": "true",  # a GPU check, not a test of how well the teacher solves
        "logging.tensorboard": str(tensorboard).lower()})
    # DS_ACCELERATOR=cuda: a run that fell back to the CPU would fail here instead of passing
    # (DeepSpeed's CUDA accelerator communicates over NCCL). tools/gpu_check.sh's bench runs
    # the auto-detected path.
    result = run([sys.executable, "-m", "paced_ds.cli", "train", "--config", str(RECIPE), "--nproc", "1",
                  *overrides], env=gpu_env(DS_ACCELERATOR="cuda"), timeout=600)
    assert result.returncode == 0, explain(result)

    run_dir = tmp_path / "run"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and m["loss"] >= 0 for m in metrics), metrics
    assert all(math.isfinite(m["grad_norm"]) for m in metrics), metrics
    assert all(m["peak_memory_bytes"] > 0 for m in metrics), metrics
    assert [e["step"] for e in read_jsonl(run_dir / "eval.jsonl")] == [0, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert (run_dir / "student" / "config.json").is_file()
