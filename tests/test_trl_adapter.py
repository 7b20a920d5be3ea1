"""trl_adapter.py inside the real TRL: a few training steps of a tiny Qwen2 for STEER, OPEFO and Archer, and
one optimizer step's loss and gradient against losses.LOSSES called directly on the same tensors (the
whole accumulation window in one call, with log-probs, entropy and S2 recomputed from full logits).

The model (2 layers, width 32) and its character tokenizer are built in code and saved to a temporary
folder (TRL builds Archer's reference model from the policy's path); nothing is downloaded. Without TRL
the module skips; in CI (CI=true) a missing TRL is an error, so these tests cannot be skipped there.
"""
import importlib
import math
import os

import pytest
import torch

REASON = "TRL is not installed (pip install -r requirements-integrations.txt)"
if os.environ.get("CI") == "true":
    importlib.import_module("trl")                     # CI: fail loudly rather than skip
else:
    pytest.importorskip("trl", reason=REASON)

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import logprobs  # noqa: E402
import losses  # noqa: E402
import trl_adapter  # noqa: E402

CHARS = "0123456789+-= "
GA, ROWS, GROUP, LENGTH = 2, 4, 4, 6                   # accumulation steps, rows per micro-batch, G, max tokens


def tiny_tokenizer():
    """Character-level fast tokenizer: <pad>=0, <eos>=1, <unk>=2, then CHARS; left padding as TRL wants."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 and its tokenizer, saved to a folder."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def count_ones(completions, **_):
    """Reward: the share of "1" among a completion's characters (graded, so groups rarely tie)."""
    return [c.count("1") / max(len(c), 1) for c in completions]


