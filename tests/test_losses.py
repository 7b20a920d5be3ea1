"""losses.py's hand-derived values, in the file's section order: group advantages, aggregation and KL; GRPO,
DAPO, Dr. GRPO; STEER and its quadrant interventions; OPEFO; Archer; ASPO, CE-GPPO and GPPO; GSPO, CISPO
and SAPO; ERC, Clip_B and Clip_V; the entropy interventions; the four-quadrant flow; the whole-batch
statistics by hand. Against the reference functions: verl's own GSPO, CISPO and SAPO (in CI), and the
authors' files where ARCHER2_CORE_ALGOS, CE_GPPO_CORE_ALGOS, ERC_CORE_ALGOS (their core_algos.py) and
TRINITY_ADVANTAGE_FN_DIR (Trinity-RFT's advantage_fn folder) name them. What every entry must do is in
test_losses_contract.py, the vocabulary kernels in test_logprobs.py."""
import importlib
import json
import math
import os

import pytest
import torch

import entropy_math
import logprobs
import losses
from conftest import (call, grads, intervention_batch, naive_entropy, random_batch, ratio_random_batch,
                      run_intervention, whole_batch_statistics)
from losses import (LOSSES, agg_loss, archer_loss, aspo_loss, ce_gppo_loss, dapo_loss, drgrpo_loss, entropy_flow,
                    first_order_term, gppo_loss, group_advantages, grpo_loss, kl_penalty, opefo_balance, opefo_loss,
                    response_quantile, steer_loss, steer_weights)


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


