"""Math answer checking for RL with verifiable rewards: find a response's final answer, decide if it equals the gold.

This is the reward r(x, y) in {0, 1} that every trainer in this project optimises (GRPO / DAPO / Dr. GRPO and the
entropy-aware variants STEER, arXiv 2510.10150; OPEFO, arXiv 2605.11491; Archer, arXiv 2507.15778: all of them use a
rule-based "is the final answer correct" reward, each with its own grader; this one is ours). Design rules: gold
first, None when the gold cannot be understood, no eval() of model text, every call bounded in time without
signals.

Pipeline
  1. extract_answer: last \\boxed{...} / \\fbox{...} (nested braces, `\\boxed 5`) in the final region of the
     response, else the last "The (final) answer is ...", "Answer: ...", "#### ..." line. No fallback to "the last
     number in the text" (that number is often the problem's own). An answer followed by a long tail of further
     text is not taken (see extract_answer for why).
  2. _normalize: Unicode mathematics to LaTeX (½, −, ×, ÷, √, π, x², full-width digits, zero-width and thin spaces),
     then string clean-up (\\left/\\right, spacing, \\dfrac, thousands separators, degrees, %, $, \\text units,
     "x =" / "x \\in" prefixes, base subscripts 204_5).
  3. _parse_value: structure (words, choice letters, tuples / intervals with their brackets, sets, bare lists,
     \\pm pairs, unions, pmatrix / bmatrix, equations), then a small recursive-descent parser over a whitelist of
     tokens for each scalar, giving a tuple AST. Nothing is ever evaluated as Python.
  4. _same: structural comparison. Two scalars are equal only when that is shown exactly, never because floats
     agree:
     - identical ASTs;
     - exact rational arithmetic (Fraction), with the symbols, pi and e replaced by random integers at 4 points
       (a Schwartz-Zippel identity test for rational functions, in exact arithmetic). This decides numbers and
       their closed forms (1000 = 10^3, 2 = \\sqrt{4}, 120 = \\binom{10}{3}) and keeps rejecting decimals that
       approximate (1/3 vs 0.333);
     - otherwise mpmath at 50 digits (at 4 fixed points of the free symbols) may reject a clear difference, and
       only SymPy's exact rewriting of the difference to 0 (automatic evaluation, expand after rewriting
       trigonometric functions with exp, cancel, expand_log, radsimp, sqrtdenest; size-bounded) accepts.
     What cannot be decided within the bounds is "not equal": 2^{30000} vs 4^{15000} is refused rather than
     guessed. The verifier does not see the problem, so any expression of exactly the gold's value counts, a
     restated computation such as 12+30 for 42 included. Variables are taken positive (\\sqrt{x^2} = x).
Bounds: answers over 1000 characters, 400 tokens or 40 nesting levels are refused; exact numbers above 20,000 bits,
factorials above 1000, exp / trig arguments above 10^6 are refused before SymPy or mpmath see them; SymPy only
rewrites expressions of at most 60 operations whose expansion has at most 2000 terms; comparison loops check a 1 s
deadline (cooperatively, no signals, so it works in threads). Parsed answers are memoised (pure).

Usage:
    from verifier import extract_answer, is_equivalent, score
    score(response, gold)  # -> Score(reward=1.0, answer='...', correct=True, timed_out=False)
    python verifier.py "... so the answer is $\\boxed{\\frac12}$." "0.5"
      -> extracted answer: \\frac12      (as written, not repr; "(none)" when no answer is found, "(empty)" if empty)
         verdict: correct (reward 1.0)
"""
import argparse
import math
import random
import re
import time
import unicodedata
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import sympy
from mpmath import MPContext
from sympy.functions.elementary.hyperbolic import HyperbolicFunction
from sympy.functions.elementary.trigonometric import TrigonometricFunction
from sympy.polys.polyerrors import BasePolynomialError

REGION_CHARS = 4000          # the answer is looked for in this many final characters of a response
MAX_ANSWER_CHARS = 1000      # longer answers are refused (gold: None, prediction: wrong)
MAX_TOKENS = 400
MAX_DEPTH = 40               # nesting of brackets / groups in one answer
MAX_ITEMS = 64               # elements of a tuple, set, list or matrix
MAX_EXACT_BITS = 20000       # exact rationals (powers, products) beyond this many bits are refused
MAX_MAGNITUDE_BITS = 10**5   # numeric values beyond 2^(10^5) count as "not evaluable here"
TIME_BUDGET_S = 1.0          # cooperative deadline of one comparison
N_POINTS = 4                 # sample points for expressions with free symbols
EXACT_POINT_RANGE = (2**16, 2**20)   # integers substituted for the indeterminates of the exact check
REL_TOL = 10**-30            # mpmath values (50 digits) further apart than this are different; closer proves nothing
MAX_SYMPY_OPS = 60           # SymPy rewriting is tried only on expressions up to this size ...
MAX_EXPANDED_TERMS = 2000    # ... whose expansion stays under this many terms

_MP = MPContext()            # private context: fixed precision, never changed, so threads cannot disturb it
_MP.dps = 50


class Score(NamedTuple):
    """Result of score(): reward 1.0 / 0.0; correct None means "the gold itself is unparseable, skip the item"."""
    reward: float
    answer: str | None
    correct: bool | None
    timed_out: bool


class _Unparseable(ValueError):
    pass


class _Timeout(Exception):
    pass


