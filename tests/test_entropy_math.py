"""Tests for entropy_math.py: the sympy identities, finite differences against every closed form, the error
slope, the four-quadrant sign table and the numerical edge cases. Budget: under 30 s on 2 CPU cores."""
import math

import pytest
import torch

import entropy_math as em

NEG_INF = float("-inf")


def _states(n=64, vocab=20, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return em.random_states(n, vocab, generator=gen, dtype=dtype)


def _probs_to_state(probs, token, weight=1.0):
    probs = torch.tensor([probs], dtype=torch.float64)
    return probs.log(), torch.tensor([token]), torch.tensor([weight], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- sympy
def test_derive_proves_exact_covariance_and_sampled_forms():
    import sympy as sp

    d = em.derive(3)
    assert d.gradient_residual == [0, 0, 0]
    assert d.exact_residual == 0
    assert d.covariance_residual == 0
    assert d.sampled_residual == 0
    assert d.paper_is_derivative is False
    p, H, w, eta = d.symbols["p"], d.symbols["H"], d.symbols["w"], d.symbols["eta"]
    others = sum(p[b] ** 2 * (sp.log(p[b]) + H) for b in (1, 2))           # sampled token a = 0
    assert sp.expand(d.missing_sampled - eta * w * others) == 0
    paper_gap = eta * w * (others - p[0] ** 2 * (1 - p[0]) * (sp.log(p[0]) + H))
    assert sp.expand(d.missing_paper - paper_gap) == 0
    assert sp.expand(d.missing_paper) != 0


def test_derive_rejects_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        em.derive(1)


# ------------------------------------------------------------------------------------ finite differences
def test_entropy_gradient_matches_closed_form():
    logits, _, _ = _states(8, 13)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(em.entropy(z).sum(), z)
    logp = torch.log_softmax(logits, -1)
    H = em.entropy(logits)[:, None]
    torch.testing.assert_close(grad, -logp.exp() * (logp + H), rtol=1e-10, atol=1e-12)   # dH/dz_b


def test_exact_and_covariance_match_realised_change_to_second_order():
    logits, token, weight = _states(64, 20)
    err = {}
    for lr in (1e-3, 1e-4):
        true = em.entropy_change_true(logits, token, weight, lr)
        exact = em.dh_exact(logits, token, weight, lr)
        torch.testing.assert_close(em.dh_covariance(logits, token, weight, lr), exact, rtol=1e-10, atol=1e-18)
        err[lr] = (exact - true).abs()
        assert float(err[lr].sum() / true.abs().sum()) < 5 * lr            # relative error O(lr)
    ratio = err[1e-3].sum() / err[1e-4].sum()                              # O(lr^2): 10x smaller lr, 100x
    assert 80 < float(ratio) < 120
    # central difference of the realised change is the first-order coefficient to O(lr^2)
    lr = 1e-4
    central = (em.entropy_change_true(logits, token, weight, lr)
               - em.entropy_change_true(logits, token, weight, -lr)) / (2 * lr)
    torch.testing.assert_close(central, em.dh_exact(logits, token, weight, 1.0), rtol=1e-6, atol=1e-10)


def test_sampled_logit_form_matches_its_own_step_but_not_the_full_step():
    logits, token, weight = _states(64, 20)
    lr = 1e-4
    est = em.dh_sampled_logit(logits, token, weight, lr)
    own = em.entropy_change_true(logits, token, weight, lr, step="sampled")
    full = em.entropy_change_true(logits, token, weight, lr)
    assert float((est - own).abs().sum() / own.abs().sum()) < 5 * lr
    assert float((est - full).abs().sum() / full.abs().sum()) > 0.05        # it misses the other tokens' terms


def test_paper_form_is_an_approximation():
    logits, token, weight = _states(64, 20)
    lr = 1e-4
    full = em.entropy_change_true(logits, token, weight, lr)
    own = em.entropy_change_true(logits, token, weight, lr, step="sampled")
    paper = em.dh_paper(logits, token, weight, lr)
    assert float((paper - full).abs().sum() / full.abs().sum()) > 0.05
    assert float((paper - own).abs().sum() / own.abs().sum()) > 0.05
    # it differs from the sampled-logit form by exactly one factor (1 - pi_a) and keeps its sign
    pi_a = torch.softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
    torch.testing.assert_close(paper, em.dh_sampled_logit(logits, token, weight, lr) * (1 - pi_a))


def test_error_slope_is_two_for_exact_forms_and_one_for_approximations():
    logits, token, weight = _states(200, 30)
    lrs = (1e-1, 1e-2, 1e-3, 1e-4)
    conv = em.error_convergence(logits, token, weight, lrs)
    for name in ("exact", "covariance", "sampled_logit_own_step"):
        assert 1.9 < em.loglog_slope(lrs, conv[name]["abs"]) < 2.1, name
    for name in ("sampled_logit", "paper"):
        assert 0.9 < em.loglog_slope(lrs, conv[name]["abs"]) < 1.1, name
    assert conv["exact"]["rel"][-1] < 1e-3


def test_loglog_slope():
    assert em.loglog_slope([1, 10, 100], [3, 300, 30000]) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------- sign and stats
def test_sign_quadrants_on_constructed_states():
    # token 0 likely (0.6 > exp(-H)), token 2 unlikely; four states, one per quadrant
    probs = [0.6, 0.3, 0.1]
    logits = torch.tensor([probs] * 4, dtype=torch.float64).log()
    token = torch.tensor([0, 2, 0, 2])
    weight = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    change = em.entropy_change_true(logits, token, weight, 1e-3)
    assert torch.equal(torch.sign(change), torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    rows = em.sign_quadrants(logits, token, weight, change)
    assert [(r[1], r[2], r[3]) for r in rows] == [(-1, 1, 1.0), (1, 1, 1.0), (1, 1, 1.0), (-1, 1, 1.0)]


def test_quadrant_rule_fails_when_a_more_likely_token_dominates():
    # a likely token (0.3 > exp(-H) = 0.276) next to a dominant one: A > 0 RAISES entropy (mass is taken
    # from the dominant token); the exact form gets the sign right, the two paper forms do not
    probs = [0.3, 0.6] + [0.1 / 50] * 50
    logits, token, weight = _probs_to_state(probs, 0, 1.0)
    lr = 1e-3
    change = em.entropy_change_true(logits, token, weight, lr)
    assert float(change) > 0
    rows = em.sign_quadrants(logits, token, weight, change)
    assert rows[0][2] == 1 and rows[0][3] == 0.0                      # "A > 0, likely" predicted lower H
    assert float(em.dh_exact(logits, token, weight, lr)) > 0
    assert float(em.dh_sampled_logit(logits, token, weight, lr)) < 0
    assert float(em.dh_paper(logits, token, weight, lr)) < 0


def test_pearson_spearman_sign_agreement():
    x = torch.linspace(0.1, 3.0, 50, dtype=torch.float64)
    assert em.spearman(x, x.exp()) == pytest.approx(1.0)
    assert em.pearson(x, x.exp()) < 0.95
    assert em.spearman(x, -x ** 3) == pytest.approx(-1.0)
    assert em.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert em.sign_agreement(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0])) == pytest.approx(2 / 3)


def test_resolvable_drops_changes_below_rounding():
    logits = torch.tensor([[40.0, 0.0], [1.0, 0.0]], dtype=torch.float64)   # first is one-hot in float64
    token, weight = torch.tensor([0, 0]), torch.ones(2, dtype=torch.float64)
    change = em.entropy_change_true(logits, token, weight, 1e-3)
    assert em.resolvable(change, logits).tolist() == [False, True]


# ---------------------------------------------------------------------------------- dtypes and edge cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    logits64, token, weight64 = _states(64, 20)
    logits, weight = logits64.to(dtype), weight64.to(dtype)
    assert em.entropy(logits).dtype == dtype
    torch.testing.assert_close(em.entropy(logits).double(), em.entropy(logits64), rtol=1e-5, atol=1e-5)
    lr = 1e-2
    true = em.entropy_change_true(logits, token, weight, lr)
    for name, fn in em.ESTIMATES.items():
        est = fn(logits, token, weight, lr)
        assert est.dtype == dtype and est.shape == (64,) and torch.isfinite(est).all(), name
        torch.testing.assert_close(est.double(), fn(logits64, token, weight64, lr), rtol=1e-3, atol=1e-7)
    exact = em.dh_exact(logits, token, weight, lr)
    assert float((exact - true).abs().sum() / true.abs().sum()) < 0.05       # O(lr) in either dtype
    torch.testing.assert_close(em.dh_covariance(logits, token, weight, lr), exact,
                               rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_logits(dtype):
    logits, token, weight = _states(16, 6, dtype=dtype)
    token = token % 4                                            # sampled tokens among the first four
    masked = torch.cat([logits[:, :4], torch.full((16, 3), NEG_INF, dtype=dtype)], dim=1)
    masked = masked[:, [0, 4, 1, 2, 5, 3, 6]]                    # interleave the masked columns
    token_m = torch.tensor([0, 2, 3, 5])[token]                  # same tokens, new positions
    H = em.entropy(masked)
    assert torch.isfinite(H).all()
    torch.testing.assert_close(H, em.entropy(logits[:, :4]))     # masked tokens contribute nothing
    lr = 1e-2
    for name, fn in em.ESTIMATES.items():
        est = fn(masked, token_m, weight, lr)
        assert torch.isfinite(est).all(), name
        torch.testing.assert_close(est, fn(logits[:, :4], token, weight, lr), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(em.entropy_change_true(masked, token_m, weight, lr),
                               em.entropy_change_true(logits[:, :4], token, weight, lr), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="masked"):
        em.dh_exact(masked, torch.full((16,), 1), weight, lr)   # column 1 is -inf
    with pytest.raises(ValueError, match="entirely -inf"):
        em.entropy(torch.full((2, 3), NEG_INF, dtype=dtype))


def test_vocab_one_and_two():
    logits, token, weight = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.long), \
        torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert em.entropy(logits).tolist() == [0.0, 0.0, 0.0]
    assert em.entropy_change_true(logits, token, weight, 0.1).abs().max() == 0
    for fn in em.ESTIMATES.values():
        assert fn(logits, token, weight, 0.1).abs().max() == 0
    # V = 2: sum_b pi_b (l_b + H) = 0, so the other token's term equals the sampled one: exact = 2 x sampled
    assert float(em.entropy(torch.zeros(1, 2, dtype=torch.float64))) == pytest.approx(math.log(2))
    logits2, token2, weight2 = _states(32, 2)
    torch.testing.assert_close(em.dh_exact(logits2, token2, weight2, 1e-3),
                               2 * em.dh_sampled_logit(logits2, token2, weight2, 1e-3))
    lr = 1e-4
    true = em.entropy_change_true(logits2, token2, weight2, lr)
    keep = em.resolvable(true, logits2)
    assert int(keep.sum()) > 16
    exact = em.dh_exact(logits2, token2, weight2, lr)
    assert float((exact - true)[keep].abs().sum() / true[keep].abs().sum()) < 5 * lr


def test_one_hot_distributions():
    logits = torch.tensor([[0.0, NEG_INF, NEG_INF], [1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    H = em.entropy(logits)
    assert H[:2].tolist() == [0.0, 0.0] and float(H[2]) == pytest.approx(math.log(3))
    token, weight = torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    for fn in [*em.ESTIMATES.values(), em.entropy_change_true]:
        out = fn(logits, token, weight, 0.1)
        assert torch.isfinite(out).all() and out[:2].abs().max() == 0
    # an off-peak token of a one-hot state: first order is still finite (pi_a = 0 kills every term)
    est = em.dh_paper(logits[1:2], torch.tensor([1]), weight[:1], 0.1)
    assert torch.isfinite(est).all() and float(est) == 0.0


def test_shapes_and_errors():
    logits, token, weight = _states(6, 5)
    batch = logits.view(2, 3, 5)
    torch.testing.assert_close(em.entropy(batch), em.entropy(logits).view(2, 3))   # extra leading dims
    assert em.entropy(logits[0]).shape == ()
    assert em.dh_exact(logits, token, weight, 0.1).shape == (6,)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        em.dh_exact(batch, token, weight, 0.1)
    with pytest.raises(ValueError, match="token must be"):
        em.dh_paper(logits, token[:5], weight, 0.1)
    with pytest.raises(ValueError, match="token ids"):
        em.dh_sampled_logit(logits, token + 5, weight, 0.1)
    with pytest.raises(ValueError, match="weight must"):
        em.dh_covariance(logits, token, weight[:2], 0.1)
    with pytest.raises(ValueError, match="step"):
        em.entropy_change_true(logits, token, weight, 0.1, step="half")
    with pytest.raises(TypeError, match="floating"):
        em.entropy(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        em.entropy(torch.tensor([[0.0, float("nan")]]))


def test_quadrant_rule_always_holds_for_unlikely_tokens_to_first_order():
    # sum_b pi_b^2 (l_b + H) = Cov_pi(pi, l) >= 0, so for unlikely tokens the exact first-order change has
    # the quadrant rule's sign; for likely tokens the rule fails on some states
    logits, token, weight = _states(4000, 30, seed=3)
    rows = em.sign_quadrants(logits, token, weight, em.dh_exact(logits, token, weight, 1e-3))
    by_label = {label.split("(")[0].strip(): (count, share) for label, _, count, share in rows}
    for label in ("A > 0, unlikely", "A < 0, unlikely"):
        assert by_label[label][0] > 100 and by_label[label][1] == 1.0
    for label in ("A > 0, likely", "A < 0, likely"):
        assert by_label[label][0] > 100 and 0.5 < by_label[label][1] < 0.99


def test_help_prints_help_instead_of_running(capsys):
    with pytest.raises(SystemExit) as e:
        em.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: entropy_math.py") and "== 1." not in out
