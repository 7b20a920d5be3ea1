"""Tests for verifier.py: extraction, equivalence by phenomenon, the notes' accept / reject / decide cases, the real
benchmark files (skipped without ../shared/data), hostile inputs, a fuzz run, threads, and an optional comparison
with math-verify. Budget given: the whole file under ~60 s on 2 cores (the fuzz test ~20 s at most; it runs in ~1.5 s; the file in ~10 s).
"""
import json
import random
import re
import string
import threading
import time
from fractions import Fraction

import pytest

import verifier
from verifier import Score, extract_answer, is_equivalent, score

BOUND_S = 2.0   # the hard bound for any single call

# ---------------------------------------------------------------- the notes' cases (gold, prediction) ------------
NOTES_ACCEPT = [
    ("1/2", "0.5"), (r"\frac{1}{2}", r"\dfrac{1}{2}"), (r"\frac{1}{2}", r"\tfrac12"), (r"\frac{1}{2}", r"\frac12"),
    (r"2\sqrt{2}", r"\sqrt{8}"), ("10", "10.0"), ("1000", "1,000"), ("1000", "1{,}000"), (r"\frac{\pi}{2}", r"\pi/2"),
    ("(x+1)^2", "x^2+2x+1"), ("5", "x = 5"), ("50", r"50\%"), ("12", r"12 \text{ cm}"), (r"90^\circ", "90"),
    (r"\{1,2\}", r"\{2,1\}"), ("e^{16}-1", "-1+e^{16}"), ("3/4", "6/8"), (r"\text{(B)}", "B"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"), ("6 - 5i", "6-5i"), (r"\text{Evelyn}", "Evelyn"),
]
NOTES_REJECT = [
    ("0.5", "50"), ("7", "7.0001"), ("[2,5)", "(2,5)"), ("1/3", "0.333"),
    ("42", "12, 30"), ("42", "12 30"),                                        # the problem's numbers restated
    ("42", ""), ("42", "   "), ("42", None),                                 # empty or missing answer
]
# 'decide' cases of the notes, with the decision taken (see the README part)
DECIDED = [
    # decimal approximations of irrationals are rejected (lenient rounding is a reward-hacking target) ...
    (r"\sqrt{3}", "1.7320508", False), (r"\pi", "3.14159", False), (r"-\sqrt{3}", "-1.732", False),
    (r"\frac{\pi}{2}", "1.5707963267948966", False),
    # ... but a decimal equal to a rational gold is exact, and a radical that is rational counts as rational
    (r"\sqrt{4}", "2.0", True), (r"\frac{\sqrt{8}}{\sqrt{2}}", "2.0", True), ("0.15", r"\frac{3}{20}", True),
    # parenthesised tuples are ordered; bare lists and \{ \} sets are not
    ("(1,-16,-4,43)", "(-16,1,-4,43)", False), ("(1,-16,-4,43)", "1,-16,-4,43", True), ("(2,4)", "(4,2)", False),
    ("3, 5, 7", "7, 5, 3", True), ("3, 5, 7", r"\{7, 3, 5\}", True), ("1,-2", "-2, 1", True),
    # units in words or \text are dropped after a number; a number spelled as a word is not a number
    ("9", "9 inches", True), ("9", r"9 \text{ inches}", True), ("50", "50 percent", True),
    ("5", "5 dollars", True), ("9", "nine", False),
    # a plain-number gold accepts any expression of exactly its value: the verifier does not see the problem, so it
    # cannot tell a restated computation from a closed form; approximations stay wrong
    ("5", r"\sqrt{25}", True), ("5", r"\frac{10}{2}", True), ("2000", r"2 \times 10^3", True), ("42", "12+30", True),
    ("1024", "2^{10}", True), ("120", r"\binom{10}{3}", True),
    # a percentage is a unit: 50\% is 50, never 0.5, in either direction
    (r"50\%", "0.5", False), (r"50\%", "50", True),
    # degrees are dropped; they are not converted to radians
    (r"90^\circ", r"\frac{\pi}{2}", False),
    # LaTeX argument rules: \sqrt51 is \sqrt{5}\cdot 1
    (r"\sqrt{51}", r"\sqrt51", False), (r"\sqrt{5}", r"\sqrt5", True),
    # base subscripts are dropped: digits must match
    ("204_5", "204", True), ("204_5", "54", False),
    # equations: the same relation up to a non-zero factor
    ("5x - 7y + 11z + 4 = 0", "-10x + 14y - 22z - 8 = 0", True), ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z = 0", False),
    # a named variable must match when both name one
    ("y = 2x + 3", "x = 2x + 3", False), ("y = 2x + 3", "2x + 3", True),
]

# ---------------------------------------------------------------- phenomena ------------------------------------
NUMBERS = [
    ("27", "27.0", True), ("27.0", "27", True), ("025", "25", True), ("-1", "-1.00", True), (".0000672", "0.0000672", True),
    (".0000672", r"6.72 \times 10^{-5}", True), (".0000672", "6.72e-5", True), ("4.5e33", r"4.5 \times 10^{33}", True),
    ("10080", r"10,\!080", True), (r"11,\! 111,\! 111,\! 100", "11111111100", True), (r"\$32,\!348", "32348", True),
    (r"\$18.90", "18.9", True), ("1,450,000", "1450000", True), ("58,500", "58500", True), ("2", "3", False),
    ("10", "100", False), ("1000", "1,001", False), ("-5", "5", False), ("0", "-0", True), ("3.21", "3.2", False),
    ("3.21", "3.210", True), ("1000000", "1e6", True), ("7", "7.00000000001", False), ("326.5", r"326\frac{1}{2}", True),
]
FRACTIONS = [
    (r"\frac{14}{3}", "14/3", True), (r"\frac 34", "0.75", True), (r"\frac9{19}", "9/19", True), (r"\frac43", r"\frac{4}{3}", True),
    (r"-\frac{24}{25}", r"\frac{-24}{25}", True), (r"-\frac{24}{25}", "-0.96", True), (r"\frac{1}{2}", r"\frac{2}{4}", True),
    (r"137 \frac{1}{2}", "137.5", True), (r"1\frac{4}{5}", r"\frac{9}{5}", True), (r"-1\frac{1}{2}", "-1.5", True),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", True), (r"\dfrac{17}{50}", "0.34", True), (r"\frac{1}{3}", "0.3333333333", False),
    (r"\frac{2}{3}", r"\frac{3}{2}", False), (r"\frac{1}{8}", "1/8.", True), (r"\frac{9}{256}", r"\frac{9}{265}", False),
]
RADICALS_CONSTANTS = [
    (r"3\sqrt{13}", r"\sqrt{117}", True), (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", True), (r"2\sqrt{5}", r"\sqrt{20}", True),
    (r"\sqrt[3]{8}", "2", True), (r"\sqrt[3]{-8}", "-2", True), (r"\sqrt[3]{16}", r"2\sqrt[3]{2}", True), (r"12\pi", r"12 \pi", True),
    (r"\frac{20000}{\pi}", r"20000/\pi", True), (r"18+2\pi", r"2\pi+18", True), (r"1+2\sqrt{3}", r"2\sqrt3+1", True),
    (r"11 \sqrt{5} + 11", r"11(1+\sqrt{5})", True), (r"\sqrt{2}", r"\sqrt{3}", False), (r"\pi", r"2\pi", False),
    (r"e^{i\pi}", "-1", True), (r"\log_2 8", "3", True), (r"\ln e", "1", True), (r"\frac{3\sqrt{3}}{4}", r"\frac{3}{4}\sqrt3", True),
    (r"\sqrt{3}", r"\sqrt{3}+10^{-40}", False),
]
COMPLEX = [
    ("6+9i", "9i+6", True), ("1 - 12i", "1-12 i", True), ("-2 + 7i", r"-2+7\mathrm{i}", True), ("1+274i", "1+274 i", True),
    ("1+2i", "1-2i", False), ("2i", "-2i", False), ("i", r"\sqrt{-1}", True),
]
SYMBOLIC = [
    ("3R^2", "3 R^{2}", True), ("2k+2", "2(k+1)", True), ("6r^2-4r-24", "2(3r^2-2r-12)", True),
    ("(a+5)(b+2)", "ab+2a+5b+10", True), (r"\frac{11+9a}{20}", r"\frac{11}{20}+\frac{9a}{20}", True),
    ("8n^2 + 4n + 1", "1+4n+8n^2", True), ("p - q", "-q+p", True), ("p - q", "q - p", False), ("2k", "2n", False),
    (r"\cot x", r"\frac{\cos x}{\sin x}", True), (r"\cot x", r"\tan x", False), ("x^3+3x-6", "x^3 + 3x - 6", True),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "(x-1)(x^4+x^2+1)", True), ("15x - 80", "5(3x-16)", True), ("-13x+3", "3-13x", True),
    ("x^2+1", "x^2+1.0000001", False), (r"\sin^2 x + \cos^2 x", "1", True), (r"\sin 2x", r"2\sin x\cos x", True),
    ("5r^5", "5r^{5}", True), ("(x+1)^{10}", "(x+1)^{10}", True), ("x^{1000}", "x^{1000}+x-x", True),
]
STRUCTURES = [
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, 1.5707963)", False), ("(6,31,-1)", "(6, 31, -1)", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True), (r"(-\infty, 0]", r"(-\infty, 0)", False), (r"(2,\infty)", r"[2,\infty)", False),
    (r"(-\infty, 2) \cup (3, \infty)", r"(3,\infty)\cup(-\infty,2)", True), (r"(0,9) \cup (9,36)", "(0,36)", False),
    (r"\left(\frac{3}{5},\frac{8}{3}\right]", "(0.6, 8/3]", True), (r"x \in [-2,7]", "[-2, 7]", True),
    (r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", r"[\pi^2/8, 5\pi^2/4]", True),
    (r"\{1\pm\sqrt{5},-2\}", r"-2, 1-\sqrt5, 1+\sqrt 5", True), (r"\{1\pm\sqrt{5},-2\}", r"\{-2, 1+\sqrt5\}", False),
    (r"1 \pm \sqrt{19}", r"1-\sqrt{19}, 1+\sqrt{19}", True), (r"3 \pm 2 \sqrt{2}", r"3 \mp 2\sqrt2", True),
    (r"3 \pm 2 \sqrt{2}", r"3 + 2\sqrt2", False), (r"\{1,2\}", r"\{1,2,3\}", False), (r"\{1,2\}", "(1,2)", False),
    (r"\emptyset", r"\{\}", True), (r"\{(1,2),(3,4)\}", r"\{(3,4),(1,2)\}", True), (r"\{(1,2),(3,4)\}", r"\{(4,3),(1,2)\}", False),
    (r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", r"\begin{pmatrix} -\frac13 \\ \frac23 \\ \frac53 \end{pmatrix}", True),
    (r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}", "(-18,-49,96)", True),
    (r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}", "(-49,-18,96)", False),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{bmatrix} -1 & 0 \\ 0 & -1 \end{bmatrix}", True),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & 1 \end{pmatrix}", False),
    (r"\begin{pmatrix} 1 & 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", False),
]
WORDS_CHOICES_PREFIXES = [
    (r"\text{(C)}", "(C)", True), (r"\text{(C)}", r"\textbf{(C)}", True), (r"\text{(C)}", "C", True), (r"\text{(C)}", "D", False),
    (r"\text{east}", "East", True), (r"\text{east}", "west", False), (r"\text{even}", r"\text{ Even }", True),
    (r"\text{ellipse}", "circle", False), (r"\text{Navin}", r"\textbf{Navin}", True),
    ("x=5", "5", True), ("x=5", "x=5", True), ("x=5", "x=6", False), ("y = -2x", "-2x", True), ("y = -2x", "x = -2y", False),
    ("5", r"\boxed{5}", True), ("5", "$5$", True), ("15", r"15\mbox{ cm}^2", True), ("5.4", r"5.4 \text{ cents}", True),
    ("4210_{5}", "4210", True), (r"\frac{\sqrt{21}}{5}", r"\left(\frac{\sqrt{21}}{5}\right)", True),
]
ALL_EQUIVALENCE = (
    [(g, p, True) for g, p in NOTES_ACCEPT] + [(g, p, False) for g, p in NOTES_REJECT] + DECIDED + NUMBERS + FRACTIONS
    + RADICALS_CONSTANTS + COMPLEX + SYMBOLIC + STRUCTURES + WORDS_CHOICES_PREFIXES)


@pytest.mark.parametrize("gold, pred", NOTES_ACCEPT)
def test_notes_accept(gold, pred):
    assert is_equivalent(gold, pred) is True


@pytest.mark.parametrize("gold, pred", NOTES_REJECT)
def test_notes_reject(gold, pred):
    assert is_equivalent(gold, pred) is False


@pytest.mark.parametrize("gold, pred, expected", DECIDED)
def test_decided_cases(gold, pred, expected):
    assert is_equivalent(gold, pred) is expected


@pytest.mark.parametrize("group", ["NUMBERS", "FRACTIONS", "RADICALS_CONSTANTS", "COMPLEX", "SYMBOLIC", "STRUCTURES",
                                   "WORDS_CHOICES_PREFIXES"])
def test_phenomena(group):
    wrong = [(g, p, e) for g, p, e in globals()[group] if is_equivalent(g, p) is not e]
    assert not wrong, f"{group}: verdicts differ from expected for {wrong}"


@pytest.mark.parametrize("gold, pred, expected", NUMBERS + FRACTIONS + SYMBOLIC + STRUCTURES)
def test_cases_individually(gold, pred, expected):
    assert is_equivalent(gold, pred) is expected


def test_last_of_several_boxed_wins():
    r = r"First I thought $\boxed{3}$, but then \boxed{4}. Final: $\boxed{\frac{1}{2}}$."
    assert extract_answer(r) == r"\frac{1}{2}"
    assert score(r, "0.5").reward == 1.0 and score(r, "4").reward == 0.0


# ---------------------------------------------------------------- extraction -----------------------------------
EXTRACTION = [
    (r"so $x=\boxed{5}$.", "5"),
    (r"\boxed{\frac{a}{\sqrt{b+\{c\}}}} done", r"\frac{a}{\sqrt{b+\{c\}}}"),
    (r"the result is \fbox{12}", "12"),
    (r"thus \boxed 5 is it", "5"),
    (r"\boxed{\boxed{7}}", "7"),
    (r"\framebox{204} minutes", "204"),
    ("Reasoning...\nThe answer is 42.", "42"),
    ("Reasoning...\nThe final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
    ("Step 1 ...\nAnswer: 17", "17"),
    ("**Answer:** 3.5", "3.5"),
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("She makes 1,000 dollars\n#### 1,000", "1,000"),
    ("Answer:\n\n12", "12"),
    ("I computed 2+2 and 3*7 but never concluded", None),
    ("", None),
    (r"unbalanced \boxed{12 and no closing", None),
    (r"\boxed{}", None),
]


@pytest.mark.parametrize("response, expected", EXTRACTION)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extraction_looks_at_final_region_of_long_responses():
    early = r"\boxed{1}" + "word " * 5000 + "The answer is 3."
    assert extract_answer(early) == "3"                            # the early box is outside the final region
    assert extract_answer("x" * 1_000_000 + r"\boxed{9}") == "9"
    assert extract_answer(r"\boxed{9}" + "x" * 1_000_000) is None


def test_boxed_answer_followed_by_degenerate_text():
    loop = "wait, let me check again. "
    assert extract_answer(r"\boxed{5}" + loop * 70) == "5"                       # 1,820 characters later: taken
    late = r"\boxed{5}" + loop * 200                                              # 5,200 characters later: not taken
    assert extract_answer(late) is None and score(late, "5") == Score(0.0, None, False, False)
    assert extract_answer(r"\boxed{5}" + "\n \t" * 5000) == "5"                  # trailing white space is not text


def test_extract_answer_non_string():
    assert extract_answer(None) is None and extract_answer(12) is None


# ---------------------------------------------------------------- score API ------------------------------------
def test_score_fields():
    s = score(r"... so $\boxed{\dfrac{1}{2}}$", r"\frac12")
    assert isinstance(s, Score) and s == Score(1.0, r"\dfrac{1}{2}", True, False)
    assert score("... so 7", "7") == Score(0.0, None, False, False)                  # no answer found
    assert score(r"\boxed{8}", "7") == Score(0.0, "8", False, False)
    assert score(r"\boxed{27}", 27.0) == Score(1.0, "27", True, False)               # AMC-style float gold
    assert score(r"\boxed{27.5}", 27.5).correct is True


@pytest.mark.parametrize("gold", ["", "   ", r"\frac{1}{", r"\unknowncommand{3}", "<>?", "1 < x", None, ["5"], True,
                                  "x" * 2000])
def test_unparseable_gold_gives_none(gold):
    assert is_equivalent(gold, "5") is None
    s = score(r"\boxed{5}", gold)
    assert s.correct is None and s.reward == 0.0


def test_unparseable_prediction_is_wrong_not_none():
    assert is_equivalent("5", r"\frac{1}{") is False
    assert is_equivalent("5", r"\unknowncommand{5}") is False


def test_gold_first_asymmetry():
    assert is_equivalent("1, 2", "(2, 1)") is True and is_equivalent("(2, 1)", "1, 2") is False   # the gold's order
    assert is_equivalent(r"\frac{1}{", "5") is None and is_equivalent("5", r"\frac{1}{") is False
    assert is_equivalent(r"\text{(C)}", "C") is True


def test_cli_prints_answer_and_verdict(capsys):
    verifier.main([r"The answer is $\boxed{\frac{1}{2}}$.", "0.5"])
    out = capsys.readouterr().out
    assert r"extracted answer: \frac{1}{2}" in out.splitlines() and "verdict: correct (reward 1.0)" in out
    verifier.main(["no answer here", "x^2+"])
    assert "gold answer not understood" in capsys.readouterr().out


def test_cli_prints_answer_as_written_not_repr(capsys):
    """The user report: the answer is shown as written (one backslash), not as its repr() with doubled ones."""
    verifier.main([r"so $x=\boxed{\dfrac12}$", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [r"extracted answer: \dfrac12", "verdict: correct (reward 1.0)"]
    verifier.main(["no answer here", "0.5"])        # a missing answer stays visible
    assert capsys.readouterr().out.splitlines() == ["extracted answer: (none)", "verdict: incorrect (reward 0.0)"]
    assert verifier._shown("") == "(empty)"          # extraction never returns "", but it would not print as blank


# ---------------------------------------------------------------- bounds, hostile input, threads ---------------
HOSTILE = [
    "{" * 10_000 + "1" + "}" * 10_000,
    r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "10^10^10", "10^{10^{10}}", "2^{2^{2^{2^{2^{2}}}}}", "9!!!!!!!!!!", "(10^{10})!", r"\binom{10^{9}}{5*10^{8}}",
    r"\sqrt[10^{10}]{2}", r"\frac{1}{0}", r"0^{-1}", r"\sin(10^{100})", r"e^{e^{e^{e^{10}}}}", r"x^{10^{10}}-x^{10^{10}}",
    "(" * 500 + "1" + ")" * 500, "1+" * 400 + "1", "9" * 999, r"\left(" * 300, r"\frac" * 300, r"\sqrt" * 400 + "2",
    r"\boxed{" * 3000, "}" * 3000 + r"\boxed{5}", r"\begin{pmatrix}" + "1&" * 400 + r"\end{pmatrix}", ",".join("1" * 300),
    r"\{" + ",".join(str(k) for k in range(300)) + r"\}", "-" * 800 + "1", "2^" * 400 + "2", r"\pm" * 300,
    "a" * 100_000, "\x00\x01\uffff" * 1000, r"\text{" * 500, "$" * 5000, r"\log_{1}(2)", r"\log_{0}(0)",
    r"(x+1)^{1000}-(x+1)^{999}(x+1)", r"x^{x^{x^{x^{x}}}}", "1e99999999999", r"\lfloor \lceil",
]


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{k}" for k in range(len(HOSTILE))])
def test_hostile_inputs_bounded_and_never_raise(text):
    for call in (lambda: score(text, "5"), lambda: score(r"\boxed{" + text + "}", text),
                 lambda: is_equivalent(text, text + "+1"), lambda: is_equivalent("x^2", text)):
        t0 = time.perf_counter()
        result = call()
        assert time.perf_counter() - t0 < BOUND_S
        assert result is None or isinstance(result, (bool, Score))


def test_huge_numbers_are_not_confused():
    assert is_equivalent("10^{10^{10}}", "10^{10^{10}}+1") is False
    assert is_equivalent("2^{100}", "1267650600228229401496703205376") is True
    assert is_equivalent("2^{100}", "1267650600228229401496703205377") is False


# ---------------------------------------------------------------- exactness: no float ties, no approximations ---
TOWER = r"\sqrt2^{\sqrt2^{\sqrt2^{\sqrt2}}}"
FLOAT_TIES = [                       # equal to 50 digits (or far beyond), yet different: each must be rejected
    ("2^{12000}", "2^{12000}+1"), ("2^{15000}", "2^{15000}+1"), ("2^{19999}", "2^{19999}-1"),
    (TOWER, TOWER + "+10^{-45}"), (r"e^{\pi}", r"e^{\pi}+10^{-45}"), (r"\pi", r"\pi+10^{-60}"),
    ("(x+1)^2", "x^2+2x+1+10^{-45}x"), (r"\sin^2 x+\cos^2 x", "1+10^{-45}"), ("x+y=1", "x+y=1+10^{-45}"),
    (r"\sqrt2", "1.4142135623730950488016887242096980785696718753769"), (r"\frac{1}{3}", "0." + "3" * 60),
    (r"\{1, \sqrt2\}", r"\{1, \sqrt2+10^{-50}\}"), ("(2^{12000}, 1)", "(2^{12000}+1, 1)"),
    (r"\lfloor 2^{19999}\sqrt2 \rfloor", r"\lfloor 2^{19999}\sqrt2 \rfloor+1"),
]


@pytest.mark.parametrize("gold, pred", FLOAT_TIES)
def test_values_a_float_cannot_separate_are_not_equal(gold, pred):
    assert is_equivalent(gold, pred) is False


@pytest.mark.parametrize("gold, pred", [("2^{15000}", "2^{15000}"), ("2^{15000}", "2^{14999}\\cdot 2"),
                                        (TOWER, TOWER), (TOWER, TOWER.replace("\\sqrt2", "\\sqrt{2}")),
                                        (r"e^{\pi}", r"e^{\pi}+0")])
def test_large_and_nested_values_still_equal_themselves(gold, pred):
    assert is_equivalent(gold, pred) is True


def test_undecided_comparison_is_not_equal():
    # 2^30000 is beyond the exact-arithmetic bound, so 4^15000 = 2^30000 cannot be proven here: "not equal"
    assert is_equivalent("2^{30000}", "4^{15000}") is False
    assert is_equivalent("2^{30000}", "2^{30000}+1") is False


CLOSED_FORMS = [                     # a plain-number gold against an exactly equal expression
    ("1000", "10^3", True), ("2", r"\sqrt{4}", True), ("2", r"\frac{\sqrt{8}}{\sqrt{2}}", True), ("-1", r"e^{i\pi}", True),
    ("3", r"\log_2 8", True), ("1", r"\sin^2 x+\cos^2 x", True), ("0.5", r"\frac{\sqrt{2}}{2}\cdot\frac{\sqrt{2}}{2}", True),
    ("-2", r"\sqrt[3]{-8}", True), ("8", r"4^{3/2}", True), ("6", "3!", True), ("0", "x-x", True),
    ("2", r"\sqrt{4.0001}", False), ("1.4142135623730951", r"\sqrt2", False), ("3", r"\pi", False),
    ("1/3", "0.333", False), ("1024", "2^{10}+1", False), ("4", r"\sqrt{15}", False),
]


@pytest.mark.parametrize("gold, pred, expected", CLOSED_FORMS)
def test_plain_number_gold_against_exact_closed_forms(gold, pred, expected):
    assert is_equivalent(gold, pred) is expected


UNICODE = [
    ("5", "5\u200b", True), ("5", "\ufeff5\u2060", True), ("0.5", "\u00bd", True), ("1.5", "1\u00bd", True),
    (r"\frac{3}{4}", "\u00be", True), (r"\frac{2}{3}", "\u2154", True), ("-3", "\u22123", True), ("6", "2\u00d73", True),
    ("2", "6\u00f73", True), (r"\sqrt{2}", "\u221a2", True), (r"2\sqrt{3}", "\u221a12", True), (r"\sqrt{x+1}", "\u221a(x+1)", True),
    ("2", "\u221b8", True), (r"2\pi", "2\u03c0", True), ("x^2+1", "x\u00b2+1", True), ("10^{-3}", "10\u207b\u00b3", True),
    ("x = 5", "x\u00a0=\u20095", True), ("1000", "1\u2009000", True), ("12", "\uff11\uff12", True), (r"\theta", "\u03b8", True),
    (r"\infty", "\u221e", True), (r"3 \pm 2", "3\u00b12", True), ("204_5", "204\u2085", True), ("x", "\U0001d465", True),
    ("0.5", "\u2153", False), ("x^2", "x2", False), ("-3", "\u22124", False), ("12", "1\u00b2", False),
]


@pytest.mark.parametrize("gold, pred, expected", UNICODE)
def test_unicode_math_characters(gold, pred, expected):
    assert is_equivalent(gold, pred) is expected
    if expected:                                                      # a Unicode gold is understood too
        assert is_equivalent(pred, gold) is True and is_equivalent(pred, pred) is True


def _random_expr(rng, depth=0):
    """A random, mostly well-formed LaTeX expression (exercises the parser and evaluator, not only rejections)."""
    if depth > 4 or rng.random() < 0.3:
        return rng.choice(["0", "1", "2", "7", "10", "0.5", "3.25", "12345678901234567890", "x", "y", "n", r"\pi", "e",
                           "i", r"\infty", "1,000"])
    a, b = _random_expr(rng, depth + 1), _random_expr(rng, depth + 1)
    return rng.choice([
        rf"\frac{{{a}}}{{{b}}}", rf"\sqrt{{{a}}}", rf"\sqrt[{b}]{{{a}}}", f"{a}^{{{b}}}", f"{a}+{b}", f"{a}-{b}",
        rf"{a}\cdot {b}", f"({a})", rf"\sin({a})", f"({a})!", rf"\binom{{{a}}}{{{b}}}", rf"\log_{{{a}}}({b})",
        f"|{a}|", f"e^{{{a}}}", f"{a}{b}", f"({a}, {b})", rf"\{{{a}, {b}\}}", f"[{a}, {b})", f"x = {a}",
        rf"{a} \pm {b}", rf"{a}\%", rf"{a} \text{{ cm}}", f"{a}^{{{a}^{{{b}}}}}"])


def _fuzz_strings(n, rng):
    pieces = [r"\frac", r"\sqrt", "{", "}", "(", ")", "[", "]", "^", "_", "+", "-", "*", "/", "=", ",", "!", "|",
              r"\pi", r"\infty", r"\cdot", r"\left(", r"\right)", r"\boxed{", r"\text{", r"\{", r"\}", r"\pm", r"\cup",
              r"\begin{pmatrix}", r"\end{pmatrix}", "&", r"\\", "x", "e", "i", "y", "0", "1", "9", "10", ".", " ", "$",
              "%", r"^\circ", r"\sin", r"\log_", "The answer is ", "Answer:", "####", "\n", "10^{10^{10}}", r"\dfrac12"]
    answers = [g for g, _, _ in ALL_EQUIVALENCE]
    for _ in range(n):
        kind = rng.random()
        if kind < 0.35:
            yield _random_expr(rng)
        elif kind < 0.55:                                  # a real answer with a few characters mutated
            chars = list(rng.choice(answers))
            for _ in range(rng.randint(1, 4)):
                k = rng.randrange(len(chars) + 1)
                op = rng.random()
                if op < 0.4 and chars:
                    del chars[min(k, len(chars) - 1)]
                elif op < 0.8:
                    chars.insert(k, rng.choice("{}()[]^_\\,-+=$0123456789x"))
                else:
                    chars[k:k] = chars[:k][-3:]
            yield "".join(chars)
        elif kind < 0.85:
            yield "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        else:
            yield "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 300)))


def test_fuzz_never_raises_and_stays_bounded():
    rng = random.Random(1234)
    golds = ["5", r"\frac{1}{2}", "(1,2)", r"\{1,2\}", "x^2+1", r"\text{east}", r"\sqrt{2}", "[0,1)"]
    worst, total, calls = 0.0, time.perf_counter(), 0
    for text in _fuzz_strings(3000, rng):
        other = _random_expr(rng)
        for call in (lambda: score(text, rng.choice(golds)), lambda: is_equivalent(text, rng.choice(golds)),
                     lambda: is_equivalent(rng.choice(golds), text), lambda: is_equivalent(text, other),
                     lambda: is_equivalent(text, text + " ")):
            t0 = time.perf_counter()
            result = call()
            worst = max(worst, time.perf_counter() - t0)
            calls += 1
            assert result is None or isinstance(result, (bool, Score))
        assert is_equivalent(text, text) in (True, None)                          # reflexive whenever gradable
    assert worst < BOUND_S, f"slowest fuzz call took {worst:.2f} s"
    assert time.perf_counter() - total < 20.0 and calls == 15000


def test_works_from_threads_and_is_deterministic():
    pairs = [(g, p) for g, p, _ in ALL_EQUIVALENCE]
    expected = [is_equivalent(g, p) for g, p in pairs]
    results = [None] * 4

    def run(k):
        results[k] = [is_equivalent(g, p) for g, p in pairs]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)
    assert [is_equivalent(g, p) for g, p in reversed(pairs)] == expected[::-1]    # no state leaks between calls


def test_typical_call_is_fast():
    pairs = [(g, p) for g, p, _ in ALL_EQUIVALENCE if p]
    times = []
    for g, p in pairs:
        t0 = time.perf_counter()
        is_equivalent(g, p)
        times.append(time.perf_counter() - t0)
    times.sort()
    assert times[len(times) // 2] < 0.005 and times[-1] < 0.5                    # loose: shared 2-core CI machines


# ---------------------------------------------------------------- real benchmark files -------------------------
def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plain_number(text):
    """The test's own reading of a plain numeric gold (integer, decimal, \\frac{a}{b}), or None."""
    t = re.sub(r"\\!|\$|\\\$|\s", "", str(text))
    t = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", t)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", t):
        t = t.replace(",", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _plus_one(value):
    v = value + 1
    return str(v.numerator) if v.denominator == 1 else rf"\frac{{{v.numerator}}}{{{v.denominator}}}"


def test_math500_reference_boxed_answers_verify(shared_data):
    rows = _rows(shared_data / "math500.jsonl")
    failures = [(k, r["answer"]) for k, r in enumerate(rows)
                if is_equivalent(r["answer"], extract_answer(r["solution"])) is not True]
    assert len(rows) == 500 and len(failures) <= 5, failures                     # >= 99 %
    assert all(is_equivalent(r["answer"], r["answer"]) is not None for r in rows)   # every gold understood


def test_math500_perturbed_numeric_answers_rejected(shared_data):
    numeric = [(r["answer"], v) for r in _rows(shared_data / "math500.jsonl")
               if (v := _plain_number(r["answer"])) is not None]
    assert len(numeric) > 250
    accepted = [g for g, v in numeric if is_equivalent(g, _plus_one(v)) is not False]
    assert not accepted


def test_gsm8k_answers_verify_and_perturbations_fail(shared_data):
    rows = _rows(shared_data / "gsm8k_test.jsonl")
    assert len(rows) == 1319
    bad = []
    for r in rows:
        raw = r["answer"].rsplit("####", 1)[1].strip()
        value = _plain_number(raw)
        pred = extract_answer(r["answer"])
        ok = (is_equivalent(raw, pred) is True and is_equivalent(str(value), raw) is True
              and is_equivalent(raw, _plus_one(value)) is False and score(r["answer"], raw).reward == 1.0)
        if not ok:
            bad.append(raw)
    assert not bad


def test_aime24_and_amc23_integer_answers(shared_data):
    aime, amc = _rows(shared_data / "aime24.jsonl"), _rows(shared_data / "amc23.jsonl")
    assert len(aime) == 30 and len(amc) == 40
    for gold in [r["answer"] for r in aime] + [r["answer"] for r in amc]:
        value = int(float(gold))
        assert score(rf"... so the answer is $\boxed{{{value}}}$.", gold) == Score(1.0, str(value), True, False)
        assert is_equivalent(gold, str(value + 1)) is False
        assert is_equivalent(gold, f"{value}.0") is True


# ---------------------------------------------------------------- optional: math-verify ------------------------
def test_disagreements_with_math_verify_are_reported():
    math_verify = pytest.importorskip("math_verify")
    compared, disagreements = 0, []
    for gold, pred, expected in ALL_EQUIVALENCE:
        if not pred:
            continue
        try:
            theirs = bool(math_verify.verify(math_verify.parse("$" + gold + "$"), math_verify.parse("$" + pred + "$")))
        except Exception as err:                     # their parser failing is itself a disagreement worth seeing
            theirs = f"error: {type(err).__name__}"
        compared += 1
        if theirs != expected:
            disagreements.append((gold, pred, f"ours={expected}", f"math-verify={theirs}"))
    print(f"\nmath-verify disagrees on {len(disagreements)} of {compared} cases:")
    for d in disagreements:
        print("  ", d)
    assert compared == sum(1 for _, p, _ in ALL_EQUIVALENCE if p)
