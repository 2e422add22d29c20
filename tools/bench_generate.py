"""Rollout tokens/s of the student's generation paths, on the same model and prompts.

    python tools/bench_generate.py [--model DIR] [--prompts 32] [--max-new-tokens 48]
                                   [--batch 16] [--nproc 2]

Launches itself on ``--nproc`` ranks (the deepspeed launcher, as ``paced-ds train`` does),
builds the student as a ZeRO-3 engine from the reference recipe with ``model.student=DIR``
(default: the shipped tiny student), and samples the same prompts (the reference task's
eval problems, rendered as a run renders them) two ways, each rank its shard:

- ``hf-sharded``: Hugging Face ``generate`` on the ZeRO-3 shards, ranks stepping together
  (``rollout.gather=false``);
- ``hf-gathered``: on a full copy gathered once (``rollout.gather=true``), copy time included.

Prints one markdown row per path: generated tokens (all ranks), seconds, tokens/s and the
speed-up over ``hf-sharded``. vLLM joins the table with issue 13.
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-student", help="student model directory (default: the tiny one)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in all (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest rollout (default 48)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generation batch per rank (default 16)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
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


def measure(args) -> None:
    import torch

    from paced_ds.config import load_config
    from paced_ds.data import arith
    from paced_ds.models import engines, generation
    from paced_ds.runtime import dist

    cfg = load_config(REPO / "ds_configs" / "recipes" / "tiny_arith.yaml",
                      [f"model.student={args.model}", "data.max_length=512"])
    dist.init(cfg.train.timeout_s)
    tokenizer = engines.load_tokenizer(cfg)
    student, _ = engines.build_student(cfg)
    records = arith.dataset("eval", args.prompts)[:args.prompts]
    prompts = generation.prompt_ids(tokenizer, records, cfg.data)
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0)
    rows = []
    for name, gather in (("hf-sharded", False), ("hf-gathered", True)):
        torch.manual_seed(dist.rank())
        dist.barrier()
        started = time.time()
        model, synced = generation.generating_model(student, gather)
        outputs = generation.sharded_generate(model, tokenizer, prompts, batch_size=args.batch, synced=synced,
                                              **sampling)
        del model
        dist.barrier()
        seconds = time.time() - started
        tokens = dist.all_reduce_sum(torch.tensor([float(sum(map(len, outputs.values())))], dtype=torch.float64))
        rows.append((name, int(tokens.item()), seconds))
    if dist.is_main():
        base = rows[0][1] / rows[0][2]
        print(f"\n{args.model}: {len(prompts)} prompts, up to {args.max_new_tokens} new tokens, batch {args.batch} "
              f"per rank, {dist.world_size()} ranks\n")
        print("| path | tokens | seconds | tokens/s | vs hf-sharded |\n|---|---:|---:|---:|---:|")
        for name, tokens, seconds in rows:
            print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {tokens / seconds / base:.1f}x |")
    dist.shutdown()


if __name__ == "__main__":
    arguments = parse_args()
    if "--ranked" in sys.argv:
        measure(arguments)
    else:
        sys.exit(launch(arguments))
