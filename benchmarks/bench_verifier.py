"""Timing and agreement of verifier.py on MATH-500 (the reward function's cost per rollout).

Measures, each row in a fresh process so that the verifier's memo of parsed answers starts empty (every distinct
answer string is parsed the first time it is seen, as in training, where a gold then repeats over its group):
  - is_equivalent(answer, boxed answer of the reference solution)         (the pair first reported slow)
  - score(full reference solution, answer)                                (extraction + grading)
  - is_equivalent(answer, rewritten answer)   (\frac{a}{b} -> (a)/(b), \dfrac -> \frac, spaces removed, "=" prefix
                                              kept: an equal answer in another spelling, so the full path runs)
  - is_equivalent(answer, boxed answer of the NEXT problem's solution)    (no string shortcut: full parse, compare)
and prints median / p99 / max per call in milliseconds, plus the agreement rate of the first row and its failures.
Then, for the numeric benchmarks found next to --data (gsm8k_test.jsonl, aime24.jsonl, amc23.jsonl) and the numeric
MATH-500 answers: how many gold answers verify and how many of their +1 perturbations are rejected.

Run:  python benchmarks/bench_verifier.py [--data ../shared/data/math500.jsonl]
"""
import argparse
import json
import multiprocessing
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository: its modules are imported from there
sys.path.insert(0, str(ROOT))

from verifier import extract_answer, is_equivalent, score

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "math500.jsonl"


def load_math500(path):
    """Rows with 'solution' and 'answer' strings; raises naming the line when a row cannot be used."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("solution"), str) or not isinstance(row.get("answer"), str):
                raise ValueError(f"{path}:{k}: expected string fields 'solution' and 'answer', got {sorted(row)}")
            rows.append(row)
    return rows


def timed(name, args_list):
    """Per-call wall times in ms and the results of verifier.<name>(*args) over args_list, in this process."""
    fn = {"is_equivalent": is_equivalent, "score": score}[name]
    times, results = [], []
    for args in args_list:
        t0 = time.perf_counter()
        results.append(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return times, results


def timed_fresh(name, args_list):
    """timed() in a newly spawned interpreter (cold memo, nothing shared with the other rows)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(timed, name, args_list).result()


def rewrite(answer):
    """The same answer spelled differently: \frac{a}{b} -> (a)/(b) for simple a, b; no spaces; \dfrac -> \frac."""
    s = re.sub(r"(?<![\d ])\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", answer)   # not mixed numbers
    return s.replace(" ", "").replace("\\!", "")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plain_number(text):
    """Exact value of a plain numeric gold (integer, decimal, 1,000, a/b, \\frac{a}{b}), else None (mixed numbers and
    base subscripts such as 204_5 are not plain)."""
    t = re.sub(r"\\!|\\?\$|\s", "", str(text))
    t = re.sub(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$", r"\1/\2", t)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", t):
        t = t.replace(",", "")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/[1-9]\d*)?", t):
        return None
    return Fraction(t)


def plus_one(value):
    v = value + 1
    return str(v.numerator) if v.denominator == 1 else rf"\frac{{{v.numerator}}}{{{v.denominator}}}"


def numeric_checks(data_dir, math500_answers):
    """(name, golds, verified, perturbations rejected) for each numeric benchmark file present in data_dir."""
    out = []
    gsm = data_dir / "gsm8k_test.jsonl"
    if gsm.is_file():
        rows = read_jsonl(gsm)
        golds = [(r["answer"], r["answer"].rsplit("####", 1)[1].strip()) for r in rows]
        out.append(("GSM8K test (full solution, #### answer)", len(golds),
                    sum(score(sol, raw).reward == 1.0 for sol, raw in golds),
                    sum(is_equivalent(raw, plus_one(plain_number(raw))) is False for _, raw in golds)))
    for name in ("aime24", "amc23"):
        path = data_dir / f"{name}.jsonl"
        if path.is_file():
            golds = [r["answer"] for r in read_jsonl(path)]
            values = [int(float(g)) for g in golds]
            out.append((f"{name} (boxed integer answer)", len(golds),
                        sum(score(rf"so the answer is $\boxed{{{v}}}$.", g).reward == 1.0 for g, v in zip(golds, values)),
                        sum(is_equivalent(g, str(v + 1)) is False for g, v in zip(golds, values))))
    numeric = [(a, v) for a in math500_answers if (v := plain_number(a)) is not None]
    out.append(("MATH-500 numeric answers (against their value as n or p/q)", len(numeric),
                sum(is_equivalent(a, str(v)) is True for a, v in numeric),
                sum(is_equivalent(a, plus_one(v)) is False for a, v in numeric)))
    return out


