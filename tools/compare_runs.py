"""Whether two run directories hold the same run: losses, competence tables, evaluations, SNR.

    python tools/compare_runs.py RUN_A RUN_B

Compares metrics.jsonl, eval.jsonl, competence.jsonl and snr.jsonl row by row, every field
but wall-clock times, for exact equality (a refactoring must not change a bit). Prints one
line per file and, where they differ, the first differing row; exit status 1 if any differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = ("metrics.jsonl", "eval.jsonl", "competence.jsonl", "snr.jsonl")
TIMES = {"step_time_s", "teacher_time_s", "rollout_time_s", "tokens_per_s", "snr/probe_time_s", "seconds"}


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    first, second = (Path(a) for a in argv)
    same = True
    for name in FILES:
        if not (first / name).exists() and not (second / name).exists():
            continue
        if not (first / name).exists() or not (second / name).exists():
            print(f"{name}: only in one of the two runs")
            same = False
            continue
        a, b = rows(first / name), rows(second / name)
        equal = a == b
        print(f"{name}: {len(a)} rows vs {len(b)}: {'identical' if equal else 'DIFFERENT'}")
        if not equal:
            same = False
            for i, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    diff = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
                    print(f"  first difference in row {i}: {str(diff)[:400]}")
                    break
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
