"""Answer extraction and checking for verifiable problems.

``extract_answer`` finds the final answer a response gives; ``is_correct`` compares it
with the reference answer. The comparison runs in three stages:

1. Both sides plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``): exact
   comparison with ``fractions.Fraction``. This is the arithmetic task's whole workload,
   it costs microseconds, and it is stricter than math-verify, which rounds floats to 6
   places (it judges 0.1234567 equal to 0.1234568).
2. Otherwise math-verify, when it parses both sides into expressions.
3. Otherwise (math-verify cannot parse, raises or is skipped) the normalised strings
   must be equal.

A checker crash never reaches the caller: it is logged and counts as incorrect.

Threads: math-verify's timeouts use ``signal.alarm``, which only works in the main
thread; elsewhere its ``parse``/``verify`` raise ValueError. So the main thread keeps
math-verify's timeouts and other threads pass ``None``. Because a thread cannot be
interrupted, inputs known to hang sympy (towers of powers, factorials of powers) and
very long answers skip math-verify in every thread, so a worker thread decides exactly
as the main thread does.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

from math_verify import parse, verify
from math_verify.errors import TimeoutException

logger = logging.getLogger(__name__)

# math-verify's timeout per parse and per comparison, main thread only (signal.alarm
# takes whole seconds).
MATH_VERIFY_TIMEOUT_S = 2
# Longer answers go straight to the string comparison: sympy time grows fast with size.
MATH_VERIFY_MAX_CHARS = 500

# Text after an end-of-sequence token is not part of the response.
_END_OF_SEQUENCE = re.compile(r"</s>|<eos>|<\|endoftext\|>|<\|im_end\|>|<\|eot_id\|>|<\|end\|>")
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|]{1,40}\|>|</?s>|<pad>|<unk>|<bos>")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# '=' but not '<=', '>=', '!=', '==', '=>'; or an "answer is" / "answer:" phrase.
_MARKER = re.compile(r"(?<![<>!=])=(?![=>])|\banswer\s+is\b\s*:?|\banswer\s*:", re.IGNORECASE)
# The arithmetic task's working ("rev 2301") is never the answer.
_ARITH_WORKING = re.compile(r"\brev\s+-?\d+")
# Thousands separators: 1,234 / 1 234 / 1\,234 / 1{,}234 / thin spaces.
_NUMBER = (r"[-+]?(?:\d{1,3}(?:(?:,|\\,|\{,\}|[ \u2009\u202f])\d{3})+(?!\d)|\d+)(?:\.\d+)?"
           r"|[-+]?\.\d+")
# A number followed by a word: "1032 Done", "42 apples".
_NUMBER_THEN_WORD = re.compile(rf"({_NUMBER})\s+([A-Za-z]{{2,}})")
# A word of text; "frac" in "\\frac" is not one.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_MATH_WORDS = {"pi", "sqrt", "infty", "and", "or"}
_SENTENCE_END = re.compile(r"\.(?=\s|$)|,\s+(?=[A-Za-z]{2,})")

_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(rf"([-+]?)({_DECIMAL})(?:/({_DECIMAL}))?")
_LATEX_FRACTION = re.compile(
    rf"([-+]?)\\[dt]?frac(?:\{{\s*([-+]?{_DECIMAL})\s*\}}\{{\s*({_DECIMAL})\s*\}}|(\d)(\d))")
# A number in free text, fractions included: the last one is the answer of last resort.
_LAST_NUMBER = re.compile(
    rf"[-+]?\\[dt]?frac\s*\{{\s*[-+]?{_DECIMAL}\s*\}}\s*\{{\s*{_DECIMAL}\s*\}}"
    rf"|[-+]?\\[dt]?frac\d\d|(?:{_NUMBER})(?:\s*/\s*\d+)?")
# 1,234 / 1 234 / 1\,234 / 1{,}234, with the separators already reduced to ','.
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Inputs that make sympy evaluate astronomically large numbers: 9^{9^9}, 9^9^9, (10^{100})!.
_EXPLOSIVE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*[\d.]+\s*\^|\^[^!]*!")


def extract_answer(response: str) -> str | None:
    """The final answer a response gives, or None if it gives none.

    In order: the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced
    braces); else the text after the last '=', 'answer is' or 'Answer:', up to the end of
    its sentence; else the whole text if it is one short line of math and no words
    ("\\frac{a}{2}", "-7"); else the last number in the text (the arithmetic task's
    "rev 2301" working excluded). Surrounding ``$...$``, a trailing period and special
    tokens are removed; text after an end-of-sequence token is ignored.
    """
    if not isinstance(response, str):
        return None
    text = _END_OF_SEQUENCE.split(response, maxsplit=1)[0]
    text = _SPECIAL_TOKEN.sub("", text).replace("\u2212", "-")
    answer = _last_boxed(text)
    if answer is None:
        markers = list(_MARKER.finditer(text))
        if markers:
            answer = _answer_span(text[markers[-1].end():])
        elif _is_bare_expression(text):
            answer = text
        else:
            numbers = _LAST_NUMBER.findall(_ARITH_WORKING.sub(" ", text))
            answer = numbers[-1] if numbers else None
    if answer is None:
        return None
    return _clean(answer) or None


def is_correct(response: str, reference: str) -> bool:
    """Whether the response's final answer equals the reference answer."""
    try:
        return _is_correct(response, reference)
    except Exception:
        # A checker bug must not stop training: the sample counts as wrong.
        logger.warning("verify: checker crashed on response %.80r; counted as incorrect",
                       response, exc_info=True)
        return False


