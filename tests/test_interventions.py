"""Tests for the entropy interventions in losses.py (the baselines STEER and OPEFO compare against), the
adaptive entropy controller, the chunked entropy gradient and the four-quadrant entropy flow.

Each loss: a hand-computed value, its gradient against an autograd reference written from the paper's
formula, bf16 against float32, and a misspelt knob. Micro-batch exactness, empty masks, garbage under
the mask, empty batches and float64 are covered for every LOSSES entry in test_losses.py.
"""
import json
import math

import pytest
import torch

import entropy_math
import logprobs
import losses
from losses import LOSSES

NEW = ["entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking", "entropy_adv", "w_reinforce"]


def batch(B=4, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, T - 2:] = 0
    mask[-1, T - 3:] = 0
    old_logp, entropy, s2 = logprobs.token_stats(logits, tokens)
    logp = old_logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 2
    return dict(logits=logits, tokens=tokens, mask=mask, logp=logp, old_logp=old_logp, advantages=adv,
                entropy=entropy, exact_term=s2, current_entropy=entropy + 0.1)


def run(name, b, **kw):
    """LOSSES[name] on batch b; Clip-Cov draws from a freshly seeded generator."""
    if name == "adaptive_entropy":
        kw.setdefault("coef", 0.01)
    if name == "clip_cov" and "cov_selected" not in kw:
        kw.setdefault("generator", torch.Generator().manual_seed(0))
    keys = ("logp", "old_logp", "advantages", "mask", "entropy", "exact_term", "current_entropy")
    return LOSSES[name](**{k: b[k] for k in keys}, **kw)