class _NotEvaluable(ArithmeticError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# 1. Extraction
# ----------------------------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")
_MARKER_RE = re.compile(r"(?:final answer is|the answer is|answer\s*:|####)", re.IGNORECASE)


def _match_brace(s, i):
    """Index of the '}' closing the '{' at s[i], or -1 when unbalanced (linear scan, no recursion)."""
    depth = 0
    n = len(s)
    j = i
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _boxed_content(s, start):
    """Content of the \\boxed starting at s[start] (after the command name), or None."""
    i = start
    while i < len(s) and s[i] in " \t":
        i += 1
    if i < len(s) and s[i] == "[":                      # \framebox[width]{...}
        close = s.find("]", i)
        i = close + 1 if close > 0 else i
    if i < len(s) and s[i] == "{":
        j = _match_brace(s, i)
        return s[i + 1:j] if j > 0 else None
    m = re.match(r"[^\s$]+", s[i:i + MAX_ANSWER_CHARS])  # \boxed 5
    return m.group() if m else None


def extract_answer(response):
    """Final answer string of `response`, or None.

    The last \\boxed{...}, \\fbox{...} or `\\boxed 5` in the final REGION_CHARS characters (trailing white space
    not counted) wins; without one, the text after the last "final answer is", "the answer is", "Answer:" or "####"
    up to the end of that line (first $...$ span in it if any; a trailing period removed). Returns None when nothing
    is found or it is empty.

    An answer followed by more than REGION_CHARS characters of further text, such as a repetition loop that runs to
    the generation limit, is not taken, where the Qwen2.5-Math grader and Math-Verify take the last \\boxed anywhere.
    This is deliberate. As a training reward, a correct box followed by a degenerate tail would earn 1, and the
    group-relative advantage would then raise the probability of every token of the tail as well, so the policy
    would learn that rambling after the answer costs nothing. Text that long after a box is also often further
    reasoning that may revise it. The cost: used for evaluation, this scores such responses lower than those
    graders do.
    """
    if not isinstance(response, str):
        return None
    region = response.rstrip()[-REGION_CHARS:]
    for m in reversed(list(_BOX_RE.finditer(region))[-8:]):
        content = _boxed_content(region, m.end())
        if content is not None and content.strip():
            return content.strip()
    markers = list(_MARKER_RE.finditer(region))
    if not markers:
        return None
    line = region[markers[-1].end():].lstrip(" \t\n:*").split("\n", 1)[0]
    spans = re.findall(r"\$+([^$]+)\$+", line)
    text = spans[0] if spans else line
    text = re.split(r"\.\s", text, maxsplit=1)[0].strip().strip("*").strip()
    text = text.rstrip(".").strip()
    return text or None


# ----------------------------------------------------------------------------------------------------------------
# 2. Normalisation (strings)
# ----------------------------------------------------------------------------------------------------------------
_INVISIBLE_RE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")       # soft hyphen, zero-width marks, BOM
_DIGIT_GROUP_RE = re.compile("(?<=\\d)[\u00a0\u2009\u202f](?=\\d{3}(?!\\d))")   # 1 000 000 with thin spaces
_VULGAR_RE = re.compile("[¼½¾⅐⅑⅒⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞↉]")
_SUPERSCRIPT_RE = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ]+")
_SUBSCRIPT_RE = re.compile("[₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎]+")
_SCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎", "0123456789+-=()ni0123456789+-=()")
_RADICAL_RE = re.compile(r"([√∛∜])\s*(\d+(?:\.\d+)?)?")
_UNICODE = {"−": "-", "–": "-", "‐": "-", "‑": "-", "‒": "-", "×": r"\times ", "·": r"\cdot ", "⋅": r"\cdot ",
            "∙": r"\cdot ", "÷": r"\div ", "∗": "*", "∕": "/", "⁄": "/", "∣": "|", "π": r"\pi ", "∞": r"\infty ",
            "°": "", "±": r"\pm ", "∓": r"\mp ", "∪": r"\cup ", "∅": r"\emptyset ", "∈": r"\in "}
_UNICODE.update((c, "\\" + name + " ") for c, name in zip(
    "αβγδεζηθικλμνξρστυφχψωΓΔΘΛΞΣΦΨΩ", "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi rho "
    "sigma tau upsilon phi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()))
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|texttt|textsf|mbox|mathrm|mathbf|mathit|"
                          r"mathsf|mathtt|mathnormal|operatorname)\s*\{")
_POWER_TAIL_RE = re.compile(r"\s*\^\s*(?:\{[^{}]*\}|-?\d)")
_FUNC_WORDS = ("arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "sin", "cos", "tan", "cot", "sec", "csc",
               "log", "ln", "exp", "sqrt", "pi")
_UNIT_WORD_RE = re.compile(r"(?<=[\s\d}).])([A-Za-z]{2,})\.?(?:\^\{?-?\d+\}?)?\s*$")


def _strip_text_commands(s):
    """Unwrap \\text{...}-like commands; a trailing one after other content is a unit and is dropped.

    Returns (string, text_only) where text_only says the whole answer was text (a word answer).
    """
    text_only = False
    for _ in range(50):
        ms = list(_TEXT_CMD_RE.finditer(s))
        if not ms:
            break
        m = ms[-1]
        close = _match_brace(s, m.end() - 1)
        if close < 0:
            raise _Unparseable("unbalanced braces in \\text")
        inner = s[m.end():close]
        rest = s[close + 1:]
        tail = _POWER_TAIL_RE.match(rest)
        after = rest[tail.end():] if tail else rest
        before = s[:m.start()]
        if not before.strip() and not rest.strip():
            s, text_only = inner.strip(), True
        elif before.strip() and not after.strip(" .") and inner.strip() not in ("e", "i"):   # unit: 12 \text{ cm}^2
            s = before
        else:
            s = before + " " + inner + " " + rest
    return s, text_only


def _from_unicode(s):
    """Unicode mathematics as the LaTeX the parser reads: ½ -> \\frac{1}{2}, x² -> x^{2}, 204₅ -> 204_{5}, √12 ->
    \\sqrt{12}, − × ÷ · ± π ∞ and Greek letters -> their commands; zero-width characters removed; compatibility forms
    (full-width digits, non-breaking and thin spaces, mathematical italic letters) folded by NFKC."""
    s = _INVISIBLE_RE.sub("", s)
    s = _DIGIT_GROUP_RE.sub("", s)
    s = _VULGAR_RE.sub(lambda m: r"\frac{%s}{%s}" % tuple(unicodedata.normalize("NFKC", m.group()).split("⁄")), s)
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + m.group().translate(_SCRIPT_DIGITS) + "}", s)
    s = _SUBSCRIPT_RE.sub(lambda m: "_{" + m.group().translate(_SCRIPT_DIGITS) + "}", s)
    s = unicodedata.normalize("NFKC", s)
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group()], s)
    return _RADICAL_RE.sub(lambda m: r"\sqrt" + {"√": "", "∛": "[3]", "∜": "[4]"}[m.group(1)]
                           + ("{" + m.group(2) + "}" if m.group(2) else ""), s)


