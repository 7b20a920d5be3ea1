"""Tests for losses.py: hand-computed values, reductions between methods, gradients and numerics."""
import importlib
import inspect
import math
import os

import pytest
import torch

import logprobs
import losses
from losses import (LOSSES, agg_loss, archer_loss, dapo_loss, drgrpo_loss, entropy_flow, first_order_term,
                    group_advantages, grpo_loss, kl_penalty, opefo_balance, opefo_loss, response_quantile,
                    steer_loss, steer_weights)
from logprobs import token_entropy, token_logprobs


def random_batch(B=4, T=7, V=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    if B:
        mask[0, T - 2:] = 0
        mask[-1, T - 4:] = 0
    logp = token_logprobs(logits, tokens).detach()
    old_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=logp.dtype)
    adv = torch.randn(B, generator=g)
    entropy, s2 = token_entropy(logits, exact_term=True)
    current_entropy = logprobs.policy_entropy(logits).detach() + 0.05   # the current policy has moved a little
    return dict(logits=logits, tokens=tokens, mask=mask, logp=logp, old_logp=old_logp, advantages=adv,
                entropy=entropy, exact_term=s2, current_entropy=current_entropy)


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_hand_values():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)      # Bessel std of (1, 0, 0)
    expected = [(1 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6), 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_group_advantages_dr_grpo_and_equal_groups():
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 3.0, 1.0]).repeat(2)[:6], 3, std_normalize=False)
    assert adv[:3].eq(0).all()                                   # all-equal group: exactly zero, no NaN
    torch.testing.assert_close(adv[3:], torch.tensor([3.0, 1.0, 0.1]) - (4.1 / 3))
    assert group_advantages(torch.tensor([5.0, 2.0]), 1).eq(0).all()   # G = 1: no baseline, no signal


def test_group_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.zeros(6), 4)


# ----------------------------------------------------------------------------------------- aggregation
def test_agg_modes_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert agg_loss(x, m, "token-mean").item() == pytest.approx(15 / 5)
    assert agg_loss(x, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.5) / 2)
    assert agg_loss(x, m, "seq-mean-token-sum").item() == pytest.approx((6 + 9) / 2)
    assert agg_loss(x, m, "seq-mean-token-sum-norm").item() == pytest.approx(15 / (2 * 3))
    assert agg_loss(x, m, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(15 / 20)
    assert agg_loss(x, m, "token-mean", num_tokens=10).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="unknown aggregation mode 'sum'"):
        agg_loss(x, m, "sum")



def verl_core_algos():
    """verl.trainer.ppo.core_algos; skips without verl, except in CI (CI=true), where it must be there."""
    if os.environ.get("CI") == "true":
        return importlib.import_module("verl.trainer.ppo.core_algos")
    return pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed "
                               "(pip install -r requirements-integrations.txt)")


def test_seq_mean_token_sum_norm_is_verls_agg_loss():
    """verl 0.9.1's seq-mean-token-sum-norm: the token sum over the rows with a valid token, divided by
    global_batch_size (default: those rows) and by loss_scale_factor (default: T), as agg_loss divides by
    num_seqs * norm_length. Compared on a batch with an all-padding row and a partly padded one."""
    core_algos = verl_core_algos()
    b = random_batch(B=5, T=7)
    mask = b["mask"].clone()
    mask[2] = 0                                                   # a row without a valid token
    x = b["logp"].double() * b["advantages"].double().view(-1, 1)
    for ours, theirs in ((dict(), dict()),
                         (dict(num_seqs=12, norm_length=16), dict(global_batch_size=12, loss_scale_factor=16))):
        mine = agg_loss(x, mask, "seq-mean-token-sum-norm", **ours)
        verl = core_algos.agg_loss(x, mask.double(), "seq-mean-token-sum-norm", **theirs)
        torch.testing.assert_close(mine, verl, rtol=1e-15, atol=0)
    assert mine.item() == pytest.approx((x * mask).sum().item() / (12 * 16), rel=1e-15)
    alone = agg_loss(x, mask, "seq-mean-token-sum-norm", num_seqs=1, norm_length=7)   # the constant alone
    torch.testing.assert_close(alone, 4 * core_algos.agg_loss(x, mask.double(), "seq-mean-token-sum-norm"))


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_micro_batches_with_global_counts_equal_whole_batch(mode):
    b = random_batch(B=6, T=5)
    logp = b["logp"].clone().requires_grad_(True)
    whole, _ = grpo_loss(logp, b["old_logp"], b["advantages"], b["mask"], agg=mode)
    (g_whole,) = torch.autograd.grad(whole, logp)
    n_tok, n_seq = b["mask"].sum(), b["mask"].shape[0]
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):                # uneven micro-batches
        part, _ = grpo_loss(logp[rows], b["old_logp"][rows], b["advantages"][rows], b["mask"][rows],
                            agg=mode, num_tokens=n_tok, num_seqs=n_seq, norm_length=5)
        total = total + part
    (g_micro,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g_micro, g_whole)


def test_token_mean_without_global_count_depends_on_split():
    """The peer bug this library avoids: per-micro-batch token-mean changes the objective."""
    b = random_batch(B=4, T=5)
    whole, _ = grpo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"])
    local = sum(grpo_loss(b["logp"][r], b["old_logp"][r], b["advantages"][r], b["mask"][r])[0] / 2
                for r in (slice(0, 2), slice(2, 4)))
    assert abs(local.item() - whole.item()) > 1e-4


# ------------------------------------------------------------------------------------------------- KL
def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    x = ref - logp                                                        # (-0.5, 1.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), -x)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), x ** 2 / 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(x) - x - 1)
    extreme = kl_penalty(torch.tensor([[0.0]]), torch.tensor([[500.0]]), "k3")
    assert extreme.item() == losses.K3_LIMIT                                 # clamped, no overflow


def test_k3_is_an_unbiased_kl_estimate():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2])
    logp, logq = p.log(), q.log()
    expect = (p * (logp - logq)).sum()                                    # KL(p || q), tokens ~ p
    k3 = (p * kl_penalty(logp, logq, "k3")).sum()
    torch.testing.assert_close(k3, expect)


# --------------------------------------------------------------------------------------- GRPO by hand
def test_grpo_dapo_drgrpo_hand_values():
    # one response, three tokens: ratios 1.5, 0.5, 1.0; advantage +1 then a second response with A = -2
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # A = +1: max(-r, -clip(r)) per token -> (-1.2, -0.5, -1.0) for clip 0.2/0.2
    # A = -2: max(2r, 2 clip(r))         -> (3.0, 1.6, -)
    loss, m = grpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 3.0 + 1.6) / 5)
    assert m["clip_frac_high"] == pytest.approx(1 / 5) and m["clip_frac_low"] == pytest.approx(1 / 5)
    # DAPO clip-higher 0.28: first token -1.28
    loss, _ = dapo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.0 + 3.0 + 1.6) / 5)
    # dual clip c = 1.4 caps the A < 0, r = 1.5 token at 2 * 1.4 = 2.8
    loss, _ = grpo_loss(logp, old, adv, mask, dual_clip=1.4)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 2.8 + 1.6) / 5)
    # Dr. GRPO: token sums / (2 responses * T = 3)
    loss, _ = drgrpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 3.0 + 1.6) / 6)
    # GRPO's original seq-mean-token-mean with k1 KL 0.5 to a reference equal to old
    loss, m = grpo_loss(logp, old, adv, mask, agg="seq-mean-token-mean", ref_logp=old, kl_coef=0.5,
                        kl_kind="k1")
    pg = ((-1.2 - 0.5 - 1.0) / 3 + (3.0 + 1.6) / 2) / 2
    kl = ((math.log(1.5) + math.log(0.5) + 0) / 3 + (math.log(1.5) + math.log(0.5)) / 2) / 2
    assert loss.item() == pytest.approx(pg + 0.5 * kl)
    assert m["kl"] == pytest.approx(kl)


