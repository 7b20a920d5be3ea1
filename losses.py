"""Every policy loss of the three papers and their neighbours, in one drop-in file (torch and the
standard library only): GRPO, DAPO, Dr. GRPO; STEER (and its quadrant interventions), OPEFO, Archer;
the successors that act through the clip, ASPO, CE-GPPO, GPPO; the entropy interventions they are
compared with. Sections follow the papers; each loss gives its equation, source and defaults. Where
the authors' code differs, and the tests that show it: docs/losses.md.

Conventions. B responses, T response positions. logp, old_logp, ref_logp (B, T): log pi of the
sampled tokens under the current policy (with gradient), the behaviour policy and a frozen
reference; mask (B, T): 1 on valid tokens; advantages (B,) or (B, T); entropy, exact_term (B, T):
the behaviour policy's H and S2 = sum_b pi_b^2 (log pi_b + H) (logprobs.py, or the three lines in
its docstring). Every loss returns (loss, metrics as plain floats); masked positions may hold
anything; an empty batch gives a zero loss.
    Alignment: logp[:, t] scores response token t, so it comes from the logits one position
    earlier. For input_ids (B, P + T) = prompt (left-padded to P) + response:
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)    # left padding must not move positions
        out = model(input_ids, attention_mask=attention_mask, position_ids=pos)
        logp = token_logprobs(out.logits[:, P - 1:-1] / temperature, input_ids[:, P:])
    with the sampling temperature. mask: 1 on every generated token up to and including the
    end-of-sequence token (it was sampled and is trained), 0 after it and on padding.
    A loss of exactly 0 on a first update is right: at r = 1 every surrogate is -A per token, and
    the advantages of a group sum to 0: the token mean is 0 at equal lengths, the sequence mean at
    any. The gradient is not 0.

Use. LOSSES maps a name to its Loss: call it with the batch tensors as keywords (those it does not
read are dropped; a missing one it needs is named) and knobs (a misspelt one is named with the
nearest). batch_statistics, once per mini-batch, makes any micro-batch's loss its exact share of the
mini-batch's:

    from losses import LOSSES, batch_statistics, group_advantages
    adv = group_advantages(rewards, group_size=8)                          # (B,)
    stats = batch_statistics("steer", mask=mask, advantages=adv, old_logp=old_logp, entropy=entropy,
                             exact_term=s2)                                # num_tokens, num_seqs, M
    loss, metrics = LOSSES["steer"](logp=logp, old_logp=old_logp, advantages=adv, mask=mask,
                                    entropy=entropy, exact_term=s2, lambda_min=0.7, **stats)
    loss.backward()

To copy one method alone: its function, the helpers it calls (the first section, agg_loss,
ppo_clip_loss) and, where its Loss entry names one, its statistics function.
"""
import difflib
import functools
import inspect
import math
from typing import Callable, NamedTuple, Optional

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_LIMIT = 20.0      # clamp on log(pi / pi_old) and the KL's log-ratio before exp (verl's)
K3_LIMIT = 10.0             # clamp on the k3 estimate (verl's value)


# ------------------------------------------------------------------------------------------- checks
def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_tensors(**tensors):
    """_check_tensor on each keyword, in order: a TypeError naming the first that is not a tensor.
    """
    for name, x in tensors.items():
        _check_tensor(name, x)


def _check_tokens(name, x, ref, like="mask"):
    _check_tensor(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (B, T) "
                         f"like {like}")


class KnobError(ValueError):
    """A knob outside its range (or with an unknown value): `knob` names it, so a trainer can name
    its flag."""

    def __init__(self, knob, message):
        super().__init__(message)
        self.knob = knob


def _check_knob(name, value, ok, rule):
    """A knob outside its range: one KnobError naming it, e.g. "lambda_min=0 must be in (0, 1]"."""
    if not ok:
        raise KnobError(name, f"{name}={value!r} must be {rule}")


def _check_clip(clip_low, clip_high, dual_clip, no_low_clip=False):
    """PPO clip knobs: clip_low in [0, 1) (a ratio bound 1 - clip_low > 0), clip_high >= 0,
    dual_clip > 1. no_low_clip (Clip-Cov only): clip_low in [0, 1]; clip_low = 1 is the bound 0,
    which r = exp(.) > 0 never reaches: no lower clip (the Clip-Cov authors' 7B setting, clip ratio
    low = high = 1)."""
    if no_low_clip:
        _check_knob("clip_low", clip_low, 0 <= clip_low <= 1, "in [0, 1]")
    else:
        _check_knob("clip_low", clip_low, 0 <= clip_low < 1, "in [0, 1)")
    _check_knob("clip_high", clip_high, clip_high >= 0, ">= 0")
    _check_dual_clip(dual_clip)


def _check_dual_clip(dual_clip):
    if dual_clip is not None:
        _check_knob("dual_clip", dual_clip, dual_clip > 1, "> 1 (or None)")


def _positive(name, value):
    """A caller-supplied count or length: must be > 0 (a 0 would otherwise be a silent 1)."""
    v = value.item() if isinstance(value, torch.Tensor) else value
    _check_knob(name, v, v > 0, "> 0")
    return value


def _acc_dtype(dtype):
    """Accumulation dtype: float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class _Batch(NamedTuple):
    """A loss's batch tensors, checked and cleaned by _batch."""
    valid: torch.Tensor          # (B, T) bool: the valid tokens
    mask: torch.Tensor           # (B, T) float: valid as 0 / 1 in the computation's dtype
    count: torch.Tensor          # 0-d: the number of valid tokens, at least 1
    adv: torch.Tensor            # (B, 1) or (B, T): the advantages, 0 where no token is valid
    tensors: list                # the cleaned (B, T) tensors (or None), in the order given


def _batch(mask, advantages, **tensors):
    """Validate and clean a loss's batch tensors (mask (B, T); advantages (B,), (B, 1) or (B, T);
    tensors: name -> (B, T) or None) into a _Batch. Every masked position becomes 0 with
    torch.where, so padding holding NaN or inf adds exactly zero to value and gradient; adv is 0 on
    rows without a valid token. Computations in float32, or float64 when any input is float64."""
    _check_tensor("mask", mask)
    _check_tensor("advantages", advantages)
    for name, x in tensors.items():
        if x is not None:
            _check_tokens(name, x, mask)
    valid = mask.bool()
    dtype = _acc_dtype(advantages.dtype)
    for x in tensors.values():
        if x is not None and torch.is_floating_point(x):
            dtype = torch.promote_types(dtype, _acc_dtype(x.dtype))
    rows = mask.shape[:1]
    if advantages.shape in (rows, rows + (1,)):            # (B, 1): rows with no valid token -> 0
        adv = torch.where(valid.any(-1, keepdim=True), advantages.to(dtype).view(-1, 1), 0.0)
    elif advantages.shape == mask.shape:
        adv = torch.where(valid, advantages.to(dtype), 0.0)
    else:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected (B,) = "
                         f"({mask.shape[0]},) "
                         f"or (B, T) = {tuple(mask.shape)}")
    cleaned = [None if x is None else
               torch.where(valid, x.to(dtype) if torch.is_floating_point(x) else x, 0)
               for x in tensors.values()]
    return _Batch(valid, valid.to(dtype), valid.sum().clamp(min=1), adv, cleaned)


def _max0(x):
    """Max of x (masked entries already 0, values >= 0); 0 for an empty tensor."""
    return x.amax() if x.numel() else x.new_zeros(())


def _quantile(x, q):
    """torch.quantile(x, q) of a non-empty 1-D x (linear interpolation) by two selections, not a
    sort: the weight_p05 metric of 262k tokens in 8 ms instead of 47 (one CPU thread)."""
    pos = q * (x.numel() - 1)
    lo, frac = int(pos), pos - int(pos)
    below = x.kthvalue(lo + 1).values
    return below + frac * (x.kthvalue(lo + 2).values - below) if frac > 0 else below


def _masked_mean(x, mask, count):
    """Mean of x (finite) over the float mask: sum(x mask) / count."""
    return (x * mask).sum() / count


def _masked_min(x, mask):
    """Min of x (finite, |x| < 1e29) over the float mask; 0 when the mask is empty."""
    if x.numel() == 0:
        return x.new_zeros(())
    low = (x + (1.0 - mask) * 1e30).min()
    return torch.where(low > 1e29, 0.0, low)


def _to_floats(metrics):
    """One host sync for all metrics: dict of 0-d tensors -> dict of floats."""
    keys = list(metrics)
    device = metrics[keys[0]].device
    wide = torch.float32 if device.type == "mps" else torch.float64            # MPS has no float64
    values = torch.stack([metrics[k].detach().to(device, wide) for k in keys]).tolist()
    return dict(zip(keys, values))


# --------------------------------------------------------------------------------------- advantages
def group_advantages(rewards, group_size, *, std_normalize=True, eps=1e-6):
    """Group-relative advantages, one per response.

    rewards: (N,) with N = num_groups * group_size; the responses of one prompt are contiguous.
    GRPO:      A_i = (R_i - mean_g R) / (std_g R + eps)   (Bessel std, eps 1e-6 as in verl)
    Dr. GRPO:  A_i =  R_i - mean_g R                      (std_normalize=False)
    A group whose rewards are all equal gets exactly 0 (no signal, never NaN). Returns (N,) float32.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}; "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)                                   # (groups, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        # Bessel-corrected std
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, 0.0, adv).view(-1)


# -------------------------------------------------------------------------------------- aggregation
def agg_loss(per_token, mask, mode="token-mean", *, num_tokens=None, num_seqs=None,
             norm_length=None):
    """Reduce a (B, T) per-token loss to a scalar over the valid tokens of `mask` (B, T).

    token-mean               sum_{i,t} l / num_tokens     (DAPO; num_tokens defaults to mask.sum())
    seq-mean-token-mean      (1/num_seqs) sum_i mean_t l        (GRPO's original)
    seq-mean-token-sum       (1/num_seqs) sum_i sum_t l
    seq-mean-token-sum-norm  sum_{i,t} l / (num_seqs * norm_length)   (Dr. GRPO; norm_length: T)

    num_tokens: the number of valid tokens; num_seqs: the number of rows with at least one valid
    token (all-padding rows left out, as verl does); both default to this call's counts and must be
    > 0. For gradient accumulation pass the whole batch's totals (batch_totals): the micro-batch
    losses then sum to the whole batch's. seq-mean-token-sum-norm is TRL's dr_grpo and verl 0.9.1's
    agg_loss (num_seqs = global_batch_size, norm_length = loss_scale_factor; docs/losses.md).
    Masked positions contribute exactly zero, even where per_token is not finite.
    """
    _check_tokens("per_token", per_token, mask)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGG_MODES}")
    mask = mask.bool()
    x = torch.where(mask, per_token, 0.0)
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1 ) if num_tokens is None else _positive("num_tokens",
                         num_tokens)
        return x.sum() / denom
    seqs = mask.any(-1).sum().clamp(min=1) if num_seqs is None else _positive("num_seqs", num_seqs)
    if mode == "seq-mean-token-mean":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / seqs
    if mode == "seq-mean-token-sum":
        return x.sum() / seqs
    length = mask.shape[-1] if norm_length is None else _positive("norm_length", norm_length)
    return x.sum() / (seqs * length)


def batch_totals(mask):
    """The whole batch's normalisers for agg_loss, from its mask (B, T): {"num_tokens", "num_seqs"}
    as ints.

    num_tokens: valid tokens; num_seqs: rows with at least one valid token. Compute them once per
    mini-batch and pass them to every micro-batch's loss.
    """
    valid = mask.bool()
    return {"num_tokens": int(valid.sum()), "num_seqs": int(valid.any(-1).sum())}


# --------------------------------------------------------------------------------------------- KL
def kl_penalty(logp, ref_logp, kind="k3"):
    """Per-token KL(pi_theta || pi_ref) estimate at the sampled token, (B, T), with gradient to
    logp.

    x = clamp(ref_logp - logp, +-20):  k1 = -x;  k2 = x^2 / 2;  k3 = exp(x) - x - 1 (>= 0, <= 10).
    """
    _check_tensor("logp", logp)
    _check_tokens("ref_logp", ref_logp, logp, like="logp")
    x = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x.square()
    if kind == "k3":
        return (torch.exp(x) - x - 1.0).clamp(-K3_LIMIT, K3_LIMIT)
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


# -------------------------------------------------------------- PPO surrogate: GRPO, DAPO, Dr. GRPO
def ppo_clip_loss(logp, old_logp, advantages, *, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Per-token clipped surrogate as a loss, (B, T), and the ratio r (B, T).

    r = exp(clamp(logp - old_logp, +-20));  loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    Dual clip (c > 1): for A < 0 the loss is capped at c |A|.  clip_low / clip_high may be floats or
    (B, T) tensors (Archer's per-token ranges). advantages: (B, 1) or (B, T), broadcast against
    logp.
    """
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    loss = torch.maximum(-advantages * ratio,
                         -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        cap = torch.where(advantages < 0, -advantages * dual_clip, math.inf)      # c |A| for A < 0
        loss = torch.minimum(loss, cap)
    return loss, ratio


def _ppo_metrics(adv, count, ratio, lo, hi, entropy=None):
    """Clip fractions, ratio mean, approximate KL(pi_old || pi) = E[r - 1 - log r] (k3) and mean
    entropy, over the valid tokens; lo, hi: the lower and upper ratio bounds (floats or (B, T)).

    The inputs come cleaned by _batch: r = exp(0 - 0) = 1 and entropy = 0 on padding, so padding is
    never clipped and adds nothing to the sums (no mask products needed).
    """
    r = ratio.detach()
    m = {
        "clip_frac_low": ((adv < 0) & (r < lo)).sum() / count,
        "clip_frac_high": ((adv > 0) & (r > hi)).sum() / count,
        "approx_kl": (r - 1.0 - r.log()).sum() / count,
        "ratio_mean": 1.0 + (r - 1.0).sum() / count,
    }
    if entropy is not None:
        m["entropy"] = entropy.sum() / count
    return m


class _PPOTerms(NamedTuple):
    """The common start of the PPO-clip losses (_ppo_terms)."""
    valid: torch.Tensor          # (B, T) bool, as _Batch
    mask: torch.Tensor           # (B, T) float mask
    count: torch.Tensor          # 0-d: valid tokens, at least 1
    adv: torch.Tensor            # (B, 1) or (B, T) advantages
    per_token: torch.Tensor      # (B, T) clipped surrogate loss, ppo_clip_loss
    ratio: torch.Tensor          # (B, T) r = pi / pi_old
    logp: torch.Tensor           # (B, T) cleaned log pi, with gradient
    rest: list                   # the further cleaned tensors, in the order given


def _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, no_low_clip=False,
               **tensors):
    """The common start of the PPO-clip losses: checks, cleaned (B, T) inputs (masked positions set
    to 0, see _batch), and the per-token clipped surrogate with its ratio, as a _PPOTerms. tensors:
    further (B, T) inputs (entropy, exact_term, ...) to check and clean, returned in `rest`.
    no_low_clip: see _check_clip (Clip-Cov's clip_low = 1).
    """
    _check_clip(clip_low, clip_high, dual_clip, no_low_clip)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, **tensors)
    logp, old_logp, *rest = b.tensors
    per_token, ratio = ppo_clip_loss(logp, old_logp, b.adv, clip_low=clip_low, clip_high=clip_high,
                                     dual_clip=dual_clip)
    return _PPOTerms(b.valid, b.mask, b.count, b.adv, per_token, ratio, logp, rest)


