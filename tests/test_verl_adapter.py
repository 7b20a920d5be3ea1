"""verl_adapter.py inside the real verl, on CPU: a batch goes through verl's own RayPPOTrainer._compute_old_log_prob
and _update_actor (as wrapped by the adapter), is cut into mini- and micro-batches by verl's own helpers, and
reaches verl's loss entry point verl.workers.utils.losses.ppo_loss; the micro-batch losses add up to
losses.LOSSES[name] on the whole batch, with the same gradient; the entropy flow that verl's metric
aggregation ends with equals train.py's (train.update) on the same batch and log-probs.

Only the model and the Ray workers are stood in for: the worker group returns the behaviour log-probs and
entropy in verl's no-padding layout, and the actor runs ppo_loss on log-probs that are leaves here, on one
or two dp ranks, collecting the metrics with verl's own functions. Without
verl the module skips; in CI (CI=true) a missing verl is an error, so these tests cannot be skipped there.
"""
import importlib
import os
from itertools import chain
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("CI") == "true":
    importlib.import_module("verl")                     # CI: fail loudly rather than skip
else:
    pytest.importorskip("verl", reason="verl is not installed (pip install -r requirements-integrations.txt)")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import Metric, reduce_metrics  # noqa: E402
from verl.utils.py_functional import append_to_dict  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402
from verl.workers.utils import losses as verl_losses  # noqa: E402

import losses  # noqa: E402
import verl_adapter  # noqa: E402

PROMPTS, GROUP, P, R, MICRO = 2, 4, 3, 5, 2            # prompts, responses each, prompt and response widths


def rollout_batch(gen):
    """A padded batch as verl's rollout leaves it: left-padded prompts, right-padded responses."""
    rows = PROMPTS * GROUP
    prompt_len = torch.randint(1, P + 1, (rows,), generator=gen)
    response_len = torch.randint(1, R + 1, (rows,), generator=gen)
    response_len[0] = R
    prompt_mask = (torch.arange(P) >= P - prompt_len[:, None]).long()
    response_mask = (torch.arange(R) < response_len[:, None]).long()
    prompts = torch.randint(3, 50, (rows, P), generator=gen) * prompt_mask
    responses = torch.randint(3, 50, (rows, R), generator=gen) * response_mask
    attention = torch.cat([prompt_mask, response_mask], 1)
    return DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "response_mask": response_mask, "row": torch.arange(rows)})


def no_padding(per_response, attention):
    """(B, R) response values -> verl's nested per-sequence layout, where the value for response token k of a
    sequence with p prompt tokens sits at position p - 1 + k (the model output is shifted by one)."""
    seqs = []
    for values, att in zip(per_response, attention):
        p, n = int(att[:P].sum()), int(att[P:].sum())
        seqs.append(torch.cat([values.new_zeros(p - 1), values[:n], values.new_zeros(1)]))
    return torch.nested.as_nested_tensor(seqs, layout=torch.jagged)


class Workers:
    """Stands in for verl's actor worker group: behaviour statistics out, ppo_loss on leaf log-probs in, on dp
    ranks that each take an equal share of every mini-batch (verl's chunking); the gradient is averaged over
    the ranks, and the metrics go through verl's own collection (append_to_dict per micro-batch, then
    Metric.aggregate_dp over the ranks, then one value per mini-batch), as verl.workers.engine_workers does."""

    def __init__(self, old_logp, entropy, logp, actor_config, dp=1, current_entropy=None):
        self.old_logp, self.entropy, self.logp, self.actor_config, self.dp = old_logp, entropy, logp, actor_config, dp
        self.current_entropy = current_entropy              # the model's entropy output (calculate_entropy)
        self.losses = []

    def compute_log_prob(self, data):
        return tu.get_tensordict({"log_probs": no_padding(self.old_logp, data["attention_mask"]),
                                  "entropy": no_padding(self.entropy, data["attention_mask"])},
                                 non_tensor_dict={"metrics": {"mfu": 0.0}})

    def update_actor(self, data):
        mini_batch_size = tu.pop(data, key="mini_batch_size")
        metrics = {}
        for mini in tu.make_iterator(data, mini_batch_size=mini_batch_size, epochs=tu.pop(data, key="epochs"),
                                     seed=0, dataloader_kwargs={"shuffle": False}):
            tu.assign_non_tensor(mini, batch_num_tokens=int(mini["loss_mask"].sum()), dp_size=self.dp,
                                 use_dynamic_bsz=False, micro_batch_size_per_gpu=MICRO)      # as the FSDP engine
            ranks = []
            for part in tu.chunk_tensordict(mini, self.dp):                 # each dp rank's share
                micro_batches, _ = prepare_micro_batches(part, dp_group=None)
                collected = {}
                for micro in micro_batches:
                    rows = micro["row"]
                    output = {"log_probs": no_padding(self.logp[rows], micro["attention_mask"])}
                    if self.current_entropy is not None:
                        output["entropy"] = no_padding(self.current_entropy[rows], micro["attention_mask"])
                    loss, micro_metrics = verl_losses.ppo_loss(self.actor_config, output, micro)
                    (loss / self.dp).backward()                             # DDP / FSDP average over ranks
                    self.losses.append(loss.detach() / self.dp)
                    append_to_dict(collected, micro_metrics)                # verl's postprocess_batch_func
                ranks.append(collected)
            gathered = {k: [r[k] for r in ranks] for k in ranks[0]}        # allgather_dict_into_dict
            append_to_dict(metrics, {k: Metric.aggregate_dp(v) if isinstance(v[0], Metric)
                                     else list(chain.from_iterable(v)) for k, v in gathered.items()})
        metrics["mfu"] = 0.0
        return tu.get_tensordict({}, non_tensor_dict={"metrics": metrics})


