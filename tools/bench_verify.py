"""Benchmark the answer checker against math-verify's own test cases.

    python tools/bench_verify.py                      # the vendored cases, a markdown table
    python tools/bench_verify.py --show-misses        # and every case a checker gets wrong
    python tools/bench_verify.py --vendor CHECKOUT    # rebuild the case file from a
                                                      # github.com/huggingface/Math-Verify checkout

The cases are the (gold, prediction, expected verdict) triples of math-verify's
parametrized tests (tests/data/verify/README.md says which commit and which tests).
Both checkers see the same strings: paced-ds through ``is_correct(prediction, gold)``
and ``is_correct_many``; math-verify with its defaults, ``verify(parse(gold),
parse(prediction))``, in this main thread where its signal timeouts work.

The main table counts the cases whose label was set under verify's default comparison
options (float rounding 6, strict, no set-relation comparison); the few labelled under
other options (strict=False, precision 2, ...) are counted in the second line only,
since a default-options checker is not meant to give their label.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from paced_ds import verify as paced_verify  # noqa: E402

CASES_PATH = REPO / "tests" / "data" / "verify" / "math_verify_cases.json"
# compare_strings(...) in math-verify's tests/test_all.py: these keyword defaults.
UPSTREAM_DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True,
                     "allow_set_relation_comp": False}


# ---------------------------------------------------------------------------------------
# Vendoring: the parametrized (gold, pred, expected) cases of a Math-Verify checkout

def vendor(checkout: Path) -> dict:
    """Every (gold, pred, expected) case of the checkout's tests/test_*.py, with the
    options its test compares under."""
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    cases, seen = [], set()
    for path in sorted((checkout / "tests").glob("test_*.py")):
        for function in ast.parse(path.read_text()).body:
            if not isinstance(function, ast.FunctionDef):
                continue
            params = [arg.arg for arg in function.args.args]
            if "gold" not in params or "pred" not in params:
                continue
            call = _comparison_call(function)
            for decorator in function.decorator_list:
                if not (isinstance(decorator, ast.Call)
                        and getattr(decorator.func, "attr", "") == "parametrize"):
                    continue
                names = [name.strip() for name in ast.literal_eval(decorator.args[0]).split(",")]
                try:  # literals only: nothing of the upstream file is executed
                    rows = ast.literal_eval(decorator.args[1])
                except ValueError:  # e.g. f-strings over math (test_float_precision): left out
                    print(f"{path.name}:{decorator.lineno}: {function.name}: cases are not literals; left out",
                          file=sys.stderr)
                    continue
                for index, row in enumerate(rows):
                    values = dict(zip(names, row))
                    options = dict(UPSTREAM_DEFAULTS)
                    for keyword in call.keywords:
                        value = keyword.value
                        options[keyword.arg] = (values[value.id] if isinstance(value, ast.Name)
                                                else ast.literal_eval(value))
                    if call.func.id == "verify":  # verify(parse(gold), parse(pred)) as is
                        options["match_types"] = "parse defaults"
                    expected = bool(values.get("expected", values.get("result")))
                    key = (values["gold"], values["pred"], expected, json.dumps(options))
                    if key in seen:  # a few cases are listed twice upstream
                        continue
                    seen.add(key)
                    cases.append({
                        "id": f"{path.name}::{function.name}[{index}]",
                        "gold": values["gold"], "prediction": values["pred"], "expected": expected,
                        "options": options, "default_options": _default_options(options)})
    # math-verify's own verdicts, so the acceptance test need not rerun it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for case in cases:
        case["math_verify_defaults"] = math_verify_defaults(case["gold"], case["prediction"])
    return {"source": "https://github.com/huggingface/Math-Verify", "commit": commit,
            "license": "Apache-2.0 (repository LICENCE); tests/test_all.py carries an MIT "
                       "header, Copyright (c) 2024 The HuggingFace Team",
            "math_verify_version": importlib.metadata.version("math-verify"),
            "cases": cases}


def _comparison_call(function: ast.FunctionDef) -> ast.Call:
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("compare_strings", "verify"):
            return node
    raise ValueError(f"{function.name}: no compare_strings(...) or verify(...) call")


def _default_options(options: dict) -> bool:
    return (options["precision"] == 6 and options["strict"] is True
            and options["allow_set_relation_comp"] is False)


# ---------------------------------------------------------------------------------------
# The benchmark

def math_verify_defaults(gold: str, prediction: str) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(prediction)))


def score(verdicts: list[bool], cases: list[dict]) -> dict:
    expected = [case["expected"] for case in cases]
    return {"cases": len(cases),
            "agree": sum(v == e for v, e in zip(verdicts, expected)),
            "false_accepts": sum(v and not e for v, e in zip(verdicts, expected)),
            "false_rejects": sum(e and not v for v, e in zip(verdicts, expected))}


def run(cases: list[dict], workers: int | None) -> dict:
    """Each checker's verdicts and wall time on the cases."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    start_s = time.perf_counter()
    paced_verify.is_correct("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")  # start its workers
    start_up_s = time.perf_counter() - start_s
    math_verify_defaults("$1$", "1")  # import sympy and math-verify outside the timing

    results = {}
    start_s = time.perf_counter()
    results["paced-ds `is_correct`"] = [paced_verify.is_correct(c["prediction"], c["gold"])
                                        for c in cases], time.perf_counter() - start_s
    start_s = time.perf_counter()
    many = paced_verify.is_correct_many([(c["prediction"], c["gold"]) for c in cases], workers)
    workers = workers or min(paced_verify.MAX_WORKERS, os.cpu_count() or 1)
    results[f"paced-ds `is_correct_many`, {workers} workers"] = many, time.perf_counter() - start_s
    start_s = time.perf_counter()
    results["math-verify defaults"] = [math_verify_defaults(c["gold"], c["prediction"])
                                       for c in cases], time.perf_counter() - start_s
    return {"results": results, "start_up_s": start_up_s}


