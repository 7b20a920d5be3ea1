"""First-order entropy change of a tabular softmax policy after one policy-gradient step.

The analysis behind STEER (arXiv 2510.10150: the token-level entropy-change estimate Omega and
its four-quadrant reading) and OPEFO (arXiv 2605.11491, the per-token "entropy flow"), together with the
covariance view of Cui et al. (arXiv 2505.22617, sec. 3.1, Lemma 1).

Setting (tabular softmax). One state with free logits z (V,), pi = softmax(z), l_b = log pi_b,
H = -sum_b pi_b l_b. A token a was sampled; one gradient-ascent step of size eta (``lr``) on w * log pi(a),
where w = I_clip * r * A is the derivative of the (clipped) surrogate with respect to log pi(a).

    dH/dz_b = -pi_b (l_b + H)                                                     (gradient of H)

    full softmax gradient, dz = eta w (e_a - pi):
    dH = -eta w [ pi_a (l_a + H) - sum_b pi_b^2 (l_b + H) ] + O(eta^2)            -> dh_exact

    covariance view, same step:   dH = -Cov_{b~pi}(l_b, dz_b) + O(eta^2)          -> dh_covariance
    (identical to dh_exact: Cov_pi(l, dz) = sum_b pi_b (l_b + H) dz_b, because E_pi[l] = -H)

    only the sampled logit moves, dz_a = eta w (1 - pi_a):
    dH = -eta w pi_a (1 - pi_a) (l_a + H) + O(eta^2)                              -> dh_sampled_logit
    (exact to first order for that step; "(1-pi) power", the STEER code released in 2026)

    paper form, Omega = -eta E_{a~pi}[ w (1 - pi_a)^2 (l_a + H) ]:
    dH ~ -eta w pi_a (1 - pi_a)^2 (l_a + H)                                       -> dh_paper
    ("(1-pi)^2 power", STEER v1 and OPEFO; an approximation, not the derivative of either step)

Units. Every dh_* function estimates the realised change of THIS update, H(z + dz) - H(z), so all four are
comparable with ``entropy_change_true``. The expectation over a ~ pi in the paper's Omega contributes the
factor pi_a for the one sampled token (E_{b~pi}[(l_b + H) dz_b] with dz nonzero only at a). The per-token
scores used inside the STEER code (|w (1-pi)(l_a + H)|) and OPEFO's flow f = -A (1-pi)^2 (l_a + H) drop
that pi_a: f * eta * pi_a = dh_paper for w = A.

Sign (STEER's four quadrants): l_a + H > 0 iff pi_a > exp(-H) ("likely" token). The approximate
forms predict dH with sign -sign(w) sign(l_a + H): A > 0 on a likely token lowers H, A > 0 on an unlikely
token raises it, A < 0 on a likely token raises it, A < 0 on an unlikely token lowers it. The exact form is
dh_sampled_logit + eta w sum_{b != a} pi_b^2 (l_b + H). Because sum_b pi_b^2 (l_b + H) = Cov_pi(pi_b, l_b)
>= 0, that extra term has the sign of w whenever a is unlikely: the rule is always right (to first order)
for unlikely tokens, and can fail for likely ones when a more likely token dominates (A > 0 then takes mass
from it and raises H). ``python entropy_math.py`` counts how often the rule holds.

Use:
    import entropy_math as em
    em.entropy(logits)                                   # (...,) from (..., V)
    em.entropy_change_true(logits, token, weight, lr)    # (N,) realised change, logits (N, V)
    em.dh_exact(logits, token, weight, lr)               # and dh_sampled_logit, dh_paper, dh_covariance
    em.derive(vocab_size=3)                              # sympy proof of the identities above
    em.estimator_report([em.estimator_terms(before, after, w, mask)])   # on a model (train.py
                                                         # --measure-entropy-change): predicted vs realised dH
    python entropy_math.py                               # derivation, convergence and correlation tables

Numerics use torch in the dtype of the logits (float64 recommended for the comparisons); sympy is only
imported inside derive().
"""
import argparse
import math
import time
from typing import NamedTuple

