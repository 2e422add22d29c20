"""Rollout tokens/s of the student's generation engines, on the same model, prompts and ranks.

    python tools/bench_generate.py [--model DIR] [--prompts 32] [--samples 8] [--max-new-tokens 48]
                                   [--batch 128] [--nproc 2] [--engines hf-sharded,hf-gathered,vllm]

Launches itself on ``--nproc`` ranks (the deepspeed launcher, as ``paced-ds train`` does),
builds the student as a ZeRO-3 engine from the reference recipe with ``model.student=DIR``
(default: the shipped tiny student), and samples ``--samples`` completions of each prompt
(the reference task's eval problems, rendered as a run renders them, chat template included)
at temperature 1, as a competence estimate does, each rank its share:

- ``hf-sharded``: Hugging Face ``generate`` on the ZeRO-3 shards, ranks stepping together
  (``rollout.gather=false``);
- ``hf-gathered``: on a full copy gathered once (``rollout.gather=true``), copy time included;
- ``vllm``: a vLLM server started on this node (``rollout.engine=vllm``; ``paced-ds
  setup-vllm`` installs it), every rank sending its share; start-up is not in the time but is
  printed below the table, with the time to load fresh student weights into it.

Prints one markdown row per engine: generated tokens (all ranks), seconds, tokens/s, the
speed-up over ``hf-sharded``, its share of the matmul ceiling, and the share of the positions
Hugging Face computed that were padding (left padding of shorter prompts, and rows that
finished before their batch).

The **matmul ceiling** bounds every engine on this hardware: each rank, all at once, times
the model's own linear layers (lm_head included) at its share of every sequence in flight
(``prompts x samples / ranks`` rows, the most one decoding step can batch), in the run's
dtype, on its cores; the ranks' tokens/s add up. A decoding step does at least these
products for every token, and attention, sampling and scheduling on top, so no engine
generates faster than this; an engine at 40% of it leaves at most 2.5x to win.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENGINES = ("hf-sharded", "hf-gathered", "vllm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-student", help="student model directory (default: the tiny one)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in all (default 32)")
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest rollout (default 48)")
    parser.add_argument("--batch", type=int, default=128, help="sequences per generation batch per rank (default 128)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="model.dtype of every engine (default fp32)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"which of {', '.join(ENGINES)} (default all)")
    parser.add_argument("--output-dir", default="runs/bench_generate", help="where the vLLM server logs and the "
                                                                            "exported weights go")
    return parser.parse_known_args(argv)[0]


def launch(args) -> int:
    from paced_ds.runtime.dist import ensure_accelerator_env, free_port

    ensure_accelerator_env()
    env = dict(os.environ)
    if env.get("DS_ACCELERATOR") == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
           "--num_gpus", str(args.nproc), __file__, "--ranked", *sys.argv[1:]]
    return subprocess.call(cmd, env=env)


def matmul_ceiling(module, rows: int, dtype) -> tuple[float, float]:
    """(tokens/s, GFLOP per token) of ``module``'s linear layers on this rank's cores, at
    ``rows`` rows per product: an upper bound on any engine's decoding tokens/s. Shapes come
    from ZeRO-3's ``ds_shape`` (the partitions hold none); tied weights count once per use."""
    import torch
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    shapes = [tuple(getattr(m.weight, "ds_shape", m.weight.shape)) for m in module.modules()
              if isinstance(m, torch.nn.Linear)]
    weights = {shape: torch.randn(shape, dtype=dtype, device=device) for shape in set(shapes)}
    inputs = {shape[1]: torch.randn(rows, shape[1], dtype=dtype, device=device) for shape in shapes}
    flops = sum(2 * out_features * in_features for out_features, in_features in shapes)

    def once() -> float:
        get_accelerator().synchronize()
        started = time.perf_counter()
        for shape in shapes:
            torch.nn.functional.linear(inputs[shape[1]], weights[shape])
        get_accelerator().synchronize()
        return time.perf_counter() - started

    once()  # warm-up: kernel selection, first-touch of the buffers
    seconds = min(once() for _ in range(3))
    return rows / seconds, flops / 1e9