def grpo_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
              agg="token-mean", ref_logp=None, kl_coef=0.0, kl_kind="k3", entropy=None,
              num_tokens=None, num_seqs=None, norm_length=None):
    """GRPO (arXiv 2402.03300 eq. 3-4): clipped surrogate on group advantages, optional KL to a
    reference.

    logp (B, T) with gradient; old_logp, ref_logp (B, T); advantages (B,) or (B, T); mask (B, T).
    loss = agg( max(-A r, -A clip(r, 1-clip_low, 1+clip_high)) ) + kl_coef * agg( KL_kind(pi ||
    pi_ref) ) GRPO's paper settings: agg="seq-mean-token-mean", kl_coef=0.04; DAPO and Dr. GRPO are
    presets below. `entropy` (B, T), if given, only feeds the "entropy" metric. Metrics:
    clip_frac_low, clip_frac_high, approx_kl (to pi_old), ratio_mean, pg_loss, [kl], [entropy].
    """
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy, ref_logp=ref_logp)
    entropy, ref_logp = t.rest
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    pg = agg_loss(t.per_token, t.valid, agg, **agg_kw)                               # eq. 3
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics["pg_loss"] = pg.detach()
    loss = pg
    if kl_coef:
        if ref_logp is None:
            raise KnobError("kl_coef", f"kl_coef={kl_coef} needs ref_logp (B, T) from a frozen "
                                       "reference model")
        kl = agg_loss(kl_penalty(t.logp, ref_logp, kl_kind), t.valid, agg, **agg_kw)   # eq. 4
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    return loss, _to_floats(metrics)


def dapo_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.28, agg="token-mean",
              dual_clip=None, ref_logp=None, kl_coef=0.0, kl_kind="k3", entropy=None,
              num_tokens=None, num_seqs=None, norm_length=None):
    """DAPO (arXiv 2503.14476 eq. 8): GRPO with clip-higher (0.2 / 0.28, eq. 10), token-mean (eq.
    12), no KL.

    Dynamic sampling (eq. 11) acts on the data and lives in the trainer; the soft overlong penalty
    (eq. 13) is overlong_penalty below, added to the reward.
    """
    return grpo_loss(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                     agg=agg, dual_clip=dual_clip, ref_logp=ref_logp, kl_coef=kl_coef,
                     kl_kind=kl_kind, entropy=entropy, num_tokens=num_tokens, num_seqs=num_seqs,
                     norm_length=norm_length)


def overlong_penalty(lengths, max_len, cache):
    """DAPO's soft overlong punishment (arXiv 2503.14476 sec. 3.4), added to the reward, (N,)
    float32:
        R_length(y) = 0                                     if |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                      -1                                    if |y| > L_max
    lengths (N,): response tokens (EOS included). The paper's L_max 20480, L_cache 4096 scale to
    --max-new-tokens and --overlong-cache (default_overlong_cache: 0.2 L_max)."""
    return ((max_len - cache - lengths.float()) / cache).clamp(-1.0, 0.0)


def default_overlong_cache(max_new_tokens):
    """L_cache for a budget L_max: the paper's ratio 4096 / 20480 = 0.2 of it, rounded, at least 1
    token."""
    return max(1, round(max_new_tokens * 4096 / 20480))


def drgrpo_loss(logp, old_logp, advantages, mask, *, agg="seq-mean-token-sum-norm", clip_low=0.2,
                clip_high=0.2, dual_clip=None, ref_logp=None, kl_coef=0.0, kl_kind="k3",
                entropy=None, num_tokens=None, num_seqs=None, norm_length=None):
    """Dr. GRPO (arXiv 2503.20783 sec. 3.2): token sums divided by a constant (num_seqs *
    norm_length).

    Pair it with group_advantages(..., std_normalize=False). Set norm_length to the generation
    budget (max new tokens) so that the normaliser does not depend on the batch.
    """
    return grpo_loss(logp, old_logp, advantages, mask, agg=agg, clip_low=clip_low,
                     clip_high=clip_high, dual_clip=dual_clip, ref_logp=ref_logp, kl_coef=kl_coef,
                     kl_kind=kl_kind, entropy=entropy, num_tokens=num_tokens, num_seqs=num_seqs,
                     norm_length=norm_length)


# ------------------------------------------------------------- first-order entropy change per token
FIRST_ORDER_FORMS = ("paper", "code", "exact")


def first_order_term(logp, entropy, exact_term=None, form="paper"):
    """The first-order entropy-change factor g per sampled token, (B, T), no gradient; a token's
    estimated change is -eta w g, with w its weight on log pi(a) (entropy_math.py derives them):
        exact:  g = pi_a (log pi_a + H) - S2,  S2 = sum_b pi_b^2 (log pi_b + H)   (the realised change)
        paper:  g = (1 - pi_a)^2 (log pi_a + H)      (STEER v1's Omega, OPEFO's flow)
        code:   g = (1 - pi_a) (log pi_a + H)        (the released STEER code)
    The paper and code forms drop the factor pi_a. pi_a is clamped to [1e-8, 1 - 1e-8]; non-finite
    entries give 0."""
    logp = logp.detach().to(_acc_dtype(logp.dtype)).clamp(math.log(1e-8), math.log1p(-1e-8))
    pi = torch.exp(logp)                                          # in [1e-8, 1 - 1e-8]
    # log pi_a + H; > 0 iff pi_a > exp(-H)
    surprise = logp + entropy.to(logp.dtype)
    if form == "paper":
        g = (1 - pi).square() * surprise
    elif form == "code":
        g = (1 - pi) * surprise
    elif form == "exact":
        if exact_term is None:
            raise KnobError("form", "form='exact' needs exact_term (B, T): "
                                    "logprobs.token_stats(logits, "
                                    "tokens)[2]")
        g = pi * surprise - exact_term.to(logp.dtype)
    else:
        raise KnobError("form",
                        f"unknown first-order form {form!r}; choose one of {FIRST_ORDER_FORMS}")
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


# -------------------------------------------------------------------------------------------- STEER
def _steer_omega(logp, adv, entropy, exact_term, form, ratio=None):
    """STEER's Omega = -r A g (B, T), no gradient (g = first_order_term; eta and I_clip dropped; r
    as the released code, or 1 when ratio is None: the behaviour policy batch_statistics sees)."""
    weight = -adv if ratio is None else ratio.detach() * -adv
    return weight * first_order_term(logp, entropy, exact_term, form)     # Omega = -r A g


def _steer_magnitude(omega, valid, mode):
    """STEER's score m (B, T), 0 off `valid`: |Omega| (symmetric) or max(-Omega, 0) (asymmetric)."""
    if mode == "symmetric":
        return torch.where(valid, omega.abs(), 0.0)
    if mode == "asymmetric":
        return torch.where(valid, (-omega).clamp(min=0), 0.0)
    raise KnobError("mode", f"unknown STEER mode {mode!r}; choose symmetric or asymmetric")


def steer_weights(omega, mask, *, lambda_min=0.7, lambda_max=1.2, mapping="exp", mode="symmetric",
                  omega_max=None, scale_floor=0.02):
    """STEER's per-token weights lambda (B, T) from the signed entropy-change estimate omega (B, T).

    omega: signed first-order entropy change per token (negative = entropy decreases).
    symmetric:  m = |omega| on every token.  asymmetric: m = -omega where entropy decreases, else 0
    (only tokens that lower entropy are attenuated).
    exp (paper default):  lambda = lambda_min ** (m / max(M, scale_floor)),  M = the max of m,
                          clamped to [lambda_min, 1]; the largest |Omega| gets lambda_min.
    linear:               min-max rescale of m onto [lambda_max, lambda_min], descending; when all
                          valid m are equal every token gets (lambda_min + lambda_max) / 2, a
                          neutral weight, as the official code gives.
    omega_max: a caller-supplied M (e.g. the max over the whole mini-batch when the loss is called
    on micro-batches); default: the max over this call's valid tokens. Detached; 0 on masked
    positions. lambda_min in (0, 1]; lambda_max >= lambda_min.
    """
    _check_knob("lambda_min", lambda_min, 0 < lambda_min <= 1, "in (0, 1]")
    _check_knob("lambda_max", lambda_max, lambda_max >= lambda_min, f">= lambda_min={lambda_min}")
    valid = mask.bool()
    m = _steer_magnitude(omega.detach(), valid, mode)
    M = _max0(m) if omega_max is None else torch.as_tensor(omega_max, device=m.device,
              dtype=m.dtype)
    if mapping == "exp":
        # lambda = lambda_min ** (m / M), as exp(m (log lambda_min / M)): the form the tables
        # computed in (torch's pow rounds 1 ulp apart on some tokens)
        lam = torch.exp(m * (math.log(lambda_min) / M.clamp(min=scale_floor))).clamp(min=lambda_min)
    elif mapping == "linear":
        small = torch.where(valid, m, math.inf).amin() if valid.any() else m.new_zeros(())
        frac = ((m - small) / (M - small).clamp(min=1e-12)).clamp(0, 1)
        # all equal: the midpoint (official code)
        frac = torch.where(M > small, frac, 0.5)
        lam = lambda_max - (lambda_max - lambda_min) * frac
    else:
        raise KnobError("mapping", f"unknown STEER mapping {mapping!r}; choose exp or linear")
    if mode == "asymmetric":
        lam = torch.where(omega < 0, lam, 1.0)
    return lam * valid.to(omega.dtype)


