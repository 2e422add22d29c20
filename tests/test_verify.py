"""Answer extraction and checking (paced_ds.verify)."""

import threading
import time

import pytest
from math_verify.errors import TimeoutException

import paced_ds.verify as verify_module
from paced_ds.verify import extract_answer, is_correct

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


def test_worker_thread_gives_the_same_answers():
    # math-verify's signal-based timeout raises in a non-main thread; the mathverify-only
    # case (sqrt(2)/2 == 1/sqrt(2)) would then drop to the string comparison and fail.
    results = {}

    def work():
        results["batch"] = [is_correct(case[0], case[1]) for case in CORRECT_CASES]

    worker = threading.Thread(target=work, daemon=True)  # a hang must not block exit
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert results["batch"] == [case[2] for case in CORRECT_CASES]


def test_power_tower_skips_math_verify():
    # sympy evaluates 9^(9^9) for minutes, and in a worker thread nothing can interrupt
    # it; in the main thread math-verify's 2 s alarm would fire, so time tells them apart.
    start_s = time.perf_counter()
    assert is_correct("\\boxed{9^{9^{9}}}", "9^{9^{8}}") is False
    assert is_correct("\\boxed{9^{9^{9}}}", "9^{9^{9}}") is True  # equal strings
    assert time.perf_counter() - start_s < 1.5


def _raise_runtime_error(*args, **kwargs):
    raise RuntimeError("math-verify broke")


def _raise_timeout(*args, **kwargs):
    raise TimeoutException("Operation timed out!")


def _parse_nothing(*args, **kwargs):
    return []


@pytest.mark.parametrize("broken_parse", [_raise_runtime_error, _raise_timeout, _parse_nothing])
@pytest.mark.parametrize("response, reference, expected", [
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", True),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", True),  # numbers never need math-verify
])
def test_fallback_decides_when_math_verify_fails(monkeypatch, broken_parse, response,
                                                 reference, expected):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return broken_parse(*args, **kwargs)

    monkeypatch.setattr(verify_module, "parse", spy)
    assert is_correct(response, reference) is expected
    is_number = reference == "0.5"
    assert bool(calls) is not is_number


def test_fallback_decides_what_math_verify_cannot_parse():
    # math-verify parses neither side of an unbalanced \frac: equal strings decide.
    assert verify_module._math_verify("\\frac{1}{", "\\frac{1}{") is None
    assert is_correct("x = \\frac{1}{", "\\frac{1}{") is True
    assert is_correct("x = \\frac{2}{", "\\frac{1}{") is False


def test_checker_crash_counts_as_incorrect(monkeypatch):
    def crash(answer):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(verify_module, "_as_number", crash)
    assert is_correct("42", "42") is False
    assert [is_correct(r, r) for r in ("42", "7")] == [False, False]
