"""Entropy collapse in seconds: a tabular softmax policy trained with GRPO, DAPO, STEER, OPEFO, Archer and the
entropy interventions they compare against (entropy bonus, adaptive entropy, Clip-Cov, KL-Cov, forking
tokens, entropy-based advantage, W-REINFORCE).

The first thing to run:  ``python toy_bandit.py``  (every algorithm, 3 seeds: about 15 s of CPU on 2 cores).

The task. A "response" is T tokens from a vocabulary of K; the policy is one free logit row per position,
a (T, K) ``nn.Parameter`` (the tabular setting of the STEER paper's entropy analysis; see entropy_math.py).
Even positions are *forks* with K // 2 correct tokens (several ways to solve the problem), odd positions are
*knowledge* positions with exactly one correct token. The verifiable reward is 1 iff every token is correct.
A policy that always solves the task and keeps every fork open has the entropy
    H* = (1 / T) * sum_t log(#correct tokens at t)
(mean over positions). Falling below H* is collapse: correct alternatives are lost. The policy starts biased
toward the correct tokens with random per-token preferences on top (a "pretrained" prior, seeded), so the
first rewards are not all zero and the correct fork tokens are not equally likely.

One prompt, a batch of several groups. Every step samples ``groups`` groups of G responses of the one task,
computes group advantages (losses.group_advantages, per group), and takes ``updates`` optimizer steps on the
same batch (PPO-style epochs on the full batch, so clipping matters). OPEFO is strictly on-policy: one
update per batch, with the learning rate multiplied by sqrt(updates) as the OPEFO paper does to compensate
(--opefo-lr-scale). Losses come from losses.LOSSES, log-probs and entropies from logprobs.token_logprobs /
logprobs.token_stats on the (B, T, K) logits; nothing of the methods is re-implemented here. What a method
needs besides its loss is read off its registry entry (losses.Loss): the clip knobs it takes (knobs), one
update per batch (on_policy), Dr. GRPO's advantages (std_normalize), the current entropy with gradient
("current_entropy" in inputs), the adaptive controller (adaptive) and Clip-Cov's generator (knobs).

Choices:
- Optimizer: plain SGD by default. The first-order entropy analysis (entropy_math.py) is for an SGD step on
  the logits; Adam rescales every logit's step and so changes the dynamics: run ``--optimizer adam`` to see.
- Accuracy and entropy of the policy are exact (computed from the table, no sampling noise).
- pass@k (k = 1, 4, 16, unbiased estimator from 256 samples of the final policy). With one training prompt,
  pass@k on the training task is just 1 - (1 - acc)^k and cannot show lost diversity, so the table reports
  pass@k on held-out *variants* of the task: in each of 64 variants only half of every fork's correct
  tokens are accepted (think of follow-up problems where only some approaches work). A policy that keeps its
  forks open solves a variant within a few samples; a collapsed one solves only the variants that happen to
  accept its single path, whatever k. Both kinds are in the --json output. "distinct" counts the distinct
  correct responses among the 256 samples (out of (K // 2) ** (number of forks) possible).
- First-order check: for every optimizer step and position t, the realised change of H(pi_t) is compared
  with the sum over the batch's tokens at t of entropy_math.dh_exact (and dh_paper) for that token, with the
  token's weight w = -d loss / d logp read off autograd (this includes clipping, STEER/OPEFO/Archer weights
  and Archer's KL). With SGD, the summed per-token first-order changes are the first-order change of the
  whole step, so r_exact measures only the second-order remainder; r_paper shows the paper's approximation.
  Steps whose gradient is exactly zero (every group had equal rewards) are left out. Pearson r per run.
- No dynamic sampling and no overlong penalty (all responses have length T): every algorithm sees the same
  batches, and groups with equal rewards just contribute zero advantage.
- Clip flags: ``--clip-low 0.99 --clip-high 5`` is STEER's "extreme scenario" (STEER Table 6). Each reaches the
  losses whose knobs include it (losses.LOSSES[name].knobs): every loss with the PPO ratio clip; Archer and
  ASPO take only ``--dual-clip`` (their clips are per token type), OPEFO and KL-Cov none. When one is given,
  the report's header says which methods of the run it reaches and which not (clip_note).
- Entropy flow per quadrant: every optimizer step's exact first-order entropy change is split with
  losses.entropy_flow_quadrants into (A > 0, A < 0) x (likely, unlikely) tokens and reported per method
  (STEER's four-factor view and OPEFO's flow view in numbers).
- The interventions run with their papers' defaults (losses.py); the adaptive-entropy controller keeps
  Skywork-OR1's target of 0.2 nats, which the toy's entropy never goes below, so it acts only once a run
  has collapsed past that target. Clip-Cov draws its tokens from the run's generator.
- ``--algos drgrpo`` (not in the default set): Dr. GRPO's loss with unnormalised advantages A = R - mean.
- ``--algos aspo,ce-gppo,gppo`` (not in the default set): the losses that act through the PPO clip after
  Archer, with their papers' defaults (losses.py). ASPO takes Archer's --archer-quantile and --archer-kl
  (its token split and knowledge-token KL) and only --dual-clip of the clip flags (its soft dual clip);
  CE-GPPO and GPPO take all three clip flags.
- ``--algos gspo,gspo-token,cispo,cispo-trl,sapo`` (the ratio reshaped) and ``erc-dapo,erc-gppo,clip-b,clip-v,
  clip-v-paper`` (gates on the entropy change; clip-v-paper scores with STEER's paper form): not in the
  default set, with their papers' defaults. ERC acts only from the second update of a batch (H = H_old on
  the first), so it needs --updates > 1, as every off-policy method.
- Whole-batch statistics (STEER's M, Clip-Cov's draw, KL-Cov's centring, the gates' choice) are taken with
  losses.batch_statistics at r = 1 before each optimizer step, as train.py takes them.
- The labels of the correct tokens carry no meaning in a tabular policy, so they are fixed: tokens
  0 .. K//2 - 1 at forks, token 0 at knowledge positions.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

import claims
import entropy_math
import logprobs
import losses
import plots
from evaluation import pass_at_k
from run_dir import json_safe

# name shown to the reader -> (key of losses.LOSSES, extra keyword arguments for that loss)
ALGOS = {
    "grpo": ("grpo", {}),
    "grpo-onpolicy": ("grpo", {}),      # OPEFO's own control: strictly on-policy GRPO at OPEFO's lr (ON_POLICY)
    "dapo": ("dapo", {}),
    "steer": ("steer", {}),
    "steer-code": ("steer", {"form": "code"}),
    "steer-exact": ("steer", {"form": "exact"}),
    "opefo": ("opefo", {}),
    "opefo-exact": ("opefo", {"form": "exact"}),
    "archer": ("archer", {}),
    "drgrpo": ("drgrpo", {}),
    # the losses that act through the PPO clip after Archer (not in the default set)
    "aspo": ("aspo", {}),
    "ce-gppo": ("ce_gppo", {}),
    "gppo": ("gppo", {}),
    # STEER's quadrant interventions: one quadrant's update doubled or halved (not in the default set)
    **{f"{q.replace('_', '-')}-x{s:g}": ("quadrant", {q: s}) for q in losses.QUADRANTS for s in (2.0, 0.5)},
    # the interventions STEER and OPEFO compare against (losses.py docstrings give papers and defaults)
    "entropy-bonus": ("entropy_bonus", {}),
    "adaptive-entropy": ("adaptive_entropy", {}),
    "clip-cov": ("clip_cov", {}),
    "kl-cov": ("kl_cov", {}),
    "forking": ("forking", {}),
    "entropy-adv": ("entropy_adv", {}),
    "w-reinforce": ("w_reinforce", {}),
    # the ratio reshaped (GSPO, CISPO, SAPO) and the gates on the entropy change (ERC, Clip_B, Clip_V)
    "gspo": ("gspo", {}),
    "gspo-token": ("gspo_token", {}),
    "cispo": ("cispo", {}),
    "cispo-trl": ("cispo_trl", {}),
    "sapo": ("sapo", {}),
    "erc-dapo": ("erc_dapo", {}),
    "erc-gppo": ("erc_gppo", {}),
    "clip-b": ("clip_b", {}),
    "clip-v": ("clip_v", {}),
    "clip-v-paper": ("clip_v", {"form": "paper"}),
}
ON_POLICY = {"grpo-onpolicy"}     # cells run as OPEFO is: one update per batch at lr x sqrt(updates)
INTERVENTIONS = ("entropy-bonus", "adaptive-entropy", "clip-cov", "kl-cov", "forking", "entropy-adv", "w-reinforce")
DEFAULT_ALGOS = ("grpo", "grpo-onpolicy", "dapo", "steer", "steer-exact", "opefo", "opefo-exact", "archer")
CLIP_KNOBS = ("clip_low", "clip_high", "dual_clip")    # each reaches the losses whose knobs include it
# method knob -> the flag that sets it, for every loss whose knobs include it (STEER; Archer and ASPO)
METHOD_KNOBS = {"lambda_min": "lambda_min", "quantile": "archer_quantile", "kl_knowledge": "archer_kl"}
PASS_K = (1, 4, 16, 64, 256)           # those up to --eval-samples; 16 at least
HELP = {
    "T": "response length (positions; even ones are forks)",
    "K": "vocabulary size (forks have K // 2 correct tokens)",
    "G": "group size",
    "groups": "groups per rollout batch",
    "steps": "rollout batches",
    "updates": "optimizer steps per rollout batch (OPEFO always 1)",
    "lr": "learning rate",
    "optimizer": "sgd (the first-order analysis' setting) or adam",
    "init_bias": "initial logit bonus of the correct tokens",
    "init_noise": "std of the random initial logits",
    "clip_low": "PPO clip epsilon below 1 (None: each loss's default; taken by every loss with the ratio clip: "
                "not opefo, kl-cov, archer or aspo)",
    "clip_high": "PPO clip epsilon above 1 (None: each loss's default; same losses)",
    "dual_clip": "dual-clip constant c for negative advantages (None: each loss's default; also archer, and "
                 "aspo's soft dual clip on both signs)",
    "lambda_min": "STEER: smallest token weight",
    "opefo_lr_scale": "OPEFO lr multiplier (None: sqrt(updates), as in the OPEFO paper)",
    "archer_quantile": "Archer and ASPO: per-response entropy quantile separating reasoning tokens",
    "archer_kl": "Archer and ASPO: KL coefficient on knowledge tokens",
    "eval_samples": "samples of the final policy for pass@k and distinct answers",
    "variants": "held-out task variants for pass@k",
}


@dataclass
class Config:
    """Sizes and knobs of one toy run (every field is a CLI flag of the same name)."""
    T: int = 6                  # response length = number of positions
    K: int = 8                  # vocabulary size
    G: int = 8                  # group size
    groups: int = 4             # groups per rollout batch (batch = groups * G responses of the one task)
    steps: int = 100            # rollout batches
    updates: int = 4            # optimizer steps per rollout batch (OPEFO: 1)
    lr: float = 5.0
    optimizer: str = "sgd"
    init_bias: float = 2.5      # logit bonus of the correct tokens at initialisation
    init_noise: float = 0.5     # std of the random initial logits ("pretrained" preferences)
    clip_low: Optional[float] = None    # PPO-style losses' clip range (None: the loss's own default);
    clip_high: Optional[float] = None   # STEER's extreme scenario is 0.99 / 5 (STEER Table 6)
    dual_clip: Optional[float] = None
    lambda_min: float = 0.7     # STEER
    opefo_lr_scale: Optional[float] = None   # OPEFO lr multiplier; None -> sqrt(updates)
    archer_quantile: float = 0.8
    archer_kl: float = 0.001    # Archer's KL coefficient on knowledge tokens
    eval_samples: int = 256
    variants: int = 64


def make_task(cfg, generator):
    """The task and the initial policy.

    Returns correct (T, K) bool, init_logits (T, K) float, variant_correct (V, T, K) bool (held-out variants:
    half of each fork's correct tokens kept), h_star float.
    """
    T, K = cfg.T, cfg.K
    width = K // 2
    correct = torch.zeros(T, K, dtype=torch.bool)
    correct[0::2, :width] = True              # forks: several correct tokens
    correct[1::2, 0] = True                   # knowledge: exactly one
    n_correct = correct.sum(-1).float()
    h_star = n_correct.log().mean().item()    # target entropy H* = mean_t log |correct_t|
    init_logits = cfg.init_noise * torch.randn(T, K, generator=generator) + cfg.init_bias * correct.float()
    keep = torch.rand(cfg.variants, T, width, generator=generator).argsort(-1) < max(width // 2, 1)
    variant_correct = correct.expand(cfg.variants, T, K).clone()
    variant_correct[:, 0::2, :width] = keep[:, 0::2]
    return correct, init_logits, variant_correct, h_star


def sample_responses(logits, n, generator):
    """n responses from the tabular policy: logits (T, K) -> tokens (n, T) long."""
    probs = torch.softmax(logits.detach(), -1)
    return torch.multinomial(probs, n, replacement=True, generator=generator).T


def is_correct(tokens, correct):
    """tokens (n, T), correct (..., T, K) bool -> (..., n) bool: every token of the response is correct."""
    T = tokens.shape[1]
    return correct[..., torch.arange(T), tokens].all(-1)


def exact_accuracy(logits, correct):
    """Probability that a sample is correct, prod_t pi_t(correct set): logits (..., T, K) -> (...)."""
    return (torch.softmax(logits.detach(), -1) * correct).sum(-1).prod(-1)


def first_order_correlations(before, after, weights, lr):
    """Pearson r between predicted and realised per-position entropy changes over all optimizer steps.

    before, after: (U, T, K) tables around each of U optimizer steps; weights: (U, T * K), the step's
    weights w = -d loss / d logp summed over the batch's tokens per (position, token). The prediction for
    position t is sum_b entropy_math.dh_*(z_t, b, W[t, b], lr): the summed first-order changes of the
    tokens sampled there (exact for a plain SGD step up to O(lr^2)). Steps with an all-zero gradient
    (every group had equal rewards) are left out. Returns (r with dh_exact, r with dh_paper).
    """
    keep = weights.abs().sum(-1) > 0
    before, after, weights = before[keep], after[keep], weights[keep]
    U, T, K = before.shape
    rows = before.unsqueeze(2).expand(U, T, K, K).reshape(-1, K)   # state z_t once per candidate token b
    token = torch.arange(K).repeat(U * T)
    realised = (entropy_math.entropy(after) - entropy_math.entropy(before)).reshape(-1)
    predicted = (fn(rows, token, weights.reshape(-1), lr).view(U * T, K).sum(-1)
                 for fn in (entropy_math.dh_exact, entropy_math.dh_paper))
    return tuple(entropy_math.pearson(p, realised) for p in predicted)


def run(algo, seed, cfg):
    """Train one algorithm on the toy with one seed.

    Returns a dict: summary numbers (see README / --json) and per-step curves "entropy_curve",
    "accuracy_curve" (length cfg.steps + 1, index 0 = initial policy).
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGOS)}")
    loss_name, extra = ALGOS[algo]
    if loss_name not in losses.LOSSES:
        raise ValueError(f"losses.LOSSES has no entry {loss_name!r} (needed by toy algorithm {algo!r})")
    method = losses.LOSSES[loss_name]
    knobs = dict(extra)
    knobs.update({name: getattr(cfg, name) for name in CLIP_KNOBS
                  if name in method.knobs and getattr(cfg, name) is not None})   # only where the loss has it
    knobs.update({knob: getattr(cfg, flag) for knob, flag in METHOD_KNOBS.items() if knob in method.knobs})
    on_policy = method.on_policy or algo in ON_POLICY
    n_updates = 1 if on_policy else cfg.updates
    lr = cfg.lr
    if on_policy:
        lr *= math.sqrt(cfg.updates) if cfg.opefo_lr_scale is None else cfg.opefo_lr_scale

    gen = torch.Generator().manual_seed(seed)        # all randomness of the run comes from here
    if "generator" in method.knobs:
        knobs["generator"] = gen                     # Clip-Cov's random choice of tokens
    control = losses.entropy_control_init() if method.adaptive else None
    correct, init_logits, variant_correct, h_star = make_task(cfg, gen)
    logits = torch.nn.Parameter(init_logits.clone())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD([logits], lr=lr)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam([logits], lr=lr)
    else:
        raise ValueError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")

    T, K = cfg.T, cfg.K
    n = cfg.groups * cfg.G
    mask = torch.ones(n, T)
    slot = (torch.arange(T) * K).expand(n, T)     # index of (position t, token 0) in a flattened (T, K) table
    ref_logits = init_logits.expand(n, T, K)      # frozen reference = initial policy (Archer's KL)
    tables = [init_logits]                        # the policy after every rollout step
    before, after, weights = [], [], []           # every optimizer step: tables around it, summed weights
    clipfrac, leverage = [], []                   # every optimizer step: clipped share, grpo_weight_change
    flows = []                                    # every optimizer step: losses.entropy_flow_quadrants

    for _ in range(cfg.steps):
        tokens = sample_responses(logits, n, gen)
        rewards = is_correct(tokens, correct).float()
        advantages = losses.group_advantages(rewards, cfg.G, std_normalize=method.std_normalize)
        with torch.no_grad():
            old_batch_logits = logits.detach().expand(n, T, K)
            old_logp, entropy, exact_term = logprobs.token_stats(old_batch_logits, tokens)   # one pass
            ref_logp = logprobs.token_logprobs(ref_logits, tokens)
        if control is not None:                   # adaptive entropy: this step's coefficient from the rollout
            knobs["coef"], control = losses.entropy_control_step(control, float(entropy.mean()))
        for _ in range(n_updates):
            opt.zero_grad(set_to_none=True)
            current = {}
            if "current_entropy" in method.inputs:   # the bonus needs H of the current policy, with gradient
                logp, current["current_entropy"] = logprobs.token_logprobs_entropy(logits.expand(n, T, K), tokens)
            else:
                logp = logprobs.token_logprobs(logits.expand(n, T, K), tokens)
            logp.retain_grad()
            # the batch's statistics at r = 1, as train.py takes them before each optimizer step
            stats = losses.batch_statistics(loss_name, mask=mask, advantages=advantages, old_logp=old_logp,
                                            entropy=entropy, exact_term=exact_term, **knobs)
            loss, metrics = method(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                                   entropy=entropy, exact_term=exact_term, ref_logp=ref_logp,
                                   **current, **stats, **knobs)
            loss.backward()
            flows.append(losses.entropy_flow_quadrants(old_logp, entropy, exact_term, advantages,
                                                       -logp.grad, mask))
            clipfrac.append(metrics.get("clip_frac_low", 0.0) + metrics.get("clip_frac_high", 0.0))
            leverage.append(losses.grpo_weight_change(-logp.grad, logp, old_logp, advantages, mask,
                                                      num_tokens=n * T))
            # w = -d loss / d logp: the step ascends sum_i w_i log pi(a_i); summed per (position, token)
            w = torch.zeros(T * K).scatter_add_(0, (slot + tokens).reshape(-1), -logp.grad.reshape(-1))
            before.append(logits.detach().clone())
            opt.step()
            after.append(logits.detach().clone())
            weights.append(w)
        tables.append(logits.detach().clone())

    tables = torch.stack(tables)                                          # (steps + 1, T, K)
    entropy_curve = entropy_math.entropy(tables).mean(-1).tolist()
    accuracy_curve = exact_accuracy(tables, correct).tolist()
    r_exact, r_paper = first_order_correlations(torch.stack(before), torch.stack(after),
                                                torch.stack(weights), lr)
    evaluated = evaluate_policy(logits.detach(), correct, variant_correct, cfg, gen)
    start = evaluate_policy(init_logits, correct, variant_correct, cfg, torch.Generator().manual_seed(seed + 10**6))
    start.update(accuracy=accuracy_curve[0], entropy_over_h_star=entropy_curve[0] / h_star)
    reached = [i for i, a in enumerate(accuracy_curve) if a >= 0.9]
    return {
        "algo": algo, "seed": seed,
        "accuracy": accuracy_curve[-1],
        "entropy": entropy_curve[-1],
        "h_star": h_star,
        "entropy_over_h_star": entropy_curve[-1] / h_star,
        "steps_to_90": reached[0] if reached else None,
        **evaluated,
        "possible_correct": (cfg.K // 2) ** ((cfg.T + 1) // 2),
        "start": start,                             # the policy before training (its own sampling generator)
        "r_first_order_exact": r_exact,
        "r_first_order_paper": r_paper,
        "clipfrac": sum(clipfrac) / max(len(clipfrac), 1),
        "leverage_changed": sum(c["changed"] for c in leverage) / max(len(leverage), 1),
        # over the run: sum |w - w_GRPO| / sum |w_GRPO| (late updates can have every GRPO weight 0: A = 0)
        "leverage_l1": sum(c["gap"] for c in leverage) / max(sum(c["size"] for c in leverage), 1e-30),
        # exact first-order change of the mean entropy per optimizer step (lr * sum / T), per quadrant,
        # averaged over the run's steps (the SGD prediction; with Adam only the direction holds)
        "flow": {q: lr * sum(f[f"{q}_exact"] for f in flows) / len(flows) / T
                 for q in losses.QUADRANTS + ("total",)},
        "entropy_curve": entropy_curve,
        "accuracy_curve": accuracy_curve,
    }


SPARK = "▁▂▃▄▅▆▇█"


def evaluate_policy(logits, correct, variant_correct, cfg, generator):
    """pass@k (PASS_K up to cfg.eval_samples, unbiased) on the training task and on the held-out variants, and
    the distinct correct answers, from cfg.eval_samples samples of the (T, K) policy drawn with `generator`."""
    ks = [k for k in PASS_K if k <= cfg.eval_samples]
    samples = sample_responses(logits, cfg.eval_samples, generator)
    ok_train = is_correct(samples, correct)
    c_train, c_variants = int(ok_train.sum()), is_correct(samples, variant_correct).sum(-1).tolist()
    return {"pass_at_k_variants": {str(k): sum(pass_at_k(cfg.eval_samples, c, k) for c in c_variants) /
                                   len(c_variants) for k in ks},
            "pass_at_k_train": {str(k): pass_at_k(cfg.eval_samples, c_train, k) for k in ks},
            "distinct_correct": int(torch.unique(samples[ok_train], dim=0).shape[0]) if c_train else 0}


def sparkline(values, lo, hi, width=40):
    """Text sparkline of a curve: average into `width` columns, map [lo, hi] onto 8 block characters."""
    n = len(values)
    cols = [values[i * n // width:max((i + 1) * n // width, i * n // width + 1)] for i in range(min(width, n))]
    out = []
    for c in cols:
        v = (sum(c) / len(c) - lo) / (hi - lo) if hi > lo else 0.0
        out.append(SPARK[min(max(int(v * len(SPARK)), 0), len(SPARK) - 1)])
    return "".join(out)


def _fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def clip_note(algos, cfg):
    """The header line on the clip flags given (--clip-low / --clip-high / --dual-clip; None when none is):
    their values, and for each method of the run whether they reach it, read off the registry
    (losses.LOSSES[name].knobs), with the reason where one does not."""
    given = [k for k in CLIP_KNOBS if getattr(cfg, k) is not None]
    if not given:
        return None
    setting = lambda keys: ", ".join(f"{k} {getattr(cfg, k):g}" for k in keys)    # noqa: E731
    by_taken, missed = {}, {}          # flags taken -> methods; reason -> methods not reached by any
    for algo in dict.fromkeys(algos):
        knobs = losses.LOSSES[ALGOS[algo][0]].knobs
        taken = tuple(k for k in given if k in knobs)
        own_clips = [k for k in knobs if k.startswith("clip_") and k not in CLIP_KNOBS]   # archer's per token type
        takes = ["--" + k.replace("_", "-") for k in CLIP_KNOBS if k in knobs]
        own = [f"own clips {', '.join(own_clips)}"] if own_clips else []
        if taken:
            by_taken.setdefault(taken, []).append((algo, "; ".join(own)))
        else:
            reason = "; ".join(own + ([f"takes only {', '.join(takes)}"] if takes else ["no ratio clip"]))
            missed.setdefault(reason, []).append(algo)
    rest = [k for k in CLIP_KNOBS if k not in given]
    head = f"clip flags: {setting(given)}" + (f" ({', '.join(rest)}: each loss's default)" if rest else "")
    verb = "reaches" if len(given) == 1 else "reach"
    parts = [f"{head} {verb} {', '.join(a for a, _ in by_taken.get(tuple(given), [])) or 'none of the run'}"]
    for taken, methods in by_taken.items():
        if taken != tuple(given):
            parts.append(f"only {setting(taken)} {'reaches' if len(taken) == 1 else 'reach'} "
                         + ", ".join(f"{a} ({r})" if r else a for a, r in methods))
    if missed:
        parts.append("not " + ", ".join(f"{', '.join(ms)} ({r})" for r, ms in missed.items()))
    return "; ".join(parts)


def figures(run):
    """The claims' figures of one toy run (claims.CLAIMS with where="toy"), and the start policy's as
    "<figure> start"."""
    def of(r):
        return {"accuracy": r["accuracy"], "entropy_over_h_star": r["entropy_over_h_star"],
                "distinct": r["distinct_correct"], **{f"pass@{k} variants": v for k, v in r["pass_at_k_variants"].items()}}
    return {**of(run), "flow total": run["flow"]["total"], "leverage_l1": run["leverage_l1"],
            **{f"{k} start": v for k, v in of(run["start"]).items()}}


def seed_values(results):
    """{algo: {figure: {seed: value}}} of the runs (claims.decide's input)."""
    out = {}
    for r in results:
        for key, value in figures(r).items():
            out.setdefault(r["algo"], {}).setdefault(key, {})[r["seed"]] = value
    return out


def toy_claims(results):
    """The toy's claims whose cells are all in `results`: [(claim, rows, verdict)]."""
    values, algos = seed_values(results), {r["algo"] for r in results}
    return [(c, *claims.decide(c, values)) for c in claims.claims_for("toy")
            if all(t.treatment in algos and t.control in algos | {None, "start"} for t in c.tests)]


def format_report(results, cfg, wall_s):
    """Summary table (per algorithm and seed, the start policy, the mean over seeds), each algorithm's mean ±
    95% interval and seed-matched difference against GRPO, the flows, the toy's claims, per-step sparklines."""
    h_star = results[0]["h_star"]
    wa = max(12, max(len(r["algo"]) for r in results) + 1)
    head = (f"{'algo':<{wa}}{'seed':>5}{'acc':>7}{'H/H*':>7}{'90%@':>6}{'pass@1':>8}{'pass@16':>8}{'pass@256':>9}"
            f"{'distinct':>9}{'lever':>7}{'r_exact':>9}{'r_paper':>9}")
    lines = [f"toy bandit: T={cfg.T} positions, K={cfg.K} tokens, {(cfg.T + 1) // 2} forks with {cfg.K // 2} correct "
             f"tokens, H* = {h_star:.3f}; {cfg.groups} groups x G={cfg.G} per batch, {cfg.steps} steps, "
             f"{cfg.updates} updates/batch (opefo, grpo-onpolicy 1), {cfg.optimizer} lr={cfg.lr:g}",
             *filter(None, [clip_note([r["algo"] for r in results], cfg)]),
             "acc, H: exact, final policy. 90%@: first step with acc >= 0.9. pass@k: unbiased, 256 samples, "
             "held-out variants. distinct: distinct correct answers in those samples "
             f"(of {results[0]['possible_correct']}). lever: sum |w - w_GRPO| / sum |w_GRPO| (the mechanism's "
             "leverage). r_*: Pearson r, first-order vs realised per-position dH. start: the policy before training.",
             "", head, "-" * len(head)]

    def row(name, seed, rs):
        mean = lambda key: sum(r[key] for r in rs) / len(rs)   # noqa: E731
        mk = lambda key, k: sum(r[key][k] for r in rs) / len(rs)   # noqa: E731
        steps = [r.get("steps_to_90") for r in rs]
        s90 = None if any(s is None for s in steps) else sum(steps) / len(steps)
        opt = lambda key: _fmt(mean(key) if key in rs[0] else None, ".3f")   # noqa: E731
        return (f"{name:<{wa}}{seed:>5}{mean('accuracy'):>7.3f}{mean('entropy_over_h_star'):>7.2f}"
                f"{_fmt(s90, '.0f'):>6}{mk('pass_at_k_variants', '1'):>8.3f}{mk('pass_at_k_variants', '16'):>8.3f}"
                f"{_fmt(mk('pass_at_k_variants', '256') if '256' in rs[0]['pass_at_k_variants'] else None, '.3f'):>9}"
                f"{mean('distinct_correct'):>9.1f}"
                f"{_fmt(mean('leverage_l1') if 'leverage_l1' in rs[0] else None, '.2f'):>7}"
                f"{opt('r_first_order_exact'):>9}{opt('r_first_order_paper'):>9}")

    algos = list(dict.fromkeys(r["algo"] for r in results))
    starts = [r["start"] for r in results if r["algo"] == algos[0]]
    lines += [row("start", str(r["seed"]), [st]) for r, st in zip(results, starts)]
    for algo in algos:
        rs = [r for r in results if r["algo"] == algo]
        lines += [row(algo, str(r["seed"]), [r]) for r in rs]
        if len(rs) > 1:
            lines.append(row(algo, "mean", rs))
    values = seed_values(results)
    if len(starts) > 1:
        shown = ("entropy_over_h_star", "pass@16 variants", "distinct")
        lines += ["", f"mean ± 95% interval over {len(starts)} seeds; d: the seed-matched difference against grpo "
                  "[95% interval]", f"{'algo':<{wa}}" + "".join(f"{k:>40}" for k in shown)]
        for algo in algos:
            cells = []
            for key in shown:
                m, ci = claims.mean_ci(list(values[algo][key].values()))
                d = claims.paired(values[algo][key], values.get("grpo", {}).get(key, {}))
                diff = f"  d {d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]" if algo != "grpo" and d.n > 1 else ""
                cells.append(f"{m:.2f} ± {ci:.2f}{diff}")
            lines.append(f"{algo:<{wa}}" + "".join(f"{c:>40}" for c in cells))
    lines += ["", "first-order entropy flow per quadrant (exact form, the change of the mean entropy per update,",
              "x 1e-3 nats, mean over the run and seeds): A>0 / A<0 on likely (pi > exp(-H)) / unlikely tokens",
              f"{'algo':<{wa}}" + "".join(f"{q:>14}" for q in losses.QUADRANTS) + f"{'net':>10}"]
    for algo in algos:
        rs = [r for r in results if r["algo"] == algo]
        flow = {q: 1e3 * sum(r["flow"][q] for r in rs) / len(rs) for q in losses.QUADRANTS + ("total",)}
        lines.append(f"{algo:<{wa}}" + "".join(f"{flow[q]:>14.2f}" for q in losses.QUADRANTS)
                     + f"{flow['total']:>10.2f}")
    if len(starts) > 1:
        for claim, _, _ in toy_claims(results):
            lines += ["", claims.report(claim, values).rstrip()]
    curves = {a: [[sum(v) / len(v) for v in zip(*(r[key] for r in results if r["algo"] == a))]
                  for key in ("entropy_curve", "accuracy_curve")] for a in algos}
    h_hi = max(max(c[0]) for c in curves.values())
    lines += ["", f"per-step curves, mean over seeds ({cfg.steps} steps; entropy scale 0 .. {h_hi:.2f}, "
              f"H* = {h_star:.2f} is '{sparkline([h_star], 0.0, h_hi, 1)}'; accuracy scale 0 .. 1)"]
    for a, (h, acc) in curves.items():
        lines.append(f"{a:<{wa}} H {sparkline(h, 0.0, h_hi)} {h[0]:.2f}->{h[-1]:.2f}   "
                     f"acc {sparkline(acc, 0.0, 1.0)} {acc[0]:.2f}->{acc[-1]:.2f}")
    lines.append(f"\n{len(results)} run{'s' * (len(results) != 1)} in {wall_s:.1f} s")
    return "\n".join(lines)


def _check_writable(path, flag):
    """Exit with a one-line message, before any work, when `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        sys.exit(f"{flag} {path}: folder {parent} does not exist")
    if path.is_dir():
        sys.exit(f"{flag} {path}: is a folder; give a file name")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        sys.exit(f"{flag} {path}: not writable")


def plot(results, path):
    """Entropy and accuracy curves (mean over seeds) to a PNG, the legend (one entry per method, and H*)
    just right of the panels (constrained layout: the panels make room for it, no empty band)."""
    plt = plots.pyplot()
    fig, (ax_h, ax_a) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for i, algo in enumerate(dict.fromkeys(r["algo"] for r in results)):
        rs = [r for r in results if r["algo"] == algo]
        style = ("-", "--", ":")[i // 10 % 3]          # the colour cycle has 10 colours: then dashed, dotted
        for ax, key in ((ax_h, "entropy_curve"), (ax_a, "accuracy_curve")):
            ax.plot([sum(v) / len(v) for v in zip(*(r[key] for r in rs))], label=algo, ls=style)
    ax_h.axhline(results[0]["h_star"], color="k", ls="--", lw=1, label="H*")
    ax_h.set(xlabel="step", ylabel="mean policy entropy (nats)", title="entropy")
    ax_a.set(xlabel="step", ylabel="P(correct)", title="accuracy", ylim=(0, 1.02))
    handles, labels = ax_h.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8,
               ncol=1 + (len(labels) - 1) // 16)            # more than 16 entries: columns, to fit the height
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help=f"comma-separated, from {', '.join(ALGOS)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1)")
    defaults = Config()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "optimizer":
            p.add_argument(flag, default=value, choices=("sgd", "adam"), help=HELP[name])
        elif value is None:
            p.add_argument(flag, type=float, default=None, help=HELP[name])
        else:
            p.add_argument(flag, type=type(value), default=value, help=HELP[name])
    p.add_argument("--plot", metavar="FILE.png", help="draw entropy and accuracy curves")
    p.add_argument("--json", metavar="FILE", help="write the summary (and per-step curves) as JSON")
    args = p.parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        p.error(f"--algos: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(ALGOS)}")
    if args.seeds < 1 or args.steps < 1 or args.updates < 1 or args.G < 2 or args.groups < 1:
        p.error("--seeds, --steps, --updates and --groups must be >= 1 and --G >= 2")
    if args.T < 1 or args.K < 2:
        p.error(f"--T must be >= 1 and --K >= 2, got T={args.T}, K={args.K}")
    if args.eval_samples < 16 or args.variants < 1 or args.lr <= 0:
        p.error(f"--eval-samples must be >= 16, --variants >= 1 and --lr > 0; got "
                f"{args.eval_samples}, {args.variants}, {args.lr}")
    cfg = Config(**{k: getattr(args, k) for k in asdict(defaults)})
    return algos, args.seeds, cfg, args


def main(argv=None):
    algos, n_seeds, cfg, args = parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):    # fail before the work, not after
        if path:
            _check_writable(path, flag)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = [run(a, s, cfg) for a in algos for s in range(n_seeds)]
    wall = time.perf_counter() - start
    print(format_report(results, cfg, wall))
    if args.json:
        with open(args.json, "w") as f:
            decided = {c.key: {"verdict": v, "tests": [claims.row_dict(r) for r in rows]}
                       for c, rows, v in toy_claims(results)} if n_seeds > 1 else {}
            json.dump(json_safe({"config": asdict(cfg), "wall_s": wall, "runs": results, "claims": decided}), f,
                      indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return results


if __name__ == "__main__":
    main()
