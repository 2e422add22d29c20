"""Answer extraction and checking (paced_ds.verify)."""

import concurrent.futures
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import pytest

import paced_ds.verify as verify_module
from paced_ds.runtime.deadline_pool import DeadlinePool
from paced_ds.verify import extract_answer, is_correct, is_correct_many

CASES_PATH = Path(__file__).parent / "data" / "verify" / "math_verify_cases.json"


@pytest.fixture(scope="module")
def workers_started():
    """The math-verify workers running, so timings measure checks, not start-ups."""
    assert is_correct("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") is True


EXTRACT_CASES = [
    # The arithmetic task: reversed digits, then " = answer".
    ("rev 2301 = 1032", "1032"),
    ("rev -2301 = -1032", "-1032"),
    ("rev \u22122301 = \u22121032", "-1032"),
    ("rev 2301 = 1032. Done", "1032"),
    ("rev 2301 = 1032</s>rev 9 = 9", "1032"),
    ("rev 2301 = 1032<pad><pad>", "1032"),
    ("rev 2301 = 1032<|endoftext|>", "1032"),
    ("rev 2301", None),  # truncated: the working is not an answer
    # \boxed and \fbox.
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("\\boxed{1} and then \\boxed{2", "1"),  # the last complete one
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\fbox{5}", "5"),
    ("so \\boxed 5", "5"),
    # '=', 'answer is', 'Answer:'.
    ("x = 3", "3"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("Answer:\n42", "42"),
    ("The answer is 42 apples", "42"),
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("3 + 4 = 7, which is right", "7"),
    ("\\[ x = 5 \\]", "5"),
    # A bare expression is the answer as a whole.
    ("-\\frac{1}{2}", "-\\frac{1}{2}"),
    ("\\sqrt{2}", "\\sqrt{2}"),
    ("1 234", "1 234"),
    # The last number.
    ("I think 12 or maybe 13", "13"),
    ("The total is 1,234", "1,234"),
    # Nothing.
    ("", None),
    ("no digits here", None),
    ("\\boxed{", None),
    ("\x00\x01\x02", None),
    (None, None),
]


@pytest.mark.parametrize("response, expected", EXTRACT_CASES)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


CORRECT_CASES = [
    # Fractions: a/b, \frac, \dfrac, equal values in different forms.
    ("1/2", "0.5", True),
    ("2/4", "1/2", True),
    ("\\boxed{\\frac{1}{2}}", "1/2", True),
    ("\\boxed{\\dfrac{3}{6}}", "\\frac12", True),
    ("\\boxed{\\tfrac{2}{4}}", "0.5", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("1/3", "0.3333333", False),  # exact, where math-verify's rounding says equal
    ("1/0", "0", False),
    # \boxed: nested braces, the last one wins.
    ("The answer is \\boxed{42}.", "42", True),
    ("\\boxed{41}, no wait: \\boxed{42}", "42", True),
    ("\\boxed{41}, no wait: \\boxed{42}", "41", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),  # math-verify decides
    ("\\boxed{\\sqrt{2}}", "2", False),
    ("\\sqrt{2}", "2", False),
    ("\\boxed{2\\pi}", "2", False),
    # Trailing text.
    ("x = 1032. Done", "1032", True),
    ("The answer is 42 apples", "42", True),
    ("= 1032<|endoftext|>", "1032", True),
    # Thousands separators.
    ("1,234", "1234", True),
    ("1 234", "1234", True),
    ("1{,}234", "1234", True),
    ("\\boxed{1,234,567}", "1234567", True),
    ("1,234", "1243", False),
    # Signs.
    ("-7", "7", False),
    ("\u22127", "-7", True),
    ("\\boxed{-7}", "\u22127", True),
    ("-0", "0", True),
    ("+5", "5", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "1/2", False),
    # Decimals.
    ("0.50", "0.5", True),
    ("3.0", "3", True),
    ("0.5", "0.05", False),
    ("0.1234567", "0.1234568", False),
    # The arithmetic task.
    ("rev 2301 = 1032", "1032", True),
    ("rev 2301 = 1032", "2301", False),
    ("rev -2301 = -1032", "-1032", True),
    ("rev -2301 = -1032", "1032", False),
    ("rev 2301 = 1032. Done", "1032", True),
    ("rev 11", "11", False),
    # Wrong answers that look close.
    ("1032", "10320", False),
    ("10320", "1032", False),
    ("x = 3", "3", True),
    ("x = 33", "3", False),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{x=4}", "3", False),
    # Garbage.
    ("", "3", False),
    (None, "3", False),
    ("asdf", "3", False),
    ("3", "", False),
    ("3", None, False),
    ("\\boxed{", "3", False),
    ("}{\\frac{{", "1", False),
    ("\x00\x01\x02", "1", False),
]


@pytest.mark.parametrize("response, reference, expected", CORRECT_CASES)
def test_is_correct(response, reference, expected):
    assert is_correct(response, reference) is expected



# ---------------------------------------------------------------------------------------
# What the issue asks for (#12 items 4 and 6), one group each

NEW_EXTRACT_CASES = [
    # GSM8K's '####' answer line wins over everything before it.
    ("48 + 24 = 72 clips in all.\n#### 71", "71"),
    ("#### 1,000", "1000"),
    # Boxes joined by "and" / commas give one answer in parts; otherwise the last box wins.
    ("\\boxed{2} and \\boxed{3}", "2, 3"),
    ("\\(\\boxed{1}\\), \\(\\boxed{-2}\\)", "1, -2"),
    ("\\boxed{41}, no wait: \\boxed{42}", "42"),
    # A "final answer" phrase after the boxes is the later word.
    ("$= \\boxed{255}$ so in all $10,455. The final answer is $10,455$.", "10,455"),
    # Text after a hallucinated next turn is ignored.
    ("x = 5\nUser: and 6?\nAssistant: x = 6", "5"),
    ("x = 5<|im_start|>user\nx = 6", "5"),
    ("x = 5\nHuman: x = 6", "5"),
    ("x = 5\n\nQuestion: what is 3+3? x = 6", "5"),
    ("Question: what is 2+3?\nx = 5", "5"),  # restating the question first is fine
    # A digit inside a word is never the answer.
    ("The formula is H2O", None),
    ("we get x2y", None),
    ("so we need 2x", None),
    ("it measures 5cm", "5"),
]


@pytest.mark.parametrize("response, expected", NEW_EXTRACT_CASES)
def test_extract_answer_from_real_outputs(response, expected):
    assert extract_answer(response) == expected


NEW_CORRECT_CASES = [
    # Plain numbers compare exactly, whatever their form.
    ("0.5", "1/2", True),
    ("\\boxed{1,000}", "1000", True),
    ("72.0", "72", True),
    ("The answer is $\\frac{3}{4}$", "0.75", True),
    ("0.33", "1/3", False),
    # ... except a printed float, equal to within its last digit (math-verify's label).
    ("$0.0833333333333333$", "\\frac{1}{12}", True),
    ("$0.0833333333333", "\\frac{1}{12}", False),
    # GSM8K: '####' in the response and in a reference given as a worked solution.
    ("She sold 48 + 24 = 72 clips.\n#### 72",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", True),
    ("She sold 48 + 24 = 72 clips ... #### 71", "#### 72", False),
    ("She sold 48 + 24 = 72 clips ... #### 71", "72", False),
    ("\\boxed{72}", "So in all 72 clips.\n#### 72", True),
    ("#### 1,234", "1234", True),
    # Several answers: a set, in any order; a tuple keeps its order.
    ("\\boxed{2} and \\boxed{3}", "2, 3", True),
    ("\\boxed{3}, \\boxed{2}", "2, 3", True),
    ("The roots are $\\boxed{3, 2}$.", "2 and 3", True),
    ("\\boxed{2,3}", "2, 3", True),
    ("\\boxed{2} and \\boxed{3}", "2, 3, 5", False),
    ("\\boxed{2} and \\boxed{3}", "3", False),
    ("\\boxed{(3, 2)}", "(2, 3)", False),
    ("\\boxed{(2, 3)}", "(2, 3)", True),
    # Units, currency and percent around a number.
    ("She earns $18 a day.", "18", True),
    ("The answer is \\$18.", "18", True),
    ("That is 18 dollars.", "18", True),
    ("\\boxed{18\\%}", "18", True),
    ("\\boxed{18\\%}", "0.18", True),
    ("\\boxed{18 \\text{ cm}^2}", "18", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{19\\%}", "18", False),
    ("\\boxed{2x}", "2", False),
    ("\\boxed{10^2}", "10", False),
    # Decimal commas only where the comma cannot separate thousands.
    ("The answer is 3,5", "3.5", True),
    ("\\boxed{0,111}", "0.111", True),
    ("The answer is 3,500", "3500", True),
    ("The answer is 3,500", "3.5", False),
    ("The answer is 3, 5", "3.5", False),
    # Multiple-choice letters.
    ("(B)", "B", True),
    ("B)", "B", True),
    ("After all that, the answer is B", "B", True),
    ("The answer is (B).", "(B)", True),
    ("Answer: **B**", "B", True),
    ("\\boxed{\\text{(C)}}", "C", True),
    ("The answer is B", "C", False),
    ("The answer is a number like 7", "A", False),
    ("(B)", "D", False),
    # Text after a hallucinated next turn is ignored.
    ("x = 5\nUser: and 6?\nAssistant: x = 6", "5", True),
    ("x = 5\nUser: and 6?\nAssistant: x = 6", "6", False),
    ("x = 5<|im_start|>user\nx = 6", "6", False),
    ("x = 5\nHuman: x = 6", "6", False),
    ("x = 5\nQuestion: what is 3+3? x = 6", "6", False),
    # A digit inside a word is never the answer.
    ("The formula is H2O", "2", False),
    ("we get x2y", "2", False),
    ("AZYUK2A", "2", False),
    # A response that is the reference, whatever math-verify makes of it.
    ("$$\\text{The midpoints form a regular hexagon}$$", "$$\\text{The midpoints form a regular hexagon}$$", True),
    # math-verify decides the rest.
    ("The answer is $\\boxed{x^2+1}$", "1+x^2", True),
    ("$\\boxed{\\{1, 2\\}}$", "\\{2, 1\\}", True),
    ("$-2 \\le x \\le 7$", "$x \\in [-2,7]$", False),  # verify's default: no set-relation
    ("$x \\in [-2,7]$", "$-2 \\le x \\le 7$", True),
    ("The answer: $odd$", "$\\text{odd}$", True),
]


@pytest.mark.parametrize("response, reference, expected", NEW_CORRECT_CASES)
def test_is_correct_on_real_outputs(response, reference, expected):
    assert is_correct(response, reference) is expected


def test_integer_answers_stay_in_process(monkeypatch):
    # The reference task's outputs (data/arith.py format_response) against integer
    # answers: no worker, well under a millisecond, today's verdicts.
    from paced_ds.data.arith import format_response

    cases = [(format_response(answer), str(answer), True) for answer in (0, 7, -45, 1032, 90817)]
    cases += [(format_response(1032), "2301", False), (format_response(-45), "45", False),
              ("rev 2301", "1032", False), ("rev 2301 = 103", "1032", False),
              ("rev 2301 = 1032</s>rev 9 = 9", "9", False), ("= 1032<|endoftext|>", "1032", True),
              ("rev 2301 = 10320", "1032", False), ("", "1032", False)]
    pool = _FakePool(("ok", True))
    monkeypatch.setattr(verify_module, "_POOL", pool)
    start_s = time.perf_counter()
    for _ in range(100):
        assert [is_correct(r, a) for r, a, _ in cases] == [e for _, _, e in cases]
    per_check_s = (time.perf_counter() - start_s) / (100 * len(cases))
    assert not pool.tasks
    assert per_check_s < 1e-3


# ---------------------------------------------------------------------------------------
# Bounded time, in any thread

PATHOLOGICAL = [  # (response, reference, verdict)
    ("\\boxed{9^9^9^9}", "9", False),
    ("9^9^9^9", "9^{9^{9^{9}}}", False),
    ("The answer is $9^{9^{9}}$", "9^{9^{8}}", False),
    ("\\boxed{2^{10000000000}}", "2", False),
    ("\\boxed{1000000!}", "1", False),
    ("The answer is $1000000!$", "1000000!", True),  # equal strings
    ("\\boxed{(10^{100})!}", "1", False),
    ("\\boxed{\\binom{1000000}{500000}}", "1", False),
    ("\\binom{1000000}{500000}", "\\binom{1000000}{500001}", False),
    ("\\boxed{9**9**9}", "1", False),
    ("x" * 100_000 + " = 5", "5", True),
    ("word " * 20_000 + "5", "5", True),
    ("1" * 100_000, "1", False),
    ("The answer is " + "1" * 5_000, "1", False),
    ("\\boxed{" * 5_000, "1", False),
    ("\\boxed{" * 5_000 + "1" + "}" * 5_000, "1", False),  # too deep for math-verify
    ("$\\boxed{1}$" * 10_000, "1", True),
    ("\\frac{" * 3_000 + "1", "1", False),
    ("$" + "(" * 50_000 + "$", "1", False),
    ("$" + "x^{" * 300 + "2" + "}" * 300 + "$", "2", False),
    ("=" * 100_000, "1", False),
    ("5", "\\boxed{" * 5_000, False),
]


def _slowest_check_s(cases) -> float:
    slowest_s = 0.0
    for response, reference, expected in cases:
        start_s = time.perf_counter()
        assert is_correct(response, reference) is expected, response[:40]
        slowest_s = max(slowest_s, time.perf_counter() - start_s)
    return slowest_s


def test_pathological_inputs_are_quick_in_the_main_thread(workers_started):
    assert _slowest_check_s(PATHOLOGICAL) < verify_module.VERIFY_TIMEOUT_S


def test_pathological_inputs_are_quick_in_a_worker_thread(workers_started):
    result = {}
    worker = threading.Thread(target=lambda: result.update(s=_slowest_check_s(PATHOLOGICAL)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert result["s"] < verify_module.VERIFY_TIMEOUT_S


def test_checks_give_math_verify_what_is_left_of_the_bound(monkeypatch):
    # The pool (paced_ds.runtime.deadline_pool) waits as long as it is told: the bound is
    # VERIFY_TIMEOUT_S, read at each call, less the time to kill a late worker.
    pool = _FakePool(("ok", True))
    monkeypatch.setattr(verify_module, "_POOL", pool)
    monkeypatch.setattr(verify_module, "VERIFY_TIMEOUT_S", 3.0)
    pair = ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")
    assert is_correct(*pair) is True
    assert is_correct_many([pair, pair], workers=2) == [True, True]
    assert [len(tasks) for tasks, _, _ in pool.calls] == [1, 2]
    assert [workers for _, _, workers in pool.calls] == [1, 2]
    for _, budget_s, _ in pool.calls:
        assert 3.0 - 0.1 < budget_s <= 3.0 - verify_module._KILL_MARGIN_S


def test_a_late_check_is_stopped_at_the_bound(workers_started):
    # A math-verify worker past its budget is stopped (time.sleep: by its own deadline,
    # the worker stays); the next check is answered as before.
    start_s = time.perf_counter()
    budget_s = verify_module.VERIFY_TIMEOUT_S - verify_module._KILL_MARGIN_S
    assert verify_module._POOL.run([(time.sleep, (30,))], budget_s=budget_s) == [("timeout", None)]
    assert time.perf_counter() - start_s < verify_module.VERIFY_TIMEOUT_S
    assert is_correct("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") is True


@pytest.mark.parametrize("outcome", [("timeout", None), ("crashed", -9)])
def test_a_timeout_counts_as_wrong(monkeypatch, outcome):
    monkeypatch.setattr(verify_module, "_POOL", _FakePool(outcome))
    assert is_correct("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") is False
    assert is_correct("I think 12 or maybe 13", "13") is False


# ---------------------------------------------------------------------------------------
# Many checks at once: worker processes, and callers in processes of their own

def test_is_correct_many_matches_is_correct(workers_started):
    cases = CORRECT_CASES + NEW_CORRECT_CASES
    assert is_correct_many([(case[0], case[1]) for case in cases], workers=2) == \
        [case[2] for case in cases]
    assert is_correct_many([]) == []


def test_is_correct_many_keeps_the_time_bound(workers_started):
    cases = PATHOLOGICAL + [("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True)] * 4
    start_s = time.perf_counter()
    verdicts = is_correct_many([(response, reference) for response, reference, _ in cases], workers=2)
    assert verdicts == [expected for _, _, expected in cases]
    assert time.perf_counter() - start_s < verify_module.VERIFY_TIMEOUT_S * len(cases) / 2


def _check_pairs(pairs):
    return [is_correct(response, reference) for response, reference in pairs]


def test_callers_in_a_process_pool(workers_started):
    # A forked child must not use its parent's workers (nor stop them): it starts its own.
    cases = [case for case in CORRECT_CASES + NEW_CORRECT_CASES if case[0] is not None]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as executor:
        verdicts = executor.submit(_check_pairs, [(case[0], case[1]) for case in cases]).result()
    assert verdicts == [case[2] for case in cases]
    assert is_correct("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") is True  # the parent's


# ---------------------------------------------------------------------------------------
# math-verify's own test cases: the acceptance target

def test_at_least_as_good_as_math_verify_on_its_own_cases(monkeypatch):
    # Agreement with the labels >= math-verify's defaults minus 1%, and no more false
    # accepts. Verdicts are measured, not speed: 5 s a check keeps a busy CI machine
    # from turning a slow sympy comparison into a timeout.
    monkeypatch.setattr(verify_module, "VERIFY_TIMEOUT_S", 5.0)
    cases = [case for case in json.loads(CASES_PATH.read_text())["cases"] if case["default_options"]]
    assert len(cases) == 252
    ours = is_correct_many([(case["prediction"], case["gold"]) for case in cases])
    theirs = [case["math_verify_defaults"] for case in cases]
    expected = [case["expected"] for case in cases]

    def agree(verdicts):
        return sum(v == e for v, e in zip(verdicts, expected))

    def false_accepts(verdicts):
        return sum(v and not e for v, e in zip(verdicts, expected))

    assert agree(ours) >= agree(theirs) - 0.01 * len(cases)
    assert false_accepts(ours) <= false_accepts(theirs)


# ---------------------------------------------------------------------------------------
# Failures inside the checker

def test_worker_thread_gives_the_same_answers():
    # math-verify's signal-based timeout raises in a non-main thread; here it runs in a
    # worker process, so a thread decides exactly as the main thread does.
    results = {}

    def work():
        results["batch"] = [is_correct(case[0], case[1]) for case in CORRECT_CASES]

    worker = threading.Thread(target=work, daemon=True)  # a hang must not block exit
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert results["batch"] == [case[2] for case in CORRECT_CASES]


def test_power_tower_skips_math_verify():
    # sympy evaluates 9^(9^9) for minutes; such inputs never reach math-verify.
    start_s = time.perf_counter()
    assert is_correct("\\boxed{9^{9^{9}}}", "9^{9^{8}}") is False
    assert is_correct("\\boxed{9^{9^{9}}}", "9^{9^{9}}") is True  # equal strings
    assert time.perf_counter() - start_s < verify_module.VERIFY_TIMEOUT_S


class _FakePool:
    """Stands in for the worker pool: every task gets ``outcome``; the calls are kept."""

    def __init__(self, outcome):
        self.outcome, self.tasks, self.calls = outcome, [], []

    def run(self, tasks, budget_s, workers=1):
        self.tasks += tasks
        self.calls.append((tasks, budget_s, workers))
        return [self.outcome] * len(tasks)


@pytest.mark.parametrize("outcome", [("error", "RuntimeError: math-verify broke"),
                                     ("ok", None), ("unavailable", None)])
@pytest.mark.parametrize("response, reference, expected, asks_math_verify", [
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False, True),
    ("I think 12 or maybe 13", "13", True, True),  # the last number, no marker: ask
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", True, False),  # equal strings never need it
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", True, False),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True, False),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", True, False),  # nor do numbers
])
def test_fallback_decides_when_math_verify_fails(monkeypatch, outcome, response, reference,
                                                 expected, asks_math_verify):
    # math-verify raised, parsed nothing, or no worker could start: numbers, else strings.
    pool = _FakePool(outcome)
    monkeypatch.setattr(verify_module, "_POOL", pool)
    assert is_correct(response, reference) is expected
    assert bool(pool.tasks) is asks_math_verify


def test_without_workers_the_fallback_decides_and_says_so(monkeypatch, caplog):
    fresh = DeadlinePool("math-verify", start_timeout_s=verify_module.WORKER_START_TIMEOUT_S,
                         max_idle=2, warm_up=verify_module._warm_up_worker,
                         on_unavailable=verify_module._say_math_verify_unavailable)
    monkeypatch.setattr(verify_module, "_POOL", fresh)  # the real one is restored after
    monkeypatch.setattr(sys, "executable", "/bin/false")  # its workers die at once
    assert is_correct("\\boxed{\\sqrt{3}}", "\\sqrt{2}") is False
    assert "math-verify worker exited" in caplog.text
    assert "compared as numbers or strings only" in caplog.text
    assert is_correct("I think 12 or maybe 13", "13") is True  # the numbers decide
    assert fresh.unavailable


def test_fallback_decides_what_math_verify_cannot_parse():
    # math-verify parses neither side of an unbalanced \frac: equal strings decide.
    assert verify_module._math_verify_verdict([("$\\frac{1}{$", "$\\frac{1}{$")]) is None
    assert is_correct("x = \\frac{1}{", "\\frac{1}{") is True
    assert is_correct("x = \\frac{2}{", "\\frac{1}{") is False


def test_checker_crash_counts_as_incorrect(monkeypatch):
    def crash(text):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(verify_module, "_final_answer", crash)
    assert is_correct("42", "42") is False
    assert is_correct_many([("42", "42"), ("7", "7")]) == [False, False]


def test_a_pool_failure_counts_as_incorrect(monkeypatch):
    class BrokenPool:
        def run(self, tasks, budget_s, workers=1):
            raise BrokenPipeError("worker gone")

    monkeypatch.setattr(verify_module, "_POOL", BrokenPool())
    pair = ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")  # asks math-verify
    assert is_correct(*pair) is False
    assert is_correct_many(iter([pair, ("42", "42")])) == [False, True]


@pytest.mark.parametrize("reference, answer", [
    ("1032", "1032"),
    ("-7", "-7"),
    ("She has 3*12=<<3*12=36>>36 pens.\nThen 36-5=<<36-5=31>>31 are left.\n#### 31", "31"),
    ("It sells 1250*2=<<1250*2=2500>>2500 eggs.\n#### 2,500", "2500"),
    ("So $x = \\boxed{\\frac{5}{6}}$.", "\\frac{5}{6}"),
    ("The roots are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3"),
])
def test_reference_answer_reduces_a_whole_solution_to_its_final_answer(reference, answer):
    assert verify_module.reference_answer(reference) == answer
