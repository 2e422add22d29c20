"""Time and peak memory of the chunked distillation loss against full materialisation.

    python tools/bench_losses.py [--tokens 8192] [--vocab 32000 152064] [--kinds ...]
                                 [--chunk-tokens N] [--threads 1] [--repeats 2] [--quick]

For each divergence and vocabulary size it measures forward + backward of
- chunked: ``distillation_loss`` (chunks of tokens, recomputed in backward);
- naive: the same per-token divergence on the whole [tokens, vocab] tensors with plain
  autograd (float32 log_softmax of both, every intermediate kept for backward);
on bf16 logits [tokens, vocab] (student requires grad), and prints a markdown table.
Target per row: chunked peak <= 25% of naive's and speed >= 0.9x naive's.

Every measurement runs in a fresh process: its peak RSS (VmHWM, reset once the inputs
exist) minus its RSS at that point is the peak extra memory of that case alone (the
student's gradient included, which both need). A case whose estimated peak exceeds
--max-memory-gb (by default 60% of the memory available now) is skipped; a case that
still runs out is capped by RLIMIT_DATA and reported as OOM instead of pushing the
machine into the OOM killer. Timings are the best of --repeats runs, on --threads torch threads (one
by default: on a shared machine it gives the steadiest numbers).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from paced_ds.distill.losses import DIVERGENCES, default_chunk_tokens, distillation_loss  # noqa: E402

GIB = 1024**3
DEFAULT_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "akl")
# Peak extra bytes per logit element beyond the two bf16 inputs, measured at 2048 and
# 8192 x 32000 and rounded up, used to skip cases that cannot fit. Chunked cases pay
# for the bf16 gradient (2 bytes) plus a few float32 chunk buffers.
NAIVE_BYTES_PER_ELEMENT = {"forward_kl": 26, "reverse_kl": 26, "jsd": 44, "tvd": 26, "skew_kl": 40,
                           "skew_reverse_kl": 40, "akl": 36}
CHUNK_BUFFERS = 24  # float32 [chunk_tokens, vocab] buffers a chunked case may hold at once


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Make the peak RSS (VmHWM) start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def random_logits(tokens: int, vocab: int, scale: float):
    """bf16 [tokens, vocab] logits, filled in blocks so no float32 copy of it exists."""
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16)
    for start in range(0, tokens, 256):
        block = logits[start : start + 256]
        block.copy_(torch.randn(block.shape) * scale)
    return logits


def run_case(kind, impl, tokens, vocab, chunk_tokens, repeats, threads) -> dict:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = random_logits(tokens, vocab, scale=2.0).requires_grad_(True)
    teacher = random_logits(tokens, vocab, scale=4.0)

    def forward_backward(student, teacher):
        if impl == "chunked":
            response_mask = torch.ones(1, student.shape[0], dtype=torch.bool)
            loss, _ = distillation_loss(
                student[None], teacher[None], response_mask, None, kind=kind, chunk_tokens=chunk_tokens
            )
        else:
            loss = DIVERGENCES[kind](student, teacher).mean()
        loss.backward()
        return float(loss)

    # A tiny run first pages in the code this case uses, which RSS would count; then
    # freed heap goes back to the OS, or the case could reuse it unseen.
    forward_backward(student[:4].detach().clone().requires_grad_(True), teacher[:4])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline_bytes = current_rss_bytes()
    reset_peak_rss()
    times_s = []
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        loss = forward_backward(student, teacher)
        times_s.append(time.perf_counter() - start)
    peak_bytes = peak_rss_bytes() - baseline_bytes
    return {"status": "ok", "time_s": min(times_s), "peak_bytes": peak_bytes, "loss": loss}


def estimate_bytes(kind: str, impl: str, tokens: int, vocab: int, chunk_tokens: int) -> int:
    inputs = 2 * 2 * tokens * vocab
    if impl == "naive":
        return inputs + NAIVE_BYTES_PER_ELEMENT[kind] * tokens * vocab
    return inputs + 2 * tokens * vocab + CHUNK_BUFFERS * 4 * min(chunk_tokens, tokens) * vocab


def measure(kind, impl, tokens, vocab, chunk_tokens, repeats, threads, max_bytes) -> dict:
    """Run one case in a subprocess capped at max_bytes of data; never raises."""
    estimate = estimate_bytes(kind, impl, tokens, vocab, chunk_tokens)
    if estimate > max_bytes:
        return {"status": f"skipped (needs ~{estimate / GIB:.0f} GiB)"}
    command = [sys.executable, __file__, "--case", kind, impl, str(tokens), str(vocab),
               str(chunk_tokens), str(repeats), str(threads), str(max_bytes)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        if "memory" in result.stderr.lower() or result.returncode < 0:  # allocator refused, or killed
            return {"status": "OOM"}
        last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return {"status": f"failed: {last_line}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def format_row(kind, vocab, chunked, naive) -> str:
    def cell(result, key, unit):
        if result["status"] != "ok":
            return result["status"]
        return f"{result[key] / unit:.2f}"

    memory_ratio = speed = meets = "-"
    if chunked["status"] == "ok" and naive["status"] == "ok":
        memory = chunked["peak_bytes"] / naive["peak_bytes"]
        speedup = naive["time_s"] / chunked["time_s"]
        memory_ratio, speed = f"{memory:.0%}", f"{speedup:.2f}x"
        meets = "yes" if memory <= 0.25 and speedup >= 0.9 else "no"
    return (f"| {kind} | {vocab} | {cell(chunked, 'time_s', 1)} | {cell(naive, 'time_s', 1)} | {speed} "
            f"| {cell(chunked, 'peak_bytes', GIB)} | {cell(naive, 'peak_bytes', GIB)} | {memory_ratio} | {meets} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per measurement")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064], help="vocabulary sizes")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), help="divergences to measure")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="distillation_loss chunk_tokens (default: its own choice per vocabulary)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is kept)")
    parser.add_argument("--impls", nargs="+", default=["chunked", "naive"], choices=["chunked", "naive"])
    parser.add_argument("--quick", action="store_true", help="a small size: 1024 tokens, vocab 32000")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip cases estimated above this (default: 60%% of available memory)")
    parser.add_argument("--case", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        kind, impl, tokens, vocab, chunk_tokens, repeats, threads, max_bytes = args.case
        resource.setrlimit(resource.RLIMIT_DATA, (int(max_bytes), int(max_bytes)))
        result = run_case(kind, impl, int(tokens), int(vocab), int(chunk_tokens), int(repeats), int(threads))
        print(json.dumps(result))
        return

    if args.quick:
        args.tokens, args.vocab = 1024, [32000]
    max_bytes = int(args.max_memory_gb * GIB) if args.max_memory_gb else int(0.6 * available_bytes())
    print(f"tokens={args.tokens} chunk_tokens={args.chunk_tokens or 'default'} threads={args.threads} "
          f"repeats={args.repeats} memory cap={max_bytes / GIB:.1f} GiB; bf16 inputs; "
          f"time = forward + backward (s); memory = peak extra RSS (GiB)\n")
    print("| kind | vocab | chunked s | naive s | speed | chunked GiB | naive GiB | memory | meets |")
    print("|---|---|---|---|---|---|---|---|---|")
    missing = {"status": "not run"}
    for vocab in args.vocab:
        chunk_tokens = args.chunk_tokens or default_chunk_tokens(vocab, "cpu")
        for kind in args.kinds:
            results = {impl: measure(kind, impl, args.tokens, vocab, chunk_tokens, args.repeats, args.threads,
                                     max_bytes) for impl in args.impls}
            print(format_row(kind, vocab, results.get("chunked", missing), results.get("naive", missing)), flush=True)


if __name__ == "__main__":
    main()