def _normalize(s):
    """Clean one answer string (see the module docstring); returns (string, text_only). Raises _Unparseable."""
    if len(s) > MAX_ANSWER_CHARS:
        raise _Unparseable(f"answer longer than {MAX_ANSWER_CHARS} characters")
    s = _from_unicode(s).strip()
    if not s:
        raise _Unparseable("empty answer")
    for _ in range(5):                                        # outer wrappers
        s = s.strip().strip("$").strip()
        m = _BOX_RE.match(s)
        if m and s.endswith("}"):
            inner = _boxed_content(s, m.end())
            if inner is not None and s.find("{", m.end()) >= 0 and _match_brace(s, s.find("{", m.end())) == len(s) - 1:
                s = inner
                continue
        for a, b in ((r"\[", r"\]"), (r"\(", r"\)")):
            if s.startswith(a) and s.endswith(b):
                s = s[2:-2]
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = re.sub(r"(\d)\s*(?:,\\!|\{,\})\s*(?=\d{3})", r"\1", s)       # 10,\!080   1{,}000
    s = re.sub(r"\\\\|\\[!,;:> ]|\\q?quad(?![a-zA-Z])|~", lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", "", s)
    s = re.sub(r"\\?%|\\\$|\$", "", s)
    s, text_only = _strip_text_commands(s)
    s = s.strip()
    if not text_only:
        for _ in range(6):                                    # 12 cm, 5 dollars, 4 square feet
            m = _UNIT_WORD_RE.search(s)
            if not m or m.group(1).lower() in _FUNC_WORDS + ("and", "or") or not s[:m.start()].strip():
                break
            s = s[:m.start()].rstrip()
        s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    s = re.sub(r"^[a-zA-Z]\s*\\in(?![a-zA-Z])\s*", "", s)                # x \in [-2, 7]
    s = re.sub(r"(\d)_\{?\d+\}?", r"\1", s)                            # 204_5 -> 204
    s = re.sub(r"\s+", " ", s).strip().rstrip(".;").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):         # 1,000,000
        s = s.replace(",", "")
    if not s:
        raise _Unparseable("answer empty after normalisation")
    return s, text_only


# ----------------------------------------------------------------------------------------------------------------
# 3. Parsing: structure, then scalars with a recursive-descent parser over whitelisted tokens
# ----------------------------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"""
    (?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+(?![a-zA-Z]))?|\.\d+(?:[eE][+-]?\d+(?![a-zA-Z]))?)
  | (?P<cmd>\\[a-zA-Z]+|\\[{}|])
  | (?P<word>[a-zA-Z]+)
  | (?P<op>[-+*/^_!=,()\[\]{}|])
  | (?P<ws>\s+)
""", re.VERBOSE)
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "exp",
          "ln", "log"}
_CONSTS = {"pi": "pi", "infty": "oo", "infin": "oo", "imath": "i"}
_OPS = {"cdot": "*", "times": "*", "ast": "*", "div": "/", "{": "{", "}": "}", "|": "|", "vert": "|",
        "lvert": "|", "rvert": "|", "mid": "|"}
_SPECIAL = {"frac", "sqrt", "binom", "lfloor", "rfloor", "lceil", "rceil"}


def _split_letters(run):
    """Split a letter run into function names and single-letter symbols; long unknown words are not maths."""
    out, i, plain = [], 0, 0
    while i < len(run):
        for w in _FUNC_WORDS:
            if run.startswith(w, i):
                out.append(("func", w) if w in _FUNCS else ("const", "pi") if w == "pi" else ("special", w))
                i += len(w)
                plain = 0
                break
        else:
            out.append(("sym", run[i]))
            i += 1
            plain += 1
            if plain >= 4:
                raise _Unparseable(f"word {run!r} is not an expression")
    return out


def _tokenize(s):
    tokens = []
    pos = 0
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise _Unparseable(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind, text = m.lastgroup, m.group()
        if kind == "num":
            tokens.append(("num", text))
        elif kind == "word":
            tokens.extend(_split_letters(text))
        elif kind == "op":
            tokens.append(("op", text))
        elif kind == "cmd":
            name = text[1:]
            if name in _OPS:
                tokens.append(("op", _OPS[name]))
            elif name in _CONSTS:
                tokens.append(("const", _CONSTS[name]))
            elif name in _GREEK:
                tokens.append(("sym", name))
            elif name in _FUNCS:
                tokens.append(("func", name))
            elif name in _SPECIAL:
                tokens.append(("special", name))
            else:
                raise _Unparseable(f"unsupported LaTeX command \\{name}")
        if len(tokens) > MAX_TOKENS:
            raise _Unparseable(f"more than {MAX_TOKENS} tokens")
    return tokens


def _num_node(text):
    exponent = re.search(r"[eE]([+-]?\d+)$", text)
    if exponent and abs(int(exponent.group(1))) > 400:
        raise _Unparseable(f"number {text[:20]!r} has an exponent beyond 10^400")
    try:
        return ("num", Fraction(text), any(c in text for c in ".eE"))
    except ValueError:
        raise _Unparseable(f"bad number {text!r}") from None


class _Parser:
    """Recursive descent over the token list; builds tuple ASTs:
    ('num', Fraction, is_decimal) ('sym', name) ('const', 'pi'|'e'|'i'|'oo') ('add', (..)) ('mul', (..)) ('neg', x)
    ('div', a, b) ('pow', a, b) ('fn', name, x) ('log', base, x) ('root', x, n|None) ('fact', x) ('binom', n, k)
    ('abs', x) ('floor', x) ('ceil', x)."""

    def __init__(self, tokens):
        self.toks = tokens
        self.i = 0
        self.depth = 0
        self.in_abs = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, value):
        tok = self.take()
        if tok != ("op", value):
            raise _Unparseable(f"expected {value!r}, found {tok[1]!r}")

    def parse(self):
        node = self.expr()
        if self.i != len(self.toks):
            raise _Unparseable(f"unexpected {self.peek()[1]!r}")
        return node

    def descend(self, rule):
        """Run a sub-rule one nesting level deeper; refuses answers nested deeper than MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Unparseable(f"nested deeper than {MAX_DEPTH}")
        node = rule()
        self.depth -= 1
        return node

    def expr(self):
        return self.descend(self.sum)

    def sum(self):
        negate = False
        while self.peek() in (("op", "-"), ("op", "+")):
            negate ^= self.take()[1] == "-"
        terms = [("neg", self.term()) if negate else self.term()]
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            t = self.signed(self.term)
            terms.append(("neg", t) if op == "-" else t)
        return terms[0] if len(terms) == 1 else ("add", tuple(terms))

    def signed(self, rule):
        if self.peek() == ("op", "-"):
            self.take()
            return ("neg", self.descend(lambda: self.signed(rule)))
        if self.peek() == ("op", "+"):
            self.take()
        return rule()

    def starts_primary(self, tok):
        kind, v = tok
        if kind in ("num", "sym", "const", "func", "special"):
            return v not in ("rfloor", "rceil")
        return kind == "op" and (v in ("(", "{") or (v == "|" and not self.in_abs))

    def term(self):
        factors = [self.factor()]
        while True:
            tok = self.peek()
            if tok in (("op", "*"), ("op", "/")):
                self.take()
                rhs = self.signed(self.factor)
                if tok[1] == "*":
                    factors.append(rhs)
                else:
                    factors = [("div", _product(factors), rhs)]
            elif self.starts_primary(tok):
                last = factors[-1]
                if last[0] == "num" and tok[0] == "num":
                    raise _Unparseable("two numbers side by side")
                rhs = self.factor()
                if (len(factors) == 1 and last[0] == "num" and not last[2] and last[1].denominator == 1
                        and tok == ("special", "frac") and rhs[0] == "div"
                        and all(a[0] == "num" and not a[2] for a in rhs[1:])):
                    factors = [("num", last[1] + rhs[1][1] / rhs[2][1], False)]    # mixed number 1\frac{4}{5}
                else:
                    factors.append(rhs)
            else:
                return _product(factors)

    def factor(self):
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            return ("pow", base, self.descend(lambda: self.signed(self.factor)))
        return base

    def postfix(self):
        node = self.primary()
        while self.peek() == ("op", "!"):
            self.take()
            node = ("fact", node)
        return node

    def group(self, close):
        node = self.expr()
        self.expect(close)
        return node

    def arg(self):
        """Argument of \\frac, \\sqrt, \\binom, _ and ^ : a {group} or one token (\\frac12 takes '1' then '2')."""
        kind, v = self.peek()
        if (kind, v) == ("op", "{"):
            self.take()
            return self.group("}")
        if kind == "num" and len(v) > 1:
            self.toks = self.toks[:self.i] + [("num", v[0]), ("num", v[1:])] + self.toks[self.i + 1:]
        return self.primary()

    def primary(self):
        kind, v = self.take()
        if kind == "num":
            return _num_node(v)
        if kind == "sym":
            if self.peek() == ("op", "_"):                                  # x_1, a_{n}
                self.take()
                sub = self.arg()
                return ("sym", v + "_" + repr(sub))
            return ("sym", v) if v not in ("e", "i") else ("const", v)
        if kind == "const":
            return ("const", v)
        if kind == "op":
            if v in ("(", "{", "["):
                return self.group({"(": ")", "{": "}", "[": "]"}[v])
            if v == "|" and not self.in_abs:
                self.in_abs += 1
                node = self.group("|")
                self.in_abs -= 1
                return ("abs", node)
        if kind == "special":
            if v == "frac":
                return ("div", self.arg(), self.arg())
            if v == "binom":
                return ("binom", self.arg(), self.arg())
            if v == "sqrt":
                index = None
                if self.peek() == ("op", "["):
                    self.take()
                    index = self.group("]")
                return ("root", self.arg(), index)
            if v in ("lfloor", "lceil"):
                node = self.expr()
                if self.take() != ("special", "r" + v[1:]):
                    raise _Unparseable(f"unclosed \\{v}")
                return ("floor" if v == "lfloor" else "ceil", node)
        if kind == "func":
            return self.function(v)
        raise _Unparseable(f"unexpected {v!r}" if v else "unexpected end of answer")

    def function(self, name):
        power = base = None
        if name == "log" and self.peek() == ("op", "_"):
            self.take()
            base = self.arg()
        if self.peek() == ("op", "^"):                                      # \sin^2 x
            self.take()
            power = self.signed(self.arg)
        if self.peek() in (("op", "("), ("op", "{")):
            self.take()
            arg = self.group(")" if self.toks[self.i - 1][1] == "(" else "}")
        else:
            arg = self.factor()                                             # \sin 2x, \cot x
            while self.starts_primary(self.peek()) and self.peek()[0] != "func":
                arg = ("mul", (arg, self.factor()))
        node = ("log", base, arg) if base is not None else ("fn", name, arg)
        return ("pow", node, power) if power is not None else node


