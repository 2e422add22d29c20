"""Answer extraction and checking for verifiable problems.

``extract_answer`` finds the final answer a response gives; ``is_correct`` says whether
it equals the reference answer; ``is_correct_many`` checks many pairs in parallel.

The response is cut where generation should have stopped (an end-of-sequence token, or
a hallucinated next turn: ``<|im_start|>``, a line starting ``User:``, ``Human:``,
``Question:`` ...). Its final answer is, in order: what follows the last GSM8K ``####``;
the last group of ``\\boxed{}`` (boxes joined only by commas or "and" are one answer
with several parts, otherwise the last box wins); the text after the last "answer is" /
"Answer:" / '='; the whole response if it is one line of math; the last number that is
not part of a word. A reference is read the same way (``####``, boxes), else as a whole.

Then, in this process, in microseconds: equal normalised strings are equal; a
multiple-choice reference (``B``, ``(B)``) is compared with the chosen letter; plain
numbers exactly (``fractions.Fraction``:
``0.5`` = ``1/2``, ``1,000`` = ``1000``; currency, units and ``%`` around them dropped,
``18%`` also equal to ``0.18``; ``3,5`` is 3.5 only where the comma cannot separate
thousands); lists of plain numbers as sets. math-verify rounds floats to 6 places
(0.1234567 = 0.1234568 there); these comparisons do not.

Everything else goes to math-verify (``parse`` and ``verify``), on the extracted answers
and on the texts as math-verify extracts them; either accepting decides. Where it parses
neither, exact numbers or normalised strings decide.

Time: every call returns within ``VERIFY_TIMEOUT_S`` in any thread. math-verify's own
timeout uses signals, which work only in a main thread, and a thread cannot be stopped,
so math-verify runs in worker processes (``paced_ds.runtime.deadline_pool``), killed
at the deadline and replaced (a timeout counts as wrong). Starting a worker (1-2 s, once
per process and after a timeout when no spare is ready) is waited for on top, up to
``WORKER_START_TIMEOUT_S``; if none starts, the string comparison decides and a warning
says so. The in-process paths cap their input sizes and stay linear, and inputs known
to make sympy compute enormous numbers (towers of powers, big factorials and binomials)
never reach math-verify.

A checker crash never reaches the caller: it is logged and counts as incorrect.
"""

from __future__ import annotations

import logging
import os
import re
import time
from fractions import Fraction
from typing import NamedTuple

from paced_ds.runtime.deadline_pool import DeadlinePool

logger = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 1.0  # the bound on one check, math-verify included
WORKER_START_TIMEOUT_S = 60.0  # waiting for a math-verify worker to start
MAX_WORKERS = 8  # is_correct_many's default processes (at most one per CPU); kept idle after
MAX_TEXT_CHARS = 20_000  # a response or reference is read from its last this many chars
MATH_VERIFY_MAX_CHARS = 8_000  # the longest text handed to math-verify
MAX_ANSWER_CHARS = 1_000  # a longer final answer is compared as a string only
_KILL_MARGIN_S = 0.05  # time to kill a late worker and return within the bound

_END_OF_SEQUENCE = re.compile(
    r"</s>|<eos>|<\|endoftext\|>|<\|im_end\|>|<\|eot_id\|>|<\|end\|>|<end_of_turn>")
# A next turn the model made up; "Question:" only on a later line (it may restate first).
_NEXT_TURN = re.compile(
    r"<\|im_start\|>|<\|start_header_id\|>|<start_of_turn>|\[INST\]"
    r"|\n[ \t>#*]*(?:User|USER|Human|HUMAN|Question|Problem|Q)[ \t]*\d*[ \t]*\**:")
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|]{1,40}\|>|</?s>|<pad>|<unk>|<bos>")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# What may stand between boxes that give one answer in parts: "\boxed{2} and \boxed{3}",
# "\boxed{1} papers and \boxed{2} bins", "\(\boxed{1}\), \(\boxed{2}\)"; once math
# delimiters and spacing are dropped. Not "\boxed{41}, no wait: \boxed{42}".
_BOX_SPACING = re.compile(r"\$|\\[()\[\],;! ]|\\q?quad\b|\\text\{\s*(and|or)\s*\}")
_BOX_JOINER = re.compile(r"\s*(?:[^.:;!?\n]{0,40}?(?:,|\band|\bor))?\s*")
# '=' but not '<=', '>=', '!=', '==', '=>'; or an "answer is" / "answer:" phrase.
_MARKER = re.compile(r"(?<![<>!=])=(?![=>])|\banswer\s+is\b\s*:?|\banswer\s*:", re.IGNORECASE)
# The arithmetic task's working ("rev 2301") is never the answer.
_ARITH_WORKING = re.compile(r"\brev\s+-?\d+")
# Thousands separators: 1,234 / 1 234 / 1\,234 / 1{,}234 / thin spaces; a decimal comma.
_NUMBER = (r"[-+]?(?:\d{1,3}(?:(?:,|\\,|\{,\}|[ \u2009\u202f])\d{3})+(?![\d,])|\d+,\d+(?![\d,])"
           r"|\d+)(?:\.\d+)?|[-+]?\.\d+")
