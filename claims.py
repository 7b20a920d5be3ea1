"""The claims ledger's evidence: each paper's claims, declared with their control, primary metrics and
predicted direction before any run, and the paired analysis that decides them. compare.py (the lab) and
toy_bandit.py (the toy) print it; RESULTS.md cites CLAIMS by key.

Design. Every cell of a comparison runs the same seeds, and a seed fixes the warm start, the data order and
the sampling (the toy: the initial logits and the held-out variants), so a claim is read on seed-matched
differences d_s = treatment_s - control_s, never on two unpaired intervals:
    mean d with a 95% Student t interval, the paired t-test's p-value,
    Holm's step-down adjustment over the claim's family (all its treatment x metric pairs),
    the smallest difference the design detects with 80% power at the family's first Holm level
    alpha / m: (t_{1 - alpha / 2m, n-1} + t_{0.8, n-1}) sd(d) / sqrt(n) (the central-t approximation).
Verdicts, in the ledger's four words:
    reproduced              every primary metric moves the predicted way (Holm-adjusted p < 0.05) in some
                            treatment, and none moves the other way;
    not reproduced          otherwise: a metric that does not move is read with its detectable difference
                            (no effect larger than it); one that moves the other way is said, and so is a
                            partial result (only some metrics as predicted);
    not testable here       no effect, and the mechanism's leverage (a logged figure, declared with its
                            threshold) is below the threshold in the treatment: it barely acts, so the null
                            says nothing (an effect that is there decides, whatever the leverage);
    depends on the form     the claim's forms (STEER's and OPEFO's paper / exact scores) disagree.

    python -c "import claims; print(claims.t_ppf(0.975, 4))"          # 2.776
    from claims import paired, holm, CLAIMS
"""
import math
from typing import NamedTuple, Optional

ALPHA, POWER = 0.05, 0.8


# ------------------------------------------------------------------------------------------ the t distribution
def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q, df):
    """The q-quantile of Student's t with df degrees of freedom (bisection on t_cdf to 1e-12)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# ------------------------------------------------------------------------------------------ paired analysis
def mean_ci(values):
    """(mean, half-width of the 95% Student t interval) of the values that are numbers (None and nan left
    out); half-width nan for one value, exactly 0.0 when every value is the same."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    if min(vals) == max(vals):
        return vals[0], 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return m, t_ppf(1 - ALPHA / 2, len(vals) - 1) * sd / math.sqrt(len(vals))


class Paired(NamedTuple):
    """A seed-matched comparison: n pairs, the mean difference with its 95% interval, the paired t-test's
    two-sided p-value (nan with fewer than 2 pairs or no spread), sd of the differences."""
    n: int
    mean: float
    lo: float
    hi: float
    p: float
    sd: float