def test_grpo_kl_without_reference_is_an_error():
    b = random_batch()
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], kl_coef=0.04)


def test_shape_errors_name_the_tensor():
    b = random_batch(B=3, T=4)
    with pytest.raises(ValueError, match=r"old_logp has shape \(3, 5\)"):
        grpo_loss(b["logp"], torch.zeros(3, 5), b["advantages"], b["mask"])
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\)"):
        grpo_loss(b["logp"], b["old_logp"], torch.zeros(2), b["mask"])


# --------------------------------------------------------------------------------------- STEER by hand
def test_steer_weights_hand_values():
    omega = torch.tensor([[0.5, -1.0, 0.25, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    lam = steer_weights(omega, mask, lambda_min=0.7)
    torch.testing.assert_close(lam, torch.tensor([[0.7 ** 0.5, 0.7, 0.7 ** 0.25, 0.0]]))
    lam = steer_weights(omega * 0.001, mask, lambda_min=0.7)               # M below the 0.02 floor
    torch.testing.assert_close(lam, torch.tensor([[0.7 ** 0.025, 0.7 ** 0.05, 0.7 ** 0.0125, 0.0]]))
    lam = steer_weights(omega, mask, lambda_min=0.8, lambda_max=1.2, mapping="linear")
    torch.testing.assert_close(lam, torch.tensor([[1.2 - 0.4 * (0.25 / 0.75), 0.8, 1.2, 0.0]]))
    lam = steer_weights(omega, mask, mode="asymmetric")                   # only the entropy-lowering token
    torch.testing.assert_close(lam, torch.tensor([[1.0, 0.7, 1.0, 0.0]]))
    lam = steer_weights(omega, mask, omega_max=2.0)                        # caller-supplied global M
    torch.testing.assert_close(lam, torch.tensor([[0.7 ** 0.25, 0.7 ** 0.5, 0.7 ** 0.125, 0.0]]))


def test_steer_loss_hand_value():
    # one token per response, on-policy (r = 1), pi = 0.5, H = 1:  log pi + H = 1 - log 2
    logp = torch.log(torch.tensor([[0.5], [0.5]]))
    adv, mask = torch.tensor([1.0, -3.0]), torch.ones(2, 1)
    ent = torch.ones(2, 1)
    g = 0.25 * (1 - math.log(2))                                           # (1 - pi)^2 (l + H)
    omega = [-1 * g, 3 * g]                                                # -r A g
    lam = [0.7 ** (abs(omega[0]) / max(abs(omega[1]), 0.02)), 0.7]
    loss, m = steer_loss(logp, logp, adv, mask, ent)
    assert loss.item() == pytest.approx((lam[0] * -1.0 + lam[1] * 3.0) / 2, rel=1e-6)
    assert m["weight_min"] == pytest.approx(0.7) and m["omega_max"] == pytest.approx(3 * g, rel=1e-6)


def test_steer_with_lambda_min_one_is_grpo():
    b = random_batch()
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    s, _ = steer_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], b["entropy"], lambda_min=1.0, **kw)
    g, _ = grpo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], **kw)
    assert s.item() == g.item()


@pytest.mark.parametrize("form", ["paper", "code", "exact"])
def test_steer_gradient_is_weight_times_grpo_gradient(form):
    b = random_batch()
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = steer_loss(logp, b["old_logp"], b["advantages"], b["mask"], b["entropy"],
                         exact_term=b["exact_term"], form=form)
    (g_steer,) = torch.autograd.grad(loss, logp)
    per_tok, ratio = losses.ppo_clip_loss(logp, b["old_logp"], b["advantages"][:, None].expand(-1, 7),
                                          clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    (g_base,) = torch.autograd.grad(agg_loss(per_tok, b["mask"]), logp)
    adv = b["advantages"][:, None].expand(-1, 7)
    om = -(ratio.detach() * adv) * first_order_term(logp, b["entropy"], b["exact_term"], form)
    lam = steer_weights(om, b["mask"])
    torch.testing.assert_close(g_steer, lam * g_base)
    assert (g_steer[b["mask"] == 0] == 0).all()


# ------------------------------------------------------------------------------------------ OPEFO
def test_opefo_hand_values_and_zero_net_flow():
    # three on-policy tokens with pi = 0.5, H = 1 -> g = 0.25 (1 - log 2) each; f = -A g
    logp = torch.log(torch.full((3, 1), 0.5))
    adv, mask, ent = torch.tensor([1.0, -1.0, -2.0]), torch.ones(3, 1), torch.ones(3, 1)
    g = 0.25 * (1 - math.log(2))
    P, N = 3 * g, 1 * g                                                   # f = (-g, +g, +2g)
    lam_star = (N - P) / (N + P)                                          # -0.5
    loss, m = opefo_loss(logp, adv, mask, ent)
    w = [1 - lam_star, 1 + lam_star, 1 + lam_star]                        # S-, S+, S+
    expected = sum(-wi * a * math.log(0.5) for wi, a in zip(w, [1.0, -1.0, -2.0])) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["lambda_star"] == pytest.approx(lam_star) and m["flow_pos"] == pytest.approx(P, rel=1e-6)
    assert m["frac_pos"] == pytest.approx(2 / 3) and abs(m["weighted_flow"]) < 1e-7


@pytest.mark.parametrize("form", ["paper", "exact"])
def test_opefo_weighted_flow_sums_to_zero(form):
    b = random_batch(B=8, T=9, V=20, seed=3)
    f = entropy_flow(b["logp"], b["advantages"], b["mask"], b["entropy"], b["exact_term"], form)
    lam, P, N = opefo_balance(f)
    w = torch.where(f > 0, 1 + lam, torch.where(f < 0, 1 - lam, 1.0))
    assert P > 0 and N > 0
    assert abs((w * f).sum().item()) < 1e-5 * (P + N).item()


def test_opefo_with_balanced_flow_is_reinforce():
    # two tokens with equal and opposite flow: P = N, lambda* = 0, every weight 1
    logp = torch.log(torch.tensor([[0.5], [0.5]])).requires_grad_(True)
    adv, mask, ent = torch.tensor([1.0, -1.0]), torch.ones(2, 1), torch.ones(2, 1)
    loss, m = opefo_loss(logp, adv, mask, ent)
    assert m["lambda_star"] == 0.0 and m["flow_pos"] == pytest.approx(m["flow_neg"])
    reinforce = (-adv[:, None] * logp).mean()
    assert loss.item() == pytest.approx(reinforce.item())
    (g1,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g1, -adv[:, None] / 2)


def test_opefo_flow_totals_let_micro_batches_match_the_batch():
    b = random_batch(B=6, T=5, seed=4)
    logp = b["logp"].clone().requires_grad_(True)
    whole, mw = opefo_loss(logp, b["advantages"], b["mask"], b["entropy"])
    f = entropy_flow(b["logp"], b["advantages"], b["mask"], b["entropy"])
    _, P, N = opefo_balance(f)
    total = sum(opefo_loss(logp[r], b["advantages"][r], b["mask"][r], b["entropy"][r], flow_totals=(P, N),
                           num_tokens=b["mask"].sum())[0] for r in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(total, whole)


# ----------------------------------------------------------------------------------------- Archer
def test_response_quantile_matches_torch_quantile():
    vals = torch.randn(5, 11)
    mask = torch.ones(5, 11)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    q = response_quantile(vals, mask, 0.8)
    for i in range(5):
        expect = torch.quantile(vals[i][mask[i].bool()], 0.8)
        torch.testing.assert_close(q[i], expect)
    assert response_quantile(vals, torch.zeros(5, 11), 0.8).isinf().all()


def test_archer_hand_values():
    # entropies 0.1, 0.2, 0.3, 0.4, 5.0: q80 = 0.4 + 0.2 * 4.6 = 1.32 -> only the last token is reasoning
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0]])
    old = torch.zeros(1, 5)
    logp = torch.full((1, 5), math.log(1.4))                              # r = 1.4 everywhere
    mask = torch.ones(1, 5)
    ref = torch.zeros(1, 5)                                               # k3 with x = -log 1.4
    loss, m = archer_loss(logp, old, torch.tensor([1.0]), mask, ent, ref)
    pg = (4 * -1.2 + -1.4) / 5                                            # knowledge clip 1.2, reasoning 1.5
    x = -math.log(1.4)
    k3 = math.exp(x) - x - 1
    assert loss.item() == pytest.approx(pg + 0.001 * 4 * k3 / 5, rel=1e-6)     # eq. 5: inside the token mean
    assert m["reasoning_frac"] == pytest.approx(0.2) and m["kl_knowledge"] == pytest.approx(k3, rel=1e-5)
    assert m["clip_frac_high"] == pytest.approx(0.8)