# A number followed by a word: "1032 Done", "42 apples".
_NUMBER_THEN_WORD = re.compile(rf"({_NUMBER})\s+([A-Za-z]{{2,}})")
# A word of text; "frac" in "\\frac" is not one.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_MATH_WORDS = {"pi", "sqrt", "infty", "and", "or"}
_SENTENCE_END = re.compile(r"\.(?=\s|$)|,\s+(?=[A-Za-z]{2,})")
# Units written against a number ("5cm"); any other letter touching a number makes it
# part of a word or a term ("H2O", "x2y", "2x").
_GLUED_UNITS = r"(?:cm|mm|km|kg|mg|ml|mph|ft|min|hrs?|m|g|s|h|L)"
_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(rf"([-+]?)({_DECIMAL})(?:/({_DECIMAL}))?")
_LATEX_FRACTION = re.compile(
    rf"([-+]?)\\[dtc]?frac(?:\{{\s*([-+]?{_DECIMAL})\s*\}}\{{\s*({_DECIMAL})\s*\}}|(\d)(\d))")
# A number in free text, fractions included: the last one is the answer of last resort.
_LAST_NUMBER = re.compile(
    rf"[-+]?\\[dt]?frac\s*\{{\s*[-+]?{_DECIMAL}\s*\}}\s*\{{\s*{_DECIMAL}\s*\}}"
    rf"|[-+]?\\[dt]?frac\d\d"
    rf"|(?<![A-Za-z_\d.,])(?:{_NUMBER})(?:\s*/\s*\d+)?(?![A-Za-z_\d]|[.,]\d)"
    rf"|(?<![A-Za-z_\d.,])(?:{_NUMBER})(?={_GLUED_UNITS}(?![A-Za-z]))")
# With the separators reduced to ',': 1,234 (never 0,123: that is a decimal comma).
_THOUSANDS = re.compile(r"[-+]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")
_CURRENCY = r"(?:\\\$|\$|€|£|¥|₹|\\euro\b|\\pounds\b|US\$|USD\b|EUR\b|Rs\.?)"
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*%\s*\}|percent(?:age)?\b|pct\b)\s*$")
# Trailing units: \text{ cm}, ^\circ, "dollars", "square meters", 5cm, m^2 (not 10^2).
_UNIT = re.compile(r"\s*(?:\\(?:text|mbox|textnormal|mathrm|textrm|textbf|textit)\s*\{[^{}\d]*\}"
                   rf"|\^\s*\{{?\s*\\circ\s*\}}?|\\circ|°|(?<=\s)[A-Za-z]{{2,}}\.?|(?<=\d){_GLUED_UNITS}"
                   r"|(?<=[A-Za-z}])(?:\^\s*\{?[23]\}?|[²³]))\s*$")
_CHOICE = re.compile(r"\(?([A-J])\)?\.?")
_CHOICE_ANSWER = re.compile(r"(?i:answer)\s*(?:is|:)\s*:?\s*(?:\*\*)?\s*\(?([A-J])\b")
_CHOICE_LINE = re.compile(r"(?:\*\*)?\(?([A-J])(?:\)|\.|:|$)")
_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
# Inputs that make sympy compute astronomically large numbers: 9^{9^9}, 9^9^9, 2^{10^10},
# 2^{10000000}, 100000!, (10^{100})!, \binom{10^6}{5*10^5}, 9**9**9.
# (A digit run is entered at its start only, or the search would be quadratic in it.)
_EXPLOSIVE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*[\d.]+\s*\^|\^\s*\{?\s*\d{7,}|(?<!\d)\d{5,}\s*[)}]*\s*!"
                        r"|\^\S{0,30}?[)}]\s*!|binom\s*\{?\s*\d{5,}|(?<!\d)\d{5,}\s*\}?\s*\\choose"
                        r"|\\choose\s*\{?\s*\d{5,}|(?<!\d)\d+\s*\*\*\s*\d+\s*\*\*\s*\d")
