"""Time and peak memory of the chunked distillation loss against full materialisation,
and of a sparse top-k teacher against the dense one.

    python tools/bench_losses.py [--tokens 8192] [--vocab 32000 152064] [--kinds ...]
                                 [--chunk-tokens N] [--threads 1] [--repeats 2] [--quick]
    python tools/bench_losses.py --sparse [--tokens 8192] [--vocab 152064] [--topk 64] [--kinds ...]

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

--sparse prints a second kind of table: forward + backward of ``distillation_loss`` on the
same bf16 student logits (requires grad) with the teacher given three ways:
- dense: bf16 teacher logits [1, tokens, V], as the engine teacher gives them (the
  chunked case above; a pipelined dense teacher sends float32, twice these bytes);
- cache: the ``TopKAnswer`` that ``TeacherCache.answer`` reads from a cache written (by
  ``write_shard``, ``write_manifest``) to a temporary directory in that process; the
  answer() call is timed with the loss, opening the cache is not (a run opens it once);
- pipelined: the ``TopKAnswer`` as the pipelined student receives it, in memory.
The sparse answer is ``compress`` of the same random teacher logits (compressed before
timing, 256 tokens at a time: the same rows as one call, without its float32 copy of all
the logits). A fourth case per row, forward only, computes the expand-then-compute
reference in float64, a block of tokens at a time: the dense log-probs that answer
stands for (the tail spread evenly over the V - k other tokens, the top-k scattered at
their ids) through the ordinary dense divergence. (The same in float32 is itself off by
~1.5e-5 at 152k: its log-softmax over ~152k near-equal tail entries rounds; and AKL's head
can flip at a token whose cumulative mass is within rounding of mu.) Columns: times,
speed = dense time / sparse time, the teacher's bytes (dense logits' nbytes vs the
answer's ids + logprobs + tail), peak extra RSS of each case, and |sparse loss - reference loss|.
Targets per row: teacher bytes <= 2% of dense, loss difference <= 1e-5, and neither sparse case
slower than dense.
Times on a shared 2-core machine carry ~5% noise, so a speed of 0.95-1.0x counts as a tie
(no slower) in the "meets" column.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from paced_ds.distill.answers import TopKAnswer, compress  # noqa: E402
from paced_ds.distill.cache import TeacherCache, write_manifest, write_shard  # noqa: E402
from paced_ds.distill.losses import DIVERGENCES, default_chunk_tokens, distillation_loss  # noqa: E402

GIB = 1024**3
DEFAULT_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "akl")
# Peak extra bytes per logit element beyond the two bf16 inputs, measured at 2048 and
# 8192 x 32000 and rounded up, used to skip cases that cannot fit. Chunked cases pay
# for the bf16 gradient (2 bytes) plus a few float32 chunk buffers.
NAIVE_BYTES_PER_ELEMENT = {"forward_kl": 26, "reverse_kl": 26, "jsd": 44, "tvd": 26, "skew_kl": 40,
                           "skew_reverse_kl": 40, "akl": 36}
CHUNK_BUFFERS = 24  # float32 [chunk_tokens, vocab] buffers a chunked case may hold at once
BLOCK_TOKENS = 256  # tokens per block when filling, compressing or expanding [tokens, vocab] tensors
BLOCK_BUFFERS = 4  # float32 [BLOCK_TOKENS, vocab] buffers compress() holds at once
TIE_SPEED = 0.95  # a sparse case at >= 0.95x the dense speed is a tie within this machine's timing noise
SPARSE_IMPLS = ("chunked", "cache", "pipelined", "reference")  # the --sparse cases; chunked is the dense one


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
    for start in range(0, tokens, BLOCK_TOKENS):
        block = logits[start : start + BLOCK_TOKENS]
        block.copy_(torch.randn(block.shape) * scale)
    return logits


def compress_in_blocks(teacher_logits: torch.Tensor, k: int) -> TopKAnswer:
    """``compress`` of [tokens, vocab] logits as one sample, a block of tokens at a time:
    the same rows as one call, without its float32 copy of all the logits."""
    tokens = teacher_logits.shape[0]
    parts = [compress(teacher_logits[None, start : start + BLOCK_TOKENS],
                      torch.ones(1, min(BLOCK_TOKENS, tokens - start), dtype=torch.bool), k)
             for start in range(0, tokens, BLOCK_TOKENS)]
    whole = TopKAnswer.concat(parts)
    return TopKAnswer(whole.ids, whole.logprobs, whole.tail, torch.tensor([tokens]), whole.vocab)


def expand(answer: TopKAnswer, rows: slice) -> torch.Tensor:
    """The dense float64 log-probs [rows, vocab] a sparse answer stands for, as
    tests/test_sparse_losses.py builds them: the tail spread evenly over the other tokens,
    the top-k log-probs scattered at their ids."""
    rest = max(answer.vocab - answer.k, 1)
    tail = answer.tail[rows].double()
    full = torch.log((tail / rest).clamp(min=1e-30))[:, None].expand(-1, answer.vocab).clone()
    return full.scatter_(-1, answer.ids[rows].long(), answer.logprobs[rows].double())


def reference_loss(kind: str, student: torch.Tensor, answer: TopKAnswer) -> float:
    """Expand-then-compute in float64, a block of tokens at a time: the token-mean divergence
    from the distribution the sparse answer stands for. (In float32 the log-softmax over
    ~152k near-equal tail entries itself rounds by ~1e-5, more than the sparse path does.)"""
    total = 0.0
    for start in range(0, student.shape[0], BLOCK_TOKENS):
        rows = slice(start, start + BLOCK_TOKENS)
        total += float(DIVERGENCES[kind](student[rows].double(), expand(answer, rows)).sum())
    return total / student.shape[0]


def first_rows(answer: TopKAnswer, n: int) -> TopKAnswer:
    """The answer for the first n tokens of its one sample."""
    return TopKAnswer(answer.ids[:n], answer.logprobs[:n], answer.tail[:n], torch.tensor([n]), answer.vocab)


def answer_bytes(answer: TopKAnswer) -> int:
    return answer.ids.nbytes + answer.logprobs.nbytes + answer.tail.nbytes


def run_case(kind, impl, tokens, vocab, chunk_tokens, topk, repeats, threads) -> dict:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = random_logits(tokens, vocab, scale=2.0).requires_grad_(impl != "reference")
    teacher = random_logits(tokens, vocab, scale=4.0)
    teacher_bytes = teacher.nbytes

    if impl in ("cache", "pipelined", "reference"):
        answer = compress_in_blocks(teacher, topk)
        teacher, teacher_bytes = None, answer_bytes(answer)  # the sparse cases hold no dense teacher
    if impl == "cache":
        cache_dir = tempfile.TemporaryDirectory(prefix="bench-losses-cache-")  # removed at exit
        manifest = {"teacher": "random", "tokenizer": "random", "k": topk, "vocab": vocab, "data": "random",
                    "temperature": 1.0}
        write_shard(Path(cache_dir.name), 0, ["bench"], answer.ids, answer.logprobs, answer.tail, [0, tokens])
        write_manifest(Path(cache_dir.name), manifest, shards=1)
        cache, answer = TeacherCache(cache_dir.name, manifest), None
    if impl == "reference":
        started = time.perf_counter()
        loss = reference_loss(kind, student.detach(), answer)
        return {"status": "ok", "time_s": time.perf_counter() - started, "peak_bytes": 0, "loss": loss,
                "teacher_bytes": teacher_bytes}

    def teacher_of(n):
        """This case's teacher for the first n tokens; reading the cache is part of the step."""
        if impl == "pipelined":
            return first_rows(answer, n)
        if impl == "cache":
            return first_rows(cache.answer(["bench"]), n)
        return teacher[None, :n]

    def forward_backward(student):
        n = student.shape[0]
        if impl == "naive":
            loss = DIVERGENCES[kind](student, teacher[:n]).mean()
        else:
            loss, _ = distillation_loss(student[None], teacher_of(n), torch.ones(1, n, dtype=torch.bool), None,
                                        kind=kind, chunk_tokens=chunk_tokens)
        if student.requires_grad:
            loss.backward()
        return float(loss)

    # A tiny run first pages in the code this case uses, which RSS would count; then
    # freed heap goes back to the OS, or the case could reuse it unseen.
    forward_backward(student[:4].detach().clone().requires_grad_(student.requires_grad))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline_bytes = current_rss_bytes()
    reset_peak_rss()
    times_s = []
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        loss = forward_backward(student)
        times_s.append(time.perf_counter() - start)
    peak_bytes = peak_rss_bytes() - baseline_bytes
    return {"status": "ok", "time_s": min(times_s), "peak_bytes": peak_bytes, "loss": loss,
            "teacher_bytes": teacher_bytes}


