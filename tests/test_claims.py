"""claims.py: the t distribution, paired differences, Holm, the detectable difference (against hand
computations, and scipy where it is installed), and the decision rules of a claim."""
import math

import pytest

import claims
from claims import Claim, Comparison


def test_t_quantiles_and_cdf_against_the_tables():
    # Student t table values (two-sided 95%: t_0.975) and t_0.8, to the printed digits
    for df, q975, q80 in ((1, 12.706, 1.376), (2, 4.303, 1.061), (4, 2.776, 0.941), (9, 2.262, 0.883),
                          (19, 2.093, 0.861), (100, 1.984, 0.845)):
        assert claims.t_ppf(0.975, df) == pytest.approx(q975, abs=5e-4)
        assert claims.t_ppf(0.8, df) == pytest.approx(q80, abs=5e-4)
    assert claims.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert claims.t_cdf(1.0, 1) == pytest.approx(0.75)                       # Cauchy: 1/2 + atan(1)/pi


def test_against_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 4, 9, 30):
        for q in (0.6, 0.8, 0.975, 0.99875):
            assert claims.t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)
    t, c = [0.52, 0.61, 0.58, 0.71, 0.49], [0.50, 0.55, 0.57, 0.62, 0.50]
    r = claims.paired(dict(enumerate(t)), dict(enumerate(c)))
    assert r.p == pytest.approx(stats.ttest_rel(t, c).pvalue, rel=1e-9)


def test_paired_by_hand():
    # differences 0.02, 0.06, 0.01, 0.09, -0.01: mean 0.034, sd 0.04037, se 0.018055, t = 1.8832 (df 4)
    t, c = [0.52, 0.61, 0.58, 0.71, 0.49], [0.50, 0.55, 0.57, 0.62, 0.50]
    r = claims.paired(dict(enumerate(t)), dict(enumerate(c)))
    sd = math.sqrt(sum((d - 0.034) ** 2 for d in (0.02, 0.06, 0.01, 0.09, -0.01)) / 4)
    assert (r.n, r.mean, r.sd) == (5, pytest.approx(0.034), pytest.approx(sd))
    assert r.hi - r.mean == pytest.approx(2.7764451 * sd / math.sqrt(5))
    assert r.p == pytest.approx(0.1327, abs=2e-4)                       # two-sided, from the t table (df 4)
    # only the seeds both sides hold, None left out
    r = claims.paired({0: 1.0, 1: 2.0, 2: None, 3: 4.0}, {0: 0.5, 1: 1.0, 3: 3.0, 4: 9.0})
    assert r.n == 3 and r.mean == pytest.approx((0.5 + 1.0 + 1.0) / 3)          # seeds 0, 1 and 3
    assert claims.paired({0: 1.0}, {0: 0.0}).n == 1 and math.isnan(claims.paired({0: 1.0}, {0: 0.0}).p)


def test_holm_by_hand():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (monotone), 0.5
    assert claims.holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    out = claims.holm([0.2, math.nan, 0.01])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_detectable_difference_by_hand():
    # n = 5, one test: (t_0.975,4 + t_0.8,4) sd / sqrt 5 = (2.7764 + 0.9410) sd / 2.2361
    assert claims.detectable(1.0, 5, 1) == pytest.approx((2.7764451 + 0.9409646) / math.sqrt(5), rel=1e-6)
    assert claims.detectable(1.0, 5, 4) > claims.detectable(1.0, 5, 1)          # Holm's first level: alpha / 4
    assert math.isnan(claims.detectable(1.0, 1, 1))


def values(**cells):
    """{cell: {metric: {seed: value}}} from cell=(metric, [values per seed]) pairs."""
    return {cell: {metric: dict(enumerate(vals)) for metric, vals in spec} for cell, spec in cells.items()}


def test_a_claim_is_reproduced_not_reproduced_or_the_opposite():
    claim = Claim("k", "P", "more entropy", "toy", (Comparison("a", "c", "h", 1),))
    base = [0.3, 0.5, 0.7, 0.4, 0.6]
    up = values(a=[("h", [b + 0.1 + 0.001 * i for i, b in enumerate(base)])], c=[("h", base)])
    down = values(a=[("h", [b - 0.1 - 0.001 * i for i, b in enumerate(base)])], c=[("h", base)])
    noise = values(a=[("h", [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)])], c=[("h", base)])
    assert claims.decide(claim, up)[1] == "reproduced"
    assert claims.decide(claim, down)[1] == "not reproduced (h the opposite)"
    assert claims.decide(claim, down)[0][0].verdict == "not reproduced (the opposite)"
    rows, verdict = claims.decide(claim, noise)
    assert verdict == "not reproduced" and rows[0].verdict.startswith("not reproduced (no effect larger than ")