import torch

import losses


# ----------------------------------------------------------------------------------------------------------
# Numerics (torch)
# ----------------------------------------------------------------------------------------------------------

def _stats(logits):
    """log pi, pi and H for logits (..., V); masked (-inf) or underflowed entries get log pi := 0 where pi = 0,
    so products pi_b * (l_b + H) are 0 there instead of NaN (0 log 0 = 0)."""
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf")
    if torch.isneginf(logits).all(dim=-1).any():
        raise ValueError("some row of logits is entirely -inf (no token left after masking)")
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    logp = logp.masked_fill(p == 0, 0.0)                     # 0 log 0 := 0 (masked or underflowed)
    H = -(p * logp).sum(-1)                                   # H = -sum_b pi_b l_b
    return logp, p, H


def entropy(logits):
    """Softmax entropy over the last dimension.

    logits: (..., V), -inf allowed for masked tokens (they contribute nothing). Returns (...,) in nats,
    finite for one-hot distributions (0) and for V = 1 (0).
    """
    return _stats(logits)[2]


def _batch(logits, token, weight):
    """Validate a batch of states; returns (logp, p, H, l_a, pi_a, 1 - pi_a, w, e_a), e_a the one-hot (N, V)
    of the sampled tokens, for logits (N, V), token (N,), weight (N,)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    n, v = logits.shape
    token = torch.as_tensor(token, device=logits.device)
    if token.shape != (n,) or token.dtype == torch.bool or torch.is_floating_point(token):
        raise ValueError(f"token must be an integer tensor of shape ({n},), got {tuple(token.shape)} {token.dtype}")
    if n and (token.min() < 0 or token.max() >= v):
        raise ValueError(f"token ids must lie in [0, {v}), got range [{int(token.min())}, {int(token.max())}]")
    weight = torch.as_tensor(weight, dtype=logits.dtype, device=logits.device)
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},), got {tuple(weight.shape)}")
    idx = token.long()[:, None]
    if torch.isneginf(logits.gather(1, idx)).any():
        raise ValueError("a sampled token has a -inf (masked) logit; it cannot have been sampled")
    logp, p, H = _stats(logits)
    l_a = logits.gather(1, idx).squeeze(1) - torch.logsumexp(logits, dim=-1)   # finite even if pi_a underflows
    pi_a = p.gather(1, idx).squeeze(1)
    one_minus_pi_a = -torch.expm1(l_a)                        # 1 - pi_a without cancellation near pi_a = 1
    onehot = torch.zeros_like(p).scatter_(1, idx, 1.0)
    return logp, p, H, l_a, pi_a, one_minus_pi_a, weight, onehot


def entropy_change_true(logits, token, weight, lr, *, step="full"):
    """Realised change H(z + dz) - H(z) after one gradient-ascent step on weight * log pi(token).

    logits (N, V), token (N,) int, weight (N,), lr float. step="full": the real softmax gradient,
    dz = lr * w * (e_a - pi). step="sampled": only the sampled logit moves, dz_a = lr * w * (1 - pi_a)
    (the assumption behind dh_sampled_logit). Returns (N,) in the dtype of logits.
    """
    _, p, _, _, _, one_minus_pi_a, w, onehot = _batch(logits, token, weight)
    if step == "full":
        dz = lr * w[:, None] * (onehot - p)                      # gradient of w log pi_a: w (e_a - pi)
    elif step == "sampled":
        dz = lr * (w * one_minus_pi_a)[:, None] * onehot         # only z_a moves, by lr w (1 - pi_a)
    else:
        raise ValueError(f"step must be 'full' or 'sampled', got {step!r}")
    return entropy(logits + dz) - entropy(logits)            # -inf + 0 stays -inf for masked tokens


def dh_exact(logits, token, weight, lr):
    """Exact first-order entropy change under the full softmax gradient step dz = lr w (e_a - pi).

    Assumption: tabular logits, only this state's logits change, the whole softmax gradient is applied.
    dH = -lr w [pi_a (l_a + H) - sum_b pi_b^2 (l_b + H)]; the error against entropy_change_true is O(lr^2).
    Equal to dh_covariance (the covariance view under the same step), as derive() proves.
    logits (N, V), token (N,), weight (N,) -> (N,).
    """
    logp, p, H, l_a, pi_a, one_minus_pi_a, w, onehot = _batch(logits, token, weight)
    norm_others = ((1 - onehot) * p * p * (logp + H[:, None])).sum(-1)   # sum_{b != a} pi_b^2 (l_b + H)
    # EXACT first order, with pi_a (l_a + H) - pi_a^2 (l_a + H) = pi_a (1 - pi_a)(l_a + H)
    # written out so that near-one-hot states (pi_a -> 1) do not cancel catastrophically
    return -lr * w * (pi_a * one_minus_pi_a * (l_a + H) - norm_others)


def dh_sampled_logit(logits, token, weight, lr):
    """First-order entropy change when only the sampled logit moves, dz_a = lr w (1 - pi_a).

    Assumption: the other logits stay fixed (their -lr w pi_b share of the softmax gradient is dropped).
    dH = -lr w pi_a (1 - pi_a) (l_a + H): exact to first order for that step, an approximation for the real
    one (it misses +lr w sum_{b != a} pi_b^2 (l_b + H)). The "(1-pi) power" of the STEER code released in
    2026, whose per-token score |w (1 - pi)(l_a + H)| is this divided by lr * pi_a.
    logits (N, V), token (N,), weight (N,) -> (N,).
    """
    _, _, H, l_a, pi_a, one_minus_pi_a, w, _ = _batch(logits, token, weight)
    return -lr * w * pi_a * one_minus_pi_a * (l_a + H)         # dH/dz_a * dz_a = -pi_a (l_a + H) lr w (1 - pi_a)


def dh_paper(logits, token, weight, lr):
    """The papers' first-order entropy change, "(1-pi)^2 power": dH ~ -lr w pi_a (1 - pi_a)^2 (l_a + H).

    From Omega = -eta E_{a~pi}[w (1 - pi_a)^2 (l_a + H)] in STEER v1 (arXiv 2510.10150) and OPEFO's
    entropy flow (arXiv 2605.11491); the pi_a is the expectation's weight of the sampled token (OPEFO's
    per-token flow f = -A (1 - pi)^2 (l_a + H) leaves it out). Assumption: none that makes it exact; it drops
    the normalisation terms of the other tokens and has one (1 - pi_a) factor too many relative to
    dh_sampled_logit. Same sign as dh_sampled_logit. logits (N, V), token (N,), weight (N,) -> (N,).
    """
    _, _, H, l_a, pi_a, one_minus_pi_a, w, _ = _batch(logits, token, weight)
    return -lr * w * pi_a * one_minus_pi_a ** 2 * (l_a + H)    # STEER v1 / OPEFO Omega, per sampled token


def dh_covariance(logits, token, weight, lr):
    """Covariance view (Cui et al., arXiv 2505.22617): dH ~ -Cov_{b~pi}(l_b, dz_b), dz = lr w (e_a - pi).

    Assumption: small logit change; with the full softmax step it is the same first-order quantity as
    dh_exact (computed here independently, as E_pi[l dz] - E_pi[l] E_pi[dz]).
    logits (N, V), token (N,), weight (N,) -> (N,).
    """
    logp, p, _, _, _, _, w, onehot = _batch(logits, token, weight)
    dz = lr * w[:, None] * (onehot - p)                        # full softmax gradient step
    cov = (p * logp * dz).sum(-1) - (p * logp).sum(-1) * (p * dz).sum(-1)
    return -cov                                                # dH ~ -Cov_{b~pi}(l_b, dz_b)


# ----------------------------------------------------------------------------------------------------------
# Symbolic derivation (sympy)
# ----------------------------------------------------------------------------------------------------------

class Derivation(NamedTuple):
    """Results of derive(); every *_residual is a sympy expression that simplified to 0.

    The softmax is built at logits z_b = log p_b (any logits, up to the shift softmax ignores), with
    probabilities p_b subject to sum_b p_b = 1; the sampled token is a = 0 (the vocabulary is symmetric).
    missing_* = exact closed form - approximate form, as expressions in p_b, log p_b, H, w, eta.
    """
    vocab_size: int
    gradient_residual: object      # dH/dz_b + pi_b (l_b + H), for every b (a list)
    exact_residual: object         # eta * d/dt H(z + t dz)|_0 - dh_exact formula, dz = w (e_a - pi)
    covariance_residual: object    # -Cov_pi(l, eta dz) - dh_exact formula
    sampled_residual: object       # eta * d/dt H(z + t dz)|_0 - dh_sampled_logit formula, dz = w (1-pi_a) e_a
    missing_sampled: object        # exact - sampled-logit form
    missing_paper: object          # exact - paper form
    paper_is_derivative: bool      # whether the paper form equals the derivative along either step (False)
    symbols: dict                  # the sympy symbols used: p (tuple), H, w, eta


def derive(vocab_size=3):
    """Prove the closed forms with sympy for a vocabulary of `vocab_size` tokens (2..6; 3-4 takes < 1 s).

    Builds pi(t) = softmax(log p + t dz), differentiates H(pi(t)) at t = 0 along the update direction and
    compares with the closed forms. Residuals are reduced with the constraint sum p = 1 and the logs
    log p_b treated as independent symbols (they enter polynomially), so a zero is an exact proof.
    Returns a Derivation.
    """
    import sympy as sp

    if not 2 <= vocab_size <= 6:
        raise ValueError(f"vocab_size must be in 2..6 (symbolic cost grows fast), got {vocab_size}")
    V = vocab_size
    p = sp.symbols(f"p0:{V}", positive=True)
    lam = sp.symbols(f"lambda0:{V}", real=True)               # stand-ins for log p_b during reduction
    w, eta, t, Hs = sp.symbols("w eta t H", real=True)
    a = 0
    logp = [sp.log(pb) for pb in p]
    H = -sum(pb * lb for pb, lb in zip(p, logp))

    def along(dz):
        """d/dt H(softmax(log p + t dz)) at t = 0."""
        Z = sum(p[c] * sp.exp(t * dz[c]) for c in range(V))
        pi_t = [p[b] * sp.exp(t * dz[b]) / Z for b in range(V)]
        logpi_t = [logp[b] + t * dz[b] - sp.log(Z) for b in range(V)]
        H_t = -sum(pb * lb for pb, lb in zip(pi_t, logpi_t))
        return sp.diff(H_t, t).subs(t, 0)

    def reduce(expr):
        """Exact zero test: logs -> symbols, then eliminate p_{V-1} = 1 - sum of the others."""
        expr = expr.xreplace({sp.log(pb): lb for pb, lb in zip(p, lam)})
        expr = expr.subs(p[-1], 1 - sum(p[:-1]))
        return sp.simplify(sp.expand(expr))

    onehot = [1 if b == a else 0 for b in range(V)]
    dz_full = [w * (onehot[b] - p[b]) for b in range(V)]       # gradient of w log pi_a w.r.t. z
    dz_sampled = [w * (1 - p[a]) * onehot[b] for b in range(V)]

    # closed forms in terms of the probabilities (pi = p at t = 0) and an entropy value h
    def exact(h):
        return -eta * w * (p[a] * (logp[a] + h) - sum(p[b] ** 2 * (logp[b] + h) for b in range(V)))

    def sampled(h):
        return -eta * w * p[a] * (1 - p[a]) * (logp[a] + h)

    def paper(h):
        return -eta * w * p[a] * (1 - p[a]) ** 2 * (logp[a] + h)

    dz_eta = [eta * d for d in dz_full]
    neg_cov = -(sum(p[b] * logp[b] * dz_eta[b] for b in range(V))
                - sum(p[b] * logp[b] for b in range(V)) * sum(p[b] * dz_eta[b] for b in range(V)))

    gradient_residual = [reduce(along([1 if c == b else 0 for c in range(V)]) + p[b] * (logp[b] + H))
                         for b in range(V)]
    d_full = eta * along(dz_full)
    d_sampled = eta * along(dz_sampled)
    exact_residual = reduce(d_full - exact(H))
    sampled_residual = reduce(d_sampled - sampled(H))
    covariance_residual = reduce(neg_cov - exact(H))
    paper_is_derivative = reduce(d_full - paper(H)) == 0 or reduce(d_sampled - paper(H)) == 0
    missing_sampled = sp.factor_terms(sp.expand(exact(Hs) - sampled(Hs)))   # H kept as a symbol for display
    missing_paper = sp.factor_terms(sp.expand(exact(Hs) - paper(Hs)))
    return Derivation(V, gradient_residual, exact_residual, covariance_residual, sampled_residual,
                      missing_sampled, missing_paper, bool(paper_is_derivative),
                      {"p": p, "H": Hs, "w": w, "eta": eta})


# ----------------------------------------------------------------------------------------------------------
# Experiments: random states, error convergence, correlation and the four-quadrant sign table
# ----------------------------------------------------------------------------------------------------------

ESTIMATES = {"exact": dh_exact, "covariance": dh_covariance, "sampled_logit": dh_sampled_logit,
             "paper": dh_paper}


def random_states(n, vocab_size, *, scale=None, generator=None, dtype=torch.float64):
    """A batch of random tabular states: (logits (N, V), token (N,), weight (N,)).

    logits = s * g with g ~ N(0, I); one scale s per state, log-uniform on [1, 16] unless `scale` is given
    (s = 1 gives flat distributions, s = 16 peaked ones: median entropy 0.05 nats at V = 151,936, 0.06 at
    V = 50). The token is sampled from pi, as in a rollout; weight ~ N(0, 1) (random sign, like r * A).
    """
    g = torch.randn(n, vocab_size, generator=generator, dtype=dtype)
    if scale is None:
        s = torch.exp(torch.rand(n, 1, generator=generator, dtype=dtype) * math.log(16.0))
    else:
        s = torch.full((n, 1), float(scale), dtype=dtype)
    logits = s * g
    token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    weight = torch.randn(n, generator=generator, dtype=dtype)
    return logits, token, weight


def pearson(x, y):
    """Pearson correlation of two 1-d tensors (N,) -> float."""
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def _ranks(x):
    """Ranks 0..N-1 of a 1-d tensor (ties broken by order; the inputs here are continuous)."""
    r = torch.empty_like(x)
    r[torch.argsort(x)] = torch.arange(x.numel(), dtype=x.dtype)
    return r


def spearman(x, y):
    """Spearman rank correlation of two 1-d tensors (N,) -> float (Pearson of the ranks)."""
    return pearson(_ranks(x), _ranks(y))


def sign_agreement(x, y):
    """Share of entries where sign(x) == sign(y) -> float."""
    return float((torch.sign(x) == torch.sign(y)).double().mean())


# ---------------------------------------------------------------------------------- the estimator on a model
# train.py --measure-entropy-change: the STEER paper's estimator-accuracy experiment with shared parameters.
def estimator_terms(before, after, weights, mask):
    """Per token that carries gradient (valid, w != 0): realised entropy change, the three first-order
    predictions -w * g, g = losses.first_order_term(form) at the pre-update policy (the tabular forms above;
    eta dropped: correlations are scale-free), and pi_a before the update. Tokens with w = 0 (zero
    advantage, clipped) are left out: their only change is the spill-over through shared parameters,
    which no tabular form predicts.
    before, after: rollout.response_stats dicts (logp, entropy, exact_term (B, T)) around one optimizer step;
    weights (B, T): w = -dLoss/dlogp of that step (with AdamW the step is preconditioned, so the forms hold
    only up to that: train.py --optimizer sgd tests them on a plain step); mask (B, T) bool.
    """
    carries = mask & (weights != 0)
    realised = (after["entropy"] - before["entropy"])[carries]
    pred = {form: (-weights * losses.first_order_term(before["logp"], before["entropy"], before["exact_term"],
                                                      form))[carries]
            for form in losses.FIRST_ORDER_FORMS}
    return realised, pred, before["logp"].exp()[carries]


UNCERTAIN = 0.99     # the estimator report is repeated over the tokens with pi_a below this


def estimator_report(measured):
    """Pearson / Spearman / sign agreement between realised and predicted per-token entropy changes, over
    all tokens that carry gradient (dH/<stat>_<form>) and over those with pi_a < UNCERTAIN
    (dH/<stat>_<form>_uncertain), where the forms differ most."""
    realised = torch.cat([r for r, _, _ in measured]).double()
    pi = torch.cat([p for _, _, p in measured])
    out = {"dH/realised_mean": float(realised.mean()) if realised.numel() else None, "dH/tokens": realised.numel(),
           "dH/tokens_uncertain": int((pi < UNCERTAIN).sum())}
    for form in losses.FIRST_ORDER_FORMS:
        pred = torch.cat([p[form] for _, p, _ in measured]).double()
        for suffix, keep in (("", torch.ones_like(pi, dtype=torch.bool)), ("_uncertain", pi < UNCERTAIN)):
            x, y = pred[keep], realised[keep]
            if y.numel() > 2 and x.std() > 0 and y.std() > 0:
                out[f"dH/pearson_{form}{suffix}"] = pearson(x, y)
                out[f"dH/spearman_{form}{suffix}"] = spearman(x, y)
                out[f"dH/sign_agree_{form}{suffix}"] = sign_agreement(x, y)
    return out


def error_convergence(logits, token, weight, lrs):
    """Errors of every estimate against the realised change, for each step size.

    Returns {name: {"abs": [mean |est - true| per lr], "rel": [sum |est - true| / sum |true| per lr]}} for
    ESTIMATES against entropy_change_true(step="full"), plus "sampled_logit_own_step": dh_sampled_logit
    against the sampled-logit-only step (step="sampled"). logits (N, V), token (N,), weight (N,).
    """
    out = {name: {"abs": [], "rel": []} for name in [*ESTIMATES, "sampled_logit_own_step"]}
    for lr in lrs:
        true_full = entropy_change_true(logits, token, weight, lr)
        true_sampled = entropy_change_true(logits, token, weight, lr, step="sampled")
        pairs = {name: (fn(logits, token, weight, lr), true_full) for name, fn in ESTIMATES.items()}
        pairs["sampled_logit_own_step"] = (dh_sampled_logit(logits, token, weight, lr), true_sampled)
        for name, (est, true) in pairs.items():
            err = (est - true).abs()
            out[name]["abs"].append(float(err.mean()))
            out[name]["rel"].append(float(err.sum() / true.abs().sum()))
    return out


def loglog_slope(xs, ys):
    """Least-squares slope of log(ys) against log(xs) -> float."""
    lx = torch.log(torch.tensor(xs, dtype=torch.float64))
    ly = torch.log(torch.tensor(ys, dtype=torch.float64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


QUADRANTS = (  # (advantage sign, token likely?) -> predicted sign of dH = -sign(w) sign(l_a + H)
    ("A > 0, likely   (pi_a > e^-H)", 1, True, -1),
    ("A > 0, unlikely (pi_a < e^-H)", 1, False, 1),
    ("A < 0, likely   (pi_a > e^-H)", -1, True, 1),
    ("A < 0, unlikely (pi_a < e^-H)", -1, False, -1),
)


def sign_quadrants(logits, token, weight, change):
    """The four-quadrant table: for each quadrant (sign of weight x token likely or not, i.e. l_a + H > 0),
    the number of states and the share where `change` (N,) has the predicted sign -sign(w) sign(l_a + H).

    logits (N, V), token (N,), weight (N,). Returns a list of (label, predicted sign, count, share).
    """
    _, _, H, l_a, _, _, w, _ = _batch(logits, token, weight)
    likely = (l_a + H) > 0
    rows = []
    for label, w_sign, is_likely, predicted in QUADRANTS:
        sel = (torch.sign(w) == w_sign) & (likely == is_likely)
        count = int(sel.sum())
        share = float((torch.sign(change[sel]) == predicted).double().mean()) if count else float("nan")
        rows.append((label, predicted, count, share))
    return rows


def _print_derivation():
    t0 = time.perf_counter()
    d = derive(3)
    print(f"== 1. Symbolic derivation (sympy, V = {d.vocab_size}, sampled token a = 0, "
          f"{time.perf_counter() - t0:.1f} s)")
    print("   softmax at logits log p + t dz, sum p = 1; residuals of each identity after simplification:")
    print(f"   dH/dz_b + pi_b (l_b + H)                        = {d.gradient_residual}")
    print(f"   eta d/dt H|_0 - dh_exact,   dz = w (e_a - pi)    = {d.exact_residual}")
    print(f"   -Cov_pi(l, eta dz) - dh_exact                   = {d.covariance_residual}")
    print(f"   eta d/dt H|_0 - dh_sampled_logit, dz = w(1-pi_a)e_a = {d.sampled_residual}")
    print(f"   paper form equals either derivative?            = {d.paper_is_derivative}")
    print(f"   exact - sampled_logit = {d.missing_sampled}")
    print("                         = eta w sum_{b != a} pi_b^2 (l_b + H)   (the other tokens' normalisation)")
    print(f"   exact - paper         = {d.missing_paper}")
    print("                         = eta w [sum_{b != a} pi_b^2 (l_b + H) - pi_a^2 (1 - pi_a) (l_a + H)]")


def _print_convergence(gen):
    lrs = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    logits, token, weight = random_states(2000, 50, generator=gen)
    conv = error_convergence(logits, token, weight, lrs)
    names = list(conv)
    print("\n== 2. Relative error sum|est - true| / sum|true| against the realised change H(z + dz) - H(z)")
    print("   float64, 2000 states, V = 50, Gaussian logits with scale log-uniform in [1, 16], tokens ~ pi,")
    print("   weights ~ N(0, 1); true = full softmax step, except the last column (sampled-logit-only step)")
    print("   " + f"{'lr':>7}" + "".join(f"{n:>24}" for n in names))
    for i, lr in enumerate(lrs):
        print("   " + f"{lr:>7.0e}" + "".join(f"{conv[n]['rel'][i]:>24.3e}" for n in names))
    print("   " + f"{'slope':>7}" + "".join(f"{loglog_slope(lrs, conv[n]['abs']):>24.2f}" for n in names))
    print("   slope = fitted log-log slope of the mean ABSOLUTE error vs lr. Expected 2 for a form that is exact")
    print("   to first order for its step (exact, covariance, sampled_logit on its own step): error O(lr^2),")
    print("   relative error O(lr). Expected 1 for an approximation of the first-order term (relative error flat).")


def resolvable(change, logits):
    """Mask (N,) of states whose realised entropy change is resolvable in the dtype of the logits:
    |change| > 2^-40 * H (about 4000 ulps of H in float64). Near-one-hot states move the entropy by less
    than its rounding error, so their realised sign is noise (often exactly 0) and is left out of sign
    statistics. change (N,), logits (N, V)."""
    return change.abs() > 2.0 ** -40 * entropy(logits)


def _print_correlations(gen, lr=1e-3):
    print(f"\n== 3. Correlation of each estimate with the realised change (full softmax step, lr = {lr:g}, float64)")
    print("   states: Gaussian logits s * N(0, 1), s log-uniform in [1, 16] per state (flat to LM-like peaked);")
    print("   tokens sampled from pi; weights ~ N(0, 1). Reference row: fixed s = 2 at V = 50.")
    print("   '/pi_a' rows: the per-token score as the papers/code use it, without the sampled token's pi_a.")
    print("   N used = states whose realised change is resolvable in float64 (|dH| > 2^-40 H); the rest are")
    print("   near-one-hot states whose change is below rounding (left out of all three statistics).")
    print(f"   {'V':>12} {'N used':>12} {'H p10/p50/p90':>17}  {'estimate':<19}{'Pearson':>8}{'Spearman':>9}"
          f"{'sign':>7}")
    configs = [(2, 10000, None), (10, 10000, None), (50, 10000, None), (1000, 2000, None), (151936, 64, None),
               (50, 10000, 2.0)]
    pooled = []
    for vocab, n, scale in configs:
        logits, token, weight = random_states(n, vocab, scale=scale, generator=gen)
        true = entropy_change_true(logits, token, weight, lr)
        keep = resolvable(true, logits)
        logits, token, weight, true = logits[keep], token[keep], weight[keep], true[keep]
        q = torch.quantile(entropy(logits), torch.tensor([0.1, 0.5, 0.9], dtype=logits.dtype))
        pi_a = torch.softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1)
        ests = {name: fn(logits, token, weight, lr) for name, fn in ESTIMATES.items()}
        ests["sampled_logit/pi_a"] = ests["sampled_logit"] / pi_a
        ests["paper/pi_a"] = ests["paper"] / pi_a
        label = f"{vocab} (s=2)" if scale else f"{vocab}"
        tag = f"{label:>12} {f'{int(keep.sum())}/{n}':>12} {'/'.join(f'{v:.2f}' for v in q.tolist()):>17}"
        for name, est in ests.items():
            print(f"   {(tag if name == 'exact' else ''):<44}{name:<19}{pearson(est, true):>8.4f}"
                  f"{spearman(est, true):>9.4f}{sign_agreement(est, true):>7.3f}")
        if scale is None:
            pooled.append((logits, token, weight, true))
    return pooled


def _print_quadrants(pooled):
    print("\n== 4. Four-quadrant sign table (resolvable states of section 3 without the reference row, all V pooled)")
    print("   predicted sign of dH = -sign(w) sign(l_a + H); share = realised change has the predicted sign.")
    print("   Unlikely tokens: always right to first order (sum_b pi_b^2 (l_b + H) = Cov_pi(pi, l) >= 0); likely")
    print("   tokens: wrong when a more likely token dominates and loses (A > 0) or gains (A < 0) the mass.")
    totals = {}                                              # label -> (predicted sign, count, agreeing)
    for logits, token, weight, true in pooled:
        for label, predicted, count, share in sign_quadrants(logits, token, weight, true):
            _, n_prev, agree_prev = totals.get(label, (predicted, 0, 0.0))
            totals[label] = (predicted, n_prev + count, agree_prev + (share * count if count else 0.0))
    print(f"   {'quadrant':<32}{'predicted':>10}{'count':>8}{'share':>8}")
    for label, (predicted, count, agree) in totals.items():
        word = "lower H" if predicted < 0 else "raise H"
        print(f"   {label:<32}{word:>10}{count:>8}{agree / count:>8.3f}")


def main(argv=None):
    """`python entropy_math.py`: print the derivation, convergence, correlation and sign tables."""
    parser = argparse.ArgumentParser(
        prog="entropy_math.py", description="First-order entropy change of a tabular softmax policy: prints the "
        "sympy derivation, the finite-difference convergence of every closed form, the correlation of each "
        "estimate with the realised change and the four-quadrant sign table. "
        "Takes no options besides --help; import the module for the functions.")
    parser.parse_args(argv)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    _print_derivation()
    _print_convergence(gen)
    pooled = _print_correlations(gen)
    _print_quadrants(pooled)
    print(f"\nwall time {time.perf_counter() - t0:.1f} s (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