def make_trainer(model_dir, tmp_path, loss, *, beta=0.0, steps=2, trl_args=None, **loss_kwargs):
    """LossesGRPOTrainer with `loss` (TRL's own GRPOTrainer when loss is None) on the tiny model; trl_args:
    more GRPOConfig fields."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=ROWS, num_generations=GROUP,
                      gradient_accumulation_steps=GA, max_completion_length=LENGTH, max_steps=steps,
                      learning_rate=0.05, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                      bf16=False, temperature=0.7, beta=beta, seed=0, disable_tqdm=True, **(trl_args or {}))
    common = dict(model=model, reward_funcs=count_ones, args=args, train_dataset=prompts,
                  processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    if loss is None:
        return trl.GRPOTrainer(**common)
    return trl_adapter.LossesGRPOTrainer(**common, loss=loss, loss_kwargs=loss_kwargs)


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize("loss, beta", [("steer", 0.0), ("opefo", 0.0), ("archer", 1.0)])
def test_trains_a_few_steps(model_dir, tmp_path, loss, beta):
    trainer = make_trainer(model_dir, tmp_path, loss, beta=beta, steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(trainer.model.parameters(), before))
    assert moved > 1e-4                                            # the loss reached the parameters
    entropy = logged(trainer, f"{loss}/entropy")
    assert len(entropy) == 3 and all(0.5 < h < math.log(17) for h in entropy)   # behaviour H, nats, V = 17
    for form in ("exact", "paper", "count"):                       # the entropy flow: one value per step
        parts = [logged(trainer, f"{loss}/flow/{q}_{form}") for q in losses.QUADRANTS + ("zero_adv",)]
        total = logged(trainer, f"{loss}/flow/total_{form}")
        assert len(total) == 3                                     # (OPEFO's paper total is ~0: abs to the parts)
        for t, *v in zip(total, *parts):
            assert t == pytest.approx(sum(v), rel=1e-6, abs=1e-6 * sum(map(abs, v))), form
    assert all(n > 0 for n in logged(trainer, f"{loss}/flow/total_count"))
    if loss == "steer":
        assert all(abs(w - 0.7) < 1e-3 for w in logged(trainer, "steer/weight_min"))   # M is the window's max
        assert all(0.7 < w < 1.0 for w in logged(trainer, "steer/weight_mean"))
    if loss == "opefo":
        for flow, pos, neg in zip(*(logged(trainer, f"opefo/{k}") for k in ("weighted_flow", "flow_pos", "flow_neg"))):
            assert abs(flow) < 1e-4 * (pos + neg) and pos + neg > 0   # the window's net flow is balanced
    if loss == "archer":
        assert all(0.1 < f < 0.5 for f in logged(trainer, "archer/reasoning_frac"))
        kl = logged(trainer, "archer/kl_knowledge")
        assert kl[0] < 1e-6 < kl[-1]                             # starts at the reference, then moves off


def reference_window(trainer, loss, knobs):
    """The window's loss and gradient from losses.LOSSES on the whole window at once, with log-probs,
    entropy and S2 recomputed here from full logits (not TRL's fused head) at TRL's temperature."""
    pieces = trainer._buffered_inputs[:GA]
    cat = {k: torch.cat([p[k] for p in pieces]) for k in
           ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
    t = cat["completion_ids"].shape[1]
    model = trainer.model
    model.zero_grad()
    logits = model(input_ids=torch.cat([cat["prompt_ids"], cat["completion_ids"]], 1),
                   attention_mask=torch.cat([cat["prompt_mask"], cat["completion_mask"]], 1),
                   logits_to_keep=t + 1).logits[:, :-1] / trainer.temperature
    logp, current_entropy = logprobs.token_logprobs_entropy(logits, cat["completion_ids"])
    _, entropy, s2 = logprobs.token_stats(logits.detach(), cat["completion_ids"])
    ref = torch.cat([p["ref_per_token_logps"] for p in pieces]) if "ref_per_token_logps" in pieces[0] else None
    value, metrics = losses.LOSSES[loss](logp=logp, old_logp=logp.detach(), advantages=cat["advantages"],
                                         mask=cat["completion_mask"], entropy=entropy, exact_term=s2,
                                         ref_logp=ref, current_entropy=current_entropy, **knobs)
    value.backward()
    return value.item(), [p.grad.clone() for p in model.parameters()], cat


@pytest.mark.parametrize("loss, beta, knobs", [("steer", 0.0, {}), ("steer", 0.0, {"form": "exact"}),
                                               ("opefo", 0.0, {}), ("archer", 1.0, {}), ("grpo", 1.0, {"kl_coef": 0.1}),
                                               ("forking", 0.0, {}), ("entropy_bonus", 0.0, {"coef": 0.1})])
def test_one_step_equals_losses(model_dir, tmp_path, loss, beta, knobs):
    trainer = make_trainer(model_dir, tmp_path, loss, beta=beta, **knobs)
    generation_batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = GA                # set by Trainer.train's loop otherwise
    trainer.model.zero_grad()
    total = sum(trainer.training_step(trainer.model, generation_batch, None).item() for _ in range(GA))
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    expected, expected_grads, cat = reference_window(trainer, loss, knobs)
    assert cat["advantages"].abs().max() > 0.1                      # the step carries a signal
    assert total == pytest.approx(expected, rel=1e-5, abs=1e-7)
    norm = math.sqrt(sum(g.square().sum().item() for g in expected_grads))
    assert norm > 1e-4
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * norm)


SEQUENCE = dict(importance_sampling_level="sequence", num_iterations=2)   # the second pass is off-policy


def test_gspo_trains_as_trls_own_sequence_level_grpo(model_dir, tmp_path):
    """loss="gspo" with TRL's importance_sampling_level="sequence" and TRL's own GRPOTrainer with that option
    (loss_type "grpo": seq-mean-token-mean) train the same: 2 optimizer steps, the second on the reused
    generation batch (num_iterations=2), so the sequence ratio and its clip act (clip 0.2 / 0.28 here, so
    that some sequences are clipped and some not at this learning rate; GSPO's 3e-4 / 4e-4 clips them all);
    the parameters agree to float32 precision and moved. Any other level is refused."""
    ours = make_trainer(model_dir, tmp_path / "ours", "gspo", trl_args=SEQUENCE, clip_low=0.2,
                        clip_high=0.28)
    start = [p.detach().clone() for p in ours.model.parameters()]
    ours.train()                                                   # each trainer seeds itself when built
    theirs = make_trainer(model_dir, tmp_path / "theirs", None, trl_args=dict(
        SEQUENCE, loss_type="grpo", epsilon=0.2, epsilon_high=0.28))
    theirs.train()
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(ours.model.parameters(), start))
    assert moved > 1e-3
    for p, q in zip(ours.model.parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    clipped = [h + lo for h, lo in zip(logged(ours, "gspo/clip_frac_high"), logged(ours, "gspo/clip_frac_low"))]
    assert max(clipped) > 0 and all(g > 0 for g in logged(ours, "grad_norm"))   # clipped, and not everything
    with pytest.raises(ValueError, match="importance_sampling_level='sequence'"):
        make_trainer(model_dir, tmp_path, "gspo")
    with pytest.raises(ValueError, match="importance_sampling_level='token'"):
        make_trainer(model_dir, tmp_path, "grpo", trl_args=SEQUENCE)


def test_refuses_mismatched_reference(model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs the reference model"):
        make_trainer(model_dir, tmp_path, "archer", beta=0.0)
    with pytest.raises(ValueError, match="does not use"):
        make_trainer(model_dir, tmp_path, "steer", beta=0.04)
    with pytest.raises(TypeError):
        make_trainer(model_dir, tmp_path, "steer", lambda_minn=0.8)
    assert not trl_adapter.uses_reference("kl_cov", {})            # its kl_coef is to pi_old, not the reference
    assert trl_adapter.uses_reference("grpo", {"kl_coef": 0.04}) and not trl_adapter.uses_reference("grpo", {})
    assert not trl_adapter.uses_reference("archer", {"kl_knowledge": 0.0})


FLOW_KEYS = [f"{q}_{k}" for q in losses.QUADRANTS + ("zero_adv", "total") for k in ("exact", "paper", "count")]


def train_py_flow(trainer, loss):
    """train.py's flow of one optimizer step (train.update, one mini-batch of the whole window, micro-batches
    of ROWS rows) on the window's rows, with the adapter's behaviour statistics (log pi_old, H, S2)."""
    import train

    pieces = trainer._buffered_inputs[:GA]
    cat = {k: torch.cat([p[k] for p in pieces]) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                             "completion_mask", "advantages", "old_logp_stats",
                                                             "old_entropy", "old_exact_term")}
    assert bool((cat["prompt_mask"] == 1).all())   # no left padding: train.py's position ids are TRL's
    batch = {"input_ids": torch.cat([cat["prompt_ids"], cat["completion_ids"]], 1),
             "attention_mask": torch.cat([cat["prompt_mask"], cat["completion_mask"]], 1),
             "mask": cat["completion_mask"].float(), "prompt_length": cat["prompt_ids"].shape[1],
             "advantages": cat["advantages"], "old_logp": cat["old_logp_stats"], "entropy": cat["old_entropy"],
             "exact_term": cat["old_exact_term"]}
    model = trainer.model

    def stats_fn(b, with_grad=False, with_entropy=True):
        return train.rollout.response_stats(model, b["input_ids"], b["attention_mask"], b["prompt_length"], b["mask"],
                                            temperature=trainer.temperature, with_grad=with_grad,
                                            with_entropy=with_entropy)
    cfg = dict(algo=loss, group_size=GROUP, updates_per_batch=1, micro_batch_size=ROWS, max_grad_norm=1e9,
               measure_entropy_change=False, temperature=trainer.temperature, max_new_tokens=LENGTH)
    cfg.update({k: None for k in train.config.KNOB_FLAGS})
    out = train.update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg, stats_fn)
    assert out["updates"] == 1
    return out


@pytest.mark.parametrize("loss", ["steer", "grpo"])
def test_flow_equals_train_py(model_dir, tmp_path, loss):
    """One optimizer step over a window of GA = 2 micro-batches: the adapter logs flow/<q>_{exact,paper,count}
    once, and each equals train.py's for the same rows (rel 1e-4; counts exactly)."""
    trainer = make_trainer(model_dir, tmp_path, loss)
    generation_batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = GA
    trainer.model.zero_grad()
    for _ in range(GA):
        trainer.training_step(trainer.model, generation_batch, None)
    metrics = trainer._metrics["train"]
    assert all(len(metrics[f"{loss}/flow/{k}"]) == 1 for k in FLOW_KEYS)   # one value per optimizer step
    adapter = {k: metrics[f"{loss}/flow/{k}"][0] for k in FLOW_KEYS}
    expected = train_py_flow(trainer, loss)
    mask = torch.cat([p["completion_mask"] for p in trainer._buffered_inputs[:GA]])
    assert adapter["total_count"] == int(mask.sum()) > 20
    assert sum(adapter[f"{q}_count"] > 0 for q in losses.QUADRANTS) >= 3        # the quadrants are populated
    scale = sum(abs(adapter[f"{q}_exact"]) for q in losses.QUADRANTS)
    assert scale > 1e-3
    for k in FLOW_KEYS:
        if k.endswith("_count"):
            assert adapter[k] == expected[f"flow/{k}"], k
        else:
            assert adapter[k] == pytest.approx(expected[f"flow/{k}"], rel=1e-4, abs=1e-7 * scale), k
    assert adapter["total_exact"] == pytest.approx(sum(adapter[f"{q}_exact"] for q in losses.QUADRANTS + ("zero_adv",)),
                                                   rel=1e-6, abs=1e-9)
