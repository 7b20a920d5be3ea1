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
    reproduced              some primary metric moves the predicted way, Holm-adjusted p < 0.05;
    not reproduced          no metric does (with the detectable difference: no effect larger than it), or
                            one moves the other way (said);
    not testable here       the mechanism's leverage (a logged figure, declared with its threshold) is
                            below the threshold in the treatment: it barely acts, so the run cannot decide;
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
