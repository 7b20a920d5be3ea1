"""Train with any losses.LOSSES entry inside TRL's GRPOTrainer: a subclass for when one GPU is not enough.

TRL samples, scores, batches and scales; this file swaps its policy loss for one of losses.py's and adds
what losses.py reads and TRL does not keep: one no-grad forward per generation batch gives the behaviour
policy's log pi, H and S2 (logprobs.token_stats, at TRL's sampling temperature); the current log-probs are
TRL's own (with gradient), the old and reference ones TRL's when it has them; losses.batch_statistics runs
once per gradient-accumulation window (all processes), so the summed micro-batch losses are the window's;
every loss metric and the four-quadrant entropy flow reach TRL's logs as "<loss>/...". TRL's beta only
switches its reference model on: the KL coefficients are the loss's knobs.

    from trl import GRPOConfig
    from trl_adapter import LossesGRPOTrainer
    args = GRPOConfig(output_dir="out", num_generations=8, temperature=1.0, beta=0.0)  # beta != 0 for Archer
    trainer = LossesGRPOTrainer(model="Qwen/Qwen2.5-Math-1.5B", reward_funcs=my_reward, args=args,
                                train_dataset=dataset, loss="steer", loss_kwargs={"lambda_min": 0.7})
    trainer.train()

Tested with TRL 1.16.0 (others refused at import). TRL options the replaced loss would drop silently are
refused (listed in docs/adapters.md), and OPEFO needs one optimizer step per generation batch. GSPO runs
with TRL's own importance_sampling_level="sequence" (which loss="gspo" requires, and every other loss refuses). Which TRL
internals it relies on, the window statistics across processes and how the flow is read: docs/adapters.md.
"""
import torch
import trl
from trl import GRPOTrainer

import logprobs
import losses

TESTED_TRL_VERSIONS = ("1.16.0",)
if trl.__version__ not in TESTED_TRL_VERSIONS:
    raise ImportError(f"trl_adapter.py is tested with TRL {', '.join(TESTED_TRL_VERSIONS)} and relies on its "
                      f"private methods; found TRL {trl.__version__}. Install a tested version "
                      f"(pip install -r requirements-integrations.txt) or check the internals listed in the "
                      f"module docstring against yours and add the version to TESTED_TRL_VERSIONS.")

NEUTRAL_TRL_ARGS = {"top_entropy_quantile": 1.0, "entropy_coef": 0.0, "use_adaptive_entropy": False,
                    "off_policy_mask_threshold": None, "delta": None}


def uses_reference(loss, knobs):
    """Whether LOSSES[loss] with these knobs reads ref_logp (losses.uses_reference)."""
    return losses.uses_reference(loss, **knobs)