def test_archer_with_equal_clips_and_no_kl_is_grpo():
    b = random_batch()
    a, _ = archer_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], b["entropy"],
                       clip_reasoning=0.25, clip_knowledge=0.25, kl_knowledge=0.0, dual_clip=3.0)
    g, _ = grpo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], clip_low=0.25, clip_high=0.25,
                     dual_clip=3.0)
    torch.testing.assert_close(a, g)


def test_archer_kl_needs_reference():
    b = random_batch()
    with pytest.raises(ValueError, match="frozen base model"):
        archer_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], b["entropy"])


# ------------------------------------------------------------------------------------- every loss
ALL = sorted(LOSSES)


KNOBS = {"adaptive_entropy": {"coef": 0.01}}     # knobs a loss cannot run without


def knobs(name, **kw):
    """The knobs for LOSSES[name] in these tests: required ones, and a freshly seeded generator for
    Clip-Cov's random choice (so that two calls draw the same tokens)."""
    out = dict(KNOBS.get(name, {}), **kw)
    if name == "clip_cov" and "cov_selected" not in out:
        out.setdefault("generator", torch.Generator().manual_seed(0))
    return out


def call(name, b, logp=None, **kw):
    return LOSSES[name](logp=b["logp"] if logp is None else logp, old_logp=b["old_logp"],
                        advantages=b["advantages"], mask=b["mask"], entropy=b["entropy"],
                        exact_term=b["exact_term"], ref_logp=b["old_logp"] - 0.1,
                        current_entropy=b["current_entropy"], num_tokens=None, **knobs(name, **kw))


@pytest.mark.parametrize("name", ALL)
def test_masked_positions_get_exactly_zero_gradient(name):
    b = random_batch()
    logp = b["logp"].clone()
    logp[b["mask"] == 0] = -math.inf                                       # garbage under the mask
    logp.requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    assert (g[b["mask"] == 0] == 0).all() and g[b["mask"] == 1].abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_gives_finite_zero_loss(name):
    b = random_batch()
    b["mask"] = torch.zeros_like(b["mask"])
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and (g == 0).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("name", ALL)
def test_equal_reward_group_gives_zero_advantage_and_finite_loss(name):
    b = random_batch(B=4)
    b["advantages"] = group_advantages(torch.ones(4), 4)
    loss, metrics = call(name, b)
    assert b["advantages"].eq(0).all() and metrics["pg_loss"] == 0.0
    if name in ("archer", "aspo"):                                         # only the knowledge-token KL
        assert 0 < loss.item() <= 0.001 * metrics["kl_knowledge"]
    elif "current_entropy" in LOSSES[name].inputs:                         # only the bonus -coef agg(H)
        assert loss.item() == pytest.approx(-metrics["coef"] * metrics["entropy_bonus"], rel=1e-6)
        assert metrics["entropy_bonus"] == pytest.approx(agg_loss(b["current_entropy"], b["mask"]).item())
    else:
        assert loss.item() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_extreme_log_ratios_do_not_overflow(name):
    b = random_batch()
    logp = b["old_logp"] + torch.tensor([1e4, -1e4, 50.0, -50.0])[:, None]
    logp.requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_registry_accepts_the_full_batch_and_rejects_typos():
    b = random_batch()
    assert set(LOSSES) == {"grpo", "dapo", "drgrpo", "steer", "quadrant", "opefo", "archer", "aspo", "ce_gppo", "gppo",
                           "entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking", "entropy_adv",
                           "w_reinforce"}
    with pytest.raises(TypeError):
        call("steer", b, lamda_min=0.5)
    assert call("dapo", b, clip_high=0.2)[0].item() == call("grpo", b)[0].item()
    assert call("dapo", b)[0].item() != call("grpo", b)[0].item()
    assert call("steer", b, form="exact")[0].item() != call("steer", b, form="paper")[0].item()


def test_drgrpo_does_not_depend_on_how_tokens_split_across_responses():
    # same 6 token losses, split 3+3 or 5+1 across two responses of width T = 5
    per = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.7, 1.1])
    logp = torch.log(1 + per.abs())                                       # arbitrary, ratio r = exp(logp)

    def split(sizes):
        lp, m = torch.zeros(2, 5), torch.zeros(2, 5)
        lp[0, :sizes[0]], lp[1, :sizes[1]] = logp[:sizes[0]], logp[sizes[0]:]
        m[0, :sizes[0]], m[1, :sizes[1]] = 1, 1
        return lp, m
    lp_a, m_a = split((3, 3))
    lp_b, m_b = split((5, 1))
    # advantages per token chosen so both layouts see the same (token, advantage) pairs
    a_tokens = torch.tensor([1.0, 1, 1, -1, -1, -1])
    adv_b = torch.zeros(2, 5)
    adv_b[0, :5], adv_b[1, 0] = a_tokens[:5], a_tokens[5]
    adv_a = torch.zeros(2, 5)
    adv_a[0, :3], adv_a[1, :3] = a_tokens[:3], a_tokens[3:]
    la, _ = drgrpo_loss(lp_a, torch.zeros(2, 5), adv_a, m_a)
    lb, _ = drgrpo_loss(lp_b, torch.zeros(2, 5), adv_b, m_b)
    torch.testing.assert_close(la, lb)
    sa, _ = grpo_loss(lp_a, torch.zeros(2, 5), adv_a, m_a, agg="seq-mean-token-mean")
    sb, _ = grpo_loss(lp_b, torch.zeros(2, 5), adv_b, m_b, agg="seq-mean-token-mean")
    assert abs(sa.item() - sb.item()) > 1e-3                               # GRPO's length bias