def test_seq_modes_leave_rows_without_valid_tokens_out_of_the_count():
    """As verl: a padded dummy row changes no seq-* loss (num_seqs counts rows with a valid token)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    xp, mp = torch.cat([x, torch.full((1, 3), 7.0)]), torch.cat([m, torch.zeros(1, 3, dtype=m.dtype)])
    for mode, value in (("seq-mean-token-mean", (2.0 + 4.5) / 2), ("seq-mean-token-sum", (6 + 9) / 2),
                        ("seq-mean-token-sum-norm", 15 / (2 * 3))):
        assert agg_loss(xp, mp, mode).item() == pytest.approx(value)
        assert agg_loss(xp, mp, mode).item() == agg_loss(x, m, mode).item()


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_num_seqs_zero_or_negative_is_an_error(mode):
    x, m = torch.ones(2, 3), torch.ones(2, 3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"num_seqs={bad} must be > 0"):
            agg_loss(x, m, mode, num_seqs=bad)
    with pytest.raises(ValueError, match="norm_length=0 must be > 0"):
        agg_loss(x, m, "seq-mean-token-sum-norm", norm_length=0)


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


def test_kl_penalty_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match=r"ref_logp has shape \(2, 4\), expected \(2, 3\)"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="ref_logp must be a torch.Tensor"):
        kl_penalty(torch.zeros(2, 3), [0.0, 0.0])


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


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([5, 6, 7, 9, 10, 11])
    penalty = losses.overlong_penalty(lengths, 10, 4)           # window (6, 10]: ((10 - 4) - L) / 4
    assert penalty.dtype == torch.float32
    assert penalty.tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert [losses.default_overlong_cache(n) for n in (20480, 512, 1)] == [4096, 102, 1]


def test_overlong_penalty_by_hand():
    """L_max = 20, L_cache = 4: 0 up to 16 tokens, then -1/4 per token to -1 at 20, -1 beyond."""
    got = losses.overlong_penalty(torch.tensor([1, 10, 16, 17, 18, 19, 20, 25]), 20, 4)
    assert got.tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert losses.overlong_penalty(torch.tensor([20479, 16384, 16385]), 20480, 4096).tolist() == pytest.approx(
        [-4095 / 4096, 0.0, -1 / 4096])
    assert [losses.default_overlong_cache(n) for n in (20480, 1024, 20, 6, 1)] == [4096, 205, 4, 1, 1]


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


def test_steer_linear_mapping_with_equal_scores_is_neutral():
    """Official STEER code: when every |Omega| is equal the linear map gives (min + max) / 2 (here 1.0)."""
    omega = torch.tensor([[0.3, -0.3, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    lam = steer_weights(omega, mask, lambda_min=0.8, lambda_max=1.2, mapping="linear")
    torch.testing.assert_close(lam, torch.tensor([[1.0, 1.0, 0.0]]))
    one = steer_weights(torch.tensor([[0.7]]), torch.ones(1, 1), lambda_min=0.7, lambda_max=1.1,
                        mapping="linear")
    assert one.item() == pytest.approx(0.9)


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


def test_archer_float64_clip_range_is_exact():
    # r = 1.2 + 1e-12 on a knowledge token: clipped at 1 + 0.2 exactly when computed in float64
    logp = torch.full((1, 5), math.log(1.2 + 1e-12), dtype=torch.float64)
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0]], dtype=torch.float64)
    old, adv = torch.zeros(1, 5, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    loss, _ = archer_loss(logp, old, adv, torch.ones(1, 5), ent, kl_knowledge=0.0)
    expected = (4 * -1.2 + -(1.2 + 1e-12)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("name", ["grpo", "dapo", "drgrpo"])
def test_wrong_shape_entropy_names_the_argument(name):
    b = random_batch(B=4, T=7)
    with pytest.raises(ValueError, match=r"entropy has shape \(4, 6\)"):
        call(name, dict(b, entropy=b["entropy"][:, :6]))


# ------------------------------------------------------------- ASPO, CE-GPPO and GPPO
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




def test_aspo_negative_tokens_are_grpo_with_a_soft_dual_clip():
    """For A < 0 ASPO is PPO's clipped ratio: its value equals grpo_loss with verl's hard dual clip c, and
    so does its gradient except past c, where ASPO keeps -A c / N (verl's: 0). Without a dual clip the
    A < 0 rows are grpo_loss exactly."""
    b = ratio_random_batch(spread=1.5)
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
    b = ratio_random_batch()
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
    r = ratio_random_batch(spread=1.5, dtype=dtype)
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
    b = ratio_random_batch(spread=1.5, dtype=dtype)
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



# ------------------------------------------------------------------------------- GSPO, CISPO and SAPO
E = math.exp(0.01)                     # the sequence ratio of a response whose every log-ratio is 0.01
GSPO_LOG_RATIOS = [[0.1, -0.1, 0.0],   # A > 0, s = 1: inside [1 - 3e-4, 1 + 4e-4]
                   [0.01] * 3,         # A > 0, s = e^0.01 > 1 + 4e-4: clipped, no gradient
                   [0.01, 0.01, 0.0],  # A < 0, s = e^0.01 (the last token is padding): not clipped
                   [-0.01] * 3]        # A < 0, s = e^-0.01 < 1 - 3e-4: clipped
GSPO_ADV = [1.5, 1.5, -2.0, -2.0]


def gspo_batch(dtype, adv=GSPO_ADV):
    b = ratio_batch([[math.exp(x) for x in row] for row in GSPO_LOG_RATIOS], adv, dtype, entropy_row=[1.0] * 3)
    b["mask"][2, 2] = 0
    return b


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_gspo_every_case_by_hand(name, dtype, tol):
    """seq-mean-token-mean over B = 4 rows: the value is the mean of the rows' -A s_i (clipped s where the
    clip binds); the gradient of token t of an unclipped row is -A s_i / (|y_i| B), of a clipped row 0."""
    b = gspo_batch(dtype)
    loss, g, m = value_and_grad(LOSSES[name], b)
    rows = [-1.5 * 1.0, -1.5 * (1 + 4e-4), 2.0 * E, 2.0 * (1 - 3e-4)]
    assert loss.dtype == dtype and loss.item() == pytest.approx(sum(rows) / 4, rel=tol)
    expected = torch.tensor([[-1.5 / 3 / 4] * 3, [0.0] * 3, [2.0 * E / 2 / 4] * 2 + [0.0], [0.0] * 3],
                            dtype=torch.float64)
    torch.testing.assert_close(g.double(), expected, rtol=tol, atol=tol)
    assert m["clip_frac_high"] == pytest.approx(3 / 11) and m["clip_frac_low"] == pytest.approx(3 / 11)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_gspo_token_takes_per_token_advantages_the_sequence_form_their_sum(dtype, tol):
    """GSPO-token's gradient is -A_t s_i / (|y_i| B) per token; the sequence form's is the row's sum of
    -A_u over its tokens, times s_i / (|y_i|^2 B): equal for one advantage per response."""
    b = gspo_batch(dtype)
    b["advantages"] = torch.tensor([[1.0, -1.0, 2.0]] + [[1.5] * 3] + [[-2.0] * 3] * 2, dtype=dtype)
    _, g_token, _ = value_and_grad(LOSSES["gspo_token"], b)
    _, g_seq, _ = value_and_grad(LOSSES["gspo"], b)
    torch.testing.assert_close(g_token[0].double(), torch.tensor([-1.0, 1.0, -2.0], dtype=torch.float64) / 12,
                               rtol=tol, atol=tol)
    torch.testing.assert_close(g_seq[0].double(), torch.full((3,), -2.0 / 36, dtype=torch.float64), rtol=tol,
                               atol=tol)
    b = gspo_batch(dtype)
    assert torch.allclose(value_and_grad(LOSSES["gspo"], b)[1], value_and_grad(LOSSES["gspo_token"], b)[1],
                          rtol=tol, atol=tol)


CISPO_RATIOS = [[0.5, 1.0, 1.5, 3.0, 6.0]] * 2


@pytest.mark.parametrize("name, knobs, weight", [
    ("cispo", {}, [0.5, 1.0, 1.2, 1.2, 1.2]),                           # cap 1 + eps_high, no lower bound
    ("cispo", {"clip_low": 0.2}, [0.8, 1.0, 1.2, 1.2, 1.2]),             # verl's default config
    ("cispo_trl", {}, [0.5, 1.0, 1.5, 3.0, 5.0])])                       # TRL's cap: epsilon_high = 5
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_cispo_every_case_by_hand(name, knobs, weight, dtype, tol):
    """value -sg(clip(r)) A log pi per token, gradient -clip(r) A / N: every token keeps a gradient."""
    b = ratio_batch(CISPO_RATIOS, [A_POS, A_NEG], dtype, entropy_row=[1.0] * 5)
    loss, g, m = value_and_grad(LOSSES[name], b, **knobs)
    logp = b["logp"].detach().double()
    values = [[-w * a * lp for w, lp in zip(weight, row.tolist())] for a, row in zip((A_POS, A_NEG), logp)]
    check(loss, g, values, [[-w * a for w in weight] for a in (A_POS, A_NEG)], dtype, tol)
    capped = sum(r > 1.2 for r in CISPO_RATIOS[0]) if name == "cispo" else 1
    assert m["clip_frac_high"] == pytest.approx(2 * capped / 10)
    assert m["clip_frac_low"] == pytest.approx(2 / 10 if "clip_low" in knobs else 0.0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_sapo_every_case_by_hand(dtype, tol):
    """f(r) = sigma(tau (r - 1)) 4 / tau with tau 1.0 for A > 0 and 1.05 for A < 0; value -f(r) A, gradient
    d/dlog pi = -A r f'(r) = -4 A r sigma (1 - sigma): -A at r = 1 (the value there -2 A / tau); seq-mean-
    token-mean (rows of equal length: the token mean)."""
    ratios = [[1.0, 1.5, 0.5, 3.0]] * 2
    b = ratio_batch(ratios, [A_POS, A_NEG], dtype, entropy_row=[1.0] * 4)
    loss, g, m = value_and_grad(LOSSES["sapo"], b)
    values, weights = [], []
    for a, tau in ((A_POS, 1.0), (A_NEG, 1.05)):
        sig = [sigmoid(tau * (r - 1)) for r in ratios[0]]
        values.append([-a * 4 * s / tau for s in sig])
        weights.append([-a * 4 * r * s * (1 - s) for r, s in zip(ratios[0], sig)])
    assert values[0][0] == -2 * A_POS and weights[1][0] == -A_NEG
    check(loss, g, values, weights, dtype, tol)
    assert m["clip_frac_low"] == m["clip_frac_high"] == 0.0


# ------------------------------------------------------------------------------------------------ ERC
RHO = [1.0, 1.04, 1.06, 0.94, 0.96, 1.051]          # H / H_old: inside (0.95, 1.05) or not
INSIDE = [True, True, False, False, True, False]


def erc_batch(dtype):
    b = ratio_batch([[1.1, 0.5, 1.5, 1.0, 1.3, 0.9]] * 2, [A_POS, A_NEG], dtype, entropy_row=[0.7] * 6)
    b["current_entropy"] = b["entropy"] * torch.tensor(RHO, dtype=dtype)
    return b


@pytest.mark.parametrize("name, base", [("erc_dapo", "dapo"), ("erc_gppo", "gppo")])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_erc_keeps_the_value_and_removes_the_gradient_outside_the_band(name, base, dtype, tol):
    b = erc_batch(dtype)
    loss, g, m = value_and_grad(LOSSES[name], b)
    kw = {"clip_high": 0.2} if base == "gppo" else {}                # GPPO-ERC's released clip: 0.2 / 0.2
    base_loss, base_g, _ = value_and_grad(LOSSES[base], {k: v for k, v in b.items() if k != "current_entropy"},
                                          **kw)
    assert loss.item() == pytest.approx(base_loss.item(), rel=tol)    # the value of DAPO (GPPO)
    inside = torch.tensor([INSIDE] * 2)
    torch.testing.assert_close(g, torch.where(inside, base_g, 0.0), rtol=tol, atol=tol)
    assert (base_g[~inside] != 0).any() and m["erc_frac"] == pytest.approx(3 / 6)


@pytest.mark.parametrize("name, base", [("erc_dapo", "dapo"), ("erc_gppo", "gppo")])
def test_erc_on_the_first_mini_batch_is_its_base_loss(name, base):
    """H = H_old before the first update (rho = 1): ERC is DAPO (GPPO) to the last bit."""
    b = ratio_random_batch(spread=1.5)
    b["current_entropy"] = b["entropy"].clone()
    kw = {"clip_high": 0.2} if base == "gppo" else {}
    one = grads(LOSSES[name], b)
    other = grads(LOSSES[base], {k: v for k, v in b.items() if k != "current_entropy"}, **kw)
    assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])


# ----------------------------------------------------------------------------------------- Clip_B, Clip_V
def gate_batch(rows, T, dtype=torch.float64):
    """rows x T tokens with pi_a = 1/2 everywhere and H = log 2 (S = pi_a (log pi_a + H) = 0), S2 = 0 (so
    x = S2 - S = 0); the tests set S and x token by token through H and S2. A = (1.5, -2, 0, ...)."""
    lp = torch.full((rows, T), math.log(0.5), dtype=dtype)
    adv = torch.tensor([A_POS, A_NEG, 0.0][:rows], dtype=dtype)
    return dict(logp=lp.clone().requires_grad_(True), old_logp=lp, advantages=adv, mask=torch.ones(rows, T),
                entropy=torch.full((rows, T), math.log(2), dtype=dtype), exact_term=torch.zeros(rows, T, dtype=dtype))


@pytest.mark.parametrize("row, dropped", [(1, True), (0, False)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_clip_b_drops_the_negative_outlier_of_s_and_renormalises(row, dropped, dtype, tol):
    """20 tokens, S = 0 but one S = -1 (H lowered by 2): mean -0.05, population std sqrt(0.0475) = 0.218;
    the outlier's centred S, -0.95, is below -2.5 std = -0.545, so it is dropped where A < 0 (row 1),
    kept where A > 0 (row 0). The loss is GRPO's token mean over the kept tokens (r = 1: -A / 19)."""
    b = gate_batch(2, 10, dtype)
    b["entropy"][row, 3] -= 2.0
    loss, g, m = value_and_grad(LOSSES["clip_b"], b)
    n = 19 if dropped else 20
    assert loss.item() == pytest.approx((10 * -A_POS + (9 if dropped else 10) * -A_NEG) / n, rel=tol)
    expected = torch.tensor([[-A_POS] * 10, [-A_NEG] * 10], dtype=torch.float64) / n
    if dropped:
        expected[1, 3] = 0.0
    torch.testing.assert_close(g.double(), expected, rtol=tol, atol=tol)
    assert m["gate_frac"] == pytest.approx(1 / 20 if dropped else 0.0)
    stats = losses.batch_statistics("clip_b", mask=b["mask"], advantages=b["advantages"], old_logp=b["old_logp"],
                                    entropy=b["entropy"])
    assert stats["num_tokens"] == n and int(stats["dropped"].sum()) == int(dropped)