def _is_correct(response: str, reference: str) -> bool:
    predicted = extract_answer(response)
    expected = _reference_answer(reference)
    if predicted is None or expected is None:
        return False
    predicted_number, expected_number = _as_number(predicted), _as_number(expected)
    if predicted_number is not None and expected_number is not None:
        return predicted_number == expected_number
    verdict = _math_verify(expected, predicted)
    if verdict is not None:
        return verdict
    return _normalise_text(predicted) == _normalise_text(expected)


def _reference_answer(reference: str) -> str | None:
    """The reference as an answer: its boxed content if it has one, else all of it."""
    if not isinstance(reference, str):
        return None
    text = reference.replace("\u2212", "-")
    answer = _last_boxed(text)
    return _clean(text if answer is None else answer) or None


def _is_bare_expression(text: str) -> bool:
    """Whether the text is only math: one short line, no words outside LaTeX commands."""
    text = text.strip()
    return (0 < len(text) <= 100 and "\n" not in text and not _BOXED.search(text)
            and re.search(r"[0-9A-Za-z]", text) is not None and not _WORD.search(text))


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}``."""
    found = None
    for match in _BOXED.finditer(text):
        start = match.end()
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] == "{":
            content = _braced(text, start)
        else:  # "\boxed 5"
            token = re.match(r"[^\s$]+", text[start:])
            content = token.group(0) if start > match.end() and token else None
        if content and content.strip():
            found = content
    return found


def _braced(text: str, open_at: int) -> str | None:
    """Text inside the brace group opening at ``open_at``; None if it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":  # \{ and \} are literal braces
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
        i += 1
    return None


def _answer_span(tail: str) -> str:
    """The answer at the start of the text following '=' or 'answer is'."""
    tail = tail.lstrip(" \t\n:")
    for opener, closer in _MATH_DELIMITERS:
        if tail.startswith(opener):
            end = tail.find(closer, len(opener))
            if end > 0:
                return tail[len(opener):end]
            break
    span = tail.split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(span)
    if sentence_end:
        span = span[:sentence_end.start()]
    number_then_word = _NUMBER_THEN_WORD.match(span.strip())
    if number_then_word and number_then_word.group(2).lower() not in _MATH_WORDS:
        span = number_then_word.group(1)
    return span


def _clean(answer: str) -> str:
    """Strip whitespace, math delimiters, stray '$' and trailing punctuation."""
    previous = None
    answer = answer.replace("\u2212", "-")
    while answer != previous:
        previous = answer
        answer = answer.strip()
        for opener, closer in _MATH_DELIMITERS:
            if (answer.startswith(opener) and answer.endswith(closer)
                    and len(answer) >= len(opener) + len(closer)):
                answer = answer[len(opener):len(answer) - len(closer)]
        answer = answer.strip("$").rstrip(".,;:").removesuffix("\\]").removesuffix("\\)")
    return answer


def _as_number(answer: str) -> Fraction | None:
    """The exact value of a plain number (int, decimal, a/b, \\frac{a}{b}); else None."""
    text = answer.replace("\u2212", "-")
    text = re.sub(r"\\[,;! ]|\{,\}", lambda m: "," if m.group(0) in ("\\,", "{,}") else " ", text)
    text = text.replace("\u2009", ",").replace("\u202f", ",").strip()
    text = re.sub(r"(?<=\d) (?=\d{3}\b)", ",", text)  # 1 234 -> 1,234
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    text = re.sub(r"\s*([-+/{}])\s*", r"\1", text)  # "- 5", "1 / 2"; "1 2" stays no number
    plain = _PLAIN_NUMBER.fullmatch(text)
    if plain:
        sign, numerator, denominator = plain.groups()
    else:
        latex = _LATEX_FRACTION.fullmatch(text)
        if not latex:
            return None
        sign = latex.group(1)
        numerator = latex.group(2) or latex.group(4)
        denominator = latex.group(3) or latex.group(5)
    value = Fraction(numerator)
    if denominator is not None:
        if Fraction(denominator) == 0:
            return None
        value /= Fraction(denominator)
    return -value if sign == "-" else value


def _math_verify(expected: str, predicted: str) -> bool | None:
    """math-verify's verdict, or None when it cannot parse a side, raises or is skipped."""
    for answer in (expected, predicted):
        if len(answer) > MATH_VERIFY_MAX_CHARS or _EXPLOSIVE.search(answer):
            return None
    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout_s = MATH_VERIFY_TIMEOUT_S if in_main_thread else None
    try:
        gold = parse(f"${expected}$", parsing_timeout=timeout_s)
        target = parse(f"${predicted}$", parsing_timeout=timeout_s)
        if not (_has_expression(gold) and _has_expression(target)):
            return None
        return bool(verify(gold, target, timeout_seconds=timeout_s))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        logger.debug("verify: math-verify failed on %.80r vs %.80r", predicted, expected,
                     exc_info=True)
        return None


def _has_expression(parsed: list) -> bool:
    """Whether math-verify parsed anything beyond its raw-string fallback."""
    return any(not isinstance(item, str) for item in parsed)


def _normalise_text(answer: str) -> str:
    """The string-comparison form: no spacing commands, \\left/\\right, or whitespace."""
    text = re.sub(r"\\(?:left|right)\b|\\[,;! ]", "", answer)
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    return re.sub(r"\s+", "", text)