def steer_loss(logp, old_logp, advantages, mask, entropy, *, exact_term=None, lambda_min=0.7,
               lambda_max=1.2, mapping="exp", mode="symmetric", form="paper", omega_max=None,
               clip_low=0.2, clip_high=0.28, dual_clip=10.0, agg="token-mean", num_tokens=None,
               num_seqs=None, norm_length=None):
    """STEER (arXiv 2510.10150): PPO-clip loss reweighted token by token to keep entropy change
    moderate.

    Omega_{i,t} = -r A g_{i,t}, with g = first_order_term(logp, entropy, exact_term, form): the
    estimated entropy change of each token's update (eta and I_clip dropped, r = pi/pi_old as in the
    released code). lambda = steer_weights(Omega) in [lambda_min, 1], detached, multiplies the
    per-token PPO loss (clip 0.2 / 0.28, dual clip 10), then token-mean. No KL, no entropy bonus, no
    renormalisation. With lambda_min = 1 this is exactly grpo_loss with the same clip settings.
    entropy, exact_term (B, T): the behaviour policy's H and S2; pi_a is the current one. Metrics:
    grpo_loss's plus weight_mean / weight_p05 (5th percentile) / weight_min / weight_max /
    omega_max.
    """
    _check_tensor("entropy", entropy)
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy, exact_term=exact_term)
    entropy, exact_term = t.rest
    omega = _steer_omega(t.logp, t.adv, entropy, exact_term, form, t.ratio)
    lam = steer_weights(omega, t.mask, lambda_min=lambda_min, lambda_max=lambda_max,
                        mapping=mapping, mode=mode, omega_max=omega_max)
    loss = agg_loss(lam * t.per_token, t.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics.update(pg_loss=loss.detach(), weight_mean=lam.sum() / t.count,
                   weight_p05=(_quantile(lam[t.valid], 0.05) if t.valid.any()
                               else lam.new_tensor(1.0)),
                   weight_min=_masked_min(lam, t.mask),
                   weight_max=_max0(lam), omega_max=_max0(omega.abs() * t.mask))
    return loss, _to_floats(metrics)


def quadrant_loss(logp, old_logp, advantages, mask, entropy, *, pos_likely=1.0, pos_unlikely=1.0,
                  neg_likely=1.0, neg_unlikely=1.0, clip_low=0.2, clip_high=0.2, dual_clip=None,
                  agg="token-mean", num_tokens=None, num_seqs=None, norm_length=None):
    """STEER's quadrant interventions (arXiv 2510.10150, its Figures 6, 22 and 23): GRPO's per-token
    loss scaled by one weight per quadrant, (A > 0 | A < 0) x (likely: pi_old(a) > exp(-H) |
    unlikely), the split of entropy_flow_quadrants. STEER's analysis predicts entropy rises when the
    A > 0 updates on unlikely tokens or the A < 0 updates on likely tokens grow, and falls when the
    other two grow. All weights 1: exactly grpo_loss. Weights >= 0. Metrics: grpo_loss's.
    """
    scales = dict(pos_likely=pos_likely, pos_unlikely=pos_unlikely, neg_likely=neg_likely,
                  neg_unlikely=neg_unlikely)
    for name, value in scales.items():
        _check_knob(name, value, value >= 0, ">= 0")
    _check_tensor("entropy", entropy)
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, old=old_logp,
                   entropy=entropy)
    old, entropy = t.rest
    likely = old + entropy > 0                                          # pi_old(a) > exp(-H)
    weight = torch.where(t.adv > 0, torch.where(likely, pos_likely, pos_unlikely),
                         torch.where(likely, neg_likely, neg_unlikely)).to(t.per_token.dtype)
    loss = agg_loss(weight * t.per_token, t.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics["pg_loss"] = loss.detach()
    return loss, _to_floats(metrics)


def steer_statistics(*, mask, advantages, old_logp, entropy, exact_term, form, mode, **_):
    """STEER's whole-batch statistic {"omega_max": M}: the max of the score m over the batch (a
    float), with Omega at r = 1 from the behaviour policy; steer_loss(omega_max=M) scales every
    micro-batch."""
    _check_tensors(advantages=advantages, old_logp=old_logp, entropy=entropy)
    b = _batch(mask, advantages, old_logp=old_logp, entropy=entropy, exact_term=exact_term)
    old_logp, entropy, exact_term = b.tensors
    omega = _steer_omega(old_logp, b.adv, entropy, exact_term, form)                  # at r = 1
    return {"omega_max": float(_max0(_steer_magnitude(omega, b.valid, mode)))}


# -------------------------------------------------------------------------------------------- OPEFO
def entropy_flow(logp, advantages, mask, entropy, exact_term=None, form="paper"):
    """OPEFO's entropy flow f (B, T), no gradient, 0 on masked positions:
        paper: f = -A (1 - pi)^2 (log pi + H);   exact: f = -A [pi (log pi + H) - S2]."""
    _check_tensor("logp", logp)
    _check_tensor("entropy", entropy)
    b = _batch(mask, advantages, logp=logp, entropy=entropy, exact_term=exact_term)
    logp, entropy, exact_term = b.tensors
    return _flow(logp, b.adv, b.mask, entropy, exact_term, form)


def _flow(logp, adv, mask, entropy, exact_term, form):
    """entropy_flow on cleaned inputs (_batch), mask the float mask."""
    return (-adv * first_order_term(logp, entropy, exact_term, form)) * mask    # f = -A g


def opefo_balance(f):
    """(lambda*, P, N) as 0-d tensors from the flow f (B, T): P = sum of f > 0, N = sum of |f| over
    f < 0, lambda* = (N - P) / (N + P) (0 when both are 0), so that (1 + l) P - (1 - l) N = 0."""
    pos, neg = f.clamp(min=0).sum(), (-f).clamp(min=0).sum()
    return _lambda_star(pos, neg), pos, neg


def _lambda_star(pos, neg):
    """lambda* = (N - P) / (N + P), 0 when both are 0."""
    total = pos + neg                                       # lambda* = (N - P) / (N + P)
    return torch.where(total > 0, (neg - pos) / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)


def opefo_loss(logp, advantages, mask, entropy, *, exact_term=None, form="paper", flow_totals=None,
               agg="token-mean", num_tokens=None, num_seqs=None, norm_length=None):
    """OPEFO (arXiv 2605.11491): on-policy policy gradient with the entropy flow balanced to zero.

    f = entropy_flow(...);  lambda* = (N - P) / (N + P);  w = 1 + lambda* on S+, 1 - lambda* on S-,
    1 where f = 0 (detached);  loss = agg(-w A log pi). Plain REINFORCE, no ratio, no clip: use it with
    one optimizer step per rollout batch (strictly on-policy), so pi = pi_old and log pi is `logp`
    itself. flow_totals: (P, N) over the whole batch when the loss is called on micro-batches
    (opefo_balance on the full batch); default: this call's tokens. Metrics: pg_loss, lambda_star,
    flow_pos (P), flow_neg (N), frac_pos (share of valid tokens in S+), weighted_flow (sum of w f
    over this call, 0 up to rounding when flow_totals is None), entropy.
    """
    _check_tensor("logp", logp)
    _check_tensor("entropy", entropy)
    b = _batch(mask, advantages, logp=logp, entropy=entropy, exact_term=exact_term)
    logp, entropy, exact_term = b.tensors
    f = _flow(logp, b.adv, b.mask, entropy, exact_term, form)
    if flow_totals is None:
        lam, pos, neg = opefo_balance(f)
    else:
        pos, neg = (torch.as_tensor(v, dtype=f.dtype, device=f.device) for v in flow_totals)
        lam = _lambda_star(pos, neg)
    # 1 + lambda* on S+, 1 - lambda* on S-
    w = 1.0 + lam * torch.sign(f)
    loss = agg_loss(-(w * b.adv) * logp, b.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = {"pg_loss": loss.detach(), "lambda_star": lam, "flow_pos": pos, "flow_neg": neg,
               "frac_pos": (f > 0).sum() / b.count, "weighted_flow": (w * f).sum(),
               "entropy": _masked_mean(entropy, b.mask, b.count)}
    return loss, _to_floats(metrics)


def opefo_statistics(*, mask, advantages, old_logp, entropy, exact_term, form, **_):
    """OPEFO's whole-batch statistic {"flow_totals": (P, N)} (floats), the flow totals of the whole
    batch from the behaviour policy (opefo_balance)."""
    _check_tensors(advantages=advantages, old_logp=old_logp, entropy=entropy)
    _, pos, neg = opefo_balance(entropy_flow(old_logp, advantages, mask, entropy, exact_term, form))
    return {"flow_totals": (float(pos), float(neg))}


# ------------------------------------------------------------------------------------------- Archer
def response_quantile(values, mask, q):
    """Per-row quantile of the valid entries, (B, T) -> (B,), torch.quantile's linear interpolation,
    by a top-k of the top (1 - q) share instead of a sort; +inf for rows without valid entries."""
    valid = mask.bool()
    n = valid.sum(-1)
    pos = q * (n - 1).clamp(min=0).to(values.dtype)               # rank of the quantile, ascending
    lo, hi = pos.floor(), pos.ceil()
    from_top_lo, from_top_hi = (n - 1 - lo.long()).clamp(min=0), (n - 1 - hi.long()).clamp(min=0)
    k = int(from_top_lo.max()) + 1 if valid.any() else 1
    padded = values - (1.0 - valid.to(values.dtype)) * 1e30                # padding sorts last
    top = padded.topk(k, dim=-1).values                                     # descending
    x_lo = top.gather(-1, from_top_lo[:, None]).squeeze(-1)
    x_hi = top.gather(-1, from_top_hi[:, None]).squeeze(-1)
    out = torch.where(hi > lo, x_lo + (pos - lo) * (x_hi - x_lo), x_lo)
    return torch.where(n > 0, out, math.inf)


def archer_loss(logp, old_logp, advantages, mask, entropy, ref_logp=None, *, quantile=0.8,
                clip_reasoning=0.5, clip_knowledge=0.2, dual_clip=10.0, kl_knowledge=0.001,
                kl_reasoning=0.0, kl_kind="k3", agg="token-mean", num_tokens=None, num_seqs=None,
                norm_length=None):
    """Archer (arXiv 2507.15778 v2, sec. 4.1): dual-token constraints in one update.

    tau_i = Quantile_rho({H_{i,t}}_t) over each response's valid tokens, rho = 0.8          (eq. 2)
    omega_{i,t} = 1[H_{i,t} >= tau_i]: reasoning tokens (~20%); the rest are knowledge tokens.
    eps(e)  = omega clip_reasoning + (1 - omega) clip_knowledge   (0.5 / 0.2, both sides)   (eq. 3)
    beta(e) = omega kl_reasoning   + (1 - omega) kl_knowledge     (0 / 0.001)               (eq. 4)
    loss = agg( PPO-clip with range eps(e), dual clip 10  +  beta(e) KL_k3(pi || pi_ref) )   (eq. 5)
    The KL sits inside the token aggregation, as eq. 5 writes it (micro-batching stays exact); the
    token types come from the behaviour policy's `entropy`. Where the official code differs:
    docs/losses.md. quantile in [0, 1]; clip_reasoning, clip_knowledge in [0, 1); dual_clip > 1 or
    None. Metrics: grpo_loss's plus reasoning_frac and kl_knowledge / kl_reasoning (unweighted KL
    means per type).
    """
    _check_knob("quantile", quantile, 0 <= quantile <= 1, "in [0, 1]")
    _check_knob("clip_reasoning", clip_reasoning, 0 <= clip_reasoning < 1, "in [0, 1)")
    _check_knob("clip_knowledge", clip_knowledge, 0 <= clip_knowledge < 1, "in [0, 1)")
    _check_dual_clip(dual_clip)
    _check_tensor("entropy", entropy)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy, ref_logp=ref_logp)
    logp, old_logp, entropy, ref_logp = b.tensors
    reasoning = _reasoning_tokens(entropy, b.valid, b.mask, quantile)               # omega, eq. 2
    eps = clip_knowledge + (clip_reasoning - clip_knowledge) * reasoning            # eq. 3
    per_token, ratio = ppo_clip_loss(logp, old_logp, b.adv, clip_low=eps, clip_high=eps,
                                     dual_clip=dual_clip)
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    metrics = _ppo_metrics(b.adv, b.count, ratio, 1 - eps, 1 + eps, entropy)
    metrics["reasoning_frac"] = reasoning.sum() / b.count
    metrics["pg_loss"] = agg_loss(per_token.detach(), b.valid, agg, **agg_kw)
    per_token = _token_type_kl(per_token, logp, ref_logp, reasoning, b.mask, kl_knowledge,
                               kl_reasoning, kl_kind, metrics, "Archer")
    loss = agg_loss(per_token, b.valid, agg, **agg_kw)                               # eq. 5
    return loss, _to_floats(metrics)


def _reasoning_tokens(entropy, valid, mask, quantile):
    """Archer's token types on cleaned inputs (_batch): omega (B, T) in the float mask's dtype, 1 on
    the reasoning tokens H_{i,t} >= tau_i = Quantile_rho of row i's valid entropies (Archer eq. 2),
    0 on knowledge tokens and padding."""
    tau = response_quantile(entropy, valid, quantile)                                # (B,)  eq. 2
    return (entropy >= tau[:, None].to(entropy.dtype)).to(mask.dtype) * mask


def _token_type_kl(per_token, logp, ref_logp, reasoning, mask, kl_knowledge, kl_reasoning, kl_kind,
                   metrics, who):
    """per_token + beta(e) KL_kind(pi || pi_ref), beta(e) = omega kl_reasoning + (1 - omega)
    kl_knowledge (Archer eq. 4), inside the token aggregation (eq. 5); adds metrics kl_knowledge /
    kl_reasoning. Both coefficients 0: unchanged, ref_logp not read."""
    if not (kl_knowledge or kl_reasoning):
        return per_token
    if ref_logp is None:
        raise KnobError("kl_knowledge", f"{who}'s KL terms need ref_logp (B, T) from the frozen base "
                                        "model "
                                        "(or set kl_knowledge=0 and kl_reasoning=0)")
    kl = kl_penalty(logp, ref_logp, kl_kind)
    beta = kl_knowledge + (kl_reasoning - kl_knowledge) * reasoning                 # eq. 4
    knowledge = mask - reasoning
    metrics.update(kl_knowledge=_masked_mean(kl.detach(), knowledge, knowledge.sum().clamp(min=1)),
                   kl_reasoning=_masked_mean(kl.detach(), reasoning, reasoning.sum().clamp(min=1)))
    return per_token + beta * kl


# ---------------------------------------------------------- clip successors: ASPO, CE-GPPO and GPPO
def _with_gradient(value, weight, logp):
    """A per-token loss with value `value` and gradient `weight` with respect to logp (both (B, T),
    detached): value + weight (log pi - sg(log pi)), exactly `value` for finite log pi."""
    return value.detach() + weight.detach() * (logp - logp.detach())


def aspo_loss(logp, old_logp, advantages, mask, entropy, ref_logp=None, *, quantile=0.8,
              clip_reasoning=0.4, clip_knowledge=0.2, dual_clip=3.0, kl_knowledge=0.001,
              kl_reasoning=0.0, kl_kind="k3", agg="token-mean", num_tokens=None, num_seqs=None,
              norm_length=None):
    """ASPO (arXiv 2510.06062; Archer's successor, public code wizard-III/Archer2.0): Archer's token
    split, the importance ratio of positive-advantage tokens flipped, a soft dual clip c on both
    sides.

    omega, eps as Archer (eq. 2-3; eps 0.4 / 0.2 as the public code), r = pi / pi_old (no gradient
    through it), per-token weight w = min(1 / min(r, 1 + eps), c) for A > 0, min(max(r, 1 - eps), c)
    for A <= 0:
        A > 0, 1/c <= r <= 1 + eps:  value -A / r          gradient -(A / r) grad log pi  (flipped)
        A > 0, r < 1/c:              value -A c            gradient -A c grad log pi      (soft dual)
        A > 0, r > 1 + eps:          value -A / (1 + eps)  gradient 0                     (PPO clip)
        A < 0, 1 - eps <= r <= c:    value -A r            gradient -A r grad log pi      (PPO)
        A < 0, r > c:                value -A c            gradient -A c grad log pi      (soft dual)
        A < 0, r < 1 - eps:          value -A (1 - eps)    gradient 0                     (PPO clip)
    loss = agg( that + beta(e) KL_k3(pi || pi_ref) ) with Archer's beta(e) (0 / 0.001). At r = 1 the
    gradient is GRPO's. clip_reasoning=0.2 gives the paper's eps 0.2 for all tokens; dual_clip=None
    no cap. The recipe drops all-equal groups (LOSSES["aspo"].data_defaults). Where the public code
    differs (token types, KL normaliser, clipped values): docs/losses.md; gradients agree to float
    precision. quantile in [0, 1]; clip_reasoning, clip_knowledge in [0, 1); dual_clip > 1 or None;
    KLs >= 0. Metrics: grpo_loss's, pg_loss, reasoning_frac, dual_clip_frac_pos / _neg,
    [kl_knowledge, kl_reasoning].
    """
    _check_knob("quantile", quantile, 0 <= quantile <= 1, "in [0, 1]")
    _check_knob("clip_reasoning", clip_reasoning, 0 <= clip_reasoning < 1, "in [0, 1)")
    _check_knob("clip_knowledge", clip_knowledge, 0 <= clip_knowledge < 1, "in [0, 1)")
    _check_knob("kl_knowledge", kl_knowledge, kl_knowledge >= 0, ">= 0")
    _check_knob("kl_reasoning", kl_reasoning, kl_reasoning >= 0, ">= 0")
    _check_dual_clip(dual_clip)
    _check_tensor("entropy", entropy)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy, ref_logp=ref_logp)
    logp, old_logp, entropy, ref_logp = b.tensors
    adv = b.adv
    # omega (Archer eq. 2)
    reasoning = _reasoning_tokens(entropy, b.valid, b.mask, quantile)
    eps = clip_knowledge + (clip_reasoning - clip_knowledge) * reasoning            # per token type
    ratio = torch.exp((logp.detach() - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    cap = math.inf if dual_clip is None else dual_clip
    pos = adv > 0
    # flipped / PPO
    w = torch.where(pos, 1.0 / torch.minimum(ratio, 1.0 + eps), torch.maximum(ratio, 1.0 - eps))
    # soft dual clip at c
    w = w.clamp(max=cap)
    unclipped = torch.where(pos, ratio <= 1.0 + eps, ratio >= 1.0 - eps)    # PPO's clip mask kept
    # value -A w, grad -A w
    per_token = _with_gradient(-adv * w, -adv * w * unclipped, logp)
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    metrics = _ppo_metrics(adv, b.count, ratio, 1 - eps, 1 + eps, entropy)
    metrics.update(pg_loss=agg_loss(per_token.detach(), b.valid, agg, **agg_kw),
                   reasoning_frac=reasoning.sum() / b.count,
                   dual_clip_frac_pos=(pos & (ratio * cap < 1.0)).sum() / b.count,
                   dual_clip_frac_neg=((adv < 0) & (ratio > cap)).sum() / b.count)
    per_token = _token_type_kl(per_token, logp, ref_logp, reasoning, b.mask, kl_knowledge,
                               kl_reasoning, kl_kind, metrics, "ASPO")
    return agg_loss(per_token, b.valid, agg, **agg_kw), _to_floats(metrics)


def ce_gppo_loss(logp, old_logp, advantages, mask, *, beta_low=0.5, beta_high=1.0, clip_low=0.2,
                 clip_high=0.2, dual_clip=10.0, agg="token-mean", entropy=None, num_tokens=None,
                 num_seqs=None, norm_length=None):
    """CE-GPPO (arXiv 2509.20712; public code Kwai-Klear/CE-GPPO, compute_gppo_loss_general_beta):
    the PPO-clip loss whose clipped tokens keep a bounded gradient, beta_1 = beta_low below, beta_2
    = beta_high above.

    r = pi / pi_old (log-ratio clamped to +-20), eps_l = clip_low, eps_h = clip_high, c = dual_clip;
    per token:
        A < 0, r < 1 - eps_l:  value -A (1 - eps_l)  gradient -beta_1 (1 - eps_l) A grad log pi  (PPO 0)
        A > 0, r > 1 + eps_h:  value -A (1 + eps_h)  gradient -beta_2 (1 + eps_h) A grad log pi  (PPO 0)
        A < 0, r > c:          value -A c            gradient 0        (verl's hard dual clip, c = 10)
        otherwise:             value -A r             gradient -A r grad log pi
    then agg (token-mean). beta_1 = beta_2 = 0 is grpo_loss to the last bit; 1 and 1 is GPPO
    (gppo_loss). Defaults: the released 1.5B recipe (beta_1 0.5, beta_2 1, eps 0.2 / 0.2, dual clip
    10; 7B: beta_1 0.75). The recipe drops all-equal groups (LOSSES["ce_gppo"].data_defaults). Where
    the public code differs (the clipped tokens' value, the unclamped ratio): docs/losses.md.
    beta_low, beta_high >= 0; clip_low in [0, 1); clip_high >= 0; dual_clip > 1 or None. Metrics:
    grpo_loss's (clip_frac_low / clip_frac_high: the shares of valid tokens in the two clipped
    cases), pg_loss, dual_clip_frac (A < 0 with r > c).
    """
    _check_knob("beta_low", beta_low, beta_low >= 0, ">= 0")
    _check_knob("beta_high", beta_high, beta_high >= 0, ">= 0")
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy)
    (entropy,) = t.rest
    adv, r = t.adv, t.ratio.detach()
    per_token = _preserved_gradient(t, beta_low, beta_high, clip_low, clip_high)
    loss = agg_loss(per_token, t.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    cap = math.inf if dual_clip is None else dual_clip
    metrics.update(pg_loss=loss.detach(), dual_clip_frac=((adv < 0) & (r > cap)).sum() / t.count)
    return loss, _to_floats(metrics)


def _preserved_gradient(t, beta_low, beta_high, clip_low, clip_high):
    """CE-GPPO's per-token term on _ppo_terms `t`: PPO's value, plus the gradient -beta (1 -+ eps) A
    grad log pi on the tokens PPO clips (value + 0)."""
    adv, r = t.adv, t.ratio.detach()
    low = ((adv < 0) & (r < 1 - clip_low)).to(t.mask.dtype)                   # PPO's lower clip
    high = ((adv > 0) & (r > 1 + clip_high)).to(t.mask.dtype)                 # PPO's upper clip
    kept = beta_low * (1 - clip_low) * low + beta_high * (1 + clip_high) * high   # beta (1 -+ eps)
    return t.per_token + _with_gradient(torch.zeros_like(t.per_token), -adv * kept, t.logp)


def gppo_loss(logp, old_logp, advantages, mask, *, beta_low=1.0, beta_high=1.0, clip_low=0.2,
              clip_high=0.28, dual_clip=10.0, agg="token-mean", entropy=None, num_tokens=None,
              num_seqs=None, norm_length=None):
    """GPPO (arXiv 2508.07629, Klear-Reasoner; public code Kwai-Klear/KlearReasoner): ce_gppo_loss
    with beta_1 = beta_2 = 1, "forward like clip-higher": the clipped tokens' gradient is the one at
    the clip boundary, (1 -+ eps) A grad log pi. Clip 0.2 / 0.28 and dual clip 10 as the released
    Klear-Reasoner scripts (recipe/dapo/perf_run_dapo_ours_math.sh).
    """
    return ce_gppo_loss(logp, old_logp, advantages, mask, beta_low=beta_low, beta_high=beta_high,
                        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                        entropy=entropy, num_tokens=num_tokens, num_seqs=num_seqs,
                        norm_length=norm_length)


# ------------------------------------------------------- the ratio reshaped: GSPO, CISPO, SAPO
def _sequence_log_ratio(logp, old_logp, valid):
    """log s_i = mean over row i's valid tokens of log r_t (B, 1), clamped to +-20: GSPO's
    length-normalised sequence ratio in log space (0 for a row without valid tokens)."""
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    return (torch.where(valid, logp - old_logp, 0.0).sum(-1, keepdim=True) / n
            ).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def gspo_loss(logp, old_logp, advantages, mask, *, clip_low=3e-4, clip_high=4e-4,
              agg="seq-mean-token-mean", entropy=None, num_tokens=None, num_seqs=None,
              norm_length=None):
    """GSPO (arXiv 2507.18071, Qwen3's RL): the PPO clip on the length-normalised sequence ratio
        s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|) = exp(mean_t log r_{i,t}),
        loss = agg( max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high)) ),
    clip 3e-4 / 4e-4 and seq-mean-token-mean as the paper (TRL's
    importance_sampling_level="sequence"). s_i depends on every token of the response, so the
    gradient of token t is s_i A_i / |y_i| grad log pi_t for every unclipped sequence. Metrics:
    grpo_loss's (clip fractions over sequences, token-weighted), pg_loss.
    """
    _check_clip(clip_low, clip_high, None)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy)
    logp, old_logp, entropy = b.tensors
    s = torch.exp(_sequence_log_ratio(logp, old_logp, b.valid)).expand_as(logp)
    return _gspo_surrogate(b, s, entropy, clip_low, clip_high, agg, num_tokens, num_seqs,
                           norm_length)


def gspo_token_loss(logp, old_logp, advantages, mask, *, clip_low=3e-4, clip_high=4e-4,
                    agg="seq-mean-token-mean", entropy=None, num_tokens=None, num_seqs=None,
                    norm_length=None):
    """GSPO-token (arXiv 2507.18071 sec. 4.3; verl's loss_mode gspo): s_{i,t} = sg(s_i) pi(y_t) /
    sg(pi(y_t)), the same value as gspo_loss per token and a per-token gradient s_i A_{i,t} grad log
    pi_t, so advantages may vary along a response. With one advantage per response and
    seq-mean-token-mean it is gspo_loss's gradient exactly. Knobs and metrics as gspo_loss."""
    _check_clip(clip_low, clip_high, None)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy)
    logp, old_logp, entropy = b.tensors
    log_s = _sequence_log_ratio(logp, old_logp, b.valid).detach()
    s = torch.exp(log_s + logp - logp.detach())                     # sg(s_i) pi / sg(pi)
    return _gspo_surrogate(b, s, entropy, clip_low, clip_high, agg, num_tokens, num_seqs,
                           norm_length)


