"""First-order entropy change of a tabular softmax policy after one policy-gradient step.

The analysis behind STEER (arXiv 2510.10150, section 3: the token-level entropy-change estimate Omega and
its four-quadrant reading) and OPEFO (arXiv 2605.11491, the per-token "entropy flow"), together with the
covariance view of Cui et al. (arXiv 2505.22617, section 3). See methods.md section 2 of the project notes.

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

Sign (four quadrants): l_a + H > 0 iff pi_a > exp(-H) ("likely" token). The approximate forms predict
dH with sign -sign(w) sign(l_a + H): A > 0 on a likely token lowers H, A > 0 on an unlikely token raises it,
A < 0 on a likely token raises it, A < 0 on an unlikely token lowers it. The exact form adds the term
+eta w sum_b pi_b^2 (l_b + H), so the quadrant rule is not always right; ``python entropy_math.py`` counts how
often it is.

Use:
    import entropy_math as em
    em.entropy(logits)                                   # (...,) from (..., V)
    em.entropy_change_true(logits, token, weight, lr)    # (N,) realised change, logits (N, V)
    em.dh_exact(logits, token, weight, lr)               # and dh_sampled_logit, dh_paper, dh_covariance
    em.derive(vocab_size=3)                              # sympy proof of the identities above
    python entropy_math.py                               # derivation, convergence and correlation tables

Numerics use torch in the dtype of the logits (float64 recommended for the comparisons); sympy is only
imported inside derive().
"""
import math
import time
from typing import NamedTuple

import torch


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
    logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    H = -(p * logp).sum(-1)                                   # H = -sum_b pi_b l_b
    return logp, p, H


def entropy(logits):
    """Softmax entropy over the last dimension.

    logits: (..., V), -inf allowed for masked tokens (they contribute nothing). Returns (...,) in nats,
    finite for one-hot distributions (0) and for V = 1 (0).
    """
    return _stats(logits)[2]


def _batch(logits, token, weight):
    """Validate a batch of states and return (logp, p, H, l_a, pi_a, 1 - pi_a, w) for logits (N, V)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    n, v = logits.shape
    token = torch.as_tensor(token, device=logits.device)
    if token.shape != (n,) or token.dtype in (torch.bool,) or torch.is_floating_point(token):
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
    l_a = torch.log_softmax(logits, dim=-1).gather(1, idx).squeeze(1)
    pi_a = p.gather(1, idx).squeeze(1)
    one_minus_pi_a = -torch.expm1(l_a)                        # 1 - pi_a without cancellation near pi_a = 1
    return logp, p, H, l_a, pi_a, one_minus_pi_a, weight


def entropy_change_true(logits, token, weight, lr, *, step="full"):
    """Realised change H(z + dz) - H(z) after one gradient-ascent step on weight * log pi(token).

    logits (N, V), token (N,) int, weight (N,), lr float. step="full": the real softmax gradient,
    dz = lr * w * (e_a - pi). step="sampled": only the sampled logit moves, dz_a = lr * w * (1 - pi_a)
    (the assumption behind dh_sampled_logit). Returns (N,) in the dtype of logits.
    """
    _, p, _, _, _, one_minus_pi_a, w = _batch(logits, token, weight)
    onehot = torch.zeros_like(p).scatter_(1, torch.as_tensor(token, device=p.device).long()[:, None], 1.0)
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
    logp, p, H, l_a, pi_a, _, w = _batch(logits, token, weight)
    norm_term = (p * p * (logp + H[:, None])).sum(-1)         # sum_b pi_b^2 (l_b + H)
    return -lr * w * (pi_a * (l_a + H) - norm_term)            # methods.md sec. 2, EXACT first order


def dh_sampled_logit(logits, token, weight, lr):
    """First-order entropy change when only the sampled logit moves, dz_a = lr w (1 - pi_a).

    Assumption: the other logits stay fixed (their -lr w pi_b share of the softmax gradient is dropped).
    dH = -lr w pi_a (1 - pi_a) (l_a + H): exact to first order for that step, an approximation for the real
    one (it misses +lr w sum_{b != a} pi_b^2 (l_b + H)). The "(1-pi) power" of the STEER code released in
    2026, whose per-token score |w (1 - pi)(l_a + H)| is this divided by lr * pi_a.
    logits (N, V), token (N,), weight (N,) -> (N,).
    """
    _, _, H, l_a, pi_a, one_minus_pi_a, w = _batch(logits, token, weight)
    return -lr * w * pi_a * one_minus_pi_a * (l_a + H)         # dH/dz_a * dz_a = -pi_a (l_a + H) lr w (1 - pi_a)


def dh_paper(logits, token, weight, lr):
    """The papers' first-order entropy change, "(1-pi)^2 power": dH ~ -lr w pi_a (1 - pi_a)^2 (l_a + H).

    From Omega = -eta E_{a~pi}[w (1 - pi_a)^2 (l_a + H)] in STEER v1 (arXiv 2510.10150, sec. 3) and OPEFO's
    entropy flow (arXiv 2605.11491); the pi_a is the expectation's weight of the sampled token (OPEFO's
    per-token flow f = -A (1 - pi)^2 (l_a + H) leaves it out). Assumption: none that makes it exact; it drops
    the normalisation terms of the other tokens and has one (1 - pi_a) factor too many relative to
    dh_sampled_logit. Same sign as dh_sampled_logit. logits (N, V), token (N,), weight (N,) -> (N,).
    """
    _, _, H, l_a, pi_a, one_minus_pi_a, w = _batch(logits, token, weight)
    return -lr * w * pi_a * one_minus_pi_a ** 2 * (l_a + H)    # STEER v1 / OPEFO Omega, per sampled token


def dh_covariance(logits, token, weight, lr):
    """Covariance view (Cui et al., arXiv 2505.22617): dH ~ -Cov_{b~pi}(l_b, dz_b), dz = lr w (e_a - pi).

    Assumption: small logit change; with the full softmax step it is the same first-order quantity as
    dh_exact (computed here independently, as E_pi[l dz] - E_pi[l] E_pi[dz]).
    logits (N, V), token (N,), weight (N,) -> (N,).
    """
    logp, p, _, _, _, _, w = _batch(logits, token, weight)
    onehot = torch.zeros_like(p).scatter_(1, torch.as_tensor(token, device=p.device).long()[:, None], 1.0)
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