def table(cases: list[dict], results: dict) -> str:
    main = [i for i, case in enumerate(cases) if case["default_options"]]
    lines = ["| checker | cases | agree | agreement | false accepts | false rejects "
             "| all cases: agree / n | time (s), all | ms / case |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (verdicts, seconds) in results.items():
        counted = score([verdicts[i] for i in main], [cases[i] for i in main])
        every = score(verdicts, cases)
        lines.append(
            f"| {name} | {counted['cases']} | {counted['agree']} "
            f"| {100 * counted['agree'] / counted['cases']:.1f}% | {counted['false_accepts']} "
            f"| {counted['false_rejects']} | {every['agree']} / {every['cases']} "
            f"| {seconds:.2f} | {1000 * seconds / len(cases):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vendor", type=Path, metavar="CHECKOUT",
                        help="rebuild the case file from a Math-Verify git checkout")
    parser.add_argument("--cases", type=Path, default=CASES_PATH)
    parser.add_argument("--workers", type=int, default=None,
                        help="is_correct_many's processes (default: one per CPU)")
    parser.add_argument("--show-misses", action="store_true",
                        help="list the cases each checker gets wrong")
    args = parser.parse_args()
    if args.vendor:
        vendored = vendor(args.vendor)
        args.cases.parent.mkdir(parents=True, exist_ok=True)
        args.cases.write_text(json.dumps(vendored, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(vendored['cases'])} cases from commit {vendored['commit']} to {args.cases}")
        return
    vendored = json.loads(args.cases.read_text())
    cases = vendored["cases"]
    measured = run(cases, args.workers)
    print(f"math-verify's test cases, {vendored['source']} at {vendored['commit'][:12]}; "
          f"main columns: the {sum(c['default_options'] for c in cases)} cases labelled under "
          f"verify's default options\n")
    print(table(cases, measured["results"]))
    print(f"\npaced-ds worker start (once per process, not in the times above): "
          f"{measured['start_up_s']:.2f} s; timeout per check {paced_verify.VERIFY_TIMEOUT_S} s; "
          f"math-verify {importlib.metadata.version('math-verify')}")
    if args.show_misses:
        for name, (verdicts, _) in measured["results"].items():
            print(f"\n{name} gets wrong:")
            for case, verdict in zip(cases, verdicts):
                if verdict != case["expected"]:
                    print(f"  {case['id']} expected {case['expected']}: gold {case['gold'][:70]!r} "
                          f"prediction ...{case['prediction'][-90:]!r}")


if __name__ == "__main__":
    main()