def trainer(workers, mode, *, use_kl=False, mini=PROMPTS):
    cfg = OmegaConf.create({
        "data": {"train_batch_size": PROMPTS},
        "actor_rollout_ref": {
            "actor": {"policy_loss": {"loss_mode": mode}, "calculate_sum_pi_squared": False,
                      "calculate_entropy": False, "entropy_coeff": 0.0, "ppo_mini_batch_size": mini,
                      "ppo_epochs": 1, "data_loader_seed": 0, "shuffle": False, "use_kl_loss": use_kl},
            "rollout": {"n": GROUP, "temperature": 1.0, "multi_turn": {"enable": False}}}})
    return SimpleNamespace(config=cfg, actor_rollout_wg=workers)


def verl_step(name, shift, dp=1, mini=PROMPTS):
    """One RL step's actor update through verl's _compute_old_log_prob and _update_actor (wrapped by the
    adapter) on a random batch, on dp ranks, in mini-batches of `mini` prompts; returns (workers, the
    update's metrics as verl's driver reduces them, the tensors)."""
    gen = torch.Generator().manual_seed(0)
    batch = rollout_batch(gen)
    rows = len(batch)
    old_logp = -torch.rand(rows, R, generator=gen) * 3
    entropy = torch.rand(rows, R, generator=gen) * 2
    logp = (old_logp + shift * torch.randn(rows, R, generator=gen)).requires_grad_()
    ref_logp = old_logp + 0.2 * torch.randn(rows, R, generator=gen)
    current = entropy * (1 + 0.05 * torch.randn(rows, R, generator=torch.Generator().manual_seed(1)))  # ERC's rho
    use_kl = verl_adapter.uses_reference(name)
    mode = verl_adapter.verl_name(name)
    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=mini, ppo_micro_batch_size_per_gpu=MICRO,
                         rollout_n=GROUP, use_kl_loss=use_kl, kl_loss_coef=0.0,
                         policy_loss=PolicyLossConfig(loss_mode=mode))
    needs_current = "current_entropy" in losses.LOSSES[name].inputs
    workers = Workers(old_logp, entropy, logp, config, dp=dp, current_entropy=current if needs_current else None)
    fake = trainer(workers, mode, use_kl=use_kl, mini=mini)

    old, _ = RayPPOTrainer._compute_old_log_prob(fake, batch)         # verl's, wrapped by the adapter
    old.batch.pop("entropys")                                          # what RayPPOTrainer.fit does next
    batch = batch.union(old)
    rewards = torch.rand(rows, generator=gen).round()
    adv = losses.group_advantages(rewards, GROUP)[:, None] * batch.batch["response_mask"]
    batch.batch["advantages"] = adv
    if use_kl:
        batch.batch["ref_log_prob"] = ref_logp
    mask = batch.batch["response_mask"].clone()                        # a gate takes its dropped tokens out
    output = RayPPOTrainer._update_actor(fake, batch)
    assert len(workers.losses) == rows // MICRO
    tensors = dict(old_logp=old_logp, entropy=entropy, logp=logp, ref_logp=ref_logp if use_kl else None, adv=adv,
                   rewards=rewards, mask=mask, current_entropy=current if needs_current else None)
    return workers, reduce_metrics(output.meta_info["metrics"]), tensors


STEP_KNOBS = {"archer": {"kl_knowledge": 0.5},                         # a KL large enough to show
              "clip_b": {"mu": 0.5}, "clip_v": {"mu": 0.5, "form": "paper"}}   # gates that act on 40 tokens


@pytest.mark.parametrize("name, shift", [("steer", 0.0), ("steer", 0.3), ("opefo", 0.0), ("archer", 0.3),
                                         ("grpo", 0.3), ("gspo", 0.02), ("erc_dapo", 0.3), ("clip_b", 0.3),
                                         ("clip_v", 0.3)])