def estimate_bytes(kind: str, impl: str, tokens: int, vocab: int, chunk_tokens: int) -> int:
    elements = tokens * vocab
    inputs = 2 * 2 * elements
    chunk_buffers = CHUNK_BUFFERS * 4 * min(chunk_tokens, tokens) * vocab
    if impl == "naive":
        return inputs + NAIVE_BYTES_PER_ELEMENT[kind] * elements
    if impl == "chunked":
        return inputs + 2 * elements + chunk_buffers
    # The sparse cases drop the dense teacher once compressed: then the student and its
    # bf16 gradient (cache, pipelined) or float64 blocks of the expanded teacher (reference).
    block_buffers = BLOCK_BUFFERS * 4 * min(BLOCK_TOKENS, tokens) * vocab
    expanded = 3 * 8 * min(BLOCK_TOKENS, tokens) * vocab if impl == "reference" else 0
    return inputs + expanded + chunk_buffers + block_buffers


def measure(kind, impl, tokens, vocab, chunk_tokens, topk, repeats, threads, max_bytes) -> dict:
    """Run one case in a subprocess capped at max_bytes of data; never raises."""
    estimate = estimate_bytes(kind, impl, tokens, vocab, chunk_tokens)
    if estimate > max_bytes:
        return {"status": f"skipped (needs ~{estimate / GIB:.0f} GiB)"}
    command = [sys.executable, __file__, "--case", kind, impl, str(tokens), str(vocab),
               str(chunk_tokens), str(topk), str(repeats), str(threads), str(max_bytes)]
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