# ------------------------------------------------------------------------- entropy with its gradient
def naive_entropy(logits):
    lsm = torch.log_softmax(logits.double(), -1)
    p = lsm.exp()
    return -(p * torch.where(p > 0, lsm, 0.0)).sum(-1), lsm


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_entropy_gradient_equals_autograd_of_the_formula(dtype, tol, chunk):
    b = batch(B=3, T=4, V=29, seed=1)
    logits = b["logits"].to(dtype)
    logits[0, 0, :3] = -math.inf                                          # masked vocabulary entries
    logits.requires_grad_(True)
    w_lp, w_h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    logp, h = logprobs.token_logprobs_entropy(logits, b["tokens"], chunk_size=chunk)
    (g,) = torch.autograd.grad((logp * w_lp).sum() + (h * w_h).sum(), logits)
    ref = logits.detach().double().requires_grad_(True)
    h_ref, lsm = naive_entropy(ref)
    lp_ref = lsm.gather(-1, b["tokens"][..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((lp_ref * w_lp).sum() + (h_ref * w_h).sum(), ref)
    assert g.dtype == dtype and torch.isfinite(g).all() and (g[0, 0, :3] == 0).all()
    torch.testing.assert_close(h.double(), h_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(logp.double(), lp_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


def test_entropy_gradient_hand_value():
    # two tokens, logits (0, log 3): pi = (1/4, 3/4); dH/dz_b = -pi_b (log pi_b + H)
    z = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64, requires_grad=True)
    h = logprobs.policy_entropy(z)
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    H = -(p * p.log()).sum()
    (g,) = torch.autograd.grad(h.sum(), z)
    assert h.item() == pytest.approx(H.item(), rel=1e-14)
    torch.testing.assert_close(g[0], -p * (p.log() + H))
    assert g.sum().abs().item() < 1e-15                                   # softmax shift invariance


def test_entropy_bonus_hand_value_and_gradient():
    # on-policy (r = 1), A = (1, -2), one token each; H = (log 4, log 2); alpha = 0.1
    logp = torch.log(torch.tensor([[0.5], [0.25]])).requires_grad_(True)
    adv, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 1)
    ent = torch.tensor([[math.log(4)], [math.log(2)]], requires_grad=True)
    loss, m = losses.entropy_bonus_loss(logp, logp.detach(), adv, mask, ent, coef=0.1)
    pg = (-1.0 + 2.0) / 2
    bonus = (math.log(4) + math.log(2)) / 2
    assert loss.item() == pytest.approx(pg - 0.1 * bonus, rel=1e-6)
    assert m["entropy_bonus"] == pytest.approx(bonus) and m["coef"] == pytest.approx(0.1)
    g_lp, g_h = torch.autograd.grad(loss, (logp, ent))
    torch.testing.assert_close(g_lp, torch.tensor([[-0.5], [1.0]]))      # -A r / 2
    torch.testing.assert_close(g_h, torch.full((2, 1), -0.05))            # -coef / 2


def test_entropy_bonus_end_to_end_gradient_on_logits():
    """loss(logits) through token_logprobs_entropy equals the same formula on a naive log_softmax."""
    b = batch(B=2, T=3, V=17, seed=2)
    logits = b["logits"].clone().requires_grad_(True)
    logp, h = logprobs.token_logprobs_entropy(logits, b["tokens"], chunk_size=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = losses.entropy_bonus_loss(logp, b["old_logp"][:2, :3], b["advantages"][:2], mask, h, coef=0.3)
    (g,) = torch.autograd.grad(loss, logits)
    ref = b["logits"].clone().requires_grad_(True)
    h_ref, lsm = naive_entropy(ref)
    lp_ref = lsm.gather(-1, b["tokens"][..., None]).squeeze(-1)
    r = torch.exp(lp_ref - b["old_logp"][:2, :3])
    a = b["advantages"][:2, None]
    pg = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
    mf = mask.double()
    ref_loss = ((pg - 0.3 * h_ref) * mf).sum() / mf.sum()
    (g_ref,) = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(loss.double(), ref_loss)
    torch.testing.assert_close(g, g_ref)
    assert (g[0, 2] == 0).all() and (g[1, 1:] == 0).all()                 # padding: no gradient


# ------------------------------------------------------------------------- adaptive entropy control
def test_entropy_controller_hand_sequence():
    state = losses.entropy_control_init(target=0.2, coef=0.005, delta=0.001, coef_min=0.0, coef_max=0.007)
    seen = []
    for e in (0.1, 0.1, 0.1, 0.1, 0.3, 0.2, 0.5):
        alpha, new = losses.entropy_control_step(state, e)
        assert new is not state and state["steps"] == len(seen)            # pure: the old state is unchanged
        seen.append((alpha, new["coef"]))
        state = new
    expect = [(0.005, 0.006), (0.006, 0.007), (0.007, 0.007), (0.007, 0.007),   # capped at coef_max
              (0.0, 0.006), (0.006, 0.006), (0.0, 0.005)]                    # above target: no bonus
    for (a, c), (ea, ec) in zip(seen, expect):
        assert a == pytest.approx(ea) and c == pytest.approx(ec)
    assert json.loads(json.dumps(state)) == state and state["steps"] == 7     # checkpoint-friendly


def test_entropy_controller_floor_and_defaults():
    state = losses.entropy_control_init()
    assert state == {"target": 0.2, "coef": 0.005, "delta": 0.001, "coef_min": 0.0, "coef_max": 0.5, "steps": 0}
    for _ in range(10):
        _, state = losses.entropy_control_step(state, 2.0)
    assert state["coef"] == 0.0
    with pytest.raises(ValueError, match=r"coef=0.9 must be in \[coef_min=0.0, coef_max=0.5\]"):
        losses.entropy_control_init(coef=0.9)
    with pytest.raises(ValueError, match="entropy=nan must be finite"):
        losses.entropy_control_step(state, float("nan"))


def test_adaptive_entropy_loss_is_the_bonus_with_the_controller_alpha():
    b = batch()
    alpha, _ = losses.entropy_control_step(losses.entropy_control_init(), 0.05)
    a, _ = run("adaptive_entropy", b, coef=alpha)
    e, _ = run("entropy_bonus", b, coef=0.005)
    assert alpha == 0.005 and a.item() == e.item()
    with pytest.raises(TypeError, match="coef"):
        LOSSES["adaptive_entropy"](logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"],
                                   mask=b["mask"], current_entropy=b["current_entropy"])


# ------------------------------------------------------------------------------------------ Clip-Cov
def clip_cov_case():
    # one response, on-policy (r = 1); per-token advantages so that Cov is known:
    # mean log pi = -2, mean A = 0.5 -> Cov = (1)(1.5), (-1)(-2.5), (0)(.), (0.5)(-1.5), (-0.5)(... )
    logp = torch.tensor([[-1.0, -3.0, -2.0, -1.5, -2.5]], dtype=torch.float64)
    adv = torch.tensor([[2.0, -2.0, 1.0, -1.0, 2.5]], dtype=torch.float64)
    return logp, adv, torch.ones(1, 5)


def test_token_covariance_hand_values():
    logp, adv, mask = clip_cov_case()
    cov = losses.token_covariance(logp, adv, mask)
    mlp, madv = -2.0, 0.5
    expect = [(lp - mlp) * (a - madv) for lp, a in zip(logp[0].tolist(), adv[0].tolist())]
    torch.testing.assert_close(cov[0], torch.tensor(expect, dtype=torch.float64))
    assert expect[:2] == [1.5, 2.5]                                       # the two tokens in (1, 5)
    given = losses.token_covariance(logp, adv, mask, cov_means=(0.0, 0.0))
    torch.testing.assert_close(given, logp * adv)


def test_clip_cov_selects_the_right_count_among_eligible_tokens():
    logp, adv, mask = clip_cov_case()
    picks = set()
    for seed in range(30):
        sel = losses.clip_cov_select(logp, adv, mask, clip_cov_ratio=0.3,
                                     generator=torch.Generator().manual_seed(seed))
        assert sel.sum() == 1                                             # max(1, int(0.3 * 5)) = 1
        picks.add(int(sel[0].nonzero()))
    assert picks == {0, 1}                                                # only Cov in (1, 5), both drawn
    sel = losses.clip_cov_select(logp, adv, mask, clip_cov_ratio=0.4,
                                 generator=torch.Generator().manual_seed(0))
    assert sel.sum() == 2 and sel[0, :2].all()                            # int(0.4 * 5) = 2: both eligible
    # a token already clipped by PPO (A > 0, r = 1.5 > 1.2) is not eligible
    sel = losses.clip_cov_select(logp, adv, mask, old_logp=logp - torch.tensor([[math.log(1.5), 0, 0, 0, 0]]),
                                 clip_cov_ratio=0.4, generator=torch.Generator().manual_seed(0))
    assert sel[0].tolist() == [False, True, False, False, False]
    a = losses.clip_cov_select(logp, adv, mask, clip_cov_ratio=0.2, generator=torch.Generator().manual_seed(7))
    b = losses.clip_cov_select(logp, adv, mask, clip_cov_ratio=0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)                                              # the caller's seed decides


def test_clip_cov_hand_value_and_gradient():
    logp, adv, mask = clip_cov_case()
    logp = logp.clone().requires_grad_(True)
    chosen = torch.tensor([[False, True, False, False, False]])
    loss, m = losses.clip_cov_loss(logp, logp.detach(), adv, mask, cov_selected=chosen)
    # r = 1: per-token loss -A; token 1 (A = -2) contributes nothing
    assert loss.item() == pytest.approx((-2.0 + 0 - 1.0 + 1.0 - 2.5) / 5)
    assert m["cov_frac"] == pytest.approx(0.2)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-2.0, 0.0, -1.0, 1.0, -2.5]], dtype=torch.float64) / 5)


