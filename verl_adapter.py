"""Train with losses.py inside verl: every LOSSES entry as a verl policy loss, with the behaviour entropy.

Importing this file registers each LOSSES name with verl's register_policy_loss (a name verl already uses,
clip_cov and kl_cov, as rlvr_<name>), so that actor_rollout_ref.actor.policy_loss.loss_mode=steer picks
losses.LOSSES["steer"]. verl hands a registered loss only (old_log_prob, log_prob, advantages,
response_mask, loss_agg_mode, config, rollout_is_weights): no entropy. That is why ERC's and STEER's
authors patch verl's actor; here three wrappers around verl functions carry the rest: the behaviour
entropy from _compute_old_log_prob, losses.batch_statistics over the whole batch as per-row columns from
_update_actor, and both handed to the loss (with the reference log-probs and the current entropy) inside
verl.workers.utils.losses.ppo_loss, which also logs the four-quadrant entropy flow.

    export PYTHONPATH=/path/to/this/repo:$PYTHONPATH VERL_USE_EXTERNAL_MODULES=verl_adapter
    export ENTROPY_RLVR_KNOBS='{"lambda_min": 0.7}'
    python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo \
        actor_rollout_ref.actor.policy_loss.loss_mode=steer actor_rollout_ref.actor.loss_agg_mode=token-mean ...

Knobs come from ENTROPY_RLVR_KNOBS (JSON); verl's clip_ratio_* are not read. A loss that reads ref_logp
needs actor.use_kl_loss=True with kl_loss_coef=0. S2 is not computed by verl's actor, so the exact forms
are refused and the flow is logged in the paper form. Tested with verl 0.9.1 (others refused at import).
The wrappers, the normalisers across dp ranks and the verl internals used: docs/adapters.md.
"""
import contextvars
import functools
import json
import os
import sys

import torch
import verl
from verl.trainer.ppo import core_algos, ray_trainer
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import no_padding_2_padding

import losses

TESTED_VERL_VERSIONS = ("0.9.1",)
if verl.__version__ not in TESTED_VERL_VERSIONS:
    raise ImportError(f"verl_adapter.py is tested with verl {', '.join(TESTED_VERL_VERSIONS)} and wraps three of its "
                      f"functions; found verl {verl.__version__}. Install a tested version (pip install -r "
                      f"requirements-integrations.txt) or check the internals listed in the module docstring.")

ENTROPY_KEY = "old_entropy"
SCALAR, ROWS = "batch_stat.", "batch_rows."        # prefixes of the batch-statistics columns
KNOBS = json.loads(os.environ.get("ENTROPY_RLVR_KNOBS") or "{}")
_MICRO_BATCH = contextvars.ContextVar("entropy_rlvr_micro_batch", default=None)


def knob_value(name, knob):
    """The value LOSSES[name] will use for `knob`: KNOBS' if set, else the loss's default (losses.Loss.knobs;
    None if the loss has no such knob or no default for it)."""
    if knob in KNOBS:
        return KNOBS[knob]
    default = losses.LOSSES[name].knobs.get(knob)
    return None if default is losses.REQUIRED else default


def uses_reference(name):
    """Whether LOSSES[name] with KNOBS reads ref_logp: its value on a dummy batch moves when ref_logp does."""
    return _uses_reference(name, json.dumps(KNOBS, sort_keys=True))


@functools.cache
def _uses_reference(name, knobs_json):
    return losses.uses_reference(name, **json.loads(knobs_json))


def check_forms(name):
    if knob_value(name, "form") == "exact":
        raise ValueError(f"{name} with form='exact' needs S2, which verl's actor does not compute; use "
                         "form='paper' (or 'code' for STEER), or train.py / trl_adapter.py")


def statistics_columns(name, batch):
    """losses.batch_statistics of LOSSES[name] over a verl batch (TensorDict with old_log_probs, old_entropy,
    advantages, response_mask, each (B, R)), as columns that survive any split of the batch into rows:
    a scalar s -> SCALAR + key, (B,) filled with s (a tuple: one column per element, key#i); a (B, ...)
    tensor -> ROWS + key. num_tokens and num_seqs are left out: verl's own mini-batch totals are used."""
    stats = losses.batch_statistics(name, mask=batch["response_mask"], advantages=batch["advantages"],
                                    old_logp=batch["old_log_probs"], entropy=batch[ENTROPY_KEY], **KNOBS)
    rows = batch["response_mask"].shape[0]
    out = {}
    for key, value in stats.items():
        if key in ("num_tokens", "num_seqs"):
            continue
        if torch.is_tensor(value):
            out[ROWS + key] = value
        else:
            parts = value if isinstance(value, tuple) else (value,)
            for i, v in enumerate(parts):
                tag = f"{key}#{i}" if isinstance(value, tuple) else key
                out[SCALAR + tag] = torch.full((rows,), float(v), dtype=torch.float64)
    return out