def _product(factors):
    return factors[0] if len(factors) == 1 else ("mul", tuple(factors))


def _ast_depth(node):
    """Nesting depth of an AST or value, computed without recursion."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in n if isinstance(c, tuple))
    return deepest


def _parse_expr(s):
    node = _Parser(_tokenize(s)).parse()
    if _ast_depth(node) > 3 * MAX_DEPTH:
        raise _Unparseable("expression nested too deeply")
    return node


def _split_top(s, sep):
    """Split s at top-level occurrences of sep (bracket depth 0, any of ([{ matching any of )]}})."""
    parts, depth, start, i = [], 0, 0, 0
    n, k = len(s), len(sep)
    while i < n:
        c = s[i]
        if c == "\\" and s.startswith(sep, i) and depth == 0 and sep.startswith("\\"):
            parts.append(s[start:i])
            i += k
            start = i
            continue
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            c = s[i + 1]
            i += 1
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                raise _Unparseable("unbalanced brackets")
        elif depth == 0 and not sep.startswith("\\") and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + k
        i += 1
    if depth != 0:
        raise _Unparseable("unbalanced brackets")
    parts.append(s[start:])
    if len(parts) > MAX_ITEMS:
        raise _Unparseable(f"more than {MAX_ITEMS} items")
    return parts


def _closes_at_end(s):
    """True when the bracket opening s[0] closes at the last character."""
    depth = 0
    for j, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return j == len(s) - 1
    return False


_VAR_PREFIX_RE = re.compile(r"^([a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*=\s*(?=\S)")


def _expand_pm(s):
    """'1 \\pm \\sqrt{19}' -> ['1 + \\sqrt{19}', '1 - \\sqrt{19}'] (at most 3 signs, 8 values)."""
    out = [s]
    for _ in range(3):
        nxt = []
        for t in out:
            m = re.search(r"\\(pm|mp)(?![a-zA-Z])", t)
            if not m:
                nxt.append(t)
                continue
            first, second = ("+", "-") if m.group(1) == "pm" else ("-", "+")
            nxt += [t[:m.start()] + first + t[m.end():], t[:m.start()] + second + t[m.end():]]
        out = nxt
    return out


def _parse_value(s, depth=0):
    """Structured value of a normalised answer string:
    ('word', text) ('choice', letter) ('scalar', ast) ('eq', lhs, rhs) ('var', name, value)
    ('tuple', open, close, items) ('set', items) ('list', items) ('union', items) ('matrix', rows)."""
    if depth > 4:
        raise _Unparseable("answer structure nested too deeply")
    s = s.strip()
    if not s:
        raise _Unparseable("empty element")
    m = re.fullmatch(r"\(?([A-E])\)?", s)
    if m:
        return ("choice", m.group(1))
    m = _VAR_PREFIX_RE.match(s)
    if m and "=" not in s[m.end():] and not _split_top(s, ",")[1:]:
        return ("var", m.group(1).replace("{", "").replace("}", ""), _parse_value(s[m.end():], depth + 1))
    parts = _split_top(s, r"\cup")
    if len(parts) > 1:
        return ("union", tuple(_parse_value(p, depth + 1) for p in parts))
    m = re.fullmatch(r"\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}", s, re.DOTALL)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r.strip()]
        cells = tuple(tuple(_parse_value(c, depth + 1) for c in r.split("&")) for r in rows)
        if not cells or len({len(r) for r in cells}) != 1 or len(cells) * len(cells[0]) > MAX_ITEMS:
            raise _Unparseable("ragged or oversized matrix")
        return ("matrix", cells)
    if re.fullmatch(r"\\(?:emptyset|varnothing)|\\\{\s*\\\}", s):
        return ("set", ())
    if s.startswith("\\{") and s.endswith("\\}") and not s.endswith("\\\\}"):
        return ("set", _items(s[2:-2], depth))          # _split_top raises when the braces are not one pair
    if s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
        inner = _split_top(s[1:-1], ",")
        if len(inner) > 1:
            return ("tuple", s[0], s[-1], tuple(_parse_value(p, depth + 1) for p in inner))
    if len(_split_top(s, ",")) > 1 or re.search(r"\\(?:pm|mp)(?![a-zA-Z])", s):
        return ("list", _items(s, depth))
    eq = _split_top(s, "=")
    if len(eq) == 2:
        return ("eq", _parse_expr(eq[0]), _parse_expr(eq[1]))
    if len(eq) > 2:
        raise _Unparseable("chained equations")
    return ("scalar", _parse_expr(s))


def _items(s, depth):
    out = []
    for part in _split_top(s, ","):
        for p in _expand_pm(part):
            out.append(_parse_value(p, depth + 1))
    if len(out) > MAX_ITEMS:
        raise _Unparseable(f"more than {MAX_ITEMS} items")
    return tuple(out)


@lru_cache(maxsize=4096)
def _understand(answer):
    """(normalised compact string, parsed value or None when unparseable, word text or None). Pure, memoised."""
    s, text_only = _normalize(answer)
    compact = s.replace(" ", "")
    word = re.sub(r"[^a-z0-9]+", " ", s.lower()).strip() if re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", s) else None
    try:
        value = _parse_value(s)
    except (_Unparseable, RecursionError, ZeroDivisionError):
        value = None
    if text_only and word is not None and (value is None or value[0] != "choice"):
        value = ("word", word)
    elif value is None and word is not None:
        value = ("word", word)
    return compact, value, word


# ----------------------------------------------------------------------------------------------------------------
# 4. Evaluation and comparison
# ----------------------------------------------------------------------------------------------------------------
def _walk(node):
    """All AST / value nodes (tuples starting with a kind string) inside node, without recursion."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n and isinstance(n[0], str):
            yield n
        stack.extend(c for c in n if isinstance(c, tuple))