def measure(args) -> None:
    import torch

    from paced_ds.config import load_config
    from paced_ds.data import arith
    from paced_ds.errors import UserError
    from paced_ds.models import engines, generation, generators
    from paced_ds.runtime import dist

    chosen = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ENGINES))
    if unknown:
        raise SystemExit(f"bench_generate: unknown engine {unknown[0]} (choose from {', '.join(ENGINES)})")
    cfg = load_config(REPO / "ds_configs" / "recipes" / "tiny_arith.yaml",
                      [f"model.student={args.model}", "data.max_length=512",
                       f"rollout.max_new_tokens={args.max_new_tokens}",
                       f"train.output_dir={args.output_dir}", f"model.dtype={args.dtype}"])
    dist.init(cfg.train.timeout_s)
    tokenizer = engines.load_tokenizer(cfg)
    student, _ = engines.build_student(cfg)
    records = arith.dataset("eval", args.prompts)[:args.prompts]
    prompts = generation.prompt_ids(tokenizer, records, cfg.data)
    sampling = dict(n=args.samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch, greedy=False,
                    temperature=1.0, top_p=1.0, top_k=0)
    rows, notes = [], []
    for name in chosen:
        torch.manual_seed(dist.rank())
        dist.barrier()
        if name == "vllm":
            started = time.time()
            try:
                source = generators.StudentGeneration(
                    load_config(REPO / "ds_configs" / "recipes" / "tiny_arith.yaml",
                                [f"model.student={args.model}", "data.max_length=512", "rollout.engine=vllm",
                                 f"rollout.max_new_tokens={args.max_new_tokens}", f"train.output_dir={args.output_dir}",
                                 f"model.dtype={args.dtype}"]),
                    tokenizer, engines.resolve_model(args.model, "--model"), fresh_run=True)
            except UserError as err:
                notes.append(f"vllm: not measured: {err}")
                continue
            notes.append(f"vLLM server start-up: {time.time() - started:.0f} s")
            with source.generator(student, 0) as generator:
                dist.barrier()
                started = time.time()
                completions = generator.complete(prompts, **sampling)
                dist.barrier()
                seconds = time.time() - started
            synced = time.time()
            source.sync(student, step=1)  # as before a re-estimate: export, then load in place
            notes.append(f"fresh student weights into the server (export + load): {time.time() - synced:.1f} s")
            if source.client.process is not None:
                source.client.process.stop()
        else:
            started = time.time()
            model, synced_gen = generation.generating_model(student, name == "hf-gathered")
            completions = generation.HFGenerator(model, tokenizer, synced_gen).complete(prompts, **sampling)
            del model
            dist.barrier()
            seconds = time.time() - started
        counts = dist.all_reduce_sum(torch.tensor([float(completions.generated), float(completions.tokens),
                                                   float(completions.padded)], dtype=torch.float64))
        generated, tokens, padded = (value.item() for value in counts)
        rows.append((name, int(generated), seconds, 1.0 - tokens / padded if padded else None))
    dist.barrier()  # every rank probes at once: together they are the machine
    rows_per_rank = -(-len(prompts) * args.samples // dist.world_size())  # every sequence in flight
    ceiling, gflop = matmul_ceiling(student.module, rows_per_rank, engines.compute_dtype(cfg))
    ceiling = dist.all_reduce_sum(torch.tensor([ceiling], dtype=torch.float64)).item()
    if dist.is_main():
        base = next((r[1] / r[2] for r in rows if r[0] == "hf-sharded"), None)
        print(f"\n{args.model}: {len(prompts)} prompts x {args.samples} samples, up to {args.max_new_tokens} new "
              f"tokens, batch {args.batch} per rank, {dist.world_size()} ranks, {args.dtype}\n")
        print("| engine | generated tokens | seconds | tokens/s | vs hf-sharded | of ceiling | padding |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        for name, tokens, seconds, padding in rows:
            speedup = f"{tokens / seconds / base:.1f}x" if base else "-"
            waste = f"{padding:.0%}" if padding is not None else "-"
            print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {speedup} | "
                  f"{tokens / seconds / ceiling:.0%} | {waste} |")
        speedup = f"{ceiling / base:.1f}x" if base else "-"
        print(f"| matmul ceiling | - | - | {ceiling:.1f} | {speedup} | 100% | - |")
        print(f"\nmatmul ceiling: the model's linear layers ({gflop:.3f} GFLOP a token) at "
              f"{rows_per_rank} rows per rank, every rank at once "
              f"({ceiling * gflop:.0f} GFLOP/s in all); no engine decodes faster on this hardware")
        for note in notes:
            print(f"\n{note}")
    dist.shutdown()


if __name__ == "__main__":
    arguments = parse_args()
    if "--ranked" in sys.argv:
        measure(arguments)
    else:
        sys.exit(launch(arguments))