def _gspo_surrogate(b, s, entropy, clip_low, clip_high, agg, num_tokens, num_seqs, norm_length):
    """The clipped surrogate of GSPO on cleaned inputs (_batch), ratio s (B, T); (loss, metrics)."""
    per_token = torch.maximum(-b.adv * s, -b.adv * s.clamp(1 - clip_low, 1 + clip_high))
    loss = agg_loss(per_token, b.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(b.adv, b.count, torch.where(b.valid, s, 1.0), 1 - clip_low,
                           1 + clip_high, entropy)
    metrics["pg_loss"] = loss.detach()
    return loss, _to_floats(metrics)


def cispo_loss(logp, old_logp, advantages, mask, *, clip_low=None, clip_high=0.2, ratio_cap=None,
               agg="token-mean", entropy=None, num_tokens=None, num_seqs=None, norm_length=None):
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE weighted by the clipped, detached ratio,
        loss = agg( -sg(clip(r, 1 - clip_low, cap)) A log pi ),   r = pi / pi_old,
    so no token loses its gradient (PPO's clip zeroes it). The cap: 1 + clip_high (the paper's and
    verl's form, verl's example 1.2: the default), or ratio_cap when given (TRL's epsilon_high, r <=
    5.0 recommended: cispo_trl). clip_low None: no lower bound (the paper's "eps_low large"; verl's
    default config has 0.2). Metrics: grpo_loss's (clip_frac_low / high: valid tokens whose weight
    is capped, of either sign), pg_loss.
    """
    _check_knob("clip_high", clip_high, clip_high >= 0, ">= 0")
    if clip_low is not None:
        _check_knob("clip_low", clip_low, 0 <= clip_low < 1, "in [0, 1) or None")
    if ratio_cap is not None:
        _check_knob("ratio_cap", ratio_cap, ratio_cap > 0, "> 0 or None")
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy)
    logp, old_logp, entropy = b.tensors
    ratio = torch.exp((logp.detach() - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    lo = 0.0 if clip_low is None else 1 - clip_low
    hi = 1 + clip_high if ratio_cap is None else ratio_cap
    weight = -ratio.clamp(lo, hi) * b.adv                                # -sg(clip(r)) A
    per_token = _with_gradient(weight * logp, weight, logp)              # -sg(clip(r)) A log pi
    loss = agg_loss(per_token, b.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(b.adv, b.count, ratio, lo, hi, entropy)
    # capped weights, either sign
    metrics.update(clip_frac_low=(b.valid & (ratio < lo)).sum() / b.count,
                   clip_frac_high=(b.valid & (ratio > hi)).sum() / b.count, pg_loss=loss.detach())
    return loss, _to_floats(metrics)


def cispo_trl_loss(logp, old_logp, advantages, mask, *, clip_low=None, clip_high=0.2, ratio_cap=5.0,
                   agg="token-mean", entropy=None, num_tokens=None, num_seqs=None,
                   norm_length=None):
    """CISPO with TRL's cap: r <= epsilon_high = 5.0 (TRL's recommended value), no lower bound;
    cispo_loss otherwise."""
    return cispo_loss(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                      ratio_cap=ratio_cap, agg=agg, entropy=entropy, num_tokens=num_tokens,
                      num_seqs=num_seqs, norm_length=norm_length)


def sapo_loss(logp, old_logp, advantages, mask, *, tau_pos=1.0, tau_neg=1.05,
              agg="seq-mean-token-mean", entropy=None, num_tokens=None, num_seqs=None,
              norm_length=None):
    """SAPO (arXiv 2511.20347): a smooth gate in place of the hard clip,
        f(r) = sigma(tau (r - 1)) 4 / tau,   tau = tau_pos (1.0) for A > 0, tau_neg (1.05) otherwise,
        loss = agg( -f(r) A ),   r = pi / pi_old (log-ratio clamped to +-20),
    whose gradient is -A grad log pi at r = 1 (f'(1) = 1) and fades smoothly as r leaves 1.
    seq-mean-token-mean as verl and TRL run it. tau_pos, tau_neg > 0. Metrics: grpo_loss's (no clip:
    clip fractions 0), pg_loss.
    """
    _check_knob("tau_pos", tau_pos, tau_pos > 0, "> 0")
    _check_knob("tau_neg", tau_neg, tau_neg > 0, "> 0")
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy)
    logp, old_logp, entropy = b.tensors
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    tau = torch.where(b.adv > 0, ratio.new_tensor(tau_pos), ratio.new_tensor(tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau                  # f(r)
    loss = agg_loss(-gate * b.adv, b.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(b.adv, b.count, ratio, 0.0, math.inf, entropy)
    metrics["pg_loss"] = loss.detach()
    return loss, _to_floats(metrics)


# ------------------------------------ gates on the first-order entropy change: ERC, Clip_B, Clip_V
def _erc_loss(preserve, logp, old_logp, advantages, mask, entropy, current_entropy, band_low, band_high,
              clip_low, clip_high, dual_clip, agg, agg_kw):
    """ERC's gate on DAPO's per-token PPO term, or with preserve=True on GPPO's gradient-preserving one:
    rho = (H + 1e-8) / (H_old + 1e-8) per token; outside the open band (band_low, band_high) a token
    keeps its loss value and loses its gradient; the normaliser is unchanged."""
    _check_knob("band_low", band_low, 0 <= band_low < 1, "in [0, 1)")
    _check_knob("band_high", band_high, band_high > 1, "> 1")
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy, current_entropy=current_entropy)
    entropy, current_entropy = t.rest
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    per_token = _preserved_gradient(t, 1.0, 1.0, clip_low, clip_high) if preserve else t.per_token
    rho = (current_entropy.detach() + 1e-8) / (entropy + 1e-8)
    inside = (rho > band_low) & (rho < band_high) & t.valid
    per_token = torch.where(inside, per_token, per_token.detach())
    metrics.update(erc_frac=(t.valid & ~inside).sum() / t.count)
    loss = agg_loss(per_token, t.valid, agg, **agg_kw)
    metrics["pg_loss"] = loss.detach()
    return loss, _to_floats(metrics)


def erc_dapo_loss(logp, old_logp, advantages, mask, entropy, current_entropy, *, band_low=0.95,
                  band_high=1.05, clip_low=0.2, clip_high=0.28, dual_clip=10.0, agg="token-mean",
                  num_tokens=None, num_seqs=None, norm_length=None):
    """ERC, entropy ratio clipping (arXiv 2512.05591; public code Kwai-Klear/ERC, grpo_erc) on
    DAPO's loss:
        rho_{i,t} = (H_theta + 1e-8) / (H_old + 1e-8),   H_theta the current policy's entropy (detached),
        H_old the behaviour policy's; a token with rho outside (0.95, 1.05) keeps its PPO-clip value
        (clip 0.2 / 0.28, dual clip 10, token-mean, as the released scripts) and loses its gradient.
    rho = 1 on the first mini-batch of a rollout batch (pi = pi_old): ERC acts only off-policy. Not
    here: the scripts' extra 0.1 x NLL of the correct responses (trainer-side). band_low < 1 <
    band_high. Metrics: grpo_loss's, pg_loss, erc_frac (share of valid tokens whose gradient is
    removed).
    """
    return _erc_loss(False, logp, old_logp, advantages, mask, entropy, current_entropy, band_low, band_high,
                     clip_low, clip_high, dual_clip, agg,
                     dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length))


def erc_gppo_loss(logp, old_logp, advantages, mask, entropy, current_entropy, *, band_low=0.95,
                  band_high=1.05, clip_low=0.2, clip_high=0.2, dual_clip=10.0, agg="token-mean",
                  num_tokens=None, num_seqs=None, norm_length=None):
    """ERC (gppo_erc) on GPPO's gradient-preserving clip (clip 0.2 / 0.2 as the released GPPO-ERC
    script): erc_dapo_loss's gate on gppo_loss's per-token term. Knobs and metrics as erc_dapo_loss.
    """
    return _erc_loss(True, logp, old_logp, advantages, mask, entropy, current_entropy, band_low, band_high,
                     clip_low, clip_high, dual_clip, agg,
                     dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length))


def clip_b_select(old_logp, advantages, mask, entropy, *, mu=2.5):
    """Clip_B's dropped tokens (B, T) bool: A < 0 tokens whose S = pi_a (log pi_a + H) (the
    behaviour policy's), centred over the batch's valid tokens, lies below -mu std(S) (population
    std); none when std(S) < 1e-12."""
    _check_knob("mu", mu, mu > 0, "> 0")
    b = _batch(mask, advantages, old_logp=old_logp, entropy=entropy)
    lp, h = b.tensors
    S = torch.exp(lp) * (lp + h)                                   # pi_a (log pi_a + H)
    mean = (S * b.mask).sum() / b.count
    std = (((S - mean) * b.mask).square().sum() / b.count).sqrt()
    return (b.adv < 0) & (S - mean < -mu * std) & b.valid & (std >= 1e-12)


def clip_v_select(old_logp, advantages, mask, entropy, exact_term=None, *, mu=8.5, max_frac=1e-4,
                  form="exact"):
    """Clip_V's dropped tokens (B, T) bool, from the behaviour policy: x = -g with g
    first_order_term(form) (form="exact": x = S2 - pi_a (log pi_a + H), the authors' nec - S), not
    centred; tokens with A <= 0 and x > mu std(x) (population std over the valid tokens) are
    dropped. When they are more than max_frac of the valid tokens, the A < 0 ones among them are cut
    to the K = max(1, int(max_frac n)) largest x."""
    _check_knob("mu", mu, mu > 0, "> 0")
    _check_knob("max_frac", max_frac, 0 < max_frac <= 1, "in (0, 1]")
    b = _batch(mask, advantages, old_logp=old_logp, entropy=entropy, exact_term=exact_term)
    lp, h, s2 = b.tensors
    if form == "exact":                                            # the authors' nec - S, unclamped
        if s2 is None:
            raise KnobError("form", "form='exact' needs exact_term (B, T): logprobs.token_stats(logits, "
                                    "tokens)[2]")
        x = (s2 - torch.exp(lp) * (lp + h)).to(b.mask.dtype)
    else:
        x = -first_order_term(lp, h, s2, form).to(b.mask.dtype)
    mean = (x * b.mask).sum() / b.count
    std = (((x - mean) * b.mask).square().sum() / b.count).sqrt()
    if std < 1e-12:
        return torch.zeros_like(b.valid)
    dropped = (b.adv <= 0) & (x > mu * std) & b.valid
    n, k = int(b.valid.sum()), max(1, int(max_frac * int(b.valid.sum())))
    violators = dropped & (b.adv < 0)
    if int(dropped.sum()) > max_frac * n and int(violators.sum()) > k:
        top = torch.where(violators, x, -math.inf).flatten().topk(k).indices
        keep_top = torch.zeros_like(violators).flatten()
        keep_top[top] = True
        dropped = (dropped & ~violators) | keep_top.view_as(violators)
    return dropped


def _gated_grpo(logp, old_logp, advantages, mask, dropped, clip_low, clip_high, dual_clip, agg,
                entropy, num_tokens, num_seqs, norm_length):
    """grpo_loss with the dropped tokens out of the mask (and its normalisers), as the Trinity-RFT
    gates zero response_mask; metrics gain gate_frac (dropped share of the call's valid tokens)."""
    valid = mask.bool()
    kept = valid & ~dropped.bool()
    loss, metrics = grpo_loss(logp, old_logp, advantages, kept, clip_low=clip_low,
                              clip_high=clip_high, dual_clip=dual_clip, agg=agg, entropy=entropy,
                              num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    metrics["gate_frac"] = float((valid & dropped.bool()).sum()) / max(1, int(valid.sum()))
    return loss, metrics


def clip_b_loss(logp, old_logp, advantages, mask, entropy, *, mu=2.5, clip_low=0.2, clip_high=0.2,
                dual_clip=None, agg="token-mean", dropped=None, num_tokens=None, num_seqs=None,
                norm_length=None):
    """Clip_B ("On the Entropy Dynamics in Reinforcement Fine-Tuning of LLMs", arXiv 2602.03392;
    public code agentscope-ai/Trinity-RFT, ClipBAdvantageFn): GRPO without the A < 0 tokens whose
    token-specific entropy term S = pi_a (log pi_a + H), centred over the batch, is below -mu std(S)
    (mu 2.5): the penalised tokens whose update would lower the entropy most; A >= 0 tokens are
    always kept. dropped: the whole batch's choice (batch_statistics: clip_b_select), sliced per
    micro-batch, with num_tokens counting the kept tokens; default: this call's. Metrics:
    grpo_loss's, gate_frac.
    """
    _check_tensor("entropy", entropy)
    if dropped is None:
        dropped = clip_b_select(old_logp, advantages, mask, entropy, mu=mu)
    return _gated_grpo(logp, old_logp, advantages, mask, dropped, clip_low, clip_high, dual_clip,
                       agg, entropy, num_tokens, num_seqs, norm_length)


def clip_v_loss(logp, old_logp, advantages, mask, entropy, exact_term=None, *, mu=8.5,
                max_frac=1e-4, form="exact", clip_low=0.2, clip_high=0.2, dual_clip=None,
                agg="token-mean", dropped=None, num_tokens=None, num_seqs=None, norm_length=None):
    """Clip_V (arXiv 2602.03392; Trinity-RFT's ClipVAdvantageFn): GRPO without the A <= 0 tokens
    whose score x = nec - S = S2 - pi_a (log pi_a + H) (minus the exact first-order entropy factor:
    such a token's update lowers the entropy) exceeds mu std(x), at most max_frac of the tokens
    among A < 0 ones. mu 8.5 (the authors' default_args and example config; their class's __init__
    default 2.0 applies only when it is built directly), max_frac 1e-4. form="paper": x = -(1 -
    pi_a)^2 (log pi_a + H), STEER's and OPEFO's score, so the exact-versus-paper question is
    testable here too. dropped: as clip_b_loss. Metrics: grpo_loss's, gate_frac.
    """
    _check_tensor("entropy", entropy)
    if dropped is None:
        dropped = clip_v_select(old_logp, advantages, mask, entropy, exact_term, mu=mu,
                                max_frac=max_frac, form=form)
    return _gated_grpo(logp, old_logp, advantages, mask, dropped, clip_low, clip_high, dual_clip,
                       agg, entropy, num_tokens, num_seqs, norm_length)


def _gate_statistics(mask, dropped):
    """The batch's dropped tokens and the normalisers of the kept ones."""
    return {"dropped": dropped, **batch_totals(mask.bool() & ~dropped)}


def clip_b_statistics(*, mask, advantages, old_logp, entropy, mu, **_):
    """Clip_B's whole-batch statistics: {"dropped": (B, T) bool} (slice it per micro-batch) and the
    kept tokens' num_tokens, num_seqs."""
    _check_tensors(advantages=advantages, old_logp=old_logp, entropy=entropy)
    return _gate_statistics(mask, clip_b_select(old_logp, advantages, mask, entropy, mu=mu))


def clip_v_statistics(*, mask, advantages, old_logp, entropy, exact_term, mu, max_frac, form, **_):
    """Clip_V's whole-batch statistics, as clip_b_statistics."""
    _check_tensors(advantages=advantages, old_logp=old_logp, entropy=entropy)
    return _gate_statistics(mask, clip_v_select(old_logp, advantages, mask, entropy, exact_term, mu=mu,
                                                max_frac=max_frac, form=form))


# -------------------------------------------------------- entropy interventions (STEER's baselines)
def entropy_bonus_loss(logp, old_logp, advantages, mask, current_entropy, *, coef=0.001,
                       clip_low=0.2, clip_high=0.2, dual_clip=None, agg="token-mean", entropy=None,
                       num_tokens=None, num_seqs=None, norm_length=None):
    """Entropy bonus: the PPO-clip loss minus coef times the current policy's entropy, with its
    gradient.

    loss = agg(PPO-clip)  -  coef * agg(H),   H = current_entropy (B, T) (token_logprobs_entropy)
    on the current logits, WITH gradient: the bonus acts on every logit, not only through log pi(a).
    Both terms use the same aggregation, as verl's entropy_coeff does. coef = 0.001 (verl's former
    default entropy_coeff); coef >= 0. PPO settings default to grpo_loss's. The bonus's gradient
    does not pass through logp, so w = -dLoss/dlogp (entropy_flow_quadrants) does not see it.
    `entropy` (B, T), if given, feeds the "entropy" metric (behaviour policy). Metrics: grpo_loss's
    plus entropy_bonus (agg of H over this call, before coef) and coef.
    """
    _check_knob("coef", coef, coef >= 0, ">= 0")
    _check_tensor("current_entropy", current_entropy)
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy, current_entropy=current_entropy)
    entropy, current_entropy = t.rest
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    pg = agg_loss(t.per_token, t.valid, agg, **agg_kw)
    bonus = agg_loss(current_entropy, t.valid, agg, **agg_kw)
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics.update(pg_loss=pg.detach(), entropy_bonus=bonus.detach(), coef=bonus.new_tensor(coef))
    return pg - coef * bonus, _to_floats(metrics)


def adaptive_entropy_loss(logp, old_logp, advantages, mask, current_entropy, *, coef, clip_low=0.2,
                          clip_high=0.2, dual_clip=None, agg="token-mean", entropy=None,
                          num_tokens=None, num_seqs=None, norm_length=None):
    """Adaptive entropy control (Skywork-OR1, arXiv 2505.22312): entropy_bonus_loss with this step's
    coefficient alpha_k as coef (required): what entropy_control_step returned, 0 while the entropy
    is above the target.
    """
    return entropy_bonus_loss(logp, old_logp, advantages, mask, current_entropy, coef=coef,
                              clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                              entropy=entropy, num_tokens=num_tokens, num_seqs=num_seqs,
                              norm_length=norm_length)


def entropy_control_init(*, target=0.2, coef=0.005, delta=0.001, coef_min=0.0, coef_max=0.5):
    """The adaptive entropy controller's state, a dict of floats (save it with the checkpoint).
    Defaults: Skywork-OR1's released 7B script. 0 <= coef_min <= coef <= coef_max; target, delta >=
    0."""
    _check_knob("target", target, target >= 0, ">= 0")
    _check_knob("delta", delta, delta >= 0, ">= 0")
    _check_knob("coef_min", coef_min, 0 <= coef_min <= coef_max, f"in [0, coef_max={coef_max}]")
    _check_knob("coef", coef, coef_min <= coef <= coef_max,
                f"in [coef_min={coef_min}, coef_max={coef_max}]")
    return {"target": float(target), "coef": float(coef), "delta": float(delta),
            "coef_min": float(coef_min), "coef_max": float(coef_max), "steps": 0}


def entropy_control_step(state, entropy):
    """One step of Skywork-OR1's adaptive entropy control (arXiv 2505.22312, "Adaptive Entropy
    Control"): the rule as the paper states it; the defaults (entropy_control_init) are its released
    script's.

    entropy: this step's mean token entropy e_k (a float; e.g. the token mean of the rollout's
    `entropy`). Returns (alpha_k, new_state) without modifying `state`:
        alpha_k = c_k 1[e_k <= target]                       (the bonus acts only below the target)
        c_{k+1} = clip(c_k + delta if e_k < target; c_k - delta if e_k > target; [coef_min, coef_max])
    """
    e = float(entropy)
    _check_knob("entropy", e, math.isfinite(e), "finite")
    coef = state["coef"]
    alpha = coef if e <= state["target"] else 0.0
    target = state["target"]
    step = state["delta"] if e < target else -state["delta"] if e > target else 0.0
    coef = min(max(coef + step, state["coef_min"]), state["coef_max"])
    return alpha, dict(state, coef=coef, steps=state["steps"] + 1)


def token_covariance(logp, advantages, mask, cov_means=None):
    """Cui et al. (arXiv 2505.22617), the per-token centred product (B, T), detached:
        Cov_t = (log pi_t - mean log pi) (A_t - mean A),   token-weighted means over valid tokens,
    or the whole batch's cov_means (batch_statistics) for micro-batches. 0 on masked positions."""
    b = _batch(mask, advantages, logp=logp)
    return _covariance(b.tensors[0], b.adv, b.mask, b.count, cov_means)


def _covariance(logp, adv, mask, count, cov_means):
    """token_covariance on cleaned (B, T) tensors (masked positions 0), mask the float mask."""
    logp = logp.detach()
    if cov_means is None:
        mean_lp, mean_adv = _cov_means(logp, adv, mask, count)
    else:
        mean_lp, mean_adv = (torch.as_tensor(v, dtype=mask.dtype, device=mask.device)
                             for v in cov_means)
    return (logp - mean_lp) * (adv - mean_adv) * mask             # Cov_t


def _cov_means(logp, adv, mask, count):
    """Token-weighted means (mean log pi, mean A) over the float mask of cleaned tensors: Cov's
    centring."""
    return (logp * mask).sum() / count, (adv * mask).sum() / count


def clip_cov_select(logp, advantages, mask, *, old_logp=None, clip_cov_ratio=2e-4, cov_lb=1.0,
                    cov_ub=5.0, clip_low=0.2, clip_high=0.2, cov_means=None, num_tokens=None,
                    generator=None):
    """Clip-Cov's token choice (B, T) bool: max(1, int(clip_cov_ratio * n)) random valid tokens
    (n = num_tokens or this call's) among those with cov_lb < Cov < cov_ub that PPO has not clipped
    at r = exp(logp - old_logp) (verl's rule; without old_logp, r = 1). generator seeds the draw."""
    _check_clip_cov(clip_cov_ratio, cov_lb, cov_ub)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp)
    lp, old = b.tensors
    clipped = None
    if old is not None:
        ratio = torch.exp((lp.detach() - old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        # verl's clip_by_origin
        clipped = -b.adv * ratio.clamp(1 - clip_low, 1 + clip_high) > -b.adv * ratio
    n = int(b.valid.sum()) if num_tokens is None else int(_positive("num_tokens", num_tokens))
    return _clip_cov_choice(_covariance(lp, b.adv, b.mask, b.count, cov_means), b.valid, clipped, n,
                            clip_cov_ratio, cov_lb, cov_ub, generator)


def _check_clip_cov(clip_cov_ratio, cov_lb, cov_ub):
    _check_knob("clip_cov_ratio", clip_cov_ratio, 0 < clip_cov_ratio <= 1, "in (0, 1]")
    _check_knob("cov_lb", cov_lb, cov_lb < cov_ub, f"< cov_ub={cov_ub}")


def _clip_cov_choice(cov, valid, clipped, n, clip_cov_ratio, cov_lb, cov_ub, generator):
    """max(1, int(clip_cov_ratio * n)) random tokens among valid & cov_lb < cov < cov_ub & ~clipped.
    """
    eligible = valid & (cov > cov_lb) & (cov < cov_ub)
    if clipped is not None:
        eligible &= ~clipped
    idx = eligible.flatten().nonzero().squeeze(-1)
    on = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randperm(idx.numel(), generator=generator, device=on
                          )[:max(1, int(clip_cov_ratio * n))]
    selected = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    selected[idx[pick.to(idx.device)]] = True
    return selected.view(valid.shape)


def clip_cov_loss(logp, old_logp, advantages, mask, *, clip_cov_ratio=2e-4, cov_lb=1.0, cov_ub=5.0,
                  clip_low=0.2, clip_high=0.2, dual_clip=None, cov_means=None, cov_selected=None,
                  generator=None, agg="token-mean", entropy=None, num_tokens=None, num_seqs=None,
                  norm_length=None):
    """Clip-Cov (Cui et al., arXiv 2505.22617): the PPO-clip loss with the gradient of a few
    high-covariance tokens removed.

    A random fraction r = clip_cov_ratio = 2e-4 of the valid tokens (a fraction, not a percent),
    drawn among tokens with Cov in (cov_lb, cov_ub) = (1, 5) that PPO has not clipped, contributes
    nothing (value and gradient), as verl multiplies their loss by 0. Cov from token_covariance on
    the current log pi (detached). PPO clip 0.2 / 0.2, no dual clip, token-mean; clip_low may be 1
    (the authors' 7B script: no lower clip). cov_selected (B, T) bool: the whole batch's choice from
    batch_statistics("clip_cov", ...), sliced with each micro-batch's rows; without it the choice is
    made in this call, as verl does per micro-batch (generator seeds the draw).
    Metrics: grpo_loss's plus cov_frac (share of valid tokens whose gradient is removed).
    """
    _check_clip_cov(clip_cov_ratio, cov_lb, cov_ub)
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   no_low_clip=True, entropy=entropy, cov_selected=cov_selected)
    entropy, cov_selected = t.rest
    adv, r = t.adv, t.ratio.detach()
    if cov_selected is None:
        clipped = -adv * r.clamp(1 - clip_low, 1 + clip_high) > -adv * r
        cov_selected = _clip_cov_choice(_covariance(t.logp, adv, t.mask, t.count, cov_means),
                                        t.valid, clipped, int(t.valid.sum()), clip_cov_ratio,
                                        cov_lb, cov_ub, generator)
    drop = cov_selected.bool() & t.valid
    loss = agg_loss(torch.where(drop, 0.0, t.per_token), t.valid, agg, num_tokens=num_tokens,
                    num_seqs=num_seqs, norm_length=norm_length)
    metrics = _ppo_metrics(adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics.update(pg_loss=loss.detach(), cov_frac=drop.sum() / t.count)
    return loss, _to_floats(metrics)


def clip_cov_statistics(*, mask, advantages, old_logp, clip_cov_ratio, cov_lb, cov_ub, generator,
                        **_):
    """Clip-Cov's whole-batch statistic {"cov_selected": (B, T) bool}: the batch's random choice
    (clip_cov_select at r = 1); slice it with each micro-batch's rows."""
    _check_tensors(advantages=advantages, old_logp=old_logp)
    return {"cov_selected": clip_cov_select(old_logp, advantages, mask, clip_cov_ratio=clip_cov_ratio,
                                            cov_lb=cov_lb, cov_ub=cov_ub, generator=generator)}


def kl_cov_threshold(cov, mask, kl_cov_ratio=2e-3):
    """The k-th largest Cov over the valid tokens, k = max(1, int(kl_cov_ratio * n)): KL-Cov's top-k
    cut. cov (B, T) from token_covariance; +inf when no token is valid. Returns a 0-d tensor."""
    _check_knob("kl_cov_ratio", kl_cov_ratio, 0 < kl_cov_ratio <= 1, "in (0, 1]")
    valid = mask.bool()
    n = int(valid.sum())
    if n == 0:
        return cov.new_tensor(math.inf)
    return cov[valid].topk(max(1, int(kl_cov_ratio * n))).values[-1]


def kl_cov_loss(logp, old_logp, advantages, mask, *, kl_cov_ratio=2e-3, kl_cov_coef=1.0,
                cov_means=None, cov_threshold=None, agg="token-mean", entropy=None, num_tokens=None,
                num_seqs=None, norm_length=None):
    """KL-Cov (Cui et al., arXiv 2505.22617): policy gradient with a KL penalty on the top-k
    covariance tokens.

    per token: -A r + kl_cov_coef |log pi - log pi_old|  on the tokens with Cov >= the k-th largest,
    k = max(1, int(kl_cov_ratio * n)); -A r elsewhere (r = pi / pi_old, log-ratio clamped to +-20,
    no clip, as in the paper's objective and both codes). kl_cov_coef = beta = 1. kl_cov_ratio is a
    FRACTION: 2e-3 is the authors' 7B k_percent=0.2 (verl's default 2e-4 is their 32B value; the
    percent / fraction trap: docs/losses.md). cov_means, cov_threshold: the whole batch's centring
    and cut (batch_statistics("kl_cov", ...)), exact under micro-batching; default: this call's.
    Tokens tied at the cut are all selected, and only tokens with Cov > 0.
    Metrics: pg_loss (the -A r part), kl_cov (the aggregated |log-ratio| of the chosen tokens,
    before kl_cov_coef), kl_cov_frac, abs_kl (mean |log-ratio|), ratio_mean, [entropy].
    """
    _check_knob("kl_cov_coef", kl_cov_coef, kl_cov_coef >= 0, ">= 0")
    _check_tensor("logp", logp)
    _check_tensor("old_logp", old_logp)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy)
    logp, old_logp, entropy = b.tensors
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    cov = _covariance(logp, b.adv, b.mask, b.count, cov_means)
    cut = kl_cov_threshold(cov, b.valid, kl_cov_ratio) if cov_threshold is None else cov_threshold
    chosen = (cov >= torch.as_tensor(cut, dtype=cov.dtype, device=cov.device)) & (cov > 0) & b.valid
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    pg = agg_loss(-b.adv * ratio, b.valid, agg, **agg_kw)
    kl = agg_loss(torch.where(chosen, log_ratio.abs(), 0.0), b.valid, agg, **agg_kw)
    metrics = {"pg_loss": pg.detach(), "kl_cov": kl.detach(), "kl_cov_frac": chosen.sum() / b.count,
               "abs_kl": _masked_mean(log_ratio.detach().abs(), b.mask, b.count),
               "ratio_mean": _masked_mean(ratio.detach(), b.mask, b.count)}
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, b.mask, b.count)
    return pg + kl_cov_coef * kl, _to_floats(metrics)


def kl_cov_statistics(*, mask, advantages, old_logp, kl_cov_ratio, **_):
    """KL-Cov's whole-batch statistics {"cov_means": (mean log pi, mean A), "cov_threshold": the
    top-k cut} (floats), from the behaviour policy."""
    _check_tensors(advantages=advantages, old_logp=old_logp)
    b = _batch(mask, advantages, logp=old_logp)
    means = tuple(float(x) for x in _cov_means(b.tensors[0], b.adv, b.mask, b.count))
    cov = token_covariance(old_logp, advantages, mask, means)
    return {"cov_means": means, "cov_threshold": float(kl_cov_threshold(cov, mask, kl_cov_ratio))}


def forking_threshold(entropy, mask, top_frac=0.2):
    """The 80/20 rule's entropy cut tau, the (1 - top_frac) quantile of H over the valid tokens
    (torch.quantile's rule, by two kthvalue selections), a 0-d tensor; +inf when none is valid."""
    _check_knob("top_frac", top_frac, 0 < top_frac <= 1, "in (0, 1]")
    valid = mask.bool().flatten()
    n = int(valid.sum())
    if n == 0:
        return entropy.new_tensor(math.inf)
    h = torch.where(valid, entropy.flatten().to(_acc_dtype(entropy.dtype)), -math.inf)
    skip = valid.numel() - n
    # rank of the quantile among valid
    pos = (1 - top_frac) * (n - 1)
    lo = math.floor(pos)
    x_lo = h.kthvalue(skip + lo + 1).values
    if pos == lo:
        return x_lo
    # the next order statistic equals x_lo
    tied = (h <= x_lo).sum() >= skip + lo + 2
    x_hi = torch.where(tied, x_lo, torch.where(h > x_lo, h, math.inf).amin())
    return x_lo + (pos - lo) * (x_hi - x_lo)


def forking_loss(logp, old_logp, advantages, mask, entropy, *, top_frac=0.2, entropy_threshold=None,
                 clip_low=0.2, clip_high=0.28, dual_clip=None, agg="token-mean", num_tokens=None,
                 num_seqs=None, norm_length=None):
    """Forking tokens, the 80/20 rule (Wang et al., arXiv 2506.01939): the policy gradient only on
    the top 20% highest-entropy tokens of the batch.

    per token: 1[H >= tau] * DAPO's PPO-clip term (clip 0.2 / 0.28, token-mean), with tau the (1 -
    top_frac) quantile of the behaviour policy's entropy over the batch's valid tokens (rho = 0.2).
    The normaliser stays the count of ALL valid tokens, as in the paper's objective (the masked 80%
    count in the mean with zero). entropy_threshold: tau over the whole batch
    (batch_statistics("forking", ...)); default: this call's tokens. Metrics: grpo_loss's plus
    forking_frac (share of valid tokens kept) and entropy_threshold.
    """
    _check_tensor("entropy", entropy)
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy)
    (entropy,) = t.rest
    tau = (forking_threshold(entropy, t.valid, top_frac) if entropy_threshold is None
           else entropy_threshold)
    keep = (entropy >= torch.as_tensor(tau, dtype=entropy.dtype, device=entropy.device)) & t.valid
    loss = agg_loss(torch.where(keep, t.per_token, 0.0), t.valid, agg, num_tokens=num_tokens,
                    num_seqs=num_seqs, norm_length=norm_length)
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics.update(pg_loss=loss.detach(), forking_frac=keep.sum() / t.count,
                   entropy_threshold=torch.nan_to_num(torch.as_tensor(tau, dtype=t.mask.dtype),
                                                      posinf=0.0))
    return loss, _to_floats(metrics)