def test_clip_cov_in_call_choice_matches_the_precomputed_one():
    logp, adv, mask = clip_cov_case()
    own, _ = losses.clip_cov_loss(logp, logp, adv, mask, clip_cov_ratio=0.3,
                                  generator=torch.Generator().manual_seed(3))
    sel = losses.clip_cov_select(logp, adv, mask, clip_cov_ratio=0.3,
                                 generator=torch.Generator().manual_seed(3))
    given, _ = losses.clip_cov_loss(logp, logp, adv, mask, cov_selected=sel)
    assert own.item() == given.item()


def test_clip_cov_micro_batches_with_the_batch_choice():
    b = batch(B=6, T=5, seed=4)
    stats = losses.batch_statistics("clip_cov", mask=b["mask"], advantages=b["advantages"],
                                    old_logp=b["old_logp"], clip_cov_ratio=0.1, cov_lb=0.0, cov_ub=50.0,
                                    generator=torch.Generator().manual_seed(1))
    assert stats["cov_selected"].sum() == int(0.1 * b["mask"].sum())     # 2 tokens, both with 0 < Cov < 50
    logp = b["logp"].clone().requires_grad_(True)
    whole, _ = losses.clip_cov_loss(logp, b["old_logp"], b["advantages"], b["mask"],
                                    cov_selected=stats["cov_selected"])
    total = sum(losses.clip_cov_loss(logp[r], b["old_logp"][r], b["advantages"][r], b["mask"][r],
                                     cov_selected=stats["cov_selected"][r], num_tokens=stats["num_tokens"])[0]
                for r in (slice(0, 2), slice(2, 3), slice(3, 6)))
    torch.testing.assert_close(total, whole)
    (g,) = torch.autograd.grad(whole, logp)
    assert (g[stats["cov_selected"]] == 0).all()



