"""Tests for the losses that act through the PPO clip after Archer: ASPO (aspo_loss), CE-GPPO (ce_gppo_loss)
and GPPO (gppo_loss): hand-derived values and per-token gradients d loss / d log pi in every case of their
equations, in float64 and float32; masked garbage, micro-batching, knobs and the registry entries.

The authors' functions themselves are compared where they are available: set ARCHER2_CORE_ALGOS to the
Archer2.0 repository's verl/trainer/ppo/core_algos.py (compute_policy_loss_archer) and CE_GPPO_CORE_ALGOS to the
CE-GPPO (or Klear-Reasoner) repository's (compute_gppo_loss_general_beta); both need verl installed, e.g.
    git -C Archer2.0 show HEAD:verl/trainer/ppo/core_algos.py > /tmp/archer2_core_algos.py
    ARCHER2_CORE_ALGOS=/tmp/archer2_core_algos.py CE_GPPO_CORE_ALGOS=/tmp/cegppo_core_algos.py pytest ...
Without them those tests skip; the hand derivations below stand on their own.
"""
import importlib.util
import math
import os

import pytest
import torch

import losses
from losses import LOSSES, agg_loss, aspo_loss, ce_gppo_loss, gppo_loss, grpo_loss, response_quantile

DTYPES = [(torch.float64, 1e-12), (torch.float32, 2e-6)]
ENTROPY_ROW = [0.1, 0.2, 0.3, 0.4, 5.0]     # q80 = 0.4 + 0.2 * 4.6 = 1.32: only the last token is reasoning
OLD = -0.7                                   # log pi_old of every token (any value: only r = pi / pi_old matters)


def ratio_batch(ratios, adv, dtype, entropy_row=ENTROPY_ROW):
    """logp (with gradient), old_logp, advantages (B,), mask, entropy for rows of given ratios r."""
    r = torch.tensor(ratios, dtype=torch.float64)
    old = torch.full(r.shape, OLD, dtype=torch.float64)
    logp = (old + r.log()).to(dtype).requires_grad_(True)
    entropy = torch.tensor([entropy_row] * r.shape[0], dtype=dtype)
    return dict(logp=logp, old_logp=old.to(dtype), advantages=torch.tensor(adv, dtype=dtype),
                mask=torch.ones(r.shape), entropy=entropy)


def value_and_grad(fn, b, **kw):
    loss, metrics = fn(**b, **kw)
    (g,) = torch.autograd.grad(loss, b["logp"])
    return loss, g, metrics