def test_every_primary_metric_must_move_for_a_claim_to_reproduce():
    """A claim with two metrics (entropy and accuracy) where only one moves is not reproduced, and says which
    moved; one treatment moving each metric is enough (the quadrant claims' grown and shrunk cells)."""
    base = [0.3, 0.5, 0.7, 0.4, 0.6]
    up = [b + 0.1 + 0.001 * i for i, b in enumerate(base)]
    noise = [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)]
    two = Claim("k", "P", "t", "toy", (Comparison("a", "c", "h", 1), Comparison("a", "c", "acc", 1)))
    v = values(a=[("h", up), ("acc", noise)], c=[("h", base), ("acc", base)])
    assert claims.decide(two, v)[1] == "not reproduced (only h as predicted)"
    v["a"]["acc"] = dict(enumerate(up))
    assert claims.decide(two, v)[1] == "reproduced"
    levered = two._replace(leverage=("lev", 0.05))                      # entropy moves, accuracy is a null
    v = values(a=[("h", up), ("acc", noise), ("lev", [0.01] * 5)], c=[("h", base), ("acc", base)])
    rows, verdict = claims.decide(levered, v)
    assert [r.verdict[:14] for r in rows] == ["reproduced", "not testable h"]
    assert verdict == "not reproduced (only h as predicted)"           # the untested half is not a half moved
    either = Claim("k", "P", "t", "toy", (Comparison("a", "c", "h", 1), Comparison("b", "c", "h", -1)))
    v = values(a=[("h", up)], b=[("h", noise)], c=[("h", base)])
    assert claims.decide(either, v)[1] == "reproduced"
    both = either._replace(every_treatment=True)                         # grown and shrunk: each must hold
    assert claims.decide(both, v)[1] == "not reproduced (only a as predicted)"
    v["b"]["h"] = dict(enumerate(b - 0.1 - 0.001 * i for i, b in enumerate(base)))
    assert claims.decide(both, v)[1] == "reproduced"


def test_leverage_premise_and_forms_decide_before_the_effect():
    base = [0.3, 0.5, 0.7, 0.4, 0.6]
    up = [b + 0.1 + 0.001 * i for i, b in enumerate(base)]
    v = values(a=[("h", up), ("lev", [0.01] * 5)], b=[("h", base), ("lev", [0.2] * 5)], c=[("h", base)])
    lever = Claim("k", "P", "t", "toy", (Comparison("a", "c", "h", 1),), leverage=("lev", 0.05))
    assert claims.decide(lever, v)[1] == "reproduced"                    # an effect decides whatever the leverage
    null = values(a=[("h", [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)]), ("lev", [0.01] * 5)],
                  c=[("h", base)])
    assert claims.decide(lever, null)[1] == "not testable here (lev 0.01 < 0.05)"     # a null where it barely acts
    null["a"]["lev"] = dict(enumerate([0.2] * 5))
    assert claims.decide(lever, null)[1] == "not reproduced"
    forms = Claim("k", "P", "t", "toy", (Comparison("a", "c", "h", 1), Comparison("b", "c", "h", 1)), forms=True)
    assert claims.decide(forms, v)[1] == "depends on the form (a: reproduced, b: not reproduced)"
    premise = Claim("k", "P", "t", "toy", (Comparison("a", "c", "h", 1),), premise=(Comparison("b", "c", "h", -1),))
    assert claims.decide(premise, v)[1].startswith("not testable here (its premise does not hold: b - c on h")
    against_zero = Claim("k", "P", "t", "toy", (Comparison("a", None, "h", 1),))
    assert claims.decide(against_zero, v)[0][0].paired.mean == pytest.approx(sum(up) / 5)
    start = Claim("k", "P", "t", "toy", (Comparison("a", "start", "h", 1),))
    v["a"]["h start"] = dict(enumerate(base))
    assert claims.decide(start, v)[1] == "reproduced"


def test_every_claim_names_cells_its_setting_runs():
    import compare
    import toy_bandit

    for claim in claims.CLAIMS:
        cells = set(toy_bandit.ALGOS) if claim.where == "toy" else set(compare.SETTINGS[claim.where])
        for t in claim.tests + claim.premise:
            assert t.treatment in cells and t.control in cells | {None, "start"}, (claim.key, t)


def test_the_ledger_has_one_row_per_claim_by_paper_or_one_per_test():
    """Two seeds-matched comparisons of STEER's default claim and OPEFO's flow claim: the summary ledger gives
    each paper its table, one row per claim with its primary test, its count of further tests and the claim's
    verdict; full=True one row per test with that test's verdict."""
    values = {"grpo": {"entropy end": {0: 0.10, 1: 0.12, 2: 0.11}, "entropy/fork end": {0: 0.3, 1: 0.31, 2: 0.29},
                       "flow/total_exact": {0: -0.02, 1: -0.021, 2: -0.019}},
              "steer": {"entropy end": {0: 0.15, 1: 0.16, 2: 0.14}, "entropy/fork end": {0: 0.35, 1: 0.3, 2: 0.33},
                        "loss/grpo_weight_l1": {0: 0.1, 1: 0.1, 2: 0.1}}}
    decided = {"default": {}}
    for key in ("steer-stable", "opefo-flow"):
        claim = next(c for c in claims.CLAIMS if c.key == key and c.where == "default")
        rows, verdict = claims.decide(claim, values)
        decided["default"][key] = {"verdict": verdict, "tests": [claims.row_dict(r) for r in rows]}
    short = claims.ledger(decided)
    assert short.index("**STEER**") < short.index("**OPEFO**")             # the papers' order
    steer = next(line for line in short if "`steer-stable`" in line)
    assert "steer - grpo, entropy end (+) (+1 more) | +0.04 [+0.0152, +0.0648], n 3 | 0.042 | 0.1 | not reproduced " \
        "(only entropy end as predicted) |" in steer                     # the fork entropy did not move
    assert "| grpo - 0, flow/total_exact (-) | -0.02 [" in next(line for line in short if "`opefo-flow`" in line)
    full = claims.ledger(decided, full=True)
    fork = next(line for line in full if "entropy/fork end" in line)
    assert fork.startswith("|  | default | steer - grpo") and "not reproduced (no effect larger than 0.13)" in fork