def forking_statistics(*, mask, entropy, top_frac, **_):
    """The forking rule's whole-batch statistic {"entropy_threshold": tau} (a float)."""
    _check_tensors(entropy=entropy)
    return {"entropy_threshold": float(forking_threshold(torch.where(mask.bool(), entropy, 0.0), mask,
                                                         top_frac))}


def entropy_adv_loss(logp, old_logp, advantages, mask, entropy, *, alpha=0.4, kappa=2.0,
                     clip_low=0.2, clip_high=0.2, dual_clip=None, agg="token-mean", num_tokens=None,
                     num_seqs=None, norm_length=None):
    """Entropy-based advantage (Cheng et al., arXiv 2506.14758): PPO-clip on the shaped advantage
        A' = A + min(alpha * H.detach(), |A| / kappa),     alpha = 0.4, kappa = 2.
    For kappa > 1 the |A| / kappa cap keeps the bonus from flipping the sign of A (and gives 0 where
    A = 0). H: the `entropy` argument (the behaviour policy's; the paper's current-policy H,
    detached, is the same on the first update). PPO settings default to grpo_loss's. alpha >= 0,
    kappa > 0. Metrics: grpo_loss's plus adv_bonus (mean of the added term) and adv_bonus_capped
    (share of valid tokens where |A| / kappa binds).
    """
    _check_knob("alpha", alpha, alpha >= 0, ">= 0")
    _check_knob("kappa", kappa, kappa > 0, "> 0")
    _check_clip(clip_low, clip_high, dual_clip)
    _check_tensor("entropy", entropy)
    b = _batch(mask, advantages, logp=logp, old_logp=old_logp, entropy=entropy)
    logp, old_logp, entropy = b.tensors
    adv = b.adv
    bonus_h, cap = alpha * entropy.detach().to(adv.dtype), adv.abs() / kappa
    shaped = adv + torch.minimum(bonus_h, cap)                            # Cheng et al.'s psi(H)
    per_token, ratio = ppo_clip_loss(logp, old_logp, shaped, clip_low=clip_low, clip_high=clip_high,
                                     dual_clip=dual_clip)
    loss = agg_loss(per_token, b.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(shaped, b.count, ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics.update(pg_loss=loss.detach(), adv_bonus=_masked_mean(shaped - adv, b.mask, b.count),
                   adv_bonus_capped=((cap < bonus_h) & b.valid).sum() / b.count)
    return loss, _to_floats(metrics)


def _entropy_adv_zero_rows(advantages, mask, entropy):
    """(B,) bool: entropy_adv_loss's rows with A = 0 whose valid tokens all have H >= 0 (a rounded H
    can be slightly negative): A' = A + min(alpha H, |A| / kappa) is then exactly 0, and so is the
    row's gradient."""
    return (advantages == 0) & (torch.where(mask.bool(), entropy, 0.0) >= 0).all(1)


def w_reinforce_loss(logp, old_logp, advantages, mask, *, positive_weight=0.1, clip_low=0.2,
                     clip_high=0.2, dual_clip=None, agg="token-mean", entropy=None, num_tokens=None,
                     num_seqs=None, norm_length=None):
    """W-REINFORCE (Zhu et al., arXiv 2506.01347): L = lambda L_PSR + L_NSR, lambda = 0.1.

    The terms of positive samples (A > 0: positive sample reinforcement) are weighted
    positive_weight = lambda; negative samples (A < 0) keep weight 1. The paper states it for
    REINFORCE with rewards +1 / -1 and no baseline: pass advantages = 2 R - 1 for 0/1 rewards to
    match (group advantages give a weighted GRPO instead). Here on the PPO-clip surrogate, whose
    gradient at r = 1 (the first update) is exactly REINFORCE's; PPO settings default to
    grpo_loss's. positive_weight >= 0. Metrics: grpo_loss's plus pos_frac (share of valid tokens
    with A > 0).
    """
    _check_knob("positive_weight", positive_weight, positive_weight >= 0, ">= 0")
    t = _ppo_terms(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   entropy=entropy)
    (entropy,) = t.rest
    # lambda L_PSR + L_NSR
    weight = torch.where(t.adv > 0, t.adv.new_tensor(positive_weight), 1.0)
    loss = agg_loss(weight * t.per_token, t.valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    norm_length=norm_length)
    metrics = _ppo_metrics(t.adv, t.count, t.ratio, 1 - clip_low, 1 + clip_high, entropy)
    metrics.update(pg_loss=loss.detach(), pos_frac=((t.adv > 0) & t.valid).sum() / t.count)
    return loss, _to_floats(metrics)


# ----------------------------------------------------------------------- four-quadrant entropy flow
QUADRANTS = ("pos_likely", "pos_unlikely", "neg_likely", "neg_unlikely")


def loss_weights(loss, logp):
    """w = -dLoss/dlogp per token, (B, T) like logp, for entropy_flow_quadrants: read off the loss's
    own graph with torch.autograd.grad (retain_graph: the trainer's backward still runs after it;
    the graph walk stops at logp, so nothing of the model is visited). Zeros when logp does not
    reach the loss."""
    grad, = torch.autograd.grad(loss, logp, retain_graph=True, allow_unused=True)
    return torch.zeros_like(logp) if grad is None else -grad


def grpo_weight_change(weights, logp, old_logp, advantages, mask, *, num_tokens=None, num_seqs=None,
                       tol=0.05):
    """A method's leverage: how far its token weights w = -dLoss/dlogp (B, T) move from GRPO's at
    the same point (grpo_loss with its defaults, token-mean over the same num_tokens). Returns
    floats
        changed  share of valid tokens with |w - w_GRPO| > tol |w_GRPO| (any change if w_GRPO = 0)
        l1       gap / size (0 for GRPO itself), where over the valid tokens
        gap      sum |w - w_GRPO|      and      size  sum |w_GRPO|
    (sum gap and size over several steps for their ratio where a step's GRPO weights can all be 0).
    logp (B, T): the current log pi at which w was taken (no gradient needed); the rest as
    grpo_loss."""
    lp = logp.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        base = loss_weights(grpo_loss(lp, old_logp, advantages, mask, num_tokens=num_tokens,
                                      num_seqs=num_seqs)[0], lp).detach()
    valid = _batch(mask, advantages).valid
    gap = torch.where(valid, (weights.detach().to(base.dtype) - base).abs(), 0.0)
    size = torch.where(valid, base.abs(), 0.0)
    changed = (gap > tol * size) & (gap > 0) & valid
    count = valid.sum().clamp(min=1)
    l1 = gap.sum() / size.sum().clamp(min=1e-30)
    return _to_floats({"changed": changed.sum() / count, "l1": l1, "gap": gap.sum(),
                       "size": size.sum()})


def entropy_flow_quadrants(old_logp, entropy, exact_term, advantages, weights, mask):
    """The first-order entropy change of an update, split into STEER's four quadrants (section 2
    above).

    old_logp, entropy, exact_term (B, T): the behaviour policy's log pi_a, H and S2
    (logprobs.token_stats); advantages (B,) or (B, T); weights (B, T): w = -dLoss/dlogp per token
    (logp.grad after backward, sign flipped), which carries clipping and every method's reweighting;
    mask (B, T).
    Quadrants: A > 0 / A < 0  x  likely (pi_a > exp(-H): log pi_a + H > 0) / unlikely. Tokens with
    A = 0 (a KL term can still give them w != 0) go to "zero_adv". Returns a dict of floats, for
    each q in QUADRANTS + ("zero_adv", "total"):
        q_exact  sum of -w [pi_a (log pi_a + H) - S2]   the exact first-order change of a tabular
                                                        softmax step per unit step (form "exact")
        q_paper  sum of -w (1 - pi_a)^2 (log pi_a + H)  the papers' form with the same weights
        q_flow   sum of -A (1 - pi_a)^2 (log pi_a + H)  OPEFO's flow f (the advantage, not w)
        q_count  number of valid tokens
    The quadrant sums add up to the total. A gradient that does not pass through log pi(a) (an
    entropy bonus's) is not in w, and so not in these sums.
    """
    _check_tensor("old_logp", old_logp)
    _check_tensor("entropy", entropy)
    _check_tensor("weights", weights)
    b = _batch(mask, advantages, old_logp=old_logp, entropy=entropy, exact_term=exact_term,
               weights=weights)
    lp, h, s2, w = b.tensors
    adv, valid, dtype = b.adv, b.valid, b.mask.dtype
    if s2 is None:
        raise ValueError("entropy_flow_quadrants needs exact_term (B, T) (logprobs.token_stats' third "
                         "output)")
    w = w.detach().to(dtype)
    paper = first_order_term(lp, h, form="paper").to(dtype)
    parts = {"exact": -w * first_order_term(lp, h, s2, form="exact").to(dtype), "paper": -w * paper,
             "flow": -adv * paper, "count": b.mask}
    likely = (lp.to(dtype) + h.to(dtype)) > 0
    masks = {"pos_likely": (adv > 0) & likely, "pos_unlikely": (adv > 0) & ~likely,
             "neg_likely": (adv < 0) & likely, "neg_unlikely": (adv < 0) & ~likely,
             "zero_adv": adv == 0, "total": torch.ones_like(valid)}
    sums = {f"{q}_{k}": torch.where(sel & valid, v, 0.0).sum()
            for q, sel in masks.items() for k, v in parts.items()}
    return _to_floats(sums)


# ----------------------------------------------------------------------------------------- registry
BATCH_KEYS = frozenset({"logp", "old_logp", "advantages", "mask", "entropy", "exact_term",
                        "ref_logp", "current_entropy", "num_tokens", "num_seqs", "norm_length"})
# what the statistic functions return: not knobs
STATISTIC_KEYS = frozenset({"omega_max", "flow_totals", "cov_selected", "cov_means",
                            "cov_threshold", "entropy_threshold", "dropped"})
REQUIRED = inspect.Parameter.empty               # Loss.knobs' value for a knob without a default
# what a needed tensor is and what computes it
_SOURCES = {
    "logp": "(B, T) with gradient: logprobs.token_logprobs(logits, tokens)",
    "old_logp": "(B, T), the behaviour policy's: logprobs.token_stats(old_logits, tokens)[0]",
    "advantages": "(B,) or (B, T): group_advantages(rewards, group_size)",
    "mask": "(B, T): 1 on the valid response tokens",
    "entropy": "(B, T), the behaviour policy's: logprobs.token_stats(old_logits, tokens)[1]",
    "current_entropy": "(B, T) with gradient: logprobs.token_logprobs_entropy(logits, tokens)[1]",
}


def _advantage_zero_rows(advantages, mask, entropy):
    """(B,) bool: the rows whose advantage is exactly 0. In a loss whose every term on a row is the
    row's advantage times something (clipped surrogates, REINFORCE, reweightings and masks from
    whole-batch statistics computed before the micro-batches) such a row adds exactly 0 to the value
    and the gradient."""
    return advantages == 0


class Loss(NamedTuple):
    """One method of LOSSES: its loss function and what a trainer needs to know to call it. What the
    function's signature says (inputs, needs, knobs) is read from it; the rest is declared here."""
    # fn: the loss function, e.g. steer_loss. statistics: its whole-batch statistics
    # (steer_statistics, ...), called by batch_statistics; None: only batch_totals. zero_rows:
    # (advantages (B,), mask, entropy) -> (B,) bool, the rows whose gradient is exactly 0 when no
    # reference KL is on; None: any row can move. reduce: metric -> "sum" | "max" | "min" over one
    # optimizer step's micro-batches (merge_metrics), besides pg_loss's "sum"; the rest
    # token-weighted means. std_normalize: for group_advantages. on_policy: one optimizer step per rollout batch.
    # adaptive: coef from entropy_control_step once per RL step. data_defaults: the trainer's
    # data-side settings of the paper. ratio_level: "token" or "sequence" (GSPO), TRL's
    # importance_sampling_level.
    fn: Callable
    statistics: Optional[Callable] = None
    zero_rows: Optional[Callable] = _advantage_zero_rows
    reduce: dict = {}
    std_normalize: bool = True
    on_policy: bool = False
    adaptive: bool = False
    data_defaults: dict = {}
    ratio_level: str = "token"

    @property
    def inputs(self):
        """The BATCH_KEYS that fn reads, in its signature's order."""
        return tuple(name for name, _ in _signature(self.fn) if name in BATCH_KEYS)

    @property
    def needs(self):
        """The tensors fn cannot run without: its positional parameters without a default."""
        return tuple(name for name, p in _signature(self.fn) if p.kind is p.POSITIONAL_OR_KEYWORD
                     and p.default is p.empty)

    @property
    def knobs(self):
        """Knob name -> default (REQUIRED where there is none): fn's keyword-only parameters that
        are neither batch tensors (BATCH_KEYS) nor whole-batch statistics (STATISTIC_KEYS)."""
        return {name: p.default for name, p in _signature(self.fn) if p.kind is p.KEYWORD_ONLY
                and name not in BATCH_KEYS and name not in STATISTIC_KEYS}

    @property
    def reductions(self):
        """How merge_metrics combines each metric over micro-batches: pg_loss "sum" and the entry's
        reduce."""
        return {"pg_loss": "sum", **self.reduce}

    def __call__(self, **kwargs):
        """fn(**kwargs) without the BATCH_KEYS that fn does not read, so that every loss takes the
        same call with the whole batch; every other keyword must be a knob or a statistic: a
        misspelt knob is a TypeError with the nearest name. A needed tensor that is missing or None
        is a TypeError naming it and what computes it."""
        for key in self.needs:
            if kwargs.get(key) is None:
                raise TypeError(f"{self.fn.__name__} needs {key} {_SOURCES[key]}")
        knobs = self.knobs
        for key in kwargs:
            if key not in BATCH_KEYS and key not in STATISTIC_KEYS and key not in knobs:
                raise TypeError(f"{self.fn.__name__} takes no knob {key!r}{_nearest(key, knobs)}; "
                                f"its knobs: {', '.join(knobs) or 'none'}")
        inputs = self.inputs
        return self.fn(**{k: v for k, v in kwargs.items() if k in inputs or k not in BATCH_KEYS})


@functools.lru_cache(maxsize=None)
def _signature(fn):
    """fn's parameters as a tuple of (name, inspect.Parameter), read once."""
    return tuple(inspect.signature(fn).parameters.items())


def _nearest(name, choices):
    """" (did you mean 'x'?)" for the choice nearest to a misspelt name, or ""."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Registry(dict):
    """LOSSES: a dict whose unknown key is a KeyError naming the nearest method and every method."""

    def __missing__(self, name):
        near = _nearest(str(name).lower(), self) or _nearest(name, self)
        raise KeyError(f"no loss {name!r} in LOSSES{near}; the methods: {', '.join(self)}")


# the recipes that drop groups whose rewards are all equal
_DROP = {"drop_equal_groups": True}
_DAPO_DATA = dict(_DROP, max_refill_rounds=9, overlong_penalty=True)     # DAPO's recipe, also ERC's
LOSSES = _Registry({
    "grpo": Loss(grpo_loss, reduce={"kl": "sum"}),
    "dapo": Loss(dapo_loss, reduce={"kl": "sum"}, data_defaults=_DAPO_DATA),
    "drgrpo": Loss(drgrpo_loss, reduce={"kl": "sum"}, std_normalize=False),
    "steer": Loss(steer_loss, statistics=steer_statistics,
                  reduce={"omega_max": "max", "weight_max": "max", "weight_min": "min"}),
    "quadrant": Loss(quadrant_loss),
    "opefo": Loss(opefo_loss, statistics=opefo_statistics, reduce={"weighted_flow": "sum"},
                  on_policy=True),
    "archer": Loss(archer_loss, data_defaults=_DROP),
    "aspo": Loss(aspo_loss, data_defaults=_DROP),
    "ce_gppo": Loss(ce_gppo_loss, data_defaults=_DROP),
    "gppo": Loss(gppo_loss, data_defaults=_DROP),
    "gspo": Loss(gspo_loss, ratio_level="sequence"),
    "gspo_token": Loss(gspo_token_loss, ratio_level="sequence"),
    "cispo": Loss(cispo_loss),
    "cispo_trl": Loss(cispo_trl_loss),
    "sapo": Loss(sapo_loss),
    "erc_dapo": Loss(erc_dapo_loss, data_defaults=_DAPO_DATA),
    "erc_gppo": Loss(erc_gppo_loss, data_defaults=_DAPO_DATA),
    "clip_b": Loss(clip_b_loss, statistics=clip_b_statistics),
    "clip_v": Loss(clip_v_loss, statistics=clip_v_statistics),
    "entropy_bonus": Loss(entropy_bonus_loss, zero_rows=None, reduce={"entropy_bonus": "sum"}),
    "adaptive_entropy": Loss(adaptive_entropy_loss, zero_rows=None, reduce={"entropy_bonus": "sum"},
                             adaptive=True),
    "clip_cov": Loss(clip_cov_loss, statistics=clip_cov_statistics),
    "kl_cov": Loss(kl_cov_loss, statistics=kl_cov_statistics, zero_rows=None,
                   reduce={"kl_cov": "sum"}),
    "forking": Loss(forking_loss, statistics=forking_statistics),
    "entropy_adv": Loss(entropy_adv_loss, zero_rows=_entropy_adv_zero_rows),
    "w_reinforce": Loss(w_reinforce_loss),
})


def _method(name):
    """LOSSES[name]; a ValueError listing the names for an unknown one."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def batch_statistics(name, *, mask, advantages=None, old_logp=None, entropy=None, exact_term=None,
                     **knobs):
    """The whole mini-batch's statistics for LOSSES[name], computed once, passed to every
    micro-batch.

    mask, advantages, old_logp, entropy, exact_term: the WHOLE mini-batch's tensors (the behaviour
    policy's, so pi = pi_old, r = 1); knobs: the loss's own knobs (one it does not take is a
    TypeError; a batch tensor it reads is accepted and not used). Returns the keyword arguments to
    add to each micro-batch's LOSSES[name](...) call: batch_totals(mask), then
    LOSSES[name].statistics with the loss's knob defaults (Loss.knobs) updated by `knobs`:
        every loss  num_tokens, num_seqs                  (batch_totals)
        steer       omega_max: M, the max of STEER's score m over the batch          (steer_statistics)
        opefo       flow_totals: (P, N) of the batch's entropy flow                  (opefo_statistics)
        clip_cov    cov_selected: (B, T) bool, the batch's random choice; SLICE it with each micro-batch's
                    rows, like the batch tensors (knob generator seeds the draw)    (clip_cov_statistics)
        kl_cov      cov_means, cov_threshold: the batch's centring and top-k cut    (kl_cov_statistics)
        forking     entropy_threshold: the batch's entropy quantile tau              (forking_statistics)
        clip_b      dropped: (B, T) bool, SLICE it; num_tokens, num_seqs of the kept tokens
        clip_v      the same                                          (clip_b_statistics, clip_v_statistics)
    Scalars are Python floats (one host sync per mini-batch). A tensor the statistics need that is
    not a tensor is a TypeError naming it.
    """
    method = _method(name)
    unknown = sorted(set(knobs) - set(method.knobs) - set(method.inputs))
    if unknown:
        raise TypeError(f"batch_statistics({name!r}) got knobs that {method.fn.__name__} does not "
                        f"take: {unknown}")
    out = batch_totals(mask)
    if method.statistics is not None:
        kw = dict(method.knobs, **{k: v for k, v in knobs.items() if k not in BATCH_KEYS})
        out.update(method.statistics(mask=mask, advantages=advantages, old_logp=old_logp, entropy=entropy,
                                     exact_term=exact_term, **kw))
    return out


def merge_metrics(name, parts):
    """One optimizer step's metrics from its micro-batches' [(valid tokens, metrics), ...]: each
    metric "sum", "max" or "min" as LOSSES[name].reductions say, else the token-weighted mean (the
    last part's value when no part has a valid token); keys in order of first appearance."""
    reduce = _method(name).reductions
    merged = {}
    for key in dict.fromkeys(k for _, m in parts for k in m):
        pairs = [(n, m[key]) for n, m in parts if key in m]
        values = [v for _, v in pairs]
        how = reduce.get(key)
        if how == "sum":
            merged[key] = sum(values)
        elif how in ("max", "min"):
            merged[key] = max(values) if how == "max" else min(values)
        else:
            weight = sum(n for n, _ in pairs)
            merged[key] = sum(n * v for n, v in pairs) / weight if weight else values[-1]
    return merged


def uses_reference(name, **knobs):
    """Whether LOSSES[name] with these knobs reads ref_logp (so a trainer must run the frozen
    reference): its value on a small dummy batch moves when ref_logp does (False for a loss that
    does not take it). Fails early on an unknown loss or knob, and on a knob out of range of a loss
    that takes ref_logp."""
    method = _method(name)
    unknown = sorted(set(knobs) - set(method.knobs))
    if unknown:
        raise TypeError(f"{method.fn.__name__} takes no knob {', '.join(unknown)}")
    if "ref_logp" not in method.inputs:
        return False
    # 1 x 5, entropies spread so Archer has both token types
    t = torch.linspace(0.1, 2.0, 5)[None]
    batch = dict(logp=-t, old_logp=-t, advantages=torch.ones(1), mask=torch.ones(1, 5), entropy=t,
                 exact_term=0 * t, current_entropy=t)
    values = []
    for ref in (-t, -t - 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            values.append(method(**batch, ref_logp=ref, **knobs)[0])
    return bool(values[0] != values[1])