def check(loss, g, values, weights, dtype, tol):
    """loss = token mean of `values`; d loss / d log pi = `weights` / N per token (rows of the batch)."""
    n = sum(len(row) for row in values)
    assert loss.dtype == dtype and g.dtype == dtype
    assert loss.item() == pytest.approx(sum(map(sum, values)) / n, rel=tol, abs=tol)
    torch.testing.assert_close(g.double(), torch.tensor(weights, dtype=torch.float64) / n, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ ASPO
# eps 0.2 on knowledge tokens (the first four of each row), 0.4 on the reasoning token (the last); c = 3
A_POS, A_NEG = 1.5, -2.0
ASPO_RATIOS = [[1.1, 1.3, 0.5, 0.25, 1.3],          # A > 0
               [0.9, 0.7, 2.5, 4.0, 0.7],           # A < 0
               [1.5, 0.3, 4.0, 0.1, 1.0],           # A = 0
               [1.0, 1.0, 1.0, 1.0, 1.5]]           # A > 0, the reasoning token past its 1.4
ASPO_ADV = [A_POS, A_NEG, 0.0, A_POS]
ASPO_VALUES = [[-A_POS / 1.1,      # open: -A / r
                -A_POS / 1.2,      # knowledge r = 1.3 > 1 + 0.2: PPO clip, value -A / (1 + eps)
                -A_POS / 0.5,      # 1/r = 2 < c: -A / r
                -A_POS * 3,        # 1/r = 4 > c = 3: soft dual clip, value -A c
                -A_POS / 1.3],     # reasoning r = 1.3 <= 1 + 0.4: open
               [-A_NEG * 0.9,      # open: -A r
                -A_NEG * 0.8,      # knowledge r = 0.7 < 1 - 0.2: PPO clip, value -A (1 - eps)
                -A_NEG * 2.5,      # open up to c
                -A_NEG * 3,        # r = 4 > c: soft dual clip, value -A c
                -A_NEG * 0.7],     # reasoning r = 0.7 >= 1 - 0.4: open
               [0.0] * 5,
               [-A_POS] * 4 + [-A_POS / 1.4]]       # reasoning r = 1.5 > 1.4: clipped
ASPO_WEIGHTS = [[-A_POS / 1.1, 0.0, -A_POS / 0.5, -A_POS * 3, -A_POS / 1.3],   # d(per-token loss) / d log pi
                [-A_NEG * 0.9, 0.0, -A_NEG * 2.5, -A_NEG * 3, -A_NEG * 0.7],
                [0.0] * 5,
                [-A_POS] * 4 + [0.0]]


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_aspo_every_case_by_hand(dtype, tol):
    b = ratio_batch(ASPO_RATIOS, ASPO_ADV, dtype)
    loss, g, m = value_and_grad(aspo_loss, b, kl_knowledge=0.0)
    check(loss, g, ASPO_VALUES, ASPO_WEIGHTS, dtype, tol)
    assert m["reasoning_frac"] == pytest.approx(4 / 20)
    assert m["clip_frac_high"] == pytest.approx(2 / 20) and m["clip_frac_low"] == pytest.approx(1 / 20)
    assert m["dual_clip_frac_pos"] == pytest.approx(1 / 20) and m["dual_clip_frac_neg"] == pytest.approx(1 / 20)
    assert m["pg_loss"] == pytest.approx(loss.item(), rel=tol) and "kl_knowledge" not in m


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_aspo_knowledge_token_kl_by_hand(dtype, tol):
    """The default KL: k3 0.001 on knowledge tokens only, inside the token mean (Archer eq. 5)."""
    b = ratio_batch(ASPO_RATIOS, ASPO_ADV, dtype)
    x = -0.3                                                     # ref_logp - logp on every token
    ref = (b["logp"].detach().double() + x).to(dtype)
    loss, g, m = value_and_grad(aspo_loss, dict(b, ref_logp=ref))
    k3, dk3 = math.exp(x) - x - 1, 1 - math.exp(x)                # k3 and d k3 / d log pi
    values = [[v + 0.001 * k3 for v in row[:4]] + [row[4]] for row in ASPO_VALUES]   # reasoning: no KL
    weights = [[w + 0.001 * dk3 for w in row[:4]] + [row[4]] for row in ASPO_WEIGHTS]
    check(loss, g, values, weights, dtype, max(tol, 1e-9))
    assert m["kl_knowledge"] == pytest.approx(k3, rel=1e-5) and m["kl_reasoning"] == pytest.approx(k3, rel=1e-5)
    assert losses.uses_reference("aspo") and not losses.uses_reference("aspo", kl_knowledge=0.0)
    with pytest.raises(ValueError, match="ASPO's KL terms need ref_logp"):
        aspo_loss(**b)


def test_aspo_papers_clip_for_all_tokens():
    """clip_reasoning=0.2: the paper's eps = 0.2 on every token; the reasoning token at r = 1.3 is clipped."""
    b = ratio_batch(ASPO_RATIOS[:1], [A_POS], torch.float64)
    loss, g, _ = value_and_grad(aspo_loss, b, clip_reasoning=0.2, kl_knowledge=0.0)
    check(loss, g, [ASPO_VALUES[0][:4] + [-A_POS / 1.2]], [ASPO_WEIGHTS[0][:4] + [0.0]], torch.float64, 1e-12)


def random_batch(B=6, T=7, seed=0, spread=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = old + spread * torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.ones(B, T)
    mask[0, T - 2:] = 0
    mask[-1, T - 4:] = 0
    return dict(logp=logp, old_logp=old, advantages=torch.randn(B, generator=g, dtype=dtype), mask=mask,
                entropy=torch.rand(B, T, generator=g, dtype=dtype) * 2)


def grads(fn, b, **kw):
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = fn(**dict(b, logp=logp), **kw)
    return loss, torch.autograd.grad(loss, logp)[0]


def test_aspo_negative_tokens_are_grpo_with_a_soft_dual_clip():
    """For A < 0 ASPO is PPO's clipped ratio: its value equals grpo_loss with verl's hard dual clip c, and
    so does its gradient except past c, where ASPO keeps -A c / N (verl's: 0). Without a dual clip the
    A < 0 rows are grpo_loss exactly."""
    b = random_batch(spread=1.5)
    b["advantages"] = -b["advantages"].abs() - 0.1
    same = dict(clip_reasoning=0.2, clip_knowledge=0.2, kl_knowledge=0.0)
    a_loss, a_g = grads(aspo_loss, b, dual_clip=3.0, **same)
    g_loss, g_g = grads(grpo_loss, b, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    torch.testing.assert_close(a_loss, g_loss, rtol=1e-14, atol=1e-14)
    r = (b["logp"] - b["old_logp"]).exp()
    past = (r > 3.0) & b["mask"].bool()
    assert past.sum() >= 3 and ((r < 0.8) & b["mask"].bool()).sum() >= 3
    n = b["mask"].sum()
    expected = torch.where(past, -b["advantages"][:, None] * 3.0 / n, g_g)
    torch.testing.assert_close(a_g, expected, rtol=1e-14, atol=1e-16)
    a_loss, a_g = grads(aspo_loss, b, dual_clip=None, **same)
    g_loss, g_g = grads(grpo_loss, b, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(a_loss, g_loss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a_g, g_g, rtol=1e-14, atol=1e-16)


def test_aspo_first_update_is_grpo():
    """At r = 1 every token is open and 1 / r = r = 1: ASPO's value and gradient are GRPO's."""
    b = random_batch()
    b["logp"] = b["old_logp"].clone()
    a_loss, a_g = grads(aspo_loss, b, kl_knowledge=0.0)
    g_loss, g_g = grads(grpo_loss, b)
    torch.testing.assert_close(a_loss, g_loss, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(a_g, g_g, rtol=1e-15, atol=1e-17)


def test_aspo_float64_clip_range_is_exact():
    """r = 1.2 + 1e-12 on a knowledge token with A > 0 is clipped in float64: value -A / 1.2, gradient 0."""
    b = ratio_batch([[1.0] * 5], [1.0], torch.float64)
    b["logp"] = torch.tensor([[OLD, OLD, OLD, OLD + math.log1p(0.2 + 1e-12), OLD]],
                             dtype=torch.float64).requires_grad_(True)
    loss, g, _ = value_and_grad(aspo_loss, b, kl_knowledge=0.0)
    r3 = math.exp(math.log1p(0.2 + 1e-12))
    assert r3 > 1.2
    assert loss.item() == pytest.approx((-4 - 1 / 1.2) / 5, rel=1e-15)
    assert g[0, 3].item() == 0.0 and g[0, 0].item() == pytest.approx(-1 / 5, rel=1e-15)


# -------------------------------------------------------------------------------------------- CE-GPPO
# eps 0.2 / 0.2, c = 10, beta_1 = 0.25, beta_2 = 0.75 (not the defaults, so that each beta shows)
B1, B2 = 0.25, 0.75
GPPO_RATIOS = [[1.1, 1.5, 0.5, 1.0],                # A > 0
               [0.9, 0.5, 2.0, 12.0],               # A < 0
               [1.5, 0.5, 12.0, 1.0]]               # A = 0
GPPO_ADV = [A_POS, A_NEG, 0.0]
GPPO_VALUES = [[-A_POS * 1.1, -A_POS * 1.2, -A_POS * 0.5, -A_POS],       # r = 1.5 > 1.2: PPO's clipped value
               [-A_NEG * 0.9, -A_NEG * 0.8, -A_NEG * 2.0, -A_NEG * 10],  # r = 0.5 < 0.8; r = 12 > c: -A c
               [0.0] * 4]
GPPO_WEIGHTS = [[-A_POS * 1.1, -B2 * 1.2 * A_POS, -A_POS * 0.5, -A_POS],  # upper clip: -beta_2 (1 + eps) A
                [-A_NEG * 0.9, -B1 * 0.8 * A_NEG, -A_NEG * 2.0, 0.0],     # lower clip: -beta_1 (1 - eps) A;
                [0.0] * 4]                                                # hard dual clip: 0


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_ce_gppo_every_case_by_hand(dtype, tol):
    b = ratio_batch(GPPO_RATIOS, GPPO_ADV, dtype, entropy_row=[1.0] * 4)
    loss, g, m = value_and_grad(ce_gppo_loss, b, beta_low=B1, beta_high=B2)
    check(loss, g, GPPO_VALUES, GPPO_WEIGHTS, dtype, tol)
    assert m["clip_frac_low"] == pytest.approx(1 / 12) and m["clip_frac_high"] == pytest.approx(1 / 12)
    assert m["dual_clip_frac"] == pytest.approx(1 / 12) and m["pg_loss"] == pytest.approx(loss.item(), rel=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_gppo_is_ce_gppo_with_betas_one_and_clip_higher(dtype, tol):
    b = ratio_batch(GPPO_RATIOS, GPPO_ADV, dtype, entropy_row=[1.0] * 4)
    loss, g, _ = value_and_grad(LOSSES["gppo"], b)
    weights = [[-A_POS * 1.1, -1.28 * A_POS, -A_POS * 0.5, -A_POS],       # clip_high 0.28: 1.5 > 1.28
               [-A_NEG * 0.9, -0.8 * A_NEG, -A_NEG * 2.0, 0.0], [0.0] * 4]
    values = [[-A_POS * 1.1, -A_POS * 1.28, -A_POS * 0.5, -A_POS]] + GPPO_VALUES[1:]
    check(loss, g, values, weights, dtype, tol)
    c_loss, c_g, _ = value_and_grad(ce_gppo_loss, b, beta_low=1.0, beta_high=1.0, clip_high=0.28)
    assert torch.equal(loss, c_loss) and torch.equal(g, c_g)
    r = random_batch(spread=1.5, dtype=dtype)
    for kw in ({}, {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": None, "agg": "seq-mean-token-mean"}):
        one = grads(gppo_loss, r, **kw)
        other = grads(ce_gppo_loss, r, **dict({"clip_high": 0.28}, **kw, beta_low=1.0, beta_high=1.0))
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(), dict(dual_clip=None), dict(clip_low=0.1, clip_high=0.28, dual_clip=3.0),
                                dict(agg="seq-mean-token-sum-norm")])
def test_ce_gppo_with_betas_zero_is_grpo(kw, dtype):
    """beta_1 = beta_2 = 0: the clipped tokens get no gradient, which is PPO's clip: grpo_loss with the same
    eps and dual clip, in value and gradient, to the last bit."""
    b = random_batch(spread=1.5, dtype=dtype)
    kw = dict(dict(clip_low=0.2, clip_high=0.2, dual_clip=10.0), **kw)
    c_loss, c_g = grads(ce_gppo_loss, b, beta_low=0.0, beta_high=0.0, **kw)
    g_loss, g_g = grads(grpo_loss, b, **kw)
    assert torch.equal(c_loss, g_loss) and torch.equal(c_g, g_g)
    d_loss, d_g = grads(ce_gppo_loss, b, **kw)                       # the default betas move the clipped tokens
    assert torch.equal(d_loss, g_loss) and not torch.equal(d_g, g_g)


def test_ce_gppo_float64_clip_range_is_exact():
    b = ratio_batch([[1.0, 1.0]], [1.0], torch.float64, entropy_row=[1.0, 1.0])
    b["logp"] = torch.tensor([[OLD + math.log1p(0.2 + 1e-12), OLD]], dtype=torch.float64).requires_grad_(True)
    loss, g, _ = value_and_grad(ce_gppo_loss, b)
    assert loss.item() == pytest.approx((-1.2 - 1) / 2, rel=1e-15)
    assert g[0, 0].item() == pytest.approx(-1.0 * 1.2 / 2, rel=1e-15)          # beta_2 = 1 (1 + eps) A / N


def test_ce_gppo_preserved_gradient_survives_extreme_ratios():
    """The preserved gradient is built on log pi, not on r / sg(r): a ratio far past the +-20 clamp still
    gives beta (1 +- eps) A (the authors' r / sg(r) is inf / inf = NaN once r overflows)."""
    b = ratio_batch([[1.0, 1.0], [1.0, 1.0]], [2.0, -2.0], torch.float64, entropy_row=[1.0, 1.0])
    b["logp"] = torch.tensor([[OLD + 1e3, OLD], [OLD - 1e3, OLD]], dtype=torch.float64).requires_grad_(True)
    loss, g, _ = value_and_grad(ce_gppo_loss, b, beta_low=B1, beta_high=B2)
    assert torch.isfinite(loss)
    torch.testing.assert_close(g, torch.tensor([[-B2 * 1.2 * 2, -2], [B1 * 0.8 * 2, 2]], dtype=torch.float64) / 4)


# ------------------------------------------------------------------------------------------ all three
NEW = ("aspo", "ce_gppo", "gppo")


def whole(b):
    return dict(b, ref_logp=b["old_logp"] - 0.1)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_batch_totals_equal_the_whole_batch(name, agg):
    b = whole(random_batch(B=6, T=5, spread=1.5))
    b["mask"][3] = 0
    totals = losses.batch_totals(b["mask"])
    logp = b["logp"].clone().requires_grad_(True)
    full, _ = LOSSES[name](**dict(b, logp=logp), agg=agg, **totals)
    (g_full,) = torch.autograd.grad(full, logp)
    parts = 0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = {k: v[rows] for k, v in b.items()}
        parts = parts + LOSSES[name](**dict(part, logp=logp[rows]), agg=agg, **totals)[0]
    (g_parts,) = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(parts, full, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_masked_garbage_contributes_nothing(name, value):
    b = whole(random_batch(spread=1.5))
    b["advantages"] = b["advantages"][:, None].expand_as(b["mask"]).clone()
    dirty = dict(b)
    pad = b["mask"] == 0
    for key in ("logp", "old_logp", "advantages", "entropy", "ref_logp"):
        dirty[key] = b[key].clone().masked_fill(pad, value)
    (l0, g0), (l1, g1) = grads(LOSSES[name], b), grads(LOSSES[name], dirty)
    assert torch.isfinite(l1) and l1.item() == l0.item() and torch.equal(g1, g0)
    assert (g1[pad] == 0).all() and (g1[~pad] != 0).any()


@pytest.mark.parametrize("name", NEW)
def test_zero_advantage_rows_have_zero_gradient_unless_a_kl_is_on(name):
    b = whole(random_batch(spread=1.5))
    b["advantages"][[1, 3]] = 0.0
    kw = {"kl_knowledge": 0.0} if name == "aspo" else {}
    assert LOSSES[name].zero_rows(b["advantages"], b["mask"], b["entropy"]).tolist() == [
        False, True, False, True, False, False]
    _, g = grads(LOSSES[name], b, **kw)
    assert (g[[1, 3]] == 0).all() and (g[[0, 2]] != 0).any()
    if name == "aspo":                                           # the default KL moves them: uses_reference
        _, g = grads(LOSSES[name], b)
        assert (g[[1, 3]] != 0).any()


def test_registry_entries():
    assert LOSSES["aspo"].inputs == ("logp", "old_logp", "advantages", "mask", "entropy", "ref_logp",
                                     "num_tokens", "num_seqs", "norm_length")
    assert LOSSES["aspo"].needs == ("logp", "old_logp", "advantages", "mask", "entropy")
    for name in ("ce_gppo", "gppo"):
        assert LOSSES[name].inputs == ("logp", "old_logp", "advantages", "mask", "entropy", "num_tokens",
                                       "num_seqs", "norm_length")
        assert LOSSES[name].needs == ("logp", "old_logp", "advantages", "mask")
        assert not losses.uses_reference(name)
    assert all(LOSSES[n].data_defaults == {"drop_equal_groups": True} for n in NEW)
    assert all(LOSSES[n].zero_rows is losses._advantage_zero_rows and LOSSES[n].reductions == {"pg_loss": "sum"}
               for n in NEW)
    assert LOSSES["gppo"].knobs == {**LOSSES["ce_gppo"].knobs, "beta_low": 1.0, "beta_high": 1.0, "clip_high": 0.28}
    assert LOSSES["aspo"].knobs == {"quantile": 0.8, "clip_reasoning": 0.4, "clip_knowledge": 0.2, "dual_clip": 3.0,
                                    "kl_knowledge": 0.001, "kl_reasoning": 0.0, "kl_kind": "k3",
                                    "agg": "token-mean"}
    assert LOSSES["ce_gppo"].knobs == {"beta_low": 0.5, "beta_high": 1.0, "clip_low": 0.2, "clip_high": 0.2,
                                       "dual_clip": 10.0, "agg": "token-mean"}
    assert LOSSES["gppo"].knobs == dict(LOSSES["ce_gppo"].knobs, beta_low=1.0, clip_high=0.28)


# ------------------------------------------------------------------------------- the authors' functions
def authors_module(variable):
    """The authors' core_algos.py named by the environment variable (see the module docstring); skips
    without it or without verl (their file imports verl.utils.torch_functional)."""
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"{variable} is not set (the authors' verl/trainer/ppo/core_algos.py)")
    pytest.importorskip("verl.utils.torch_functional", reason="verl is not installed")
    spec = importlib.util.spec_from_file_location(f"authors_{variable.lower()}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authors_batch(seed):
    """float64, log-ratios out to +-25 (past the +-20 clamp), A > 0, < 0 and = 0 rows, finite padding."""
    b = random_batch(B=8, T=9, seed=seed, spread=2.0)
    b["logp"][0, :4] = b["old_logp"][0, :4] + torch.tensor([25.0, -25.0, 21.0, -21.0], dtype=torch.float64)
    b["advantages"][2] = 0.0
    b["advantages"][[0, 1]] = torch.tensor([1.3, -0.9], dtype=torch.float64)
    return b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aspo_matches_the_authors_compute_policy_loss_archer(seed):
    """Gradient to float precision, value up to the soft-dual-clipped tokens, whose value is -A c log pi
    there and -A c here; their token mean's denominator (verl_F.masked_mean: mask sum + 1e-8) is undone."""
    theirs_mod = authors_module("ARCHER2_CORE_ALGOS")
    b = authors_batch(seed)
    valid, n = b["mask"].bool(), b["mask"].sum()
    reasoning = (b["entropy"] >= response_quantile(b["entropy"], b["mask"], 0.8)[:, None]) & valid
    adv = b["advantages"][:, None].expand_as(b["mask"]) * b["mask"]
    logp_t = b["logp"].clone().requires_grad_(True)
    theirs = theirs_mod.compute_policy_loss_archer(
        old_log_prob=b["old_logp"], log_prob=logp_t, advantages=adv, response_mask=valid,
        high_entropy_mask=~reasoning & valid,                   # their name: True on the LOW-entropy tokens
        negative_low_entropy_clip_ratio_low=0.2, negative_high_entropy_clip_ratio_low=0.4,
        positive_low_entropy_clip_ratio_high=0.2, positive_high_entropy_clip_ratio_high=0.4,
        negative_clip_ratio_c=3.0, positive_clip_ratio_c=3.0)[0]
    (g_theirs,) = torch.autograd.grad(theirs, logp_t)
    mine, g_mine = grads(aspo_loss, b, kl_knowledge=0.0)
    scale = (valid.sum() + 1e-8) / n                             # their masked_mean's denominator / N
    torch.testing.assert_close(g_mine, g_theirs * scale, rtol=1e-13, atol=1e-18)
    r = (b["logp"] - b["old_logp"]).clamp(-20, 20).exp()
    dual = valid & (((adv > 0) & (r < 1 / 3)) | ((adv < 0) & (r > 3)))
    assert dual.sum() >= 2
    shift = (torch.where(dual, -adv * 3.0 * b["logp"], 0.0) - torch.where(dual, -adv * 3.0, 0.0)).sum() / n
    torch.testing.assert_close(mine + shift, theirs * scale, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("betas", [(0.5, 1.0), (0.75, 1.0), (1.0, 1.0), (0.25, 0.6)])
@pytest.mark.parametrize("clip_high", [0.2, 0.28])
def test_ce_gppo_matches_the_authors_compute_gppo_loss_general_beta(betas, clip_high):
    """Gradient to float precision; value equal where beta = 1, else the clipped tokens' values differ by the
    factor beta (theirs -beta (1 +- eps) A, here -(1 +- eps) A). Log-ratios within +-20 (theirs unclamped)."""
    theirs_mod = authors_module("CE_GPPO_CORE_ALGOS")
    b = random_batch(B=8, T=9, seed=3, spread=2.0)
    valid, n = b["mask"].bool(), b["mask"].sum()
    adv = b["advantages"][:, None].expand_as(b["mask"]) * b["mask"]
    logp_t = b["logp"].clone().requires_grad_(True)
    theirs = theirs_mod.compute_gppo_loss_general_beta(
        old_log_prob=b["old_logp"], log_prob=logp_t, advantages=adv, response_mask=b["mask"].double(),
        cliprange=0.2, cliprange_low=0.2, cliprange_high=clip_high, clip_ratio_c=10.0,
        loss_agg_mode="token-mean", gppo_loss_beta1=betas[0], gppo_loss_beta2=betas[1])[0]
    (g_theirs,) = torch.autograd.grad(theirs, logp_t)
    mine, g_mine = grads(ce_gppo_loss, b, beta_low=betas[0], beta_high=betas[1], clip_high=clip_high)
    scale = (b["mask"].double().sum() + 1e-8) / n                # their masked_mean's denominator / N
    torch.testing.assert_close(g_mine, g_theirs * scale, rtol=1e-13, atol=1e-18)
    r = (b["logp"] - b["old_logp"]).exp()
    low, high = valid & (adv < 0) & (r < 0.8), valid & (adv > 0) & (r > 1 + clip_high)
    assert low.sum() >= 2 and high.sum() >= 2
    shift = (torch.where(low, (1 - betas[0]) * 0.8 * -adv, 0.0)
             + torch.where(high, (1 - betas[1]) * (1 + clip_high) * -adv, 0.0)).sum() / n
    torch.testing.assert_close(mine - shift, theirs * scale, rtol=1e-13, atol=1e-15)
    with pytest.raises(NameError, match="only_higher"):             # their one-line GPPO, as committed
        theirs_mod.compute_gppo_loss(b["old_logp"], b["logp"], adv, b["mask"], cliprange=0.2)