def _guard_magnitude(x):
    if _MP.isfinite(x) and x != 0 and abs(_MP.log(abs(x), 2)) > MAX_MAGNITUDE_BITS:
        raise _NotEvaluable("value out of range")
    return x


def _mp_eval(node, env):
    """Value of an AST as an mpmath complex at 50 digits; raises _NotEvaluable / ZeroDivisionError off-domain."""
    kind = node[0]
    mp = _MP
    if kind == "num":
        return mp.mpc(mp.mpf(node[1].numerator) / node[1].denominator)
    if kind == "sym":
        return env[node[1]]
    if kind == "const":
        return {"pi": mp.mpc(mp.pi), "e": mp.mpc(mp.e), "i": mp.mpc(0, 1), "oo": mp.mpc(mp.inf)}[node[1]]
    if kind == "neg":
        return -_mp_eval(node[1], env)
    if kind == "add":
        total = mp.mpc(0)
        for t in node[1]:
            total += _mp_eval(t, env)
        return total
    if kind == "mul":
        prod = mp.mpc(1)
        for f in node[1]:
            prod *= _mp_eval(f, env)
        return _guard_magnitude(prod)
    if kind == "div":
        den = _mp_eval(node[2], env)
        if den == 0:
            raise ZeroDivisionError("division by zero")
        return _mp_eval(node[1], env) / den
    if kind == "pow":
        b, e = _mp_eval(node[1], env), _mp_eval(node[2], env)
        if not (mp.isfinite(b) and mp.isfinite(e)):
            raise _NotEvaluable("infinite power")
        if b == 0:
            if e.real <= 0:
                raise ZeroDivisionError("0 to a non-positive power")
            return mp.mpc(0)
        if abs(e) * (abs(mp.log(abs(b), 2)) + 4) > MAX_MAGNITUDE_BITS:
            raise _NotEvaluable("power out of range")
        if e.imag == 0 and e.real == int(e.real):
            return b ** int(e.real)
        return b ** e
    if kind == "root":
        x = _mp_eval(node[1], env)
        n = _mp_eval(node[2], env) if node[2] is not None else mp.mpc(2)
        if n == 0 or abs(n) > 10**6:
            raise _NotEvaluable("bad root index")
        if x.imag == 0 and x.real < 0 and n.imag == 0 and n.real == int(n.real) and int(n.real) % 2:
            return -(mp.mpc(-x.real) ** (1 / n))          # real odd root of a negative number
        return x ** (1 / n)
    if kind == "fn":
        x = _mp_eval(node[2], env)
        name = node[1]
        if name == "exp":
            if abs(x.real) > MAX_MAGNITUDE_BITS / 2:
                raise _NotEvaluable("exp out of range")
            return mp.exp(x)
        if name in ("ln", "log"):
            return mp.log(x)
        if abs(x) > 10**6:
            raise _NotEvaluable("function argument out of range")
        f = {"sin": mp.sin, "cos": mp.cos, "tan": mp.tan, "cot": mp.cot, "sec": mp.sec, "csc": mp.csc,
             "arcsin": mp.asin, "arccos": mp.acos, "arctan": mp.atan, "sinh": mp.sinh, "cosh": mp.cosh,
             "tanh": mp.tanh}[name]
        return f(x)
    if kind == "log":
        base = _mp_eval(node[1], env)
        return mp.log(_mp_eval(node[2], env)) / mp.log(base)
    if kind in ("fact", "binom"):
        args = [_mp_eval(a, env) for a in node[1:]]
        if any(abs(a) > 1000 for a in args):
            raise _NotEvaluable("factorial argument above 1000")
        if kind == "fact":
            return mp.mpc(mp.factorial(args[0]))
        return mp.mpc(mp.binomial(args[0], args[1]))
    if kind == "abs":
        return mp.mpc(abs(_mp_eval(node[1], env)))
    if kind in ("floor", "ceil"):
        x = _mp_eval(node[1], env)
        return mp.mpc(mp.floor(x.real) if kind == "floor" else mp.ceil(x.real))
    raise _NotEvaluable(f"unknown node {kind}")