def clip_v_case(max_frac):
    """3 rows x 40 tokens (A > 0, < 0, = 0); x = 1.0 at (0, 0), (1.0, 0.9, 0.8) at (1, 0..2), 0.95 at (2, 0):
    population std 0.186, so with mu = 2 every outlier is above 2 std."""
    b = gate_batch(3, 40)
    b["exact_term"][0, 0], b["exact_term"][2, 0] = 1.0, 0.95
    b["exact_term"][1, :3] = torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64)
    return losses.clip_v_select(b["old_logp"], b["advantages"], b["mask"], b["entropy"], b["exact_term"], mu=2.0,
                                max_frac=max_frac)


@pytest.mark.parametrize("max_frac, dropped", [
    (1e-4, [(1, 0), (2, 0)]),                  # K = max(1, int(0.012)) = 1 of the A < 0 tokens: the largest x
    (0.02, [(1, 0), (1, 1), (2, 0)]),          # K = int(2.4) = 2
    (0.05, [(1, 0), (1, 1), (1, 2), (2, 0)])])  # 4 dropped <= 0.05 x 120: no cap
def test_clip_v_drops_non_positive_advantages_above_mu_std_capped_among_negatives(max_frac, dropped):
    """A > 0 tokens are always kept; A = 0 tokens above the cut are dropped whatever max_frac (the authors'
    ClipVAdvantageFn); A < 0 ones are cut to the K largest x once more than max_frac of the tokens go."""
    chosen = clip_v_case(max_frac)
    assert sorted(map(tuple, chosen.nonzero().tolist())) == dropped