def statistics_from_columns(columns):
    """The inverse of statistics_columns on a micro-batch: {key: scalar, tuple or that micro-batch's rows}."""
    stats, tuples = {}, {}
    for key, column in columns.items():
        if key.startswith(ROWS):
            stats[key[len(ROWS):]] = column
        elif "#" in key:
            base, i = key[len(SCALAR):].split("#")
            tuples.setdefault(base, {})[int(i)] = column[0].item()
        else:
            stats[key[len(SCALAR):]] = column[0].item()
    stats.update({k: tuple(v[i] for i in sorted(v)) for k, v in tuples.items()})
    return stats


def make_policy_loss(name):
    """A verl policy loss (verl's PolicyLossFn signature) computing losses.LOSSES[name]."""
    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None):
        extra = _MICRO_BATCH.get()
        if extra is None:
            raise RuntimeError(f"{name} needs the behaviour entropy, which reaches the loss only through "
                               "verl_adapter's ppo_loss wrapper: import verl_adapter in every verl process "
                               "(VERL_USE_EXTERNAL_MODULES=verl_adapter)")
        if rollout_is_weights is not None:
            raise ValueError(f"{name} does not apply rollout-correction weights; turn rollout correction off")
        if uses_reference(name) and extra["ref_logp"] is None:
            raise ValueError(f"{name}'s KL needs ref_log_prob: set actor_rollout_ref.actor.use_kl_loss=True "
                             "and actor_rollout_ref.actor.kl_loss_coef=0")
        if uses_reference(name) and config.use_kl_loss and config.kl_loss_coef:
            raise ValueError(f"{name} has its own KL term; set actor_rollout_ref.actor.kl_loss_coef=0 so that "
                             "verl does not add a second one")
        if "current_entropy" in losses.LOSSES[name].inputs and extra["current_entropy"] is None:
            raise ValueError(f"{name} needs the current entropy: set actor_rollout_ref.actor.calculate_entropy=True "
                             "(and entropy_coeff=0, the coefficient being the loss's coef)")
        info = config.global_batch_info
        dp = info.get("dp_size") or 1
        kwargs = {"agg": loss_agg_mode, **extra["stats"]}
        if info.get("batch_num_tokens") is not None:
            kwargs["num_tokens"] = info["batch_num_tokens"] / dp
        if info.get("global_batch_size") is not None:
            kwargs["num_seqs"] = info["global_batch_size"] / dp
        if info.get("loss_scale_factor") is not None:
            kwargs["norm_length"] = info["loss_scale_factor"]
        loss, metrics = losses.LOSSES[name](logp=log_prob, old_logp=old_log_prob, advantages=advantages,
                                            mask=response_mask, entropy=extra["entropy"], ref_logp=extra["ref_logp"],
                                            current_entropy=extra["current_entropy"], **{**kwargs, **KNOBS})
        if torch.is_grad_enabled() and loss.requires_grad and log_prob.requires_grad:
            flow = flow_sums(loss, log_prob, old_log_prob, extra["entropy"], advantages, response_mask, dp)
            extra["flow"] = {f"{name}/flow/{k}": v for k, v in flow.items()}
        return loss, {f"{name}/{k}": v for k, v in metrics.items() if k != "pg_loss"}   # verl logs pg_loss
    policy_loss.__name__ = policy_loss.__qualname__ = f"{name}_policy_loss"
    return policy_loss


FLOW_KEYS = tuple(f"{q}_{k}" for q in losses.QUADRANTS + ("zero_adv", "total") for k in ("paper", "count"))


def flow_sums(loss, log_prob, old_log_prob, entropy, advantages, mask, dp):
    """This rank's micro-batch share of the optimizer step's entropy flow (paper form and counts), times dp
    (verl averages the metric over dp ranks): losses.entropy_flow_quadrants with w = -dLoss/dlogp / dp, the
    gradient of the loss verl averages over dp ranks."""
    weights = losses.loss_weights(loss, log_prob) / dp                # the loss's graph only
    flow = losses.entropy_flow_quadrants(old_log_prob, entropy, torch.zeros_like(entropy), advantages, weights,
                                         mask)                      # S2 = 0: the exact sums are dropped
    return {k: dp * flow[k] for k in FLOW_KEYS}


def sum_flow_over_mini_batches(metrics, name):
    """In _update_actor's metrics (per mini-batch lists, which verl's driver averages), replace each flow list
    by its sum: the logged value is then the RL step's, summed over its optimizer steps as train.py's."""
    prefix = f"actor/{name}/flow/"
    for key, value in metrics.items():
        if key.startswith(prefix) and isinstance(value, list):      # (a Metric, without a dp group: SUM already)
            metrics[key] = [float(sum(value))]
    return metrics


# ------------------------------------------------------------------------------------------ wrappers
def keep_behaviour_entropy(compute_old_log_prob):
    """Wrapper 1: the behaviour entropy stays in the batch as "old_entropy" after the trainer pops "entropys"."""
    @functools.wraps(compute_old_log_prob)
    def wrapper(self, batch):
        old_log_prob, mfu = compute_old_log_prob(self, batch)
        old_log_prob.batch[ENTROPY_KEY] = old_log_prob.batch["entropys"]
        return old_log_prob, mfu
    return wrapper