def _to_sympy(node):
    """SymPy expression of an AST with the same size guards as _mp_eval (used for exact questions only)."""
    kind = node[0]
    if kind == "num":
        return sympy.Rational(node[1].numerator, node[1].denominator)
    if kind == "sym":
        return sympy.Symbol(node[1], positive=True)
    if kind == "const":
        return {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "oo": sympy.oo}[node[1]]
    if kind == "neg":
        return -_to_sympy(node[1])
    if kind == "add":
        return sympy.Add(*[_to_sympy(t) for t in node[1]])
    if kind == "mul":
        return sympy.Mul(*[_to_sympy(f) for f in node[1]])
    if kind == "div":
        return _to_sympy(node[1]) / _to_sympy(node[2])
    if kind in ("pow", "root"):
        b = _to_sympy(node[1])
        e = _to_sympy(node[2]) if kind == "pow" else 1 / (_to_sympy(node[2]) if node[2] is not None else sympy.Integer(2))
        if e.is_Number and b.is_Number:
            bits = _power_bits(b.p, b.q, e) if b.is_Rational else 64 * abs(float(e))
            if bits > MAX_EXACT_BITS or (isinstance(e, sympy.Rational) and e.q > 1000):
                raise _NotEvaluable("power too large for exact arithmetic")
        elif e.is_Number and abs(e) > 1000:
            raise _NotEvaluable("symbolic power too large")
        elif sympy.count_ops(e) > MAX_SYMPY_OPS:
            raise _NotEvaluable("oversized exponent")
        elif not (e.is_Number or e.free_symbols or b.free_symbols):      # a constant power: \sqrt2^{\sqrt2}
            x, y = _mp_eval(node[1], {}), _mp_eval(node[2], {})
            y = 1 / y if kind == "root" else y
            if x == 0 or abs(y) * (abs(_MP.log(abs(x), 2)) + 1) > MAX_EXACT_BITS:
                raise _NotEvaluable("power too large for exact arithmetic")
        if kind == "root" and (1 / e).is_Integer and (1 / e) % 2 == 1:
            return sympy.real_root(b, 1 / e)                 # \sqrt[3]{-8} = -2, as in _mp_eval and _exact
        return b ** e
    if kind == "fn":
        name = {"arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log"}.get(node[1], node[1])
        return getattr(sympy, name)(_to_sympy(node[2]))
    if kind == "log":
        return sympy.log(_to_sympy(node[2]), _to_sympy(node[1]))
    if kind in ("fact", "binom", "floor", "ceil", "abs"):
        args = [_to_sympy(a) for a in node[1:]]
        if kind in ("fact", "binom") and not all(a.is_Integer and 0 <= a <= 1000 for a in args):
            raise _NotEvaluable("factorial argument outside 0..1000")
        f = {"fact": sympy.factorial, "binom": sympy.binomial, "floor": sympy.floor, "ceil": sympy.ceiling,
             "abs": sympy.Abs}[kind]
        return f(*args)
    raise _NotEvaluable(f"unknown node {kind}")


_SYMPY_ERRORS = (_NotEvaluable, TypeError, ValueError, ZeroDivisionError, OverflowError, RecursionError,
                 NotImplementedError, BasePolynomialError)


def _expansion_terms(e):
    """Upper bound on the number of terms sympy.expand(e) produces (sums multiply out in products and powers)."""
    if e.is_Add:
        return min(sum(_expansion_terms(t) for t in e.args), MAX_EXPANDED_TERMS + 1)
    if e.is_Mul:
        total = 1
        for f in e.args:
            total = min(total * _expansion_terms(f), MAX_EXPANDED_TERMS + 1)
        return total
    if e.is_Pow and e.exp.is_Integer:
        t, n = _expansion_terms(e.base), abs(int(e.exp))
        if t == 1 or n == 1:
            return t
        return MAX_EXPANDED_TERMS + 1 if n * math.log2(t) > 64 else min(math.comb(n + t - 1, t - 1), MAX_EXPANDED_TERMS + 1)
    return max([1] + [_expansion_terms(a) for a in e.args if isinstance(a, sympy.Expr)])


def _sympy_zero(node, ctx):
    """True when exact SymPy rewriting turns the expression into 0: its automatic evaluation, then, for a bounded
    expression, expand (after rewriting trigonometric and hyperbolic functions with exp), cancel, expand_log,
    radsimp and sqrtdenest. No numerical step: False means "not shown to be zero"."""
    try:
        e = _to_sympy(node)
        if e == 0:
            return True
        if sympy.count_ops(e) > MAX_SYMPY_OPS:
            return False
        forms = [e]
        if e.has(TrigonometricFunction, HyperbolicFunction, sympy.exp) or any(
                not p.exp.is_Number for p in e.atoms(sympy.Pow)):
            forms.append(e.rewrite(sympy.exp))
        if e.has(sympy.exp):
            forms.append(e.rewrite(sympy.cos))
        for x in forms:
            for step in (None, sympy.cancel, sympy.expand_log, sympy.radsimp, sympy.sqrtdenest):
                ctx.tick()
                y = step(x) if step else x
                if _expansion_terms(y) > MAX_EXPANDED_TERMS:
                    break
                x = sympy.expand(y)
                if x == 0:
                    return True
        return False
    except _SYMPY_ERRORS:
        return False


def _sympy_constant_ratio(dg, dp):
    """True when SymPy shows dp / dg is a non-zero constant (two equations that are multiples of each other)."""
    try:
        a, b = _to_sympy(dg), _to_sympy(dp)
        if sympy.count_ops(a) + sympy.count_ops(b) > MAX_SYMPY_OPS or a == 0:
            return False
        q = sympy.cancel(sympy.expand(b / a))
        return not q.free_symbols and q.is_zero is False and q.is_finite is True
    except _SYMPY_ERRORS:
        return False


def _close(a, b):
    if not (_MP.isfinite(a) and _MP.isfinite(b)):
        return a == b
    d = abs(a - b)
    return d <= REL_TOL * max(abs(a), abs(b)) or d <= REL_TOL ** 1.3