def test_clip_cov_with_clip_low_and_high_one_is_the_unclipped_surrogate():
    """The Clip-Cov authors' 7B setting, clip ratio low = high = 1: the ratio bounds (0, 2); r > 0 always,
    so the lower clip is none, and for r in (0, 2) the loss is the unclipped -A r on the tokens kept."""
    b = batch(B=4, T=6, seed=12)
    r = 0.05 + 1.9 * torch.rand(4, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    r[1, 0] = 1e-6                                                        # far below 1 - 0.2: still unclipped
    logp = (b["old_logp"] + r.log()).requires_grad_(True)
    chosen = torch.zeros(4, 6, dtype=torch.bool)
    chosen[0, 1] = chosen[2, 3] = True                                    # two valid tokens Clip-Cov drops
    loss, m = losses.clip_cov_loss(logp, b["old_logp"], b["advantages"], b["mask"], clip_low=1.0,
                                   clip_high=1.0, cov_selected=chosen)
    keep = b["mask"].bool() & ~chosen
    ratio = torch.exp(logp - b["old_logp"])
    expected = (-b["advantages"].view(-1, 1) * ratio)[keep].sum() / b["mask"].sum()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(expected, logp)[0],
                               rtol=1e-14, atol=0)
    assert m["clip_frac_low"] == m["clip_frac_high"] == 0.0
    own, _ = run("clip_cov", dict(b, logp=logp), clip_low=1.0, clip_high=1.0)   # its own draw, via LOSSES
    assert torch.isfinite(own)
    with pytest.raises(ValueError, match=r"clip_low=1.5 must be in \[0, 1\]"):
        run("clip_cov", b, clip_low=1.5)
    with pytest.raises(ValueError, match=r"clip_low=1.0 must be in \[0, 1\)"):    # the other PPO losses
        run("forking", b, clip_low=1.0)


# -------------------------------------------------------------------------------------------- KL-Cov
def kl_cov_reference(logp, old_logp, adv, chosen, coef):
    """KL-Cov's per-token loss from the paper's formula, token-mean over one fully valid row."""
    log_r = logp - old_logp
    return (-adv * torch.exp(log_r) + coef * chosen * log_r.abs()).mean()


def test_kl_cov_hand_value_and_gradient():
    logp, adv, mask = clip_cov_case()
    logp = logp.clone().requires_grad_(True)
    old = logp.detach() - torch.tensor([[0.1, -0.2, 0.05, 0.3, -0.1]], dtype=torch.float64)
    loss, m = losses.kl_cov_loss(logp, old, adv, mask, kl_cov_ratio=0.2, kl_cov_coef=1.0)
    # k = max(1, int(0.2 * 5)) = 1: the largest Cov is token 1's 2.5 (Cov uses the current log pi)
    chosen = torch.tensor([[0, 1, 0, 0, 0]], dtype=torch.float64)
    ref = kl_cov_reference(logp, old, adv, chosen, 1.0)
    hand = sum(-a * math.exp(d) for a, d in zip(adv[0].tolist(), [0.1, -0.2, 0.05, 0.3, -0.1])) / 5 + 0.2 / 5
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12) and loss.item() == pytest.approx(hand, rel=1e-12)
    assert m["kl_cov_frac"] == pytest.approx(0.2) and m["kl_cov"] == pytest.approx(0.2 / 5)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(kl_cov_reference(logp, old, adv, chosen, 1.0), logp)
    torch.testing.assert_close(g, g_ref)