def test_clip_v_default_mu_drops_one_outlier_in_a_hundred_tokens_and_paper_form_scores_differently():
    """mu = 8.5: one x = 1 among 100 tokens (std 0.0995, 8.5 std = 0.846) is dropped where A < 0; two are not
    (std 0.14, 8.5 std = 1.19). The paper form scores x = -(1 - pi_a)^2 (log pi_a + H) instead."""
    b = gate_batch(2, 50)
    b["exact_term"][1, 7] = 1.0
    loss, g, m = value_and_grad(LOSSES["clip_v"], b)
    assert m["gate_frac"] == pytest.approx(1 / 100) and g[1, 7] == 0 and loss.item() == pytest.approx(
        (50 * -A_POS + 49 * -A_NEG) / 99)
    b["exact_term"][1, 8] = 1.0
    assert value_and_grad(LOSSES["clip_v"], b)[2]["gate_frac"] == 0.0
    b = gate_batch(2, 50)
    b["entropy"][1, 7] -= 4.0                  # paper x = -(1/4)(-4) = 1 there, 0 elsewhere; exact x = 2 there
    paper = losses.clip_v_select(b["old_logp"], b["advantages"], b["mask"], b["entropy"], form="paper")
    exact = losses.clip_v_select(b["old_logp"], b["advantages"], b["mask"], b["entropy"], b["exact_term"])
    assert paper.nonzero().tolist() == exact.nonzero().tolist() == [[1, 7]]
    with pytest.raises(losses.KnobError, match="needs exact_term"):
        losses.clip_v_select(b["old_logp"], b["advantages"], b["mask"], b["entropy"])