def _iroot(n, k):
    """The integer k-th root of the integer n >= 0 when n is a perfect k-th power, else None (Newton from above)."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // k)
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x if x ** k == n else None
        x = y


def _power_bits(num, den, e):
    """Bits of (num / den) ** e, for integers num, den > 0 and a number e."""
    return abs(float(e)) * max(math.log2(abs(num)) if num else 0.0, math.log2(den))


def _bounded(v):
    if max(v.numerator.bit_length(), v.denominator.bit_length()) > MAX_EXACT_BITS:
        raise _NotEvaluable(f"exact value beyond {MAX_EXACT_BITS} bits")
    return v


def _exact_pow(b, e, depends):
    """b ** e as an exact rational: integer e, or e = p/q with b >= 0 a perfect q-th power."""
    if e.denominator == 1:
        if b == 0 and e < 0:
            raise ZeroDivisionError("0 to a negative power")
        if _power_bits(b.numerator, b.denominator, e) > MAX_EXACT_BITS:
            raise _NotEvaluable("power too large for exact arithmetic")
        return b ** int(e)
    q = e.denominator
    if depends or q > 1000 or b < 0:
        raise _NotEvaluable("not a rational power")
    num, den = _iroot(b.numerator, q), _iroot(b.denominator, q)
    if num is None or den is None:
        raise _NotEvaluable("irrational root")
    return _exact_pow(Fraction(num, den), Fraction(e.numerator), False)


def _exact(node, env):
    """(value, depends): the exact rational value of an AST, when it has one that is cheap to compute.

    env gives a rational for every symbol and for pi and e, which then act as indeterminates (depends is True when
    the value used one). Roots, fractional powers, exponents, factorials, |.|, floor and ceil only take arguments
    that do not depend, so a value that depends is a rational function of the indeterminates with rational
    coefficients. Raises _NotEvaluable for anything else (functions, i, infinity, irrational roots, values beyond
    MAX_EXACT_BITS) and ZeroDivisionError for a division by zero.
    """
    kind = node[0]
    if kind == "num":
        return node[1], False
    if kind in ("sym", "const"):
        if node in env:
            return env[node], True
        raise _NotEvaluable(f"no exact value for {node[1]}")
    if kind == "neg":
        v, d = _exact(node[1], env)
        return -v, d
    if kind in ("add", "mul"):
        total, depends = Fraction(kind == "mul"), False
        for t in node[1]:
            v, d = _exact(t, env)
            total = _bounded(total + v if kind == "add" else total * v)
            depends |= d
        return total, depends
    if kind == "div":
        (a, da), (b, db) = _exact(node[1], env), _exact(node[2], env)
        if b == 0:
            raise ZeroDivisionError("division by zero")
        return _bounded(a / b), da or db
    if kind == "pow":
        b, d = _exact(node[1], env)
        return _exact_pow(b, _exact_constant(node[2], env), d), d
    if kind == "root":
        x, d = _exact(node[1], env)
        n = Fraction(2) if node[2] is None else _exact_constant(node[2], env)
        if n.denominator != 1 or not 0 < n <= 1000:
            raise _NotEvaluable("root index not an integer in 1..1000")
        if x < 0 and n % 2 == 1:
            return -_exact_pow(-x, 1 / n, d), d            # the real odd root, as in _mp_eval: \sqrt[3]{-8} = -2
        return _exact_pow(x, 1 / n, d), d
    if kind in ("fact", "binom"):
        args = [_exact_constant(a, env) for a in node[1:]]
        if not all(a.denominator == 1 and 0 <= a <= 1000 for a in args):
            raise _NotEvaluable("factorial argument outside 0..1000")
        return Fraction(math.factorial(int(args[0])) if kind == "fact" else math.comb(*map(int, args))), False
    if kind in ("abs", "floor", "ceil"):
        x = _exact_constant(node[1], env)
        return Fraction({"abs": abs, "floor": math.floor, "ceil": math.ceil}[kind](x)), False
    raise _NotEvaluable(f"no exact value for {kind}")


def _exact_constant(node, env):
    v, depends = _exact(node, env)
    if depends:
        raise _NotEvaluable("argument depends on a variable")
    return v


def _indeterminates(value):
    """The symbol nodes of a parsed value, and its pi and e (indeterminates of the exact evaluation)."""
    return {n for n in _walk(value) if n[0] == "sym" or n[:2] in (("const", "pi"), ("const", "e"))}


class _Context:
    """Per-call state: the sample points (mpmath points of the free symbols; exact points of the indeterminates),
    memoised values, the deadline."""

    def __init__(self, indeterminates, deadline):
        self.deadline = deadline
        nodes = sorted(indeterminates)
        names = sorted({n[1] for n in nodes if n[0] == "sym"})
        rng = random.Random(20240607)
        self.points = [{s: _MP.mpc(_MP.mpf(rng.uniform(0.3, 2.3))) for s in names}
                       for _ in range(N_POINTS if names else 1)]
        self.exact_points = [{n: Fraction(rng.randrange(*EXACT_POINT_RANGE)) for n in nodes}
                             for _ in range(N_POINTS if nodes else 1)]
        self.memo = {}

    def tick(self):
        if time.perf_counter() > self.deadline:
            raise _Timeout()

    def values(self, node):
        """mpmath values of node at the sample points (None where it cannot be evaluated)."""
        key = ("mp", id(node))
        if key not in self.memo:
            self.tick()
            vals = []
            for env in self.points:
                try:
                    vals.append(_mp_eval(node, env))
                except (_NotEvaluable, ZeroDivisionError, ValueError, TypeError, OverflowError, RecursionError):
                    vals.append(None)
            self.memo[key] = (node, vals)
        return self.memo[key][1]

    def exact(self, node):
        """(exact values at the exact points, None where node divides by zero; whether node depends on an
        indeterminate), or None when node has no exact rational evaluation."""
        key = ("exact", id(node))
        if key not in self.memo:
            self.tick()
            vals, depends = [], False
            try:
                for env in self.exact_points:
                    try:
                        v, d = _exact(node, env)
                    except ZeroDivisionError:
                        vals.append(None)
                        continue
                    vals.append(v)
                    depends |= d
                result = vals, depends
            except (_NotEvaluable, ValueError, OverflowError, RecursionError):
                result = None
            self.memo[key] = (node, result)
        return self.memo[key][1]


def _exact_verdict(g, p, ctx):
    """True / False when exact rational evaluation decides g == p, None when it does not apply.

    Without indeterminates one evaluation decides. With them, the values at random integer points decide: two
    different rational functions agree at a random point of a range of size R with probability at most degree / R
    (Schwartz-Zippel), and pi and e, being transcendental, cannot make two different rational functions of them
    equal.
    """
    eg, ep = ctx.exact(g), ctx.exact(p)
    if eg is None or ep is None:
        return None
    pairs = [(a, b) for a, b in zip(eg[0], ep[0]) if a is not None and b is not None]
    if any(a != b for a, b in pairs):
        return False
    needed = N_POINTS - 1 if eg[1] or ep[1] else 1
    return True if len(pairs) >= needed else None


def _scalar_same(g, p, ctx):
    """Two scalar ASTs are equal only when shown exactly: identical ASTs, exact rational evaluation, or SymPy
    rewriting to 0. mpmath values at 50 digits only reject (a clear difference); a check that cannot decide
    (too large, too slow) answers False."""
    if g == p:
        return True
    verdict = _exact_verdict(g, p, ctx)
    if verdict is not None:
        return verdict
    for a, b in zip(ctx.values(g), ctx.values(p)):
        if (a is None) != (b is None) or a is not None and not _close(a, b):
            return False
    return _sympy_zero(("add", (g, ("neg", p))), ctx)


def _equation_same(g, p, ctx):
    """lhs - rhs of the prediction is a non-zero constant multiple of the gold's (2x+y=3 vs 4x+2y=6), shown exactly:
    the factor is read at an exact point and the scaled difference checked by _scalar_same, else SymPy's cancel."""
    dg = ("add", (g[1], ("neg", g[2])))
    dp = ("add", (p[1], ("neg", p[2])))
    eg, ep = ctx.exact(dg), ctx.exact(dp)
    if eg is None or ep is None:
        return _sympy_constant_ratio(dg, dp)
    for a, b in zip(eg[0], ep[0]):
        if a is not None and b is not None and a != 0:
            return b != 0 and _scalar_same(("mul", (("num", b / a, False), dg)), dp, ctx)
    return False