# ------------------------------------------------------------------------------- token statistics
def naive_stats(logits, tokens):
    lsm = torch.log_softmax(logits.double(), -1)
    p = lsm.exp()
    h = -(p * lsm).sum(-1)
    s2 = (p * p * (lsm + h[..., None])).sum(-1)
    return lsm.gather(-1, tokens[..., None]).squeeze(-1), h, s2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunked_statistics_equal_naive(dtype, tol, chunk):
    b = random_batch(B=3, T=5, V=37, seed=1)
    logits = b["logits"].to(dtype)                                        # compare on the same rounded logits
    lp = token_logprobs(logits, b["tokens"], chunk_size=chunk)
    h, s2 = token_entropy(logits, exact_term=True, chunk_size=chunk)
    lp_n, h_n, s2_n = naive_stats(logits, b["tokens"])
    for got, want in ((lp, lp_n), (h, h_n), (s2, s2_n)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert token_entropy(logits).shape == (3, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_logprob_gradient_equals_naive(dtype):
    b = random_batch(B=2, T=3, V=29, seed=2)
    logits = b["logits"].to(dtype).requires_grad_(True)
    w = torch.randn(2, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((token_logprobs(logits, b["tokens"], chunk_size=2) * w).sum(), logits)
    ref = logits.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((naive_stats(ref, b["tokens"])[0] * w).sum(), ref)
    assert g.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


def test_statistics_at_qwen_vocabulary_size():
    V = 151_936
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, V, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, V, (2, 3), generator=g)
    lp = token_logprobs(logits, tokens)
    h, s2 = token_entropy(logits, exact_term=True)
    lp_n, h_n, s2_n = naive_stats(logits, tokens)
    torch.testing.assert_close(lp.double(), lp_n, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.double(), h_n, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s2.double(), s2_n, rtol=1e-4, atol=1e-6)


def test_entropy_edge_cases():
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]])
    h, s2 = token_entropy(masked, exact_term=True)
    torch.testing.assert_close(h, torch.tensor([math.log(2)]))
    torch.testing.assert_close(s2, torch.tensor([0.0]))                   # pi_b (l_b + H) = 0 when uniform
    h, s2 = token_entropy(one_hot, exact_term=True)
    assert h.item() == 0.0 and s2.item() == 0.0
    h = token_entropy(torch.tensor([[1e4, 0.0, -1e4]]))
    assert torch.isfinite(h).all() and h.item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 5)
    before = logits.clone()
    token_entropy(logits, exact_term=True)
    assert torch.equal(logits, before)                                     # input is never modified


def test_token_logprobs_shape_error():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and tokens \(2, 4\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def micro(name, b, logp, rows, stats, **kw):
    """LOSSES[name] on the rows `rows` of batch b, with the whole batch's statistics `stats`."""
    part = {k: v[rows] for k, v in b.items() if k not in ("logits", "tokens")}
    extra = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in stats.items()}
    return LOSSES[name](logp=logp[rows], old_logp=part["old_logp"], advantages=part["advantages"],
                        mask=part["mask"], entropy=part["entropy"], exact_term=part["exact_term"],
                        ref_logp=part["old_logp"] - 0.1, current_entropy=part["current_entropy"],
                        **extra, **knobs(name, **kw))


def whole_batch_statistics(name, b, **kw):
    return losses.batch_statistics(name, mask=b["mask"], advantages=b["advantages"], old_logp=b["old_logp"],
                                   entropy=b["entropy"], exact_term=b["exact_term"], **knobs(name, **kw))


@pytest.mark.parametrize("name", ALL)
def test_every_loss_splits_into_micro_batches_exactly(name):
    """Gradient accumulation: batch_statistics on the whole batch (num_tokens / num_seqs, STEER's M, OPEFO's
    P and N, the Cov centring, cut and choice, the entropy cut) makes the sum of micro-batch losses equal
    the whole-batch loss, gradient included."""
    b = random_batch(B=6, T=5, seed=5)
    b["mask"][3] = 0                                                       # an all-padding row
    stats = whole_batch_statistics(name, b)
    assert stats["num_tokens"] == b["mask"].sum() and stats["num_seqs"] == 5
    logp = b["logp"].clone().requires_grad_(True)
    whole = micro(name, b, logp, slice(0, 6), stats)[0]
    (g_whole,) = torch.autograd.grad(whole, logp)
    total = sum(micro(name, b, logp, r, stats)[0] for r in (slice(0, 1), slice(1, 4), slice(4, 6)))
    (g_micro,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g_micro, g_whole)


@pytest.mark.parametrize("name", ALL)
def test_batch_statistics_equal_the_loss_own_on_policy(name):
    """On the first update (logp = old_logp) the precomputed statistics are what the loss computes itself."""
    b = random_batch(B=5, T=6, seed=8)
    b["logp"] = b["old_logp"]
    own, _ = call(name, b)
    stats = whole_batch_statistics(name, b)
    given, _ = call(name, b, **{k: v for k, v in stats.items() if k != "num_tokens"})
    torch.testing.assert_close(given, own, rtol=1e-6, atol=1e-7)