@pytest.mark.parametrize("name", ["clip_b", "clip_v"])
def test_gates_micro_batch_exactly_with_the_batch_choice(name):
    """The whole batch's choice and kept-token count (batch_statistics) make the micro-batches' losses and
    gradients add up to the whole batch's; without them, a micro-batch's own choice differs."""
    b = gate_batch(3, 40)
    b["entropy"][1, 5] -= 2.0
    b["exact_term"][1, 5] = 1.0
    kw = {"mu": 2.0} if name == "clip_v" else {}
    keys = ("old_logp", "advantages", "mask", "entropy", "exact_term")
    stats = losses.batch_statistics(name, **{k: b[k] for k in keys if k != "exact_term" or name == "clip_v"}, **kw)
    assert int(stats["dropped"].sum()) == 1
    whole_loss, whole_g = grads(LOSSES[name], b, **kw)
    total, parts = 0.0, []
    for rows in ([0], [1, 2]):
        part = {k: v[rows] for k, v in b.items()}
        extra = {k: (v[rows] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in stats.items()}
        loss, g = grads(LOSSES[name], part, **extra, **kw)
        total, parts = total + loss.item(), parts + [g]
    assert total == pytest.approx(whole_loss.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(parts), whole_g, rtol=1e-12, atol=1e-15)


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
    b = ratio_random_batch(B=8, T=9, seed=seed, spread=2.0)
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
    b = ratio_random_batch(B=8, T=9, seed=3, spread=2.0)
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


def verl_actor_config(**kw):
    """verl's ActorConfig as its policy losses read it (a global batch of this test's rows)."""
    from verl.workers.config import ActorConfig
    verl_core_algos()
    return ActorConfig(strategy="fsdp", ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=8, rollout_n=1, **kw)


@pytest.mark.parametrize("name, verl_name, knobs, config", [
    ("gspo_token", "gspo", {}, dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)),
    ("gspo_token", "gspo", {"clip_low": 0.1, "clip_high": 0.2}, dict(clip_ratio_low=0.1, clip_ratio_high=0.2)),
    ("cispo", "cispo", {"clip_low": 0.2, "clip_high": 0.2}, dict(clip_ratio_low=0.2, clip_ratio_high=0.2)),
    ("sapo", "sapo", {}, dict(tau_pos=1.0, tau_neg=1.05)),
    ("sapo", "sapo", {"tau_pos": 0.5, "tau_neg": 2.0}, dict(tau_pos=0.5, tau_neg=2.0))])