def paired(treatment, control):
    """Paired comparison of two {seed: value} dicts on the seeds both hold (values None are left out)."""
    seeds = sorted(s for s in treatment if s in control and treatment[s] is not None and control[s] is not None)
    d = [treatment[s] - control[s] for s in seeds]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = sum(d) / n
    if n < 2:
        return Paired(1, mean, math.nan, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        return Paired(n, mean, mean, mean, 0.0 if mean else 1.0, 0.0)
    p = 2 * (1 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return Paired(n, mean, mean - half, mean + half, p, sd)


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the order given (nan stays nan and does not count in m)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m, out, running = len(order), [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def detectable(sd, n, family_size, power=POWER):
    """The smallest true mean difference a paired t-test over n seeds detects with `power` at the family's
    first Holm level ALPHA / family_size: (t_{1 - a/2, n-1} + t_{power, n-1}) sd / sqrt(n)."""
    if n < 2 or math.isnan(sd):
        return math.nan
    a = ALPHA / max(1, family_size)
    return (t_ppf(1 - a / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


# ------------------------------------------------------------------------------------------ the claims
class Comparison(NamedTuple):
    """One seed-matched comparison of a claim: treatment's `metric` against control's `control_metric`
    (default: the same metric; control "start": the same cell's value at step 0 / the start policy; None:
    against 0), with the sign of treatment - control that the claim predicts."""
    treatment: str
    control: Optional[str]
    metric: str
    sign: int
    control_metric: Optional[str] = None


class Claim(NamedTuple):
    """A paper's claim as the ledger tests it, declared before the runs (see the module docstring).
    where: "toy" or a compare.py setting; leverage: (metric, threshold) that says whether the mechanism acts in
    a treatment (below it a null is not testable here), or None; forms: the treatments are the forms of one
    method (paper / exact scores), so a split verdict reads "depends on the form"; every_treatment: each
    treatment predicts on its own (a quadrant grown and shrunk), so all must hold."""
    key: str
    paper: str
    text: str
    where: str
    tests: tuple
    leverage: Optional[tuple] = None
    forms: bool = False
    premise: tuple = ()         # Comparisons the claim presupposes (GRPO destabilises without a clip): else untestable
    every_treatment: bool = False   # each treatment is a prediction of its own (grow and shrink): all must hold


def _tests(treatments, control, metrics, sign=1):
    """A Comparison for every treatment x metric; metrics: {metric: predicted sign}, times `sign` (a treatment that
    turns the mechanism down predicts the opposite)."""
    return tuple(Comparison(t, control, m, s * sign) for t in treatments for m, s in metrics.items())


ENTROPY = {"entropy end": 1, "entropy/fork end": 1}             # the lab's collapse figures (more = less collapse)
ACCURACY = {"eval/avg@64": 1, "eval/pass@64": 1}                # pass@1 and pass@k on held-out problems
LEVER = ("loss/grpo_weight_l1", 0.05)          # the mechanism moves at least 5% of GRPO's token weight
TOY_LEVER = ("leverage_l1", 0.05)
TOY_H = {"entropy_over_h_star": 1}
# STEER's analysis: entropy rises when A > 0 updates on unlikely tokens, or A < 0 on likely tokens, grow
QUADRANT_SIGN = {"pos_likely": -1, "pos_unlikely": 1, "neg_likely": 1, "neg_unlikely": -1}


def _quadrant_claims(where, cell, control, metrics, lever):
    return [Claim(f"steer-quadrant-{q}", "STEER", f"growing the A {'>' if q.startswith('pos') else '<'} 0 update "
                  f"on {q.split('_')[1]} tokens {'raises' if s > 0 else 'lowers'} entropy, shrinking it does "
                  f"the opposite", where, _tests([cell(q, "2")], control, metrics, s)
                  + _tests([cell(q, "0.5")], control, metrics, -s), lever, every_treatment=True)
            for q, s in QUADRANT_SIGN.items()]


def _successor_claims(where, entropy, entropy_and_accuracy, accuracy, lever):
    """The newer losses' claims, each against the loss it modifies (toy cell names; the lab's are the same)."""
    return [
        Claim("erc-base", "ERC", "entropy ratio clipping keeps entropy up and helps accuracy (on DAPO, on GPPO)",
              where, _tests(["erc-dapo"], "dapo", entropy_and_accuracy) + _tests(["erc-gppo"], "gppo",
                                                                                 entropy_and_accuracy), lever),
        Claim("clip-b-grpo", "Clip_B",
              "dropping the most entropy-lowering A < 0 tokens keeps entropy up and helps accuracy", where,
              _tests(["clip-b"], "grpo", entropy_and_accuracy), lever),
        Claim("clip-v-grpo", "Clip_V",
              "dropping the A <= 0 tokens of largest entropy drop keeps entropy up and helps accuracy",
              where, _tests(["clip-v", "clip-v-paper"], "grpo", entropy_and_accuracy), lever, forms=True),
        Claim("sapo-grpo", "SAPO", "a soft gate keeps entropy healthier than GRPO's hard clip", where,
              _tests(["sapo"], "grpo", entropy), lever),
        Claim("cispo-dapo", "CISPO", "keeping every token's gradient learns faster than DAPO", where,
              _tests(["cispo"], "dapo", accuracy), lever),
        Claim("gspo-grpo", "GSPO", "the sequence-level ratio trains better than GRPO's token ratio", where,
              _tests(["gspo"], "grpo", accuracy), lever),
    ]


CLAIMS = (
    # ---------------------------------------------------------------- the toy (toy_bandit.py --seeds 10)
    Claim("opefo-flow", "OPEFO", "under GRPO the entropy-decreasing flow dominates", "toy",
          (Comparison("grpo", None, "flow total", -1),)),
    Claim("steer-stable", "STEER", "entropy stays stable where GRPO collapses", "toy",
          _tests(["steer", "steer-exact"], "grpo", {**TOY_H, "pass@16 variants": 1}), TOY_LEVER, forms=True),
    Claim("opefo-balance", "OPEFO", "balancing the flow prevents collapse (against on-policy GRPO)", "toy",
          _tests(["opefo", "opefo-exact"], "grpo-onpolicy", {**TOY_H, "accuracy": 1}), TOY_LEVER, forms=True),
    Claim("archer-grpo", "Archer", "dual-token constraints keep entropy and beat GRPO", "toy",
          _tests(["archer"], "grpo", {**TOY_H, "pass@16 variants": 1}), TOY_LEVER),
    Claim("aspo-grpo", "ASPO", "flipping positive tokens' ratio mitigates collapse", "toy",
          _tests(["aspo"], "grpo", TOY_H), TOY_LEVER),
    Claim("ce-gppo-grpo", "CE-GPPO", "gradient-preserving clipping controls entropy", "toy",
          _tests(["ce-gppo"], "grpo", TOY_H), TOY_LEVER),
    Claim("dapo-grpo", "DAPO", "clip-higher keeps entropy up", "toy", _tests(["dapo"], "grpo", TOY_H), TOY_LEVER),
    *_quadrant_claims("toy", lambda q, x: f"{q.replace('_', '-')}-x{x}", "grpo", TOY_H, TOY_LEVER),
    *_successor_claims("toy", TOY_H, {**TOY_H, "accuracy": 1}, {"accuracy": 1}, TOY_LEVER),
    Claim("yue-narrowing", "Yue et al.", "RLVR narrows pass@k at large k", "toy",
          (Comparison("grpo", "start", "pass@256 variants", -1), Comparison("grpo", "start", "distinct", -1),
           Comparison("grpo", "start", "pass@1 variants", 1))),
    # ---------------------------------------------------------------- the lab (compare.py, settings)
    Claim("opefo-flow", "OPEFO", "under GRPO the entropy-decreasing flow dominates", "default",
          (Comparison("grpo", None, "flow/total_exact", -1),)),
    Claim("steer-stable", "STEER", "entropy stays stable where GRPO collapses", "default",
          _tests(["steer"], "grpo", ENTROPY), LEVER),
    Claim("steer-stable", "STEER", "entropy stays stable where GRPO collapses", "steer-seeds",
          _tests(["steer"], "grpo", ENTROPY), LEVER),
    Claim("steer-dose", "STEER", "a smaller lambda_min keeps more entropy (its Figure 12)", "steer-dose",
          _tests([f"steer-{lm}" for lm in ("0.8", "0.7", "0.6", "0.5", "0.3", "0.1")], "steer-1",
                 {**ENTROPY, "eval/distinct": 1}), LEVER),
    *_quadrant_claims("quadrant", lambda q, x: f"{q}-x{x}", "grpo", ENTROPY, LEVER),
    Claim("opefo-balance", "OPEFO", "balancing the flow prevents collapse (against on-policy GRPO at its lr)",
          "opefo-onpolicy", _tests(["opefo", "opefo-exact"], "grpo-onpolicy", {**ENTROPY, "eval/avg@64": 1}),
          LEVER, forms=True),
    Claim("archer-grpo", "Archer", "dual-token constraints beat GRPO on pass@1 and pass@k", "archer-leverage",
          _tests(["archer", "archer-kl-0.01", "archer-kl-0.1", "archer-clip-knowledge-0.1"], "grpo-drop",
                 ACCURACY), LEVER),
    Claim("archer-masking", "Archer", "dual-token constraints beat masking the low-entropy tokens", "archer-leverage",
          _tests(["archer"], "forking", ACCURACY), LEVER),
    Claim("aspo-grpo", "ASPO", "flipping positive tokens' ratio mitigates collapse and beats GRPO", "clip-regime",
          _tests(["aspo"], "grpo-drop", {"entropy end": 1, "eval/avg@64": 1}), LEVER),
    Claim("ce-gppo-grpo", "CE-GPPO", "gradient-preserving clipping controls entropy and beats GRPO", "clip-regime",
          _tests(["ce-gppo"], "grpo-drop", {"entropy end": 1, "eval/avg@64": 1}), LEVER),
    *_successor_claims("successors", ENTROPY, {"entropy end": 1, "eval/avg@64": 1}, {"eval/avg@64": 1}, LEVER),
    Claim("steer-extreme", "STEER", "stable without a clip (eps_low 0.99, eps_high 5) where GRPO is not",
          "clip-regime", _tests(["steer-extreme-paper", "steer-extreme-exact"], "grpo-extreme",
                                {"eval/avg@64": 1, "entropy end": 1}), LEVER, forms=True,
          premise=(Comparison("grpo-extreme", "grpo", "eval/avg@64", -1),)),
    Claim("steer-extreme", "STEER", "stable without a clip (eps_low 0.99, eps_high 5) where GRPO is not",
          "steer-regime", _tests(["steer-extreme-paper", "steer-extreme-exact"], "grpo-extreme",
                                 {"eval/avg@64": 1, "entropy end": 1}), LEVER, forms=True,
          premise=(Comparison("grpo-extreme", "grpo", "eval/avg@64", -1),)),
    Claim("dapo-grpo", "DAPO", "clip-higher and dynamic sampling keep entropy up and train faster", "default",
          _tests(["dapo"], "grpo", {"entropy end": 1, "eval/avg@64": 1})),
    Claim("dapo-generation", "DAPO", "DAPO beats GRPO at equal generated groups", "dapo-generation",
          _tests(["dapo"], "grpo-long", {"eval/avg@64": 1})),
    Claim("yue-narrowing", "Yue et al.", "RLVR narrows pass@k at large k", "default",
          (Comparison("grpo", "start", "eval/pass@64", -1), Comparison("grpo", "start", "eval_unique/pass@64", -1),
           Comparison("grpo", "start", "eval/distinct", -1), Comparison("grpo", "start", "eval/avg@64", 1))),
)


def claims_for(where):
    """The claims decided in `where` ("toy" or a compare.py setting)."""
    return [c for c in CLAIMS if c.where == where]


# ------------------------------------------------------------------------------------------ deciding
class Row(NamedTuple):
    """One decided Comparison: its paired comparison, Holm-adjusted p, detectable difference, the treatment's
    leverage (mean over seeds; None when the claim declares none) and the row's verdict."""
    test: Comparison
    paired: Paired
    p_holm: float
    detectable: float
    leverage: Optional[float]
    verdict: str


def _series(values, cell, metric):
    """{seed: value} of values[cell][metric] ({} when absent)."""
    return dict(values.get(cell, {}).get(metric, {}))


def _compare(test, values):
    treated = _series(values, test.treatment, test.metric)
    if test.control is None:
        return paired(treated, {s: 0.0 for s in treated})
    if test.control == "start":
        return paired(treated, _series(values, test.treatment, f"{test.metric} start"))
    return paired(treated, _series(values, test.control, test.control_metric or test.metric))


def decide_tests(tests, values, leverage=None):
    """Rows for `tests` over values {cell: {metric: {seed: value}}}: Holm over the tests given."""
    results = [_compare(t, values) for t in tests]
    adjusted = holm([r.p for r in results])
    rows = []
    for t, r, p in zip(tests, results, adjusted):
        lever = None
        if leverage:
            seeds = _series(values, t.treatment, leverage[0])
            lever = sum(seeds.values()) / len(seeds) if seeds else math.nan
        mde = detectable(r.sd, r.n, len(tests))
        if p < ALPHA:                       # an effect decides, however little the mechanism acts
            verdict = "reproduced" if math.copysign(1, r.mean) == t.sign else "not reproduced (the opposite)"
        elif lever is not None and not lever >= leverage[1]:     # a null where it barely acts decides nothing
            verdict = f"not testable here ({leverage[0]} {lever:.3g} < {leverage[1]:g})"
        else:
            verdict = f"not reproduced (no effect larger than {mde:.2g})"
        rows.append(Row(t, r, p, mde, lever, verdict))
    return rows


def row_dict(row):
    """A Row as a flat dict (results.json)."""
    return {**row.test._asdict(), **{k: v for k, v in row.paired._asdict().items()}, "p_holm": row.p_holm,
            "detectable": row.detectable, "leverage": row.leverage, "verdict": row.verdict}


def _overall(rows):
    """A claim's verdict from its rows: reproduced when every primary metric moves the predicted way in some
    treatment and none moves the other way; a partial result names the metrics that moved."""
    live = [r for r in rows if not r.verdict.startswith("not testable")]
    if not live:
        return rows[0].verdict if rows else "not testable here (no runs)"
    against = list(dict.fromkeys(r.test.metric for r in live if "opposite" in r.verdict))
    if against:
        return f"not reproduced ({', '.join(against)} the opposite)"
    metrics = dict.fromkeys(r.test.metric for r in rows)      # a metric left untestable is not a metric moved
    moved = [m for m in metrics if any(r.test.metric == m and r.verdict == "reproduced" for r in live)]
    if len(moved) == len(metrics):
        return "reproduced"
    return f"not reproduced (only {', '.join(moved)} as predicted)" if moved else "not reproduced"


def decide(claim, values):
    """(rows, verdict) of a claim on values {cell: {metric: {seed: value}}} (see the module docstring)."""
    if claim.premise:
        base = decide_tests(claim.premise, values)
        if _overall(base) != "reproduced":
            why = "; ".join(f"{r.test.treatment} - {r.test.control} on {r.test.metric} {_interval(r.paired)}"
                            for r in base)
            rows = decide_tests(claim.tests, values, claim.leverage)
            return rows, f"not testable here (its premise does not hold: {why})"
    rows = decide_tests(claim.tests, values, claim.leverage)
    by_treatment = {t: _overall([r for r in rows if r.test.treatment == t])
                    for t in dict.fromkeys(r.test.treatment for r in rows)}
    if claim.forms and len({v.split(" (")[0] for v in by_treatment.values()}) > 1:
        return rows, "depends on the form (" + ", ".join(f"{t}: {v}" for t, v in by_treatment.items()) + ")"
    if claim.every_treatment and len(set(by_treatment.values())) > 1:
        held = [t for t, v in by_treatment.items() if v == "reproduced"]
        return rows, f"not reproduced (only {', '.join(held)} as predicted)" if held else _overall(rows)
    return rows, _overall(rows)


def _interval(r, spec=".3g"):
    if r.n < 2:
        return "(fewer than 2 seed pairs)"
    return f"{r.mean:+{spec}} [{r.lo:+{spec}}, {r.hi:+{spec}}]"


def report(claim, values, spec=".3g"):
    """A claim's decision as Markdown: a heading line, one table row per test, the verdict."""
    rows, verdict = decide(claim, values)
    n = max((r.paired.n for r in rows), default=0)
    lines = [f"**{claim.paper}: {claim.text}** (`{claim.key}`, {claim.where}; paired over {n} seeds, "
             f"Holm over {len(rows)} tests)", "",
             "| treatment | control | metric | difference [95% CI] | p (Holm) | detectable | leverage | row |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r.test
        control = "0" if t.control is None else t.control
        lever = "-" if r.leverage is None else f"{r.leverage:.3g}"
        lines.append(f"| {t.treatment} | {control} | {t.metric} ({'+' if t.sign > 0 else '-'}) | "
                     f"{_interval(r.paired, spec)} | {r.p_holm:.2g} | {r.detectable:.2g} | {lever} | {r.verdict} |")
    return "\n".join(lines + ["", f"Verdict: **{verdict}**", ""])


# ------------------------------------------------------------------------------------------ the ledger
PAPERS = ("STEER", "OPEFO", "Archer", "ASPO", "CE-GPPO", "ERC", "Clip_B", "Clip_V", "SAPO", "CISPO", "GSPO", "DAPO",
          "Yue et al.")


def _cell(t):
    """A decided test (row_dict) as the ledger's 'difference [95% CI], n; detectable' cell."""
    if t["n"] < 2:
        return "fewer than 2 seed pairs", "-"
    return (f"{t['mean']:+.3g} [{t['lo']:+.3g}, {t['hi']:+.3g}], n {t['n']}", f"{t['detectable']:.2g}")


def ledger(decided, full=False):
    """The verdict tables by paper, markdown lines, from decided {where: {claim key: {"verdict", "tests": [row
    dicts]}}} (compare.py's and toy_bandit.py's JSON "claims"). One row per claim, its first (primary) test
    shown, or with full=True one row per test."""
    lines = []
    for paper in PAPERS:
        found = [(c, decided[c.where][c.key]) for c in CLAIMS
                 if c.paper == paper and c.key in decided.get(c.where, {})]
        if not found:
            continue
        lines += ["", f"**{paper}**", "", "| claim | setting | treatment - control, metric (predicted) | "
                  "difference [95% CI], seeds | detectable | leverage | verdict |", "| --- | --- | --- | --- | --- | "
                  "--- | --- |"]
        for claim, result in found:
            tests = result["tests"] if full else result["tests"][:1]
            for i, t in enumerate(tests):
                diff, mde = _cell(t)
                lever = "-" if t["leverage"] is None else f"{t['leverage']:.2g}"
                more = "" if full or len(result["tests"]) == 1 else f" (+{len(result['tests']) - 1} more)"
                what = f"{t['treatment']} - {t['control'] or '0'}, {t['metric']} ({'+' if t['sign'] > 0 else '-'})"
                verdict = (t["verdict"] if full else result["verdict"]) if full or i == 0 else ""
                text = f"{claim.text} (`{claim.key}`)" if i == 0 else ""
                lines.append(f"| {text} | {claim.where} | {what}{more} | {diff} | {mde} | {lever} | {verdict} |")
    return lines
