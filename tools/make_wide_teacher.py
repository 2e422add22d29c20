"""The shipped tiny teacher widened until DeepSpeed swaps it to NVMe, for tests and benchmarks.

    python tools/make_wide_teacher.py OUT_DIR [--problems PROBLEMS.jsonl]

DeepSpeed's NVMe offload swaps a parameter partition to disk only from 1 MiB up, and every
partition of the shipped tiny teacher is smaller, so it would stay in memory. This writes
the same architecture and tokenizer with ``intermediate_size`` 8192 (each MLP matrix 4 MiB,
2 MiB per rank on 2 ranks), randomly initialised, to OUT_DIR; with ``--problems`` also the
reference arithmetic problems with their reference responses (a teacher with random
weights cannot generate them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER = REPO_ROOT / "paced_ds" / "assets" / "tiny-teacher"
WIDE_INTERMEDIATE = 8192


def save_wide_teacher(out: Path, seed: int = 0) -> Path:
    """The tiny teacher's architecture and tokenizer with a wide MLP, randomly initialised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_TEACHER)
    config.intermediate_size = WIDE_INTERMEDIATE
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for path in TINY_TEACHER.glob("tokenizer*"):
        shutil.copy(path, out / path.name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for the widened teacher")
    parser.add_argument("--problems", type=Path, help="also write the reference problems (400 per level) here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    from paced_ds.data import arith

    print(f"make_wide_teacher: {save_wide_teacher(args.out)}")
    if args.problems:
        arith.write_jsonl(arith.dataset("train", 400, seed=0), args.problems, with_response=True)
        print(f"make_wide_teacher: {args.problems}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