def summary(times):
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return f"{statistics.median(ordered):8.3f} {p99:8.3f} {ordered[-1]:8.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="path to math500.jsonl")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"--data: {args.data} not found (MATH-500 JSON Lines with 'solution' and 'answer')")
    rows = load_math500(args.data)
    boxed = [extract_answer(r["solution"]) for r in rows]
    answers = [r["answer"] for r in rows]

    t_eq, verdicts = timed_fresh("is_equivalent", list(zip(answers, boxed)))
    t_score, scores = timed_fresh("score", [(r["solution"], r["answer"]) for r in rows])
    t_rew, rewritten = timed_fresh("is_equivalent", [(a, rewrite(a)) for a in answers])
    t_other, others = timed_fresh("is_equivalent", list(zip(answers, boxed[1:] + boxed[:1])))
    timed("is_equivalent", list(zip(answers, boxed)))
    t_warm, _ = timed("is_equivalent", list(zip(answers, boxed)))      # second pass: every answer already parsed

    print(f"MATH-500, {len(rows)} problems; times per call in ms")
    print(f"{'call':58s} {'median':>8s} {'p99':>8s} {'max':>8s}")
    print(f"{'is_equivalent(answer, boxed answer of its solution)':58s} {summary(t_eq)}")
    print(f"{'score(full solution, answer)':58s} {summary(t_score)}")
    print(f"{'is_equivalent(answer, rewritten answer)':58s} {summary(t_rew)}")
    print(f"{'is_equivalent(answer, boxed answer of next problem)':58s} {summary(t_other)}")
    print(f"{'is_equivalent(answer, boxed answer), memo warm':58s} {summary(t_warm)}")
    agree = sum(v is True for v in verdicts)
    print(f"agreement (boxed answer of the solution verifies against 'answer'): {agree}/{len(rows)} "
          f"= {agree / len(rows):.1%}; score() reward 1.0 on {sum(s.reward for s in scores):.0f}/{len(rows)}")
    changed = [k for k, a in enumerate(answers) if rewrite(a) != a]
    print(f"rewritten answers accepted: {sum(rewritten[k] is True for k in changed)}/{len(changed)} changed strings")
    print(f"accepted against the next problem's answer (should be ~0): {sum(v is True for v in others)}")
    print(f"timed out: {sum(s.timed_out for s in scores)}; gold not understood: {sum(s.correct is None for s in scores)}")
    for name, n, verified, rejected in numeric_checks(args.data.parent, answers):
        print(f"{name}: {verified}/{n} verify; +1 perturbations rejected {rejected}/{n}")
    for k, v in enumerate(verdicts):
        if v is not True:
            print(f"  failure row {k}: answer={answers[k]!r} boxed={boxed[k]!r} verdict={v}")
    for k in changed:
        if rewritten[k] is not True:
            print(f"  rewrite not accepted: row {k}: {answers[k]!r} vs {rewrite(answers[k])!r}")
    for k, v in enumerate(others):
        if v is True:
            print(f"  accepted across problems: row {k}: {answers[k]!r} vs {boxed[(k + 1) % len(rows)]!r}")


if __name__ == "__main__":
    main()