def test_batch_statistics_rejects_unknown_knobs_and_losses():
    b = random_batch()
    with pytest.raises(TypeError, match="top_fraction"):
        whole_batch_statistics("forking", b, top_fraction=0.2)
    with pytest.raises(TypeError, match="old_logp must be a torch.Tensor"):
        losses.batch_statistics("kl_cov", mask=b["mask"], advantages=b["advantages"])
    with pytest.raises(ValueError, match="unknown loss 'stear'"):
        losses.batch_statistics("stear", mask=b["mask"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_stats_is_the_two_functions_in_one_pass(dtype):
    b = random_batch(B=3, T=4, V=41, seed=6)
    logits = b["logits"].to(dtype)
    logp, h, s2 = logprobs.token_stats(logits, b["tokens"], chunk_size=5)
    h_ref, s2_ref = token_entropy(logits, exact_term=True, chunk_size=5)
    lp_ref = token_logprobs(logits, b["tokens"], chunk_size=5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logp, lp_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(s2, s2_ref, rtol=0, atol=0)
    assert not logp.requires_grad
    with pytest.raises(ValueError, match="disagree"):
        logprobs.token_stats(logits, b["tokens"][:, :2])


# ------------------------------------------------------------------- robustness where the file is copied
def garbage_under_mask(b, value=math.nan):
    """The batch with `value` in every masked position of every (B, T) input and (B, T) advantages."""
    pad = b["mask"] == 0
    out = dict(b)
    out["advantages"] = b["advantages"][:, None].expand_as(b["mask"]).clone()
    for key in ("logp", "old_logp", "advantages", "entropy", "exact_term"):
        out[key] = out[key].clone().masked_fill(pad, value)
    return out


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ALL)
def test_garbage_under_the_mask_changes_neither_loss_nor_gradient(name, value):
    b = random_batch()
    clean = dict(b, advantages=b["advantages"][:, None].expand_as(b["mask"]).clone())
    dirty = garbage_under_mask(b, value)
    results = []
    for batch in (clean, dirty):
        logp = batch["logp"].clone().requires_grad_(True)
        loss, metrics = call(name, batch, logp)
        (g,) = torch.autograd.grad(loss, logp)
        results.append((loss, g, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert l1.item() == l0.item() and torch.equal(g1, g0)
    assert (g1[b["mask"] == 0] == 0).all()
    assert m1 == m0


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_gives_zero_loss_and_empty_gradient(name):
    b = random_batch(B=0)
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and g.shape == (0, 7)
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_empty_batch_statistics():
    empty = torch.zeros(0, 3, 11)
    assert token_entropy(empty).shape == (0, 3)
    h, s2 = token_entropy(empty, exact_term=True)
    assert h.shape == s2.shape == (0, 3)
    assert token_logprobs(empty, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
    assert logprobs.token_stats(empty, torch.zeros(0, 3, dtype=torch.long))[0].shape == (0, 3)


@pytest.mark.parametrize("name,knob,value,message", [
    ("steer", "lambda_min", 0.0, r"lambda_min=0.0 must be in \(0, 1\]"),
    ("steer", "lambda_min", -0.5, r"lambda_min=-0.5 must be in \(0, 1\]"),
    ("steer", "lambda_min", 1.5, r"lambda_min=1.5 must be in \(0, 1\]"),
    ("archer", "quantile", 1.5, r"quantile=1.5 must be in \[0, 1\]"),
    ("archer", "quantile", -0.1, r"quantile=-0.1 must be in \[0, 1\]"),
    ("grpo", "clip_low", -0.5, r"clip_low=-0.5 must be in \[0, 1\)"),
    ("grpo", "clip_low", 1.0, r"clip_low=1.0 must be in \[0, 1\)"),
    ("dapo", "clip_high", -0.1, r"clip_high=-0.1 must be >= 0"),
    ("steer", "dual_clip", 1.0, r"dual_clip=1.0 must be > 1"),
    ("archer", "dual_clip", 0.5, r"dual_clip=0.5 must be > 1"),
    ("archer", "clip_reasoning", 1.2, r"clip_reasoning=1.2 must be in \[0, 1\)"),
    ("grpo", "num_tokens", 0, r"num_tokens=0 must be > 0"),
    ("opefo", "num_tokens", -3, r"num_tokens=-3 must be > 0"),
    ("grpo", "num_tokens", torch.tensor(0), r"num_tokens=0 must be > 0"),
    ("aspo", "clip_reasoning", 1.0, r"clip_reasoning=1.0 must be in \[0, 1\)"),
    ("aspo", "clip_knowledge", -0.1, r"clip_knowledge=-0.1 must be in \[0, 1\)"),
    ("aspo", "quantile", 1.5, r"quantile=1.5 must be in \[0, 1\]"),
    ("aspo", "dual_clip", 1.0, r"dual_clip=1.0 must be > 1"),
    ("aspo", "kl_knowledge", -0.001, r"kl_knowledge=-0.001 must be >= 0"),
    ("aspo", "kl_reasoning", -1.0, r"kl_reasoning=-1.0 must be >= 0"),
    ("ce_gppo", "beta_low", -0.5, r"beta_low=-0.5 must be >= 0"),
    ("gppo", "beta_high", -1.0, r"beta_high=-1.0 must be >= 0"),
    ("ce_gppo", "clip_low", 1.0, r"clip_low=1.0 must be in \[0, 1\)"),
    ("gppo", "clip_high", -0.1, r"clip_high=-0.1 must be >= 0"),
    ("ce_gppo", "dual_clip", 0.5, r"dual_clip=0.5 must be > 1"),
])
def test_bad_knobs_raise_one_clear_error(name, knob, value, message):
    b = random_batch()
    with pytest.raises(ValueError, match=message) as err:
        call(name, b, **{knob: value}) if knob != "num_tokens" else LOSSES[name](
            logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"],
            entropy=b["entropy"], exact_term=b["exact_term"], ref_logp=b["old_logp"], num_tokens=value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_num_seqs_zero_or_negative_is_an_error(mode):
    x, m = torch.ones(2, 3), torch.ones(2, 3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"num_seqs={bad} must be > 0"):
            agg_loss(x, m, mode, num_seqs=bad)
    with pytest.raises(ValueError, match="norm_length=0 must be > 0"):
        agg_loss(x, m, "seq-mean-token-sum-norm", norm_length=0)


@pytest.mark.parametrize("kind", ["list", "numpy"])
@pytest.mark.parametrize("name", ALL)
def test_advantages_that_are_not_tensors_raise_type_error(name, kind):
    b = random_batch()
    adv = b["advantages"].tolist() if kind == "list" else b["advantages"].numpy()
    with pytest.raises(TypeError, match="advantages must be a torch.Tensor"):
        call(name, dict(b, advantages=adv))


@pytest.mark.parametrize("name", ["grpo", "dapo", "drgrpo"])
def test_wrong_shape_entropy_names_the_argument(name):
    b = random_batch(B=4, T=7)
    with pytest.raises(ValueError, match=r"entropy has shape \(4, 6\)"):
        call(name, dict(b, entropy=b["entropy"][:, :6]))


def test_kl_penalty_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match=r"ref_logp has shape \(2, 4\), expected \(2, 3\)"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="ref_logp must be a torch.Tensor"):
        kl_penalty(torch.zeros(2, 3), [0.0, 0.0])


def test_seq_modes_leave_rows_without_valid_tokens_out_of_the_count():
    """As verl: a padded dummy row changes no seq-* loss (num_seqs counts rows with a valid token)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    xp, mp = torch.cat([x, torch.full((1, 3), 7.0)]), torch.cat([m, torch.zeros(1, 3, dtype=m.dtype)])
    for mode, value in (("seq-mean-token-mean", (2.0 + 4.5) / 2), ("seq-mean-token-sum", (6 + 9) / 2),
                        ("seq-mean-token-sum-norm", 15 / (2 * 3))):
        assert agg_loss(xp, mp, mode).item() == pytest.approx(value)
        assert agg_loss(xp, mp, mode).item() == agg_loss(x, m, mode).item()


def test_steer_linear_mapping_with_equal_scores_is_neutral():
    """Official STEER code: when every |Omega| is equal the linear map gives (min + max) / 2 (here 1.0)."""
    omega = torch.tensor([[0.3, -0.3, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    lam = steer_weights(omega, mask, lambda_min=0.8, lambda_max=1.2, mapping="linear")
    torch.testing.assert_close(lam, torch.tensor([[1.0, 1.0, 0.0]]))
    one = steer_weights(torch.tensor([[0.7]]), torch.ones(1, 1), lambda_min=0.7, lambda_max=1.1,
                        mapping="linear")
    assert one.item() == pytest.approx(0.9)


@pytest.mark.parametrize("name", ALL)
def test_float64_inputs_stay_float64(name):
    """Advantages (and Archer's per-token clip range and KL coefficient) keep the input's precision."""
    b = random_batch(dtype=torch.float64)
    b = {k: (v.double() if torch.is_floating_point(v) else v) for k, v in b.items()}
    b["advantages"] = b["advantages"] * (1 + 1e-9)           # a difference that float32 would round away
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.dtype == torch.float64 and g.dtype == torch.float64
    b32 = dict(b, advantages=b["advantages"] / (1 + 1e-9))
    loss32, _ = call(name, b32, b["logp"])
    assert loss.item() != loss32.item()                       # the 1e-9 survives in float64


def test_archer_float64_clip_range_is_exact():
    # r = 1.2 + 1e-12 on a knowledge token: clipped at 1 + 0.2 exactly when computed in float64
    logp = torch.full((1, 5), math.log(1.2 + 1e-12), dtype=torch.float64)
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0]], dtype=torch.float64)
    old, adv = torch.zeros(1, 5, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    loss, _ = archer_loss(logp, old, adv, torch.ones(1, 5), ent, kl_knowledge=0.0)
    expected = (4 * -1.2 + -(1.2 + 1e-12)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-15)


def test_uses_reference_probes_whether_a_loss_reads_ref_logp():
    assert losses.uses_reference("archer") and not losses.uses_reference("archer", kl_knowledge=0.0)
    assert not losses.uses_reference("grpo") and losses.uses_reference("grpo", kl_coef=0.1)
    assert not losses.uses_reference("kl_cov")              # its penalty is to pi_old, not to a reference
    assert not losses.uses_reference("adaptive_entropy")    # no ref_logp: no probe, so no coef is needed
    with pytest.raises(ValueError, match="unknown loss"):
        losses.uses_reference("ppo")
    with pytest.raises(TypeError):
        losses.uses_reference("steer", lamda_min=0.5)


# ----------------------------------------------------------------------------------- registry (losses.Loss)
CLIPS = ("clip_low", "clip_high", "dual_clip")
RATIO_CLIP = {"grpo", "dapo", "drgrpo", "steer", "entropy_bonus", "adaptive_entropy", "clip_cov", "forking",
              "entropy_adv", "w_reinforce", "ce_gppo", "gppo", "quadrant"}   # built on ppo_clip_loss's ratio clip


PPO = ("logp", "old_logp", "advantages", "mask")
NEEDS = {**{n: PPO for n in ("grpo", "dapo", "drgrpo", "ce_gppo", "gppo", "clip_cov", "kl_cov", "w_reinforce")},
         **{n: PPO + ("entropy",) for n in ("steer", "quadrant", "archer", "aspo", "forking", "entropy_adv")},
         "opefo": ("logp", "advantages", "mask", "entropy"),                    # on-policy: no old_logp
         **{n: PPO + ("current_entropy",) for n in ("entropy_bonus", "adaptive_entropy")}}


@pytest.mark.parametrize("name", ALL)
def test_registry_reads_off_each_signature_what_the_method_needs(name):
    entry = LOSSES[name]
    assert entry.needs == NEEDS[name]                       # the tensors it cannot run without, in order
    assert set(entry.needs) <= set(entry.inputs) <= losses.BATCH_KEYS
    assert {"num_tokens", "num_seqs", "norm_length"} <= set(entry.inputs)    # every loss aggregates exactly
    assert ("ref_logp" in entry.inputs) == (name in ("grpo", "dapo", "drgrpo", "archer", "aspo"))
    assert ("exact_term" in entry.inputs) == (name in ("steer", "opefo"))
    with pytest.raises(TypeError, match=f"{entry.fn.__name__} needs {entry.needs[-1]} "):
        entry(**{k: v for k, v in random_batch().items() if k in entry.needs[:-1]})


@pytest.mark.parametrize("name", ALL)
def test_registry_knobs_are_what_the_loss_takes_with_its_defaults(name):
    entry, b = LOSSES[name], random_batch()
    knobs = entry.knobs
    assert not set(knobs) & (losses.BATCH_KEYS | losses.STATISTIC_KEYS)
    for knob in CLIPS:                                      # calling the function itself decides who takes what
        try:
            call(name, b, **{knob: 3.0 if knob == "dual_clip" else 0.1})
            takes = True
        except TypeError:
            takes = False
        assert takes == (knob in knobs), knob
    expected = CLIPS if name in RATIO_CLIP else ("dual_clip",) if name in ("archer", "aspo") else ()
    assert tuple(k for k in CLIPS if k in knobs) == expected
    # the defaults are the ones the loss uses: passing them all changes nothing, to the last bit
    given = {k: v for k, v in knobs.items() if v is not losses.REQUIRED and k != "generator"}
    assert call(name, b, **given)[0].item() == call(name, b)[0].item()
    assert [k for k, v in knobs.items() if v is losses.REQUIRED] == (["coef"] if name == "adaptive_entropy" else [])


def test_registry_knob_defaults_of_presets_come_first():
    assert LOSSES["dapo"].knobs["clip_high"] == 0.28 and LOSSES["grpo"].knobs["clip_high"] == 0.2
    assert LOSSES["drgrpo"].knobs["agg"] == "seq-mean-token-sum-norm" and "kl_coef" in LOSSES["drgrpo"].knobs
    assert LOSSES["steer"].knobs["dual_clip"] == 10.0 and "omega_max" not in LOSSES["steer"].knobs


def test_registry_flags_match_the_papers():
    assert [n for n in ALL if not LOSSES[n].std_normalize] == ["drgrpo"]
    assert [n for n in ALL if LOSSES[n].on_policy] == ["opefo"]
    assert [n for n in ALL if LOSSES[n].adaptive] == ["adaptive_entropy"]
    assert [n for n in ALL if "current_entropy" in LOSSES[n].inputs] == ["adaptive_entropy", "entropy_bonus"]
    assert {n: LOSSES[n].data_defaults for n in ALL if LOSSES[n].data_defaults} == {
        "dapo": {"drop_equal_groups": True, "max_refill_rounds": 9, "overlong_penalty": True},
        "archer": {"drop_equal_groups": True}, "aspo": {"drop_equal_groups": True},
        "ce_gppo": {"drop_equal_groups": True}, "gppo": {"drop_equal_groups": True}}
    assert [n for n in ALL if LOSSES[n].zero_rows is None] == ["adaptive_entropy", "entropy_bonus", "kl_cov"]
    assert {n for n in ALL if LOSSES[n].statistics is not None} == {"steer", "opefo", "clip_cov", "kl_cov",
                                                                     "forking"}


@pytest.mark.parametrize("name", [n for n in ALL if LOSSES[n].statistics is not None])
def test_statistic_functions_read_only_batch_tensors_and_the_loss_knobs(name):
    entry = LOSSES[name]
    params = inspect.signature(entry.statistics).parameters
    named = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert all(p.default is p.empty for p in params.values())            # no default of its own
    assert named <= {"mask", "advantages", "old_logp", "entropy", "exact_term"} | set(entry.knobs)


def zero_row_batch(seed=3):
    """A batch of 6 rows, 3 with A = 0 (one of them with a slightly negative entropy on a valid token)."""
    b = random_batch(B=6, T=5, seed=seed)
    b["advantages"][[1, 3, 4]] = 0.0
    b["entropy"][4, 1] = -1e-7                                 # rounding: entropy_adv's A' = alpha H != 0
    b["logp"] = b["old_logp"] + 0.2 * torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    return b


@pytest.mark.parametrize("name", ALL)
def test_zero_rows_have_exactly_zero_gradient(name):
    """Rows a trainer may skip (Loss.zero_rows) get exactly zero gradient, with the whole batch's statistics
    and no reference KL; the losses without zero_rows move some zero-advantage row."""
    b = zero_row_batch()
    kw = {"archer": {"kl_knowledge": 0.0}, "aspo": {"kl_knowledge": 0.0}, "kl_cov": {"kl_cov_ratio": 0.5},
          "forking": {"top_frac": 0.5}}.get(name, {})
    assert not losses.uses_reference(name, **knobs(name, **kw))
    stats = whole_batch_statistics(name, b, **kw)
    logp = b["logp"].clone().requires_grad_(True)
    b["current_entropy"] = b["current_entropy"].clone().requires_grad_(True)    # the bonus's own gradient
    loss = micro(name, b, logp, slice(0, 6), stats, **kw)[0]
    grads = torch.autograd.grad(loss, (logp, b["current_entropy"]), allow_unused=True)
    g = sum(x.abs() for x in grads if x is not None)
    moved = g.sum(1) > 0
    zero = LOSSES[name].zero_rows
    if zero is None:
        assert moved[[1, 3, 4]].all()
        return
    rows = zero(b["advantages"], b["mask"], b["entropy"])
    assert rows.tolist() == [False, True, False, True, name != "entropy_adv", False]
    assert (g[rows] == 0).all() and moved.any()
    assert moved[4] == (name == "entropy_adv")                  # A' = alpha H < 0 moves it


def test_steer_statistics_is_the_max_score_at_r_one():
    b = random_batch(B=5, T=6, seed=8)
    valid = b["mask"].bool()
    for form, mode in (("paper", "symmetric"), ("exact", "symmetric"), ("code", "asymmetric")):
        omega = -b["advantages"][:, None] * first_order_term(b["old_logp"], b["entropy"], b["exact_term"], form)
        m = omega.abs() if mode == "symmetric" else (-omega).clamp(min=0)
        stats = whole_batch_statistics("steer", b, form=form, mode=mode)
        assert stats["omega_max"] == m[valid].max().item() > 0
        assert losses.steer_statistics(mask=b["mask"], advantages=b["advantages"], old_logp=b["old_logp"],
                                       entropy=b["entropy"], exact_term=b["exact_term"], form=form,
                                       mode=mode) == {"omega_max": stats["omega_max"]}
    with pytest.raises(ValueError, match="unknown STEER mode"):
        whole_batch_statistics("steer", b, mode="both")


def test_opefo_statistics_are_the_flow_totals():
    b = random_batch(B=5, T=6, seed=8)
    valid = b["mask"].bool()
    for form in ("paper", "exact"):
        f = (-b["advantages"][:, None] * first_order_term(b["old_logp"], b["entropy"], b["exact_term"], form))[valid]
        pos, neg = whole_batch_statistics("opefo", b, form=form)["flow_totals"]
        assert isinstance(pos, float) and isinstance(neg, float)
        assert pos == pytest.approx(f.clamp(min=0).sum().item(), rel=1e-6)
        assert neg == pytest.approx((-f).clamp(min=0).sum().item(), rel=1e-6)
        assert pos > 0 and neg > 0


def test_cov_and_forking_statistics_are_their_hand_formulas():
    b = random_batch(B=5, T=6, seed=8)
    valid = b["mask"].bool()
    lp, adv = b["old_logp"][valid], b["advantages"][:, None].expand_as(b["mask"])[valid]
    stats = whole_batch_statistics("kl_cov", b, kl_cov_ratio=0.25)
    assert stats["cov_means"] == pytest.approx((lp.mean().item(), adv.mean().item()), rel=1e-6)
    cov = (lp - lp.mean()) * (adv - adv.mean())
    k = int(0.25 * valid.sum())
    assert stats["cov_threshold"] == pytest.approx(cov.sort(descending=True).values[k - 1].item(), rel=1e-5)
    tau = whole_batch_statistics("forking", b, top_frac=0.3)["entropy_threshold"]
    assert tau == pytest.approx(torch.quantile(b["entropy"][valid], 0.7).item(), rel=1e-6)
    chosen = whole_batch_statistics("clip_cov", b, clip_cov_ratio=0.2, cov_lb=-10.0, cov_ub=10.0)["cov_selected"]
    again = losses.clip_cov_select(b["old_logp"], b["advantages"], b["mask"], clip_cov_ratio=0.2, cov_lb=-10.0,
                                   cov_ub=10.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again) and int(chosen.sum()) == int(0.2 * valid.sum())


def test_batch_statistics_takes_the_loss_batch_tensors_but_not_its_outputs():
    b = random_batch()
    stats = whole_batch_statistics("drgrpo", b, norm_length=9, kl_coef=0.1)     # batch keys it reads: ignored
    assert stats == {"num_tokens": int(b["mask"].sum()), "num_seqs": 4}
    with pytest.raises(TypeError, match="omega_max"):
        whole_batch_statistics("steer", b, omega_max=1.0)
    with pytest.raises(TypeError, match="current_entropy"):
        whole_batch_statistics("grpo", b, current_entropy=b["current_entropy"])


def test_merge_metrics_sums_maxes_mins_and_token_weights():
    parts = [(2, {"pg_loss": 0.5, "omega_max": 1.0, "weight_min": 0.8, "entropy": 1.0}),
             (6, {"pg_loss": -0.25, "omega_max": 3.0, "weight_min": 0.7, "entropy": 2.0})]
    assert losses.merge_metrics("steer", parts) == {"pg_loss": 0.25, "omega_max": 3.0, "weight_min": 0.7,
                                                    "entropy": (2 * 1.0 + 6 * 2.0) / 8}
    # the reduce table is the loss's: under grpo omega_max would be a token-weighted mean
    assert losses.merge_metrics("grpo", parts)["omega_max"] == (2 * 1.0 + 6 * 3.0) / 8
    assert losses.merge_metrics("kl_cov", [(0, {"kl_cov": 1.0, "abs_kl": 4.0}), (0, {"kl_cov": 2.0, "abs_kl": 5.0})]) \
        == {"kl_cov": 3.0, "abs_kl": 5.0}                    # no valid token anywhere: the last value
    assert losses.merge_metrics("opefo", []) == {}
    with pytest.raises(ValueError, match="unknown loss 'stear'"):
        losses.merge_metrics("stear", parts)


@pytest.mark.parametrize("name", ALL)
def test_reduce_names_metrics_the_loss_emits(name):
    b = random_batch()
    kw = {"kl_coef": 0.1} if name in ("grpo", "dapo", "drgrpo") else {}
    _, metrics = call(name, b, **kw)
    assert set(LOSSES[name].reductions) <= set(metrics) and LOSSES[name].reductions["pg_loss"] == "sum"
    assert set(LOSSES[name].reductions.values()) <= {"sum", "max", "min"}


def test_reduce_tables_together_are_the_former_trl_window_table():
    union = {}
    for name in ALL:
        for k, v in LOSSES[name].reductions.items():
            assert union.setdefault(k, v) == v                # one rule per metric name across losses
    assert union == {"pg_loss": "sum", "kl": "sum", "weighted_flow": "sum", "entropy_bonus": "sum",
                     "kl_cov": "sum", "omega_max": "max", "weight_max": "max", "weight_min": "min"}


@pytest.mark.parametrize("name", ["entropy_bonus", "adaptive_entropy"])
def test_missing_current_entropy_names_the_tensor_and_its_function(name):
    b = random_batch()
    message = (rf"{name}_loss needs current_entropy \(B, T\) with gradient: "
               r"logprobs.token_logprobs_entropy\(logits, tokens\)\[1\]")
    with pytest.raises(TypeError, match=message):
        call(name, dict(b, current_entropy=None))
    with pytest.raises(TypeError, match=message):
        LOSSES[name](logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"],
                     **knobs(name))
    with pytest.raises(TypeError, match=r"steer_loss needs entropy \(B, T\), the behaviour policy's: "
                                        r"logprobs.token_stats\(old_logits, tokens\)\[1\]"):
        LOSSES["steer"](logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"])



BONUSES = ("adaptive_entropy", "entropy_bonus")                  # the entries that need current_entropy


def whole_batch(b):
    """Every batch tensor of losses.BATCH_KEYS, as a trainer that serves all 13 entries would pass them."""
    batch = {k: b[k] for k in ("logp", "old_logp", "advantages", "mask", "entropy", "exact_term",
                                "current_entropy")}
    batch.update(ref_logp=b["old_logp"] - 0.1, norm_length=b["mask"].shape[1], **losses.batch_totals(b["mask"]))
    assert set(batch) == losses.BATCH_KEYS
    return batch


def test_every_entry_takes_the_whole_batch_and_only_the_bonuses_need_current_entropy():
    """The contract of losses.py's Usage: one call with every batch tensor runs every entry (its required
    knobs aside); without current_entropy, the two entropy bonuses raise one line naming the tensor and
    the function that computes it, and every other entry gives the same value to the last bit."""
    b = random_batch()
    full = whole_batch(b)
    values = {}
    for name in ALL:
        loss, metrics = LOSSES[name](**full, **knobs(name))
        assert torch.isfinite(loss) and metrics, name
        values[name] = loss.item()
    assert [n for n in ALL if "current_entropy" in LOSSES[n].needs] == list(BONUSES)
    without = {k: v for k, v in full.items() if k != "current_entropy"}
    for batch in (without, dict(without, current_entropy=None)):
        for name in ALL:
            if name in BONUSES:
                with pytest.raises(TypeError) as err:
                    LOSSES[name](**batch, **knobs(name))
                assert str(err.value) == (f"{name}_loss needs current_entropy (B, T) with gradient: "
                                          "logprobs.token_logprobs_entropy(logits, tokens)[1]")
            else:
                assert LOSSES[name](**batch, **knobs(name))[0].item() == values[name], name


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([5, 6, 7, 9, 10, 11])
    penalty = losses.overlong_penalty(lengths, 10, 4)           # window (6, 10]: ((10 - 4) - L) / 4
    assert penalty.dtype == torch.float32
    assert penalty.tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert [losses.default_overlong_cache(n) for n in (20480, 512, 1)] == [4096, 102, 1]


def test_loss_weights_are_minus_the_gradient_backward_would_leave_on_logp():
    b = random_batch()
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = call("grpo", b, logp=logp)
    w = losses.loss_weights(loss, logp)
    loss.backward()                                      # the graph was retained for the trainer's backward
    assert torch.equal(w, -logp.grad) and w.abs().sum() > 0
    unused = torch.zeros(2, 3, requires_grad=True)
    assert torch.equal(losses.loss_weights((2 * logp).sum(), unused), torch.zeros(2, 3))   # unused does not reach it


def test_the_docstrings_alignment_is_the_one_the_trainer_scores_with():
    """The three lines losses.py's docstring gives a copier (shift by one, positions under left padding, the
    sampling temperature) give rollout.response_stats' log-probs on a left-padded batch."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import rollout

    doc = " ".join(losses.__doc__.split())
    assert "logits[:, P - 1:-1] / temperature" in doc and "position_ids=pos" in doc
    assert "up to and including the end-of-sequence token" in doc and "A loss of exactly 0 on a first update" in doc
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=17, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    P, T, temperature = 4, 5, 0.7
    input_ids = torch.randint(1, 17, (3, P + T))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0                                             # row 0: a prompt of 2 tokens
    mask = torch.ones(3, T)
    with torch.no_grad():
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids, attention_mask=attention_mask, position_ids=pos)
        logp = logprobs.token_logprobs(out.logits[:, P - 1:-1] / temperature, input_ids[:, P:])
        expected = rollout.response_stats(model, input_ids, attention_mask, P, mask, temperature=temperature)["logp"]
    torch.testing.assert_close(logp, expected)


def test_an_unknown_method_or_a_misspelt_knob_names_the_nearest():
    with pytest.raises(KeyError, match="no loss 'Steer' in LOSSES \\(did you mean 'steer'\\?\\); the methods: grpo"):
        LOSSES["Steer"]
    b = {k: v for k, v in random_batch().items() if k in losses.BATCH_KEYS}
    with pytest.raises(TypeError, match="steer_loss takes no knob 'lamda_min' \\(did you mean 'lambda_min'\\?\\); "
                                        "its knobs: lambda_min, "):
        LOSSES["steer"](**b, lamda_min=0.5)
    with pytest.raises(TypeError, match="grpo_loss takes no knob 'zzz'; its knobs: clip_low"):
        LOSSES["grpo"](**b, zzz=1)


# ------------------------------------------------------------------------------------------ STEER's quadrants
def test_quadrant_loss_scales_one_quadrants_gradient_and_is_grpo_at_ones():
    b = {k: v for k, v in random_batch(dtype=torch.float64).items() if k in losses.BATCH_KEYS}
    likely = b["old_logp"] + b["entropy"] > 0
    adv = b["advantages"][:, None].expand_as(likely)

    def grad(name, **kw):
        logp = b["logp"].clone().requires_grad_(True)
        loss, _ = LOSSES[name](**dict(b, logp=logp), **kw)
        loss.backward()
        return loss.detach(), logp.grad
    base_value, base = grad("grpo")
    value, ones = grad("quadrant")
    assert value == base_value and torch.equal(ones, base)
    for q, sel in {"pos_likely": (adv > 0) & likely, "pos_unlikely": (adv > 0) & ~likely,
                   "neg_likely": (adv < 0) & likely, "neg_unlikely": (adv < 0) & ~likely}.items():
        _, g = grad("quadrant", **{q: 2.5})
        torch.testing.assert_close(g, torch.where(sel, 2.5 * base, base))
    with pytest.raises(ValueError, match="neg_likely=-1 must be >= 0"):
        LOSSES["quadrant"](**b, neg_likely=-1)


def test_grpo_weight_change_is_zero_for_grpo_and_the_reweighted_share_otherwise():
    b = {k: v for k, v in random_batch(dtype=torch.float64).items() if k in losses.BATCH_KEYS}
    totals = losses.batch_totals(b["mask"])

    def weights(name, **kw):
        logp = b["logp"].clone().requires_grad_(True)
        return losses.loss_weights(LOSSES[name](**dict(b, logp=logp), **totals, **kw)[0], logp)
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    same = losses.grpo_weight_change(weights("grpo"), *args, **totals)
    assert (same["changed"], same["l1"], same["gap"]) == (0.0, 0.0, 0.0) and same["size"] > 0
    w = weights("quadrant", pos_likely=3.0)
    valid = b["mask"].bool()
    sel = valid & (b["advantages"][:, None] > 0) & (b["old_logp"] + b["entropy"] > 0) & (w != 0)
    base = weights("grpo")
    change = losses.grpo_weight_change(w, *args, **totals)
    assert change["changed"] == pytest.approx(float(sel.sum() / valid.sum()))
    assert change["l1"] == pytest.approx(float(2 * base[sel].abs().sum() / base[valid].abs().sum()))
    assert change["l1"] == pytest.approx(change["gap"] / change["size"])
