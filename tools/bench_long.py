"""Long reasoning traces on 2 CPU ranks: peak memory per rank and step time, by path and length.

    python tools/bench_long.py                                  # the table in docs/benchmarks.md#long-traces
    python tools/bench_long.py --lengths 2048 8192 --paths fused fused_s2 --steps 2

A small-width Qwen3-architecture student and teacher (random weights; hidden 128, 2 layers,
4 heads of 32, 2 key-value heads) with Qwen3's real vocabulary of 151,936 tokens, in fp32, ZeRO-3
on 2 ranks; one sequence per data-parallel group and step: a 64-token prompt and a response of
each --lengths tokens (random ids), forward KL. Three paths:

    today      the whole-logits path: the student's [T, V] logits and their gradient, the teacher's
               dense [T, V] logits of every position (loss.fused=false; a teacher that answers
               whole logits, as before distill/fused.py)
    fused      the student's output layer inside the divergence, response rows only, a tile at a
               time; the teacher's answer from its hidden states (loss.fused=true, the default)
    fused_s2   fused, each sequence split over the 2 ranks (train.sequence_parallel=2)

Each (path, length) is one launch of --steps steps after one warm-up step; a result already in
--out for the same settings is reused (--fresh measures again). Peak memory is the largest
resident set of a rank, sampled every 2 ms during the measured steps: models, optimizer state,
the allocator's caches and what the step adds. Fitted as a + b x length per path, b x length is
what a length costs (logits and activations); "longest" solves a + b x length = --budget-gb. A
length whose projection exceeds --machine-gb over both ranks is not run; its row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 151_936
PROMPT = 64
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True, "use_sliding_window": False,
         "max_position_embeddings": 40_000, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
PATHS = {"today": ["loss.fused=false"], "fused": ["loss.fused=true"],
         "fused_s2": ["loss.fused=true", "train.sequence_parallel=2"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--steps", type=int, default=2, help="measured steps per launch (default 2)")
    parser.add_argument("--budget-gb", type=float, default=20.0, help="memory budget per rank (default 20)")
    parser.add_argument("--machine-gb", type=float, default=22.0,
                        help="what both ranks together may take here (default 22 of this machine's 24)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    parser.add_argument("--out", default="runs/bench_long")
    parser.add_argument("--fresh", action="store_true", help="measure again what --out already holds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON job: run by the launcher on each rank
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    return parser.parse_args(argv)


# ---- the worker: one (path, length) on every rank ------------------------------------------------

class PeakSampler:
    """The largest resident set of this process while it runs, sampled from /proc every 2 ms."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self.run, daemon=True)

    @staticmethod
    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.resident())
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def worker(job: dict) -> None:
    import torch

    from paced_ds.config import load_config
    from paced_ds.distill.answers import DenseAnswer
    from paced_ds.distill.step import optimizer_step
    from paced_ds.distill.teachers import EngineTeacher
    from paced_ds.models import engines
    from paced_ds.models.ulysses import SequenceParallel
    from paced_ds.runtime import dist

    class WholeLogitsTeacher(EngineTeacher):
        """The engine teacher as it answered before distill/fused.py: dense logits of every position."""

        def answer(self, batch):
            device = dist.device()
            with torch.no_grad():
                logits = self.engine.module(input_ids=batch["input_ids"].to(device),
                                            attention_mask=batch["attention_mask"].to(device),
                                            **({"position_ids": batch["position_ids"]} if "position_ids" in batch
                                               else {})).logits
            return DenseAnswer(logits[..., :self.vocab], batch["loss_mask"].to(device))

    cfg = load_config(REPO / "ds_configs" / "recipes" / "tiny_arith.yaml", job["overrides"])
    dist.init(cfg.train.timeout_s)
    student, _ = engines.build_student(cfg)
    engine = engines.build_teacher(cfg)
    sp = SequenceParallel.create(cfg.train.sequence_parallel)
    teacher = (WholeLogitsTeacher if job["path"] == "today" else EngineTeacher)(engine, VOCAB)
    group = dist.rank() // cfg.train.sequence_parallel  # the ranks of a group train on one sequence
    generator = torch.Generator().manual_seed(group)
    example = {"input_ids": torch.randint(0, VOCAB, (PROMPT + job["length"],), generator=generator).tolist(),
               "response_start": PROMPT}

    def step(number):
        started = time.time()
        outcome = optimizer_step(cfg, student, teacher, [example], [group], torch.ones(1), kind="forward_kl",
                                 vocab=VOCAB, pad_id=0, number=number, sequence_parallel=sp)
        return time.time() - started, outcome.loss

    step(1)  # warm-up: optimizer state, buffers, first-touch allocations
    before = PeakSampler.resident()
    with PeakSampler() as sampler:
        measured = [step(n + 2) for n in range(job["steps"])]
    mine = {"rank": dist.rank(), "job": job, "peak_extra": sampler.peak - before, "resident_before": before,
            "seconds": [s for s, _ in measured], "losses": [loss for _, loss in measured]}
    everyone = dist.all_gather_objects(mine)
    if dist.is_main():
        Path(job["result"]).write_text(json.dumps(everyone))
    dist.shutdown()