MAX_NESTING = 40  # deeper brackets go to the string comparison: sympy recurses on them


# ---------------------------------------------------------------------------------------
# The public checks

def extract_answer(response: str) -> str | None:
    """The final answer a response gives (see the module docstring), or None."""
    text = _response_text(response)
    answer = _final_answer(text)[0] if text is not None else None
    return answer or None


def reference_answer(reference: str) -> str:
    """The answer a reference gives: the number after GSM8K's '####', its boxed answers, or
    all of it (a whole worked solution as gold reduces to its final answer)."""
    text = _reference_text(reference)
    answer = _reference_answer(text)[0] if text is not None else None
    return answer or reference


def is_correct(response: str, reference: str) -> bool:
    """Whether the response's final answer equals the reference answer."""
    start_s = time.monotonic()
    try:
        check = _Check(response, reference)
        if check.verdict is not None:
            return check.verdict
        budget_s = VERIFY_TIMEOUT_S - (time.monotonic() - start_s) - _KILL_MARGIN_S
        return check.finish(_POOL.run([(_math_verify_verdict, (check.attempts,))], budget_s=budget_s)[0])
    except Exception:
        # A checker bug must not stop training: the sample counts as wrong.
        logger.warning("verify: checker crashed on response %.80r; counted as incorrect",
                       response, exc_info=True)
        return False


def is_correct_many(pairs, workers: int | None = None) -> list[bool]:
    """``is_correct`` for each (response, reference) pair, math-verify in ``workers``
    processes at once (default: one per CPU, at most ``MAX_WORKERS``); each check keeps
    the same time bound."""
    pairs, checks = list(pairs), []
    for response, reference in pairs:
        try:
            checks.append(_Check(response, reference))
        except Exception:
            logger.warning("verify: checker crashed on response %.80r; counted as incorrect",
                           response, exc_info=True)
            checks.append(None)
    waiting = [i for i, check in enumerate(checks) if check is not None and check.verdict is None]
    try:
        outcomes = _POOL.run([(_math_verify_verdict, (checks[i].attempts,)) for i in waiting],
                             budget_s=VERIFY_TIMEOUT_S - _KILL_MARGIN_S,
                             workers=workers or min(MAX_WORKERS, os.cpu_count() or 1)) if waiting else []
    except Exception:
        logger.warning("verify: checker crashed on %d answers for math-verify; counted as incorrect",
                       len(waiting), exc_info=True)
        outcomes = [("crashed", None)] * len(waiting)
    verdicts = [bool(check and check.verdict) for check in checks]
    for i, outcome in zip(waiting, outcomes):
        try:
            verdicts[i] = checks[i].finish(outcome)
        except Exception:
            logger.warning("verify: checker crashed on response %.80r; counted as incorrect",
                           pairs[i][0], exc_info=True)
    return verdicts


# ---------------------------------------------------------------------------------------
# One check: what this process decides, and what it asks math-verify