def _unordered_same(gs, ps, ctx):
    if len(gs) != len(ps):
        return False
    left = list(ps)
    for g in gs:
        for k, p in enumerate(left):
            if _same(g, p, ctx):
                del left[k]
                break
        else:
            return False
    return True


def _same(g, p, ctx):
    """Gold value g against predicted value p (both from _parse_value)."""
    ctx.tick()
    gk, pk = g[0], p[0]
    if gk == "var":
        if pk == "var":
            return p[1] == g[1] and _same(g[2], p[2], ctx)
        return _same(g[2], p, ctx)
    if pk == "var":
        return _same(g, p[2], ctx)
    if gk == "word":
        return False                                 # words compare as strings only (done before parsing)
    if gk == "choice":
        return pk == "choice" and p[1] == g[1]
    if gk == "scalar":
        return pk == "scalar" and _scalar_same(g[1], p[1], ctx)
    if gk == "eq":
        return pk == "eq" and _equation_same(g, p, ctx)
    if gk == "tuple":
        if pk == "tuple" and (p[1], p[2]) == (g[1], g[2]) or pk == "list" and (g[1], g[2]) == ("(", ")"):
            items = p[3] if pk == "tuple" else p[1]
            return len(items) == len(g[3]) and all(_same(a, b, ctx) for a, b in zip(g[3], items))
        if pk == "matrix":
            return _same(("matrix", tuple((x,) for x in g[3])), p, ctx)
        return False
    if gk == "list":
        if pk in ("list", "set", "tuple"):
            return _unordered_same(g[1], p[3] if pk == "tuple" else p[1], ctx)
        return False
    if gk == "set":
        return pk in ("set", "list") and _unordered_same(g[1], p[1], ctx)
    if gk == "union":
        return pk == "union" and _unordered_same(g[1], p[1], ctx)
    if gk == "matrix":
        rows = g[1]
        if pk == "tuple" and p[1:3] == ("(", ")") and (len(rows) == 1 or len(rows[0]) == 1):
            flat = [c for r in rows for c in r]
            return len(flat) == len(p[3]) and all(_same(a, b, ctx) for a, b in zip(flat, p[3]))
        if pk != "matrix" or len(p[1]) != len(rows) or len(p[1][0]) != len(rows[0]):
            return False
        return all(_same(a, b, ctx) for ra, rb in zip(rows, p[1]) for a, b in zip(ra, rb))
    return False


def _gold_value(gold):
    """Parsed gold value, or None when the gold cannot be understood."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float, Fraction)):
        return None
    if isinstance(gold, float):
        gold = str(int(gold)) if gold.is_integer() else repr(gold)
    try:
        return _understand(str(gold))
    except (_Unparseable, RecursionError):
        return None


def _check(gold, pred):
    """(verdict True/False/None, timed_out). Never raises: a reward function that crashes stops training, so an
    unexpected error while reading the gold gives None and one while comparing gives False (the fuzz test keeps
    these paths unused by the inputs it tries)."""
    try:
        return _check_unguarded(gold, pred)
    except Exception:                                 # noqa: BLE001  (last-resort guard, see docstring)
        return (None if _gold_value_safe(gold) is None else False), False


def _gold_value_safe(gold):
    try:
        g = _gold_value(gold)
        return None if g is None or g[1] is None else g
    except Exception:                                 # noqa: BLE001
        return None


def _check_unguarded(gold, pred):
    g = _gold_value(gold)
    if g is None or g[1] is None:
        return None, False
    if not isinstance(pred, str) or not pred.strip():
        return False, False
    try:
        p = _understand(pred)
    except (_Unparseable, RecursionError):
        return False, False
    if p[0] == g[0]:
        return True, False
    if g[1][0] == "word":
        return p[2] is not None and p[2] == g[2], False
    if p[1] is None:
        return False, False
    ctx = _Context(_indeterminates(g[1]) | _indeterminates(p[1]), time.perf_counter() + TIME_BUDGET_S)
    try:
        return bool(_same(g[1], p[1], ctx)), False
    except _Timeout:
        return False, True
    except (RecursionError, ArithmeticError, ValueError, TypeError):
        return False, False


def is_equivalent(gold, pred):
    """True / False whether the predicted answer `pred` equals `gold`; None when the gold cannot be understood.

    Gold first (not symmetric: the gold decides the structure, e.g. a parenthesised tuple gold is ordered while a
    bare list gold is not, and only an unreadable gold gives None).
    Both are answer strings (a \\boxed{...} wrapper or $...$ is removed); gold may also be an int or float.
    """
    return _check(gold, pred)[0]


def score(response, gold):
    """Reward of one response: Score(reward 1.0/0.0, extracted answer, correct True/False/None, timed_out).

    correct is None (and reward 0.0) when the gold is unparseable, so the trainer can count and skip the item.
    """
    answer = extract_answer(response)
    if _gold_value_safe(gold) is None:
        return Score(0.0, answer, None, False)
    if answer is None:
        return Score(0.0, None, False, False)
    verdict, timed_out = _check(gold, answer)
    return Score(1.0 if verdict else 0.0, answer, verdict, timed_out)


def _shown(answer):
    """The extracted answer for the command line, as written (no repr, so one backslash stays one); None and the
    empty string, which would print as nothing, are shown as "(none)" and "(empty)"."""
    if answer is None:
        return "(none)"
    return answer if answer else "(empty)"


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Extract the final answer of a response and grade it against a gold.",
        epilog="Prints 'extracted answer: ...' with the answer as written (LaTeX backslashes as typed, not escaped); "
               "'(none)' when no final answer is found, '(empty)' for an empty one. Then 'verdict: ...'.")
    ap.add_argument("response", help="model response text (the last \\boxed{...} or 'Answer: ...' is graded)")
    ap.add_argument("gold", help="gold answer, e.g. '\\frac{1}{2}'")
    args = ap.parse_args(argv)
    s = score(args.response, args.gold)
    print(f"extracted answer: {_shown(s.answer)}")
    verdict = {True: "correct", False: "incorrect", None: "gold answer not understood (item would be skipped)"}
    print(f"verdict: {verdict[s.correct]} (reward {s.reward}{', timed out' if s.timed_out else ''})")


if __name__ == "__main__":
    main()