# ---- the driver -------------------------------------------------------------------------------

def make_models(out: Path, **shape) -> tuple[Path, Path]:
    """The random student and teacher (seeds 2 and 1), saved once; ``shape`` overrides ``SHAPE``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    paths = []
    for name, seed in (("teacher", 1), ("student", 2)):
        path = out / "models" / name
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            config = AutoConfig.for_model("qwen3", vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                          **{**SHAPE, **shape})
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def launch(job: dict, out: Path) -> list[dict] | str:
    from paced_ds.runtime.dist import ensure_accelerator_env, free_port

    ensure_accelerator_env()
    env = dict(os.environ)
    if env.get("DS_ACCELERATOR") == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    job_file = out / f"{job['path']}_{job['length']}.json"
    job_file.write_text(json.dumps(job))
    log = out / f"{job['path']}_{job['length']}.log"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), "--worker", str(job_file)]  # the launcher adds --local_rank
    with open(log, "w") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    result = Path(job["result"])
    if code != 0 or not result.is_file():
        tail = log.read_text().splitlines()[-3:]
        return f"failed (exit {code}): {' / '.join(tail)[-300:]}"
    return json.loads(result.read_text())


def overrides(student: Path, teacher: Path, length: int, path: str, checkpointing: bool) -> list[str]:
    """The config of one (path, length) launch: one sequence per rank and step, fp32."""
    return [f"model.student={student}", f"model.teacher={teacher}", "model.dtype=fp32", "train.micro_batch_size=1",
            "train.grad_accum=1", "train.lr=1e-4", "train.warmup_steps=0", f"data.max_length={PROMPT + length}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", *PATHS[path]]


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of peak = a + b * length, from two or more lengths."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, student = make_models(out)
    gib = 2 ** 30
    rows, measured = [], {path: [] for path in args.paths}
    for path in args.paths:
        for length in sorted(args.lengths):
            line = fit(measured[path])
            projected = line[0] + line[1] * length if line else None
            if projected is not None and 2 * projected / gib > args.machine_gb:
                rows.append((path, length, f"not run: projected {projected / gib:.1f} GiB a rank", "", ""))
                continue
            job = {"path": path, "length": length, "steps": args.steps,
                   "overrides": overrides(student, teacher, length, path, args.gradient_checkpointing),
                   "result": str(out / f"{path}_{length}.result.json")}
            done = Path(job["result"])
            if done.is_file() and not args.fresh and json.loads(done.read_text())[0].get("job") == job:
                result = json.loads(done.read_text())  # measured before, with these settings
            else:
                print(f"bench_long: {path} at {length} tokens ...", file=sys.stderr, flush=True)
                result = launch(job, out)
            if isinstance(result, str):
                rows.append((path, length, result, "", ""))
                continue
            peak = max(rank["resident_before"] + rank["peak_extra"] for rank in result)
            seconds = sum(sum(rank["seconds"]) for rank in result) / sum(len(rank["seconds"]) for rank in result)
            measured[path].append((length, peak))
            rows.append((path, length, f"{peak / gib:.2f}", f"{seconds:.1f}",
                         " ".join(f"{loss:.4f}" for loss in result[0]["losses"])))
    print(f"\n{len(args.lengths)} lengths, 2 CPU ranks, vocabulary {VOCAB}, fp32, "
          f"{'with' if args.gradient_checkpointing else 'no'} gradient checkpointing\n")
    print("| path | response tokens | peak memory per rank (GiB) | step time (s) | losses |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(f"\npeak memory per rank fitted as a + b x length; what the length adds at 8k (b x 8192) and the longest "
          f"response within {args.budget_gb:g} GiB a rank:")
    for path, points in measured.items():
        line = fit(points)
        if not line or line[1] <= 0:
            print(f"- {path}: no growth measured over {[x for x, _ in points]}")
            continue
        longest = (args.budget_gb * gib - line[0]) / line[1]
        print(f"- {path}: a = {line[0] / gib:.2f} GiB, b = {line[1] * 1024 / 2 ** 20:.1f} MiB per 1k tokens; "
              f"{line[1] * 8192 / gib:.2f} GiB at 8k; longest {longest:,.0f} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