class _Check:
    """A (response, reference) pair read in this process: ``verdict`` is set when that
    decides it; else ``attempts`` are the (gold, prediction) texts for math-verify."""

    def __init__(self, response, reference):
        self.verdict: bool | None = None
        self.attempts: list[tuple[str, str]] = []
        text, gold_text = _response_text(response), _reference_text(reference)
        if text is None or gold_text is None:
            self.verdict = False
            return
        gold, gold_is_gsm8k = _reference_answer(gold_text)
        self.gold, (self.answer, strong) = gold, _final_answer(text)
        if not gold:
            self.verdict = False
            return
        if _normalise_text(_clean(text)) == _normalise_text(_clean(gold_text)):
            self.verdict = True  # the reference itself, however little it parses
            return
        choice = _CHOICE.fullmatch(_TEXT_COMMAND.sub(r"\1", gold).strip())
        if choice:
            self.verdict = _chosen_letter(text) == choice.group(1)
            return
        if strong and self.answer:
            if _normalise_text(self.answer) == _normalise_text(gold):
                self.verdict = True
                return
            gold_number, number = _as_number(gold), _as_number(self.answer)
            if gold_number is not None and number is not None:
                self.verdict = _numbers_equal(gold_number, number)
                return
            gold_list = _number_list(gold)
            answer_list = _number_list(self.answer, in_list=bool(gold_list and len(gold_list) > 1))
            if gold_list and answer_list and max(len(gold_list), len(answer_list)) > 1:
                self.verdict = set(gold_list) == set(answer_list)  # order-insensitive
                return
            if gold_number is None or re.search(r"\d", self.answer):  # "abc" is no number
                self.attempts.append((_as_math(gold), _as_math(self.answer)))
        raw_text = _ARITH_WORKING.sub(" ", text)
        if "####" not in text and re.search(r"[\d$\\]", raw_text):
            # math-verify's own reading of the texts (not after '####', nor in "rev 2301").
            raw_gold = (gold_text if not gold_is_gsm8k and re.search(r"\$|\\[(\[]|\\boxed", gold_text)
                        else _as_math(gold))
            self.attempts.append((raw_gold[-MATH_VERIFY_MAX_CHARS:], raw_text[-MATH_VERIFY_MAX_CHARS:]))
        # Nothing to ask, or nothing math-verify could finish in time (a timeout foretold).
        self.attempts = [pair for pair in dict.fromkeys(self.attempts)
                         if not any(map(_too_costly, pair))]
        if not self.attempts:
            self.verdict = False

    def finish(self, outcome: tuple[str, object]) -> bool:
        """The verdict from math-verify's outcome: ("ok", True | False | None), or a
        timeout / error / crash (wrong), or "unavailable" (no worker started)."""
        status, value = outcome
        if status == "ok" and value is not None:
            return bool(value)
        if status in ("timeout", "crashed") or self.answer is None:
            return False
        if status == "error":
            logger.debug("verify: math-verify raised %s", value)
        # math-verify parsed neither side (or is unavailable): exact numbers, else strings.
        gold_number, number = _as_number(self.gold), _as_number(self.answer)
        if gold_number is not None and number is not None:
            return _numbers_equal(gold_number, number)
        return _normalise_text(self.answer) == _normalise_text(self.gold)


def _response_text(response) -> str | None:
    """The response up to where generation should have stopped, its tail at most."""
    if not isinstance(response, str):
        return None
    text = _END_OF_SEQUENCE.split(response, maxsplit=1)[0]
    turn = _NEXT_TURN.search(text)
    if turn:
        text = text[:turn.start()]
    return _SPECIAL_TOKEN.sub("", text[-MAX_TEXT_CHARS:]).replace("\u2212", "-")


def _reference_text(reference) -> str | None:
    if not isinstance(reference, str):
        return None
    return reference[-MAX_TEXT_CHARS:].replace("\u2212", "-")


def _reference_answer(text: str) -> tuple[str | None, bool]:
    """The reference's answer: after GSM8K's '####', or its boxes, or all of it; and
    whether it came from '####'."""
    if "####" in text:
        return _clean(_gsm8k_answer(text)), True
    boxes = _boxes(text)
    return _clean(", ".join(boxes) if boxes else text), False


def _gsm8k_answer(text: str) -> str:
    line = text[text.rfind("####") + 4:].strip().split("\n", 1)[0]
    return line.replace(",", "") if _THOUSANDS.fullmatch(line.strip()) else line


def _final_answer(text: str) -> tuple[str | None, bool]:
    """The response's final answer, and whether an explicit marker gave it ('####', a
    box, "answer is", a last '=' with no number after it, or all-math text)."""
    if "####" in text:
        return _clean(_gsm8k_answer(text)) or None, True
    boxes = _boxes(text)
    markers = list(_MARKER.finditer(text))
    if boxes:
        # "Final answer: ..." after the boxes, naming math, is the later word on it.
        phrase = markers[-1] if markers and markers[-1].group(0) != "=" else None
        after = _clean(_answer_span(text[phrase.end():])) if phrase else ""
        last_box_at = [match.start() for match in _BOXED.finditer(text)][-1]
        if not (phrase and phrase.start() > last_box_at and re.search(r"[\d\\$]", after)):
            return _clean(", ".join(boxes)) or None, True
    if markers:
        tail = text[markers[-1].end():]
        answer = _clean(_answer_span(tail))
        after = tail.lstrip(" \t\n:$")[len(answer):]
        strong = markers[-1].group(0) != "=" or not re.search(r"\d", after)
        return answer or None, strong
    if _is_bare_expression(text):
        return _clean(text) or None, True
    numbers = _LAST_NUMBER.findall(_ARITH_WORKING.sub(" ", text))
    return (_clean(numbers[-1]) or None) if numbers else None, False