@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_cispo_sapo_match_verls_own_losses(name, verl_name, knobs, config, seed):
    """verl 0.9.1's compute_policy_loss_<name> (its registry: gspo is the token form) on the same batch,
    seq-mean-token-mean (token-mean for CISPO): value and gradient to float64 precision, up to verl's 1e-8
    added to each response's token count (relative 1e-8 / |y|). Log-ratios within +-3, sequence means within
    verl's one-sided clamp at 10 (here +-20)."""
    core_algos = verl_core_algos()
    b = ratio_random_batch(B=8, T=9, seed=seed, spread=0.02 if name == "gspo_token" else 1.0)
    b["logp"][3] = b["old_logp"][3] + 0.5                             # a sequence far off: clipped
    agg = "token-mean" if name == "cispo" else "seq-mean-token-mean"
    adv = b["advantages"][:, None].expand_as(b["mask"]) * b["mask"]
    logp_t = b["logp"].clone().requires_grad_(True)
    theirs, _ = core_algos.get_policy_loss_fn(verl_name)(
        old_log_prob=b["old_logp"], log_prob=logp_t, advantages=adv, response_mask=b["mask"].double(),
        loss_agg_mode=agg, config=verl_actor_config(**config))
    (g_theirs,) = torch.autograd.grad(theirs, logp_t)
    mine, g_mine = grads(LOSSES[name], b, agg=agg, **knobs)
    torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-8, atol=1e-15)
    assert g_mine.abs().max() > 1e-3


def test_gspo_sequence_form_matches_verls_gradient():
    """The sequence form has verl's GSPO-token gradient when each response has one advantage."""
    core_algos = verl_core_algos()
    b = ratio_random_batch(B=8, T=9, seed=4, spread=0.02)
    adv = b["advantages"][:, None].expand_as(b["mask"]) * b["mask"]
    logp_t = b["logp"].clone().requires_grad_(True)
    theirs, _ = core_algos.get_policy_loss_fn("gspo")(
        old_log_prob=b["old_logp"], log_prob=logp_t, advantages=adv, response_mask=b["mask"].double(),
        loss_agg_mode="seq-mean-token-mean", config=verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4))
    (g_theirs,) = torch.autograd.grad(theirs, logp_t)
    mine, g_mine = grads(LOSSES["gspo"], b)
    torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-8, atol=1e-15)


def erc_config(clip_high):
    from omegaconf import OmegaConf
    return OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=clip_high, clip_ratio_c=10.0,
                                 tis_imp_ratio_cap=0.0, entropy_mask_low=0.95, entropy_mask_high=1.05))