def test_verl_step_equals_losses(name, shift, monkeypatch):
    """GSPO runs as rlvr_gspo (verl has its own gspo); ERC reads the model's entropy output; a gate's dropped
    tokens leave verl's response_mask, so verl's token count is the kept tokens' (gate_frac logged)."""
    knobs = dict(STEP_KNOBS.get(name, {}))
    for k, v in knobs.items():
        monkeypatch.setitem(verl_adapter.KNOBS, k, v)
    workers, metrics, t = verl_step(name, shift)
    logp, old_logp, adv, mask = t["logp"], t["old_logp"], t["adv"], t["mask"]
    grad = logp.grad.clone()

    logp.grad = None
    stats = losses.batch_statistics(name, mask=mask, advantages=adv, old_logp=old_logp, entropy=t["entropy"],
                                    **knobs)        # the whole batch's, at r = 1 (STEER's M, the gates' choice)
    if "dropped" in stats:
        frac = metrics[f"actor/{name}/gate_frac"]
        assert 0 < frac < 0.5 and frac == pytest.approx(int(stats["dropped"].sum()) / int(mask.sum()))
    expected, _ = losses.LOSSES[name](logp=logp, old_logp=old_logp, advantages=adv, mask=mask, entropy=t["entropy"],
                                      ref_logp=t["ref_logp"], current_entropy=t["current_entropy"], agg="token-mean",
                                      **stats, **knobs)
    expected.backward()
    assert expected.abs() > 1e-3 and logp.grad.abs().max() > 1e-3
    torch.testing.assert_close(sum(workers.losses), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-5, atol=1e-7)


class LeafPolicy(torch.nn.Module):
    """train.py's model stood in for: its log-probs are a (rows, R) parameter, read per row."""

    def __init__(self, logp):
        super().__init__()
        self.logp = torch.nn.Parameter(logp.detach().clone())


def train_py_flow(name, t, updates):
    """train.py's flow (train.update: `updates` optimizer steps, each on a mini-batch of whole groups, in
    micro-batches of MICRO rows) on the same rows, advantages, behaviour log-probs and entropy, and
    log-probs (S2 = 0: verl has none; lr 0, so every step sees the same log-probs, as the stand-in's)."""
    import train

    policy = LeafPolicy(t["logp"])

    def stats_fn(b, with_grad=False, with_entropy=True):
        with torch.set_grad_enabled(with_grad):
            return {"logp": policy.logp[b["row"]] * b["mask"]}
    rows = len(t["rewards"])
    batch = {"row": torch.arange(rows), "mask": t["mask"].float(), "old_logp": t["old_logp"],
             "entropy": t["entropy"], "exact_term": torch.zeros_like(t["entropy"]),
             "advantages": losses.group_advantages(t["rewards"], GROUP)}
    cfg = dict(algo=name, group_size=GROUP, updates_per_batch=updates, micro_batch_size=MICRO, max_grad_norm=1e9,
               measure_entropy_change=False, temperature=1.0, max_new_tokens=R)
    cfg.update({k: None for k in train.config.KNOB_FLAGS})
    out = train.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, cfg, stats_fn,
                       knobs={"agg": "token-mean"})
    assert out["updates"] == updates
    return out


@pytest.mark.parametrize("name, dp, mini", [("steer", 1, PROMPTS), ("steer", 2, PROMPTS), ("grpo", 1, PROMPTS),
                                            ("grpo", 2, PROMPTS), ("grpo", 2, 1)])
def test_verl_flow_equals_train_py(name, dp, mini):
    """The RL step's logged entropy flow (paper form and counts; verl's own metric collection over
    micro-batches and dp ranks, the adapter's sum over mini-batches) equals train.py's, summed over its
    optimizer steps, for the same batch and log-probs (rel 1e-4; counts exactly); the exact form, which needs
    S2, is not logged. (Two mini-batches only for GRPO: STEER's M is per mini-batch in train.py, over the
    whole batch here.)"""
    _, metrics, t = verl_step(name, 0.3, dp=dp, mini=mini)
    assert not any(k.endswith("_exact") for k in metrics if "/flow/" in k)
    expected = train_py_flow(name, t, updates=PROMPTS // mini)
    keys = [f"{q}_{k}" for q in losses.QUADRANTS + ("zero_adv", "total") for k in ("paper", "count")]
    logged = {k: metrics[f"actor/{name}/flow/{k}"] for k in keys}
    assert logged["total_count"] == int(t["mask"].sum())
    assert all(logged[f"{q}_count"] > 0 for q in losses.QUADRANTS)
    scale = sum(abs(logged[f"{q}_paper"]) for q in losses.QUADRANTS)
    assert scale > 1e-2
    for k in keys:
        if k.endswith("_count"):
            assert logged[k] == expected[f"flow/{k}"], k
        else:
            assert logged[k] == pytest.approx(expected[f"flow/{k}"], rel=1e-4, abs=1e-7 * scale), k


def test_refusals(monkeypatch):
    steer = verl_adapter.make_policy_loss("steer")
    z = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="VERL_USE_EXTERNAL_MODULES"):      # called without the ppo_loss wrapper
        steer(z, z, z, z.bool(), "token-mean", None)
    monkeypatch.setitem(verl_adapter.KNOBS, "form", "exact")
    with pytest.raises(ValueError, match="needs S2"):
        verl_adapter.check_forms("steer")
    assert verl_adapter.REGISTERED["steer"] == "steer" and verl_adapter.REGISTERED["rlvr_clip_cov"] == "clip_cov"