def _is_bare_expression(text: str) -> bool:
    """Whether the text is only math: one short line, no words outside LaTeX commands."""
    text = text.strip()
    return (0 < len(text) <= 100 and "\n" not in text and not _BOXED.search(text)
            and re.search(r"[0-9A-Za-z]", text) is not None and not _WORD.search(text))


def _boxes(text: str) -> list[str]:
    """Contents of the last run of complete, non-empty ``\\boxed{}`` / ``\\fbox{}`` joined
    by commas or "and" (see ``_BOX_JOINER``): usually one."""
    if not _BOXED.search(text):
        return []
    closing = _matching_braces(text)
    group, group_end = [], 0
    for match in _BOXED.finditer(text):
        if match.start() < group_end:  # inside the previous box, which holds it
            continue
        start = match.end()
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] == "{":
            end = closing.get(start)
            content = text[start + 1:end] if end is not None else None
            end = end + 1 if end is not None else None
        else:  # "\boxed 5"
            token = re.match(r"[^\s$]+", text[start:start + 100])
            content = token.group(0) if start > match.end() and token else None
            end = start + len(content) if content else None
        if not (content and content.strip()):
            continue
        between = _BOX_SPACING.sub(r" \1 ", text[group_end:match.start()])
        if not (group and _BOX_JOINER.fullmatch(between)):
            group = []
        group.append(content)
        group_end = end
    return group


def _matching_braces(text: str) -> dict[int, int]:
    """The position of each '{' that closes, mapped to its '}' (one linear pass)."""
    closing, open_at = {}, []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":  # \{ and \} are literal braces
            i += 2
            continue
        if char == "{":
            open_at.append(i)
        elif char == "}" and open_at:
            closing[open_at.pop()] = i
        i += 1
    return closing


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


def _chosen_letter(text: str) -> str | None:
    """The multiple-choice letter a response picks: boxed, after "answer is", or alone
    on its last line ("(B)", "B)", "B. 14")."""
    boxes = _boxes(text)
    boxed = _CHOICE_LINE.match(_TEXT_COMMAND.sub(r"\1", boxes[-1]).strip()) if boxes else None
    if boxed:
        return boxed.group(1)
    phrases = list(_CHOICE_ANSWER.finditer(text[-2000:]))
    if phrases:
        return phrases[-1].group(1)
    last_line = _CHOICE_LINE.match(text.strip().rsplit("\n", 1)[-1].strip().strip("$"))
    return last_line.group(1) if last_line else None


# ---------------------------------------------------------------------------------------
# Exact numbers

class _Number(NamedTuple):
    value: Fraction
    percent: bool  # written with %, "percent"
    tolerance: Fraction  # 0, or half a unit in the last place of a printed float


def _as_number(answer: str) -> _Number | None:
    """The exact value of a plain number (int, decimal, a/b, \\frac{a}{b}), with any
    currency, unit or percent sign around it dropped."""
    if not answer or len(answer) > 200:
        return None
    text = re.sub(r",\\!\s*", ",", answer.replace("\u2212", "-")).replace("\\!", "").strip()
    percent = _PERCENT.search(text)
    if percent:
        text = text[:percent.start()]
    for _ in range(3):  # "15 \text{ cm}^2", "5 square meters"
        unit = _UNIT.search(text)
        if not unit or unit.start() == 0 or unit.group(0).strip().lower() in _MATH_WORDS:
            break
        text = text[:unit.start()]
    text = re.sub(rf"^([-+]?)\s*{_CURRENCY}\s*|\s*{_CURRENCY}$", r"\1", text.strip()).replace("$", "")
    text = re.sub(r"\\[,;! ]|\{,\}", lambda m: "," if m.group(0) in ("\\,", "{,}") else " ", text)
    text = text.replace("\u2009", ",").replace("\u202f", ",").strip()
    text = re.sub(r"(?<=\d) (?=\d{3}\b)", ",", text)  # 1 234 -> 1,234
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    elif _DECIMAL_COMMA.fullmatch(text):
        text = text.replace(",", ".")
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
    tolerance = Fraction(0)
    if denominator is not None:
        if Fraction(denominator) == 0:
            return None
        value /= Fraction(denominator)
    elif "." in numerator and len(numerator.replace(".", "").lstrip("0")) >= 15:
        # 0.0833333333333333 is 1/12 printed as a float, not a claim of 16 exact digits.
        tolerance = Fraction(1, 2 * 10 ** len(numerator.split(".")[1]))
    return _Number(-value if sign == "-" else value, bool(percent), tolerance)