@pytest.mark.parametrize("name, theirs_name, clip_high", [("erc_dapo", "compute_policy_loss_grpo_erc", 0.28),
                                                          ("erc_gppo", "compute_policy_loss_gppo_erc", 0.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_erc_matches_the_authors_grpo_erc_and_gppo_erc(name, theirs_name, clip_high, seed):
    """Kwai-Klear/ERC's compute_policy_loss_{grpo,gppo}_erc (ERC_CORE_ALGOS, their core_algos.py) with the
    released scripts' band (0.95, 1.05), clip 0.2 / 0.28 (DAPO) or 0.2 / 0.2 (GPPO), dual clip 10: value
    and gradient to float precision once their masked_mean's denominator (mask sum + 1e-8) is undone. GPPO's
    log-ratios within +-20: past their clamp, r / sg(r) has no gradient (as for CE-GPPO above)."""
    theirs_mod = authors_module("ERC_CORE_ALGOS")
    b = authors_batch(seed) if name == "erc_dapo" else ratio_random_batch(B=8, T=9, seed=3 + seed, spread=2.0)
    g = torch.Generator().manual_seed(seed)
    b["current_entropy"] = b["entropy"] * (1 + 0.1 * torch.randn(b["entropy"].shape, generator=g,
                                                                  dtype=torch.float64))
    adv = b["advantages"][:, None].expand_as(b["mask"]) * b["mask"]
    logp_t = b["logp"].clone().requires_grad_(True)
    theirs, _, _, inside_frac = getattr(theirs_mod, theirs_name)(
        old_log_prob=b["old_logp"], log_prob=logp_t, old_entropy=b["entropy"], entropy=b["current_entropy"],
        advantages=adv, response_mask=b["mask"].double(), loss_agg_mode="token-mean", config=erc_config(clip_high))
    (g_theirs,) = torch.autograd.grad(theirs, logp_t)
    mine, g_mine = grads(LOSSES[name], b)
    _, metrics = LOSSES[name](**b)
    scale = (b["mask"].double().sum() + 1e-8) / b["mask"].double().sum()   # their masked_mean's denominator
    torch.testing.assert_close(mine, theirs * scale, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g_mine, g_theirs * scale, rtol=1e-13, atol=1e-18)
    assert 0.2 < metrics["erc_frac"] < 0.8 and metrics["erc_frac"] == pytest.approx(1 - inside_frac.item())


def trinity_advantage_fn(file_name, class_name):
    """Trinity-RFT's advantage function class from TRINITY_ADVANTAGE_FN_DIR (a folder holding the authors'
    trinity/algorithm/advantage_fn/<file_name>), its one import (the AdvantageFn base) stood in for."""
    import sys
    import types
    folder = os.environ.get("TRINITY_ADVANTAGE_FN_DIR")
    if not folder:
        pytest.skip("TRINITY_ADVANTAGE_FN_DIR is not set (Trinity-RFT's trinity/algorithm/advantage_fn)")
    base = types.ModuleType("trinity.algorithm.advantage_fn.advantage_fn")
    base.AdvantageFn = type("AdvantageFn", (), {})
    names = ["trinity", "trinity.algorithm", "trinity.algorithm.advantage_fn"]
    stubs = {n: sys.modules.get(n) or types.ModuleType(n) for n in names}
    saved = {n: sys.modules.get(n) for n in names + [base.__name__]}
    sys.modules.update(stubs, **{base.__name__: base})
    try:
        spec = importlib.util.spec_from_file_location(f"trinity_{file_name[:-3]}", os.path.join(folder, file_name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return getattr(module, class_name)


def trinity_batch(seed, T=30):
    """8 groups of 4 responses (float32, as their filters compute), lengths 10..T, rewards 0 / 1, a
    behaviour policy from random logits over 7 tokens (log pi, H and S2 consistent)."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(seed)
    rows = 32
    logits = torch.randn(rows, T, 7, generator=g) * 3
    tokens = torch.randint(0, 7, (rows, T), generator=g)
    old_logp, entropy, s2 = logprobs.token_stats(logits, tokens)
    lengths = torch.randint(10, T + 1, (rows,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()
    rewards = torch.zeros(rows, T)
    rewards[torch.arange(rows), lengths - 1] = torch.randint(0, 2, (rows,), generator=g).float()
    exps = SimpleNamespace(batch={"token_level_rewards": rewards, "response_mask": mask.clone(),
                                  "old_log_probs": old_logp, "rollout_log_probs": old_logp, "entropys": entropy,
                                  "necs": s2},
                           non_tensor_batch={"uid": [i // 4 for i in range(rows)]})
    return exps, mask


@pytest.mark.parametrize("name, file_name, class_name, knobs", [
    ("clip_b", "clipb_advantage.py", "ClipBAdvantageFn", {"mu": 2.5}),
    ("clip_b", "clipb_advantage.py", "ClipBAdvantageFn", {"mu": 1.0}),
    ("clip_v", "clipv_advantage.py", "ClipVAdvantageFn", {"mu": 8.5, "max_frac": 1e-4}),
    ("clip_v", "clipv_advantage.py", "ClipVAdvantageFn", {"mu": 1.0, "max_frac": 1e-4}),
    ("clip_v", "clipv_advantage.py", "ClipVAdvantageFn", {"mu": 1.0, "max_frac": 0.5})])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_b_and_clip_v_drop_the_tokens_the_authors_functions_drop(name, file_name, class_name, knobs, seed):
    """Trinity-RFT's ClipBAdvantageFn / ClipVAdvantageFn (pinned in docs/losses.md) on the same batch: the
    response mask they leave is the mask without batch_statistics' dropped tokens, token for token."""
    fn = trinity_advantage_fn(file_name, class_name)(**knobs)
    exps, mask = trinity_batch(seed)
    exps, _ = fn(exps)
    stats = losses.batch_statistics(name, mask=mask, advantages=exps.batch["advantages"],
                                    old_logp=exps.batch["old_log_probs"], entropy=exps.batch["entropys"],
                                    exact_term=exps.batch["necs"], **knobs)
    theirs_dropped = (mask > 0) & (exps.batch["response_mask"] == 0)
    assert torch.equal(stats["dropped"], theirs_dropped)
    assert stats["num_tokens"] == exps.batch["response_mask"].sum().item()
    if knobs["mu"] < 2:                                  # the defaults drop nothing on so small a batch
        assert theirs_dropped.any()



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
    b = intervention_batch(B=2, T=3, V=17, seed=2)
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
    b = intervention_batch()
    alpha, _ = losses.entropy_control_step(losses.entropy_control_init(), 0.05)
    a, _ = run_intervention("adaptive_entropy", b, coef=alpha)
    e, _ = run_intervention("entropy_bonus", b, coef=0.005)
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
    b = intervention_batch(B=6, T=5, seed=4)
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
    b = intervention_batch(B=4, T=6, seed=12)
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
    own, _ = run_intervention("clip_cov", dict(b, logp=logp), clip_low=1.0, clip_high=1.0)   # its own draw, via LOSSES
    assert torch.isfinite(own)
    with pytest.raises(ValueError, match=r"clip_low=1.5 must be in \[0, 1\]"):
        run_intervention("clip_cov", b, clip_low=1.5)
    with pytest.raises(ValueError, match=r"clip_low=1.0 must be in \[0, 1\)"):    # the other PPO losses
        run_intervention("forking", b, clip_low=1.0)


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
    b = intervention_batch(seed=6)
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
    b = intervention_batch(seed=11)
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
    b = intervention_batch(B=6, T=7, seed=11)
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


def test_loss_weights_are_minus_the_gradient_backward_would_leave_on_logp():
    b = random_batch()
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = call("grpo", b, logp=logp)
    w = losses.loss_weights(loss, logp)
    loss.backward()                                      # the graph was retained for the trainer's backward
    assert torch.equal(w, -logp.grad) and w.abs().sum() > 0
    unused = torch.zeros(2, 3, requires_grad=True)
    assert torch.equal(losses.loss_weights((2 * logp).sum(), unused), torch.zeros(2, 3))   # unused does not reach it


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


@pytest.mark.parametrize("n", [1, 2, 7, 1001])
def test_the_quantile_by_selection_is_torch_quantile(n):
    """STEER's weight_p05 metric: two kthvalue selections give torch.quantile's linear interpolation."""
    x = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    for q in (0.0, 0.05, 0.5, 0.999, 1.0):
        assert losses._quantile(x, q).item() == pytest.approx(x.quantile(q).item(), abs=1e-15), (n, q)