def drop_gated_tokens(batch):
    """A gate's dropped tokens (Clip_B, Clip_V: the batch statistic "dropped") leave response_mask, as
    Trinity-RFT's gates leave them, so that verl's token counts are the kept tokens'; returns the dropped share
    of the valid tokens (None without a gate)."""
    dropped = batch.get(ROWS + "dropped")
    if dropped is None:
        return None
    mask = batch["response_mask"]
    frac = float((dropped & mask.bool()).sum()) / max(1, int(mask.sum()))
    batch["response_mask"] = mask * ~dropped
    return frac


def add_batch_statistics(update_actor):
    """Wrapper 2: the chosen loss's batch statistics join the batch as per-row columns before the update;
    after it, the entropy-flow metrics are summed over the mini-batches (sum_flow_over_mini_batches)."""
    @functools.wraps(update_actor)
    def wrapper(self, batch):
        actor = self.config.actor_rollout_ref.actor
        name, gate = REGISTERED.get(actor.policy_loss.loss_mode), None
        if name is not None:
            check_forms(name)
            if ENTROPY_KEY not in batch.batch.keys():
                raise RuntimeError(f"{name} needs the behaviour entropy, which verl computes with the old "
                                   "log-probs: rollout_correction.bypass_mode is not supported")
            if name == "opefo" and (actor.ppo_epochs != 1
                                    or actor.ppo_mini_batch_size != self.config.data.train_batch_size):
                raise ValueError("OPEFO is strictly on-policy: set actor.ppo_epochs=1 and actor.ppo_mini_batch_size "
                                 "= data.train_batch_size (one optimizer step per batch)")
            for key, column in statistics_columns(name, batch.batch).items():
                batch.batch[key] = column
            gate = drop_gated_tokens(batch.batch)
        output = update_actor(self, batch)
        if name is not None:
            sum_flow_over_mini_batches(output.meta_info["metrics"], name)
            if gate is not None:
                output.meta_info["metrics"][f"actor/{name}/gate_frac"] = [gate]
        return output
    return wrapper


def hand_batch_to_loss(ppo_loss):
    """Wrapper 3: the micro-batch's behaviour entropy, batch statistics, reference log-probs and (with
    calculate_entropy) current entropy reach the registered loss for the length of the call; the loss's
    entropy-flow sums come back into ppo_loss's metrics as Metric(SUM), summed over micro-batches."""
    @functools.wraps(ppo_loss)
    def wrapper(config, model_output, data, dp_group=None):
        if config.policy_loss.get("loss_mode", "vanilla") not in REGISTERED or ENTROPY_KEY not in data.keys():
            return ppo_loss(config, model_output, data, dp_group)          # verl's own losses: untouched
        columns = [k for k in data.keys() if k.startswith((SCALAR, ROWS))]
        picked = data.select(ENTROPY_KEY, *columns, *(["ref_log_prob"] if "ref_log_prob" in data.keys() else []))
        picked = picked.to_padded_tensor()
        current = model_output.get("entropy")
        extra = {"entropy": picked[ENTROPY_KEY], "ref_logp": picked.get("ref_log_prob"),
                 "stats": statistics_from_columns({k: picked[k] for k in columns}),
                 "current_entropy": None if current is None else no_padding_2_padding(current, data)}
        token = _MICRO_BATCH.set(extra)
        try:
            loss, metrics = ppo_loss(config, model_output, data, dp_group)
        finally:
            _MICRO_BATCH.reset(token)
        for key, value in extra.get("flow", {}).items():     # summed over micro-batches (policy metrics: mean)
            metrics[key] = Metric(value=value, aggregation=AggregationType.SUM)
        return loss, metrics
    wrapper.wraps_ppo_loss = True
    return wrapper


def verl_name(name):
    """The loss_mode under which LOSSES[name] is registered: its own name, or rlvr_<name> where verl has one."""
    return f"rlvr_{name}" if name in VERL_OWN_LOSSES else name


VERL_OWN_LOSSES = frozenset(n for n, f in core_algos.POLICY_LOSS_REGISTRY.items()
                            if not getattr(f, "from_losses_py", False))
REGISTERED = {verl_name(name): name for name in losses.LOSSES}       # loss_mode -> LOSSES name


def install():
    """Register the losses and wrap the three verl functions (once per process)."""
    if getattr(verl_losses.ppo_loss, "wraps_ppo_loss", False):
        return
    for mode, name in REGISTERED.items():
        fn = make_policy_loss(name)
        fn.from_losses_py = True
        core_algos.register_policy_loss(mode)(fn)
    trainer = ray_trainer.RayPPOTrainer
    trainer._compute_old_log_prob = keep_behaviour_entropy(trainer._compute_old_log_prob)
    trainer._update_actor = add_batch_statistics(trainer._update_actor)
    original = verl_losses.ppo_loss
    wrapped = hand_batch_to_loss(original)
    for name, module in list(sys.modules.items()):     # verl's modules that imported ppo_loss by name
        if name.startswith("verl.") and vars(module).get("ppo_loss") is original:
            module.ppo_loss = wrapped


install()