def _numbers_equal(first: _Number, second: _Number) -> bool:
    """Equal values (within a printed float's last digit); a percentage also equals its
    fraction: 18% = 18 = 0.18."""
    tolerance = max(first.tolerance, second.tolerance)
    candidates = [(first.value, second.value)]
    if first.percent != second.percent:
        candidates.append((first.value / 100, second.value) if first.percent
                          else (first.value, second.value / 100))
    return any(abs(a - b) <= tolerance for a, b in candidates)


def _number_list(answer: str, in_list: bool = False) -> list[Fraction] | None:
    """The values of a bare list of plain numbers ("2, 3", "2 and 3", "{2; 3}"), None if
    it is not one (tuples and intervals are not). Within a list (``in_list``, or with
    separators of its own) "2,3" is two items; alone it is the number 2.3."""
    text = re.sub(r"^\\?\{(.*?)\\?\}$", r"\1", answer.strip())
    if re.search(r"[()\[\]]", text):
        return None
    parts = re.split(r"\s*;\s*|,\s+|\s+(?:and|or)\s+|\\text\{\s*(?:and|or)\s*\}|\\q?quad", text)
    in_list = in_list or len(parts) > 1
    items = []
    for part in parts:
        thousands = _THOUSANDS.fullmatch(part.strip().strip("$"))
        split = not thousands and (in_list or _as_number(part) is None)
        items += part.split(",") if split else [part]
    values = [_as_number(item) for item in items if item.strip()]
    if not values or any(value is None for value in values):
        return None
    return [value.value for value in values]


def _normalise_text(answer: str) -> str:
    """The string-comparison form: no spacing commands, \\left/\\right, or whitespace."""
    text = re.sub(r"\\(?:left|right)\b|\\[,;! ]", "", answer)
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    return re.sub(r"\s+", "", text)


def _too_costly(text: str) -> bool:
    """Whether math-verify could not finish on this text in time (see ``_EXPLOSIVE``)."""
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]" and depth:
            depth -= 1
    return deepest > MAX_NESTING or _EXPLOSIVE.search(text) is not None


def _as_math(answer: str) -> str:
    """An extracted answer as math-verify reads math: inside '$'."""
    return answer if answer.startswith(("$", "\\(", "\\[")) else f"${answer[:MAX_ANSWER_CHARS]}$"


# ---------------------------------------------------------------------------------------
# math-verify, in worker processes

def _math_verify_verdict(attempts: list[tuple[str, str]]) -> bool | None:
    """(Runs in a worker.) Whether math-verify accepts any (gold, prediction) attempt;
    None if it parsed both sides of none of them."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    extraction = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    parsed_any = False
    for gold, prediction in attempts:
        gold_parsed = parse(gold, extraction, parsing_timeout=None)
        if not any(not isinstance(item, str) for item in gold_parsed):
            continue
        predicted = parse(prediction, extraction, parsing_timeout=None)
        if not any(not isinstance(item, str) for item in predicted):
            continue
        parsed_any = True
        if verify(gold_parsed, predicted, timeout_seconds=None):
            return True
    return False if parsed_any else None


def _warm_up_worker() -> None:
    """(Runs in each new worker.) Import math-verify and pay sympy's first-use costs
    (equations, sets, matrices) here, not inside some check's deadline."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled"
    for warm_up in [("$1/2$", "The answer is $\\boxed{0.5}$"),
                    ("$x^2/4 + y^2/3 = 1$", "$\\boxed{x \\in [-2, 7]}$"),
                    ("$\\{1, 2\\} \\cup (3, \\infty)$", "$\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix}$")]:
        _math_verify_verdict([warm_up])


def _say_math_verify_unavailable(reason: str) -> None:
    logger.warning("verify: %s; answers math-verify would decide are compared as "
                   "numbers or strings only", reason)


# This process's math-verify workers, none started before a check needs one (made at
# import: later changes to WORKER_START_TIMEOUT_S and MAX_WORKERS do not reach it).
_POOL = DeadlinePool("math-verify", start_timeout_s=WORKER_START_TIMEOUT_S, max_idle=MAX_WORKERS,
                     warm_up=_warm_up_worker, on_unavailable=_say_math_verify_unavailable)