def completion_mask(batch):
    """The loss mask of a TRL batch: completion_mask times tool_mask when tools ran."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


class LossesGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is losses.LOSSES[loss](**batch tensors, **loss_kwargs).

    Takes GRPOTrainer's arguments plus loss (a LOSSES name) and loss_kwargs (its knobs). TRL's loss_type,
    epsilon and epsilon_high are not read: the clip ranges are the loss's knobs.
    """

    def __init__(self, *args, loss="steer", loss_kwargs=None, **kwargs):
        knobs = dict(loss_kwargs or {})
        self._uses_reference = uses_reference(loss, knobs)
        super().__init__(*args, **kwargs)
        self.loss_name, self.loss_kwargs = loss, knobs
        self._check_config()
        self._stats = (None, None)        # (window index, losses.batch_statistics of that window)
        self._window_parts = []           # (valid tokens, metrics) of this window's micro-batches
        self._window_flows = []           # losses.entropy_flow_quadrants of this window's micro-batches

    def _check_config(self):
        a, name = self.args, self.loss_name
        bad = [f"{k}={getattr(a, k)!r}" for k, v in NEUTRAL_TRL_ARGS.items() if getattr(a, k) != v]
        if a.use_vllm and a.vllm_importance_sampling_correction:
            bad.append("use_vllm with vllm_importance_sampling_correction=True")
        if bad:
            raise ValueError(f"LossesGRPOTrainer replaces TRL's loss, which would drop: {', '.join(bad)}; "
                             "reset them to TRL's defaults")
        level = losses.LOSSES[name].ratio_level              # GSPO: TRL's own sequence-level option
        if a.importance_sampling_level != level:
            raise ValueError(f"{name} takes its importance ratio at the {level} level: set "
                             f"importance_sampling_level={level!r} (got {a.importance_sampling_level!r})")
        if a.steps_per_generation % a.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation={a.steps_per_generation} must be a multiple of "
                             f"gradient_accumulation_steps={a.gradient_accumulation_steps}, so that each "
                             "accumulation window lies inside one generation batch")
        if name == "opefo" and (a.num_iterations != 1 or a.steps_per_generation != a.gradient_accumulation_steps):
            raise ValueError("OPEFO is strictly on-policy: set num_iterations=1 and steps_per_generation="
                             "gradient_accumulation_steps (one optimizer step per generation batch)")
        if self._uses_reference and self.beta == 0.0:
            raise ValueError(f"{name}'s KL term needs the reference model, which TRL loads only when beta != 0: "
                             "set beta=1.0 (its value is not used; the KL coefficients are the loss's knobs)")
        if not self._uses_reference and self.beta != 0.0:
            raise ValueError(f"beta={self.beta} loads a reference model that {name} with these knobs does not "
                             "use: set beta=0, or turn the loss's KL to the reference on (e.g. kl_coef)")

    # ------------------------------------------------------------------------- behaviour statistics
    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if any(k in batch for k in ("pixel_values", "num_images", "image_position_ids")):
            raise ValueError("LossesGRPOTrainer supports text models only")
        batch["old_logp_stats"], batch["old_entropy"], batch["old_exact_term"] = self._behaviour_stats(batch)
        return batch

    @torch.no_grad()
    def _behaviour_stats(self, batch):
        """(log pi_old, H, S2), each (B, T) float32, from the completion positions' full logits."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        t = batch["completion_ids"].shape[1]
        rows = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        parts = []
        for s in range(0, ids.shape[0], rows):
            with self.accelerator.autocast():
                logits = self.model(input_ids=ids[s:s + rows], attention_mask=attention[s:s + rows],
                                    logits_to_keep=t + 1).logits[:, :-1]    # position p predicts token p + 1
            if self.temperature != 1.0:
                logits = logits / self.temperature                          # the sampling distribution
            parts.append(logprobs.token_stats(logits, batch["completion_ids"][s:s + rows]))
        return tuple(torch.cat(p) for p in zip(*parts))

    # ------------------------------------------------------------------------------ window statistics
    def _window(self, inputs):
        """(window index, the micro-batches of the current accumulation window, this one's position in it);
        in evaluation: (None, [this batch], 0)."""
        if not self.model.training:
            return None, [inputs], 0
        ga, spg = self.args.gradient_accumulation_steps, self.args.steps_per_generation
        start = self._step // ga * ga
        return self._step // ga, [self._buffered_inputs[s % spg] for s in range(start, start + ga)], self._step % ga

    def _window_statistics(self, pieces):
        """losses.batch_statistics over the window's micro-batches, the behaviour's (pi = pi_old, r = 1).

        Across processes: num_tokens and num_seqs are summed (then divided by the number of processes, as
        DDP averages gradients), omega_max is maxed, flow_totals summed; the other statistics stay per process.
        """
        cat = {k: torch.cat([p[k] for p in pieces]) for k in ("advantages", "old_logp_stats", "old_entropy",
                                                               "old_exact_term")}
        stats = losses.batch_statistics(self.loss_name, mask=torch.cat([completion_mask(p) for p in pieces]),
                                        advantages=cat["advantages"], old_logp=cat["old_logp_stats"],
                                        entropy=cat["old_entropy"], exact_term=cat["old_exact_term"],
                                        **self.loss_kwargs)
        acc = self.accelerator
        if acc.num_processes > 1:
            dev = acc.device
            sums = acc.reduce(torch.tensor([stats["num_tokens"], stats["num_seqs"], *stats.get("flow_totals", ())],
                                           dtype=torch.float64, device=dev), reduction="sum").tolist()
            stats["num_tokens"], stats["num_seqs"] = sums[0] / acc.num_processes, sums[1] / acc.num_processes
            if "flow_totals" in stats:
                stats["flow_totals"] = tuple(sums[2:])
            if "omega_max" in stats:
                stats["omega_max"] = acc.gather(torch.tensor([stats["omega_max"]], device=dev)).max().item()
        return stats

    def _loss_statistics(self, inputs):
        """The window's statistics for this micro-batch: (B_window, ...) tensors cut to its rows."""
        key, pieces, position = self._window(inputs)
        if key is None or self._stats[0] != key:
            self._stats = (key, self._window_statistics(pieces))
        first = sum(len(p["advantages"]) for p in pieces[:position])
        rows = slice(first, first + len(inputs["advantages"]))
        return {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in self._stats[1].items()}

    # ------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logp, current_entropy, aux_loss = self._get_per_token_logps_and_entropies(
            model, ids, attention, inputs["completion_ids"].shape[1], compute_aux_loss=self.aux_loss_enabled,
            compute_entropy="current_entropy" in losses.LOSSES[self.loss_name].inputs)   # entropy with gradient
        old_logp = inputs.get("old_per_token_logps")
        mask = completion_mask(inputs)
        loss, metrics = losses.LOSSES[self.loss_name](
            logp=logp, old_logp=logp.detach() if old_logp is None else old_logp, advantages=inputs["advantages"],
            mask=mask, entropy=inputs["old_entropy"], exact_term=inputs["old_exact_term"],
            ref_logp=inputs.get("ref_per_token_logps"), current_entropy=current_entropy, **{**self._loss_statistics(inputs), **self.loss_kwargs})
        if self.model.training and loss.requires_grad:
            self._window_flows.append(self._flow(loss, logp, inputs, mask))
        if self.aux_loss_enabled:            # MoE load balancing, scaled for accumulation as TRL does
            share = self.current_gradient_accumulation_steps if self.model.training else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / share
        self._record(metrics, int(mask.sum()))
        return loss

    def _flow(self, loss, logp, inputs, mask):
        """losses.entropy_flow_quadrants of this micro-batch, with w = -dLoss/dlogp of the global loss."""
        weights = losses.loss_weights(loss, logp) / self.accelerator.num_processes     # the loss's graph only
        return losses.entropy_flow_quadrants(inputs["old_logp_stats"], inputs["old_entropy"], inputs["old_exact_term"],
                                             inputs["advantages"], weights, mask)

    def _log_flow(self):
        """The window's flow (summed over its micro-batches and over processes) to TRL's logs, as train.py's."""
        flows, self._window_flows = self._window_flows, []
        if not flows:
            return
        keys = [f"{q}_{k}" for q in losses.QUADRANTS + ("zero_adv", "total") for k in ("exact", "paper", "count")]
        device = self.accelerator.device
        total = torch.tensor([sum(f[k] for f in flows) for k in keys], device=device,
                             dtype=torch.float32 if device.type == "mps" else torch.float64)   # MPS: no float64
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        for k, value in zip(keys, total.tolist()):
            self._metrics["train"][f"{self.loss_name}/flow/{k}"].append(value)

    def _record(self, metrics, tokens):
        """Collect a micro-batch's metrics; at the window's end write one value per metric to TRL's logs."""
        self._window_parts.append((tokens, metrics))
        if self.model.training and (self._step + 1) % self.args.gradient_accumulation_steps:
            return
        parts, self._window_parts = self._window_parts, []
        if self.model.training:
            self._log_flow()
        merged = losses.merge_metrics(self.loss_name, parts)
        reduce = losses.LOSSES[self.loss_name].reductions
        keys = list(merged)
        every = self.accelerator.gather(torch.tensor([[merged[k] for k in keys]], device=self.accelerator.device))
        mode = "train" if self.model.training else "eval"
        for k, column in zip(keys, every.T):                                # across processes
            how = reduce.get(k)
            value = column.max() if how == "max" else column.min() if how == "min" else column.mean()
            self._metrics[mode][f"{self.loss_name}/{k}"].append(value.item())