def format_sparse_row(kind, vocab, k, dense, cache, pipelined, reference) -> str:
    """One --sparse row; the targets need every case, else "-"."""
    def cell(result, key, unit, digits=2):
        if result["status"] != "ok":
            return result["status"]
        return f"{result[key] / unit:.{digits}f}"

    speeds, bytes_ratio, loss_difference, meets = ["-", "-"], "-", "-", "-"
    if all(result["status"] == "ok" for result in (dense, cache, pipelined, reference)):
        speeds = [f"{dense['time_s'] / sparse['time_s']:.2f}x" for sparse in (cache, pipelined)]
        ratio = pipelined["teacher_bytes"] / dense["teacher_bytes"]
        difference = max(abs(sparse["loss"] - reference["loss"]) for sparse in (cache, pipelined))
        bytes_ratio, loss_difference = f"{ratio:.2%}", f"{difference:.1e}"
        no_slower = max(cache["time_s"], pipelined["time_s"]) <= dense["time_s"] / TIE_SPEED
        meets = "yes" if ratio <= 0.02 and difference <= 1e-5 and no_slower else "no"
    times = " | ".join(cell(result, "time_s", 1) for result in (dense, cache, pipelined))
    memory = " | ".join(cell(result, "peak_bytes", GIB) for result in (dense, cache, pipelined))
    teacher_mib = f"{cell(dense, 'teacher_bytes', 2**20, 1)} | {cell(pipelined, 'teacher_bytes', 2**20, 2)}"
    return (f"| {kind} | {vocab} | {k} | {times} | {' | '.join(speeds)} | {teacher_mib} | {bytes_ratio} | {memory} "
            f"| {loss_difference} | {meets} |")