def test_kl_cov_ratio_is_a_fraction_not_a_percent():
    """2e-3 of 2000 valid tokens is 4 tokens (a percent reading would give 0.04)."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 500, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    _, m = losses.kl_cov_loss(logp, logp - 0.01, adv, torch.ones(4, 500))
    assert m["kl_cov_frac"] * 2000 == pytest.approx(4)
    _, m = losses.kl_cov_loss(logp, logp - 0.01, adv, torch.ones(4, 500), kl_cov_ratio=2e-4)   # verl's default
    assert m["kl_cov_frac"] * 2000 == pytest.approx(1)                    # max(1, int(0.4))


# ------------------------------------------------------------------------------------ forking tokens
def test_forking_hand_values_and_gradient():
    # entropies over the batch's 8 valid tokens; q80 of (0.1, .., 0.8) = 0.66 -> keep 0.7 and 0.8
    ent = torch.tensor([[0.1, 0.5, 0.8, 0.3], [0.7, 0.2, 0.6, 0.4]], dtype=torch.float64)
    mask = torch.ones(2, 4)
    logp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    tau = losses.forking_threshold(ent, mask)
    assert tau.item() == pytest.approx(torch.quantile(ent.flatten(), 0.8).item())
    assert tau.item() == pytest.approx(0.66)
    loss, m = losses.forking_loss(logp, logp.detach(), adv, mask, ent)
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 8)                 # r = 1: -A on the 2 kept tokens / 8
    assert m["forking_frac"] == pytest.approx(0.25) and m["entropy_threshold"] == pytest.approx(0.66)
    (g,) = torch.autograd.grad(loss, logp)
    expect = torch.zeros(2, 4, dtype=torch.float64)
    expect[0, 2], expect[1, 0] = -1.0 / 8, 2.0 / 8
    torch.testing.assert_close(g, expect)
    given, _ = losses.forking_loss(logp, logp.detach(), adv, mask, ent, entropy_threshold=0.45)
    assert given.item() == pytest.approx((-1.0 - 1.0 + 2.0 + 2.0) / 8)      # 0.5, 0.8 | 0.7, 0.6


@pytest.mark.parametrize("top_frac", [0.2, 0.5, 0.37, 1.0])
def test_forking_threshold_is_torch_quantile_with_ties_and_padding(top_frac):
    g = torch.Generator().manual_seed(13)
    ent = torch.randint(0, 4, (5, 9), generator=g).double() / 2          # many ties
    mask = torch.rand(5, 9, generator=g) < 0.7
    ent[~mask] = math.nan                                                  # padding may hold anything
    tau = losses.forking_threshold(ent, mask, top_frac)
    assert tau.item() == pytest.approx(torch.quantile(ent[mask], 1 - top_frac).item(), abs=1e-12)
    assert losses.forking_threshold(ent, torch.zeros(5, 9), top_frac).item() == math.inf


# ------------------------------------------------------------------------- entropy-based advantage
def test_entropy_adv_hand_values_and_gradient():
    # psi = min(0.4 H, |A| / 2): (min(0.2, 0.5), min(1.2, 0.5), min(0.8, 0)) -> A' = (1.2, -0.5, 0)
    ent = torch.tensor([[0.5], [3.0], [2.0]])
    adv, mask = torch.tensor([1.0, -1.0, 0.0]), torch.ones(3, 1)
    logp = torch.log(torch.full((3, 1), 0.5)).requires_grad_(True)
    loss, m = losses.entropy_adv_loss(logp, logp.detach(), adv, mask, ent)
    assert loss.item() == pytest.approx((-1.2 + 0.5 + 0.0) / 3, rel=1e-6)
    assert m["adv_bonus"] == pytest.approx((0.2 + 0.5 + 0.0) / 3, rel=1e-6)
    assert m["adv_bonus_capped"] == pytest.approx(2 / 3)                   # tokens 2 and 3: |A| / kappa binds
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-1.2], [0.5], [0.0]]) / 3)


def test_entropy_adv_gradient_equals_the_formula_off_policy():
    b = batch(seed=6)
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = losses.entropy_adv_loss(logp, b["old_logp"], b["advantages"], b["mask"], b["entropy"])
    a = b["advantages"][:, None]
    shaped = a + torch.minimum(0.4 * b["entropy"], a.abs() / 2)
    r = torch.exp(logp - b["old_logp"])
    per = torch.maximum(-shaped * r, -shaped * r.clamp(0.8, 1.2))
    ref = (per * b["mask"]).sum() / b["mask"].sum()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0])


# ------------------------------------------------------------------------------------- W-REINFORCE
def test_w_reinforce_hand_values_and_gradient():
    logp = torch.log(torch.tensor([[0.5], [0.5]])).requires_grad_(True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 1)
    loss, m = losses.w_reinforce_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx((-0.1 + 1.0) / 2)                 # lambda = 0.1 on the positive sample
    assert m["pos_frac"] == pytest.approx(0.5)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-0.05], [0.5]]))         # REINFORCE at r = 1: -w A / 2
    same, _ = losses.w_reinforce_loss(logp, logp.detach(), adv, mask, positive_weight=1.0)
    plain, _ = losses.grpo_loss(logp, logp.detach(), adv, mask)
    assert same.item() == plain.item()



def test_w_reinforce_float64_weights_are_float64():
    """float64 inputs are computed in float64: lambda = 0.1 itself, not float32(0.1) (1.5e-9 off)."""
    b = batch(seed=11)
    adv = b["advantages"]
    assert (adv > 0).any() and (adv < 0).any()
    loss, _ = losses.w_reinforce_loss(b["logp"], b["old_logp"], adv, b["mask"], positive_weight=0.1)
    r = torch.exp(b["logp"] - b["old_logp"])
    a = adv.view(-1, 1)
    per_token = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))            # PPO-clip, clip 0.2 / 0.2
    weight = torch.tensor([[0.1 if x > 0 else 1.0] for x in adv.tolist()], dtype=torch.float64)
    expected = (weight * per_token)[b["mask"].bool()].sum() / b["mask"].sum()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) <= 1e-15 * abs(expected.item())


# --------------------------------------------------------------------- every new loss: shared checks
@pytest.mark.parametrize("name", NEW)
def test_bf16_inputs_give_the_float32_result(name):
    b = batch(seed=9)
    low = {k: (v.to(torch.bfloat16) if torch.is_floating_point(v) and k != "advantages" else v)
           for k, v in b.items()}
    f32 = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in low.items()}
    f32["advantages"] = low["advantages"] = b["advantages"].float()
    lo, _ = run(name, low)
    hi, _ = run(name, f32)
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo, hi, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NEW)
def test_gradient_equals_finite_differences(name):
    b = batch(B=2, T=3, seed=10)
    b["mask"] = torch.ones(2, 3)
    b["mask"][1, 2] = 0
    chosen = torch.tensor([[True, False, False], [False, False, False]])
    stats = {"cov_selected": chosen} if name == "clip_cov" else {}
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = run(name, dict(b, logp=logp), **stats)
    (g,) = torch.autograd.grad(loss, logp)
    eps = 1e-6
    for i, t in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2)):
        up, down = b["logp"].clone(), b["logp"].clone()
        up[i, t] += eps
        down[i, t] -= eps
        fd = (run(name, dict(b, logp=up), **stats)[0] - run(name, dict(b, logp=down), **stats)[0]) / (2 * eps)
        assert g[i, t].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8), (i, t)


@pytest.mark.parametrize("name,typo", [("entropy_bonus", "alpah"), ("adaptive_entropy", "alpha"),
                                       ("clip_cov", "clip_cov_ration"), ("kl_cov", "kl_cov_percent"),
                                       ("forking", "top_fraction"), ("entropy_adv", "kapa"),
                                       ("w_reinforce", "lam")])
def test_misspelt_knob_raises_type_error(name, typo):
    with pytest.raises(TypeError, match=typo):
        run(name, batch(), **{typo: 0.1})


@pytest.mark.parametrize("name,knob,value,message", [
    ("entropy_bonus", "coef", -0.1, r"coef=-0.1 must be >= 0"),
    ("clip_cov", "clip_cov_ratio", 0.0, r"clip_cov_ratio=0.0 must be in \(0, 1\]"),
    ("clip_cov", "cov_lb", 6.0, r"cov_lb=6.0 must be < cov_ub=5.0"),
    ("kl_cov", "kl_cov_ratio", 2.0, r"kl_cov_ratio=2.0 must be in \(0, 1\]"),
    ("forking", "top_frac", 0.0, r"top_frac=0.0 must be in \(0, 1\]"),
    ("entropy_adv", "kappa", 0.0, r"kappa=0.0 must be > 0"),
    ("w_reinforce", "positive_weight", -1.0, r"positive_weight=-1.0 must be >= 0"),
    ("forking", "clip_low", 1.5, r"clip_low=1.5 must be in \[0, 1\)"),
])
def test_bad_knob_values_raise_one_clear_error(name, knob, value, message):
    with pytest.raises(ValueError, match=message):
        run(name, batch(), **{knob: value})


# ------------------------------------------------------------------------ four-quadrant entropy flow
def test_quadrant_assignment_hand_cases():
    # pi_a = 0.9, H = 0.5: log pi + H = 0.395 > 0 (likely); pi_a = 0.1, H = 0.5: -1.80 < 0 (unlikely)
    lp = torch.log(torch.tensor([[0.9], [0.1], [0.9], [0.1], [0.9]], dtype=torch.float64))
    h = torch.full((5, 1), 0.5, dtype=torch.float64)
    s2 = torch.full((5, 1), 0.01, dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0, 0.0], dtype=torch.float64)
    w = adv[:, None].clone()
    q = losses.entropy_flow_quadrants(lp, h, s2, adv, w, torch.ones(5, 1))
    for name in losses.QUADRANTS + ("zero_adv",):
        assert q[f"{name}_count"] == 1
    g_likely = 0.9 * (math.log(0.9) + 0.5) - 0.01                          # pi (l + H) - S2
    g_unlikely = 0.1 * (math.log(0.1) + 0.5) - 0.01
    assert q["pos_likely_exact"] == pytest.approx(-1.0 * g_likely)       # entropy down
    assert q["pos_unlikely_exact"] == pytest.approx(-2.0 * g_unlikely)   # up
    assert q["neg_likely_exact"] == pytest.approx(1.0 * g_likely)        # up
    assert q["neg_unlikely_exact"] == pytest.approx(3.0 * g_unlikely)    # down
    assert q["pos_likely_paper"] == pytest.approx(-(0.1 ** 2) * (math.log(0.9) + 0.5))
    assert q["neg_unlikely_flow"] == pytest.approx(3.0 * 0.9 ** 2 * (math.log(0.1) + 0.5))
    assert q["pos_likely_exact"] < 0 < q["pos_unlikely_exact"]
    assert q["neg_unlikely_exact"] < 0 < q["neg_likely_exact"]


def test_quadrant_sums_add_up_to_the_total():
    b = batch(B=6, T=7, seed=11)
    adv = b["advantages"][:, None].expand(-1, 7).clone()
    adv[2, :3] = 0                                                        # some zero-advantage tokens
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = losses.archer_loss(logp, b["old_logp"], adv, b["mask"], b["entropy"], b["old_logp"] - 0.2)
    loss.backward()
    q = losses.entropy_flow_quadrants(b["old_logp"], b["entropy"], b["exact_term"], adv, -logp.grad, b["mask"])
    for part in ("exact", "paper", "flow", "count"):
        four = sum(q[f"{name}_{part}"] for name in losses.QUADRANTS) + q[f"zero_adv_{part}"]
        assert four == pytest.approx(q[f"total_{part}"], rel=1e-12, abs=1e-15)
    assert q["total_count"] == b["mask"].sum() and q["zero_adv_count"] == 3
    assert q["zero_adv_exact"] != 0                                        # Archer's KL moves A = 0 tokens too


def test_quadrant_total_matches_a_tabular_softmax_step():
    """N independent states, one sampled token each, one gradient step of size lr on w log pi(a):
    lr * (the summed exact first-order change) equals entropy_math's realised change up to O(lr^2),
    in every quadrant."""
    g = torch.Generator().manual_seed(12)
    n, v = 400, 9
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    w = adv * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))     # clip and reweighting: w != A
    lp, h, s2 = logprobs.token_stats(logits[:, None], tokens[:, None])
    q = losses.entropy_flow_quadrants(lp, h, s2, adv, w[:, None], torch.ones(n, 1))
    likely = (lp[:, 0] + h[:, 0]) > 0
    for lr in (1e-3, 1e-4):
        real = entropy_math.entropy_change_true(logits, tokens, w, lr)
        assert lr * q["total_exact"] == pytest.approx(real.sum().item(), rel=20 * lr)   # error ~ lr relative
        assert abs(lr * q["total_paper"] - real.sum().item()) > 0.5 * abs(real.sum().item())  # paper form: off
        for name, sel in (("pos_likely", (adv > 0) & likely), ("neg_unlikely", (adv < 0) & ~likely)):
            assert lr * q[f"{name}_exact"] == pytest.approx(real[sel].sum().item(), rel=20 * lr)
    dh = entropy_math.dh_exact(logits, tokens, w, 1.0).sum().item()
    assert q["total_exact"] == pytest.approx(dh, rel=1e-10)