def print_sparse_table(args, max_bytes: int) -> None:
    print(f"tokens={args.tokens} k={args.topk} chunk_tokens={args.chunk_tokens or 'default'} threads={args.threads} "
          f"repeats={args.repeats} memory cap={max_bytes / GIB:.1f} GiB; bf16 student logits; "
          f"time = forward + backward (s); teacher = its tensors' MiB; memory = peak extra RSS (GiB); "
          f"loss diff = |sparse - expand-then-compute|\n")
    print("| kind | vocab | k | dense s | cache s | pipelined s | cache speed | pipelined speed | dense teacher MiB "
          "| sparse teacher MiB | teacher bytes | dense GiB | cache GiB | pipelined GiB | loss diff | meets |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        chunk_tokens = args.chunk_tokens or default_chunk_tokens(vocab, "cpu")
        for kind in args.kinds:
            results = [measure(kind, impl, args.tokens, vocab, chunk_tokens, args.topk, args.repeats, args.threads,
                               max_bytes) for impl in SPARSE_IMPLS]
            print(format_sparse_row(kind, vocab, args.topk, *results), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per measurement")
    parser.add_argument("--vocab", type=int, nargs="+", default=None,
                        help="vocabulary sizes (default: 32000 152064; with --sparse 152064)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), help="divergences to measure")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="distillation_loss chunk_tokens (default: its own choice per vocabulary)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is kept)")
    parser.add_argument("--impls", nargs="+", default=["chunked", "naive"], choices=["chunked", "naive"])
    parser.add_argument("--quick", action="store_true", help="a small size: 1024 tokens, vocab 32000")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip cases estimated above this (default: 60%% of available memory)")
    parser.add_argument("--sparse", action="store_true",
                        help="the sparse table: dense vs cached vs pipelined top-k teacher")
    parser.add_argument("--topk", type=int, default=64, help="with --sparse: the teacher's top-k")
    parser.add_argument("--case", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        kind, impl, *sizes, max_bytes = args.case
        resource.setrlimit(resource.RLIMIT_DATA, (int(max_bytes), int(max_bytes)))
        print(json.dumps(run_case(kind, impl, *map(int, sizes))))
        return

    if args.quick:
        args.tokens, args.vocab = 1024, [32000]
    max_bytes = int(args.max_memory_gb * GIB) if args.max_memory_gb else int(0.6 * available_bytes())
    if args.sparse:
        args.vocab = args.vocab or [152064]
        print_sparse_table(args, max_bytes)
        return
    args.vocab = args.vocab or [32000, 152064]
    print(f"tokens={args.tokens} chunk_tokens={args.chunk_tokens or 'default'} threads={args.threads} "
          f"repeats={args.repeats} memory cap={max_bytes / GIB:.1f} GiB; bf16 inputs; "
          f"time = forward + backward (s); memory = peak extra RSS (GiB)\n")
    print("| kind | vocab | chunked s | naive s | speed | chunked GiB | naive GiB | memory | meets |")
    print("|---|---|---|---|---|---|---|---|---|")
    missing = {"status": "not run"}
    for vocab in args.vocab:
        chunk_tokens = args.chunk_tokens or default_chunk_tokens(vocab, "cpu")
        for kind in args.kinds:
            results = {impl: measure(kind, impl, args.tokens, vocab, chunk_tokens, args.topk, args.repeats,
                                     args.threads, max_bytes) for impl in args.impls}
            print(format_row(kind, vocab, results.get("chunked", missing), results.get("naive", missing)), flush=True)


if __name__ == "__main__":
    main()
