"""The contract every losses.LOSSES entry keeps, parametrized over all of them: value and gradient (central
finite differences), exact zeros under the mask and for empty batches, float64 and bf16 inputs, exact
micro-batching with batch_statistics, one clear error per bad knob or missing tensor, and the registry's
facts read off each signature."""
import inspect
import math

import pytest
import torch

import logprobs
import losses
from conftest import (INTERVENTIONS, SUCCESSORS, call, grads, intervention_batch, knobs, random_batch,
                      ratio_random_batch, run_intervention, whole, whole_batch_statistics)
from logprobs import token_entropy, token_logprobs
from losses import LOSSES, agg_loss, group_advantages

# ------------------------------------------------------------------------------------- every loss
ALL = sorted(LOSSES)



def micro(name, b, logp, rows, stats, **kw):
    """LOSSES[name] on the rows `rows` of batch b, with the whole batch's statistics `stats`."""
    part = {k: v[rows] for k, v in b.items() if k not in ("logits", "tokens")}
    extra = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in stats.items()}
    return LOSSES[name](logp=logp[rows], old_logp=part["old_logp"], advantages=part["advantages"],
                        mask=part["mask"], entropy=part["entropy"], exact_term=part["exact_term"],
                        ref_logp=part["old_logp"] - 0.1, current_entropy=part["current_entropy"],
                        **extra, **knobs(name, **kw))



# ------------------------------------------------------------------- robustness where the file is copied
def garbage_under_mask(b, value=math.nan):
    """The batch with `value` in every masked position of every (B, T) input and (B, T) advantages."""
    pad = b["mask"] == 0
    out = dict(b)
    out["advantages"] = b["advantages"][:, None].expand_as(b["mask"]).clone()
    for key in ("logp", "old_logp", "advantages", "entropy", "exact_term"):
        out[key] = out[key].clone().masked_fill(pad, value)
    return out


def zero_row_batch(seed=3):
    """A batch of 6 rows, 3 with A = 0 (one of them with a slightly negative entropy on a valid token)."""
    b = random_batch(B=6, T=5, seed=seed)
    b["advantages"][[1, 3, 4]] = 0.0
    b["entropy"][4, 1] = -1e-7                                 # rounding: entropy_adv's A' = alpha H != 0
    b["logp"] = b["old_logp"] + 0.2 * torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    return b


BONUSES = ("adaptive_entropy", "entropy_bonus")                  # the entropy bonuses
CURRENT_ENTROPY = BONUSES + ("erc_dapo", "erc_gppo")             # the entries that need current_entropy


def whole_batch(b):
    """Every batch tensor of losses.BATCH_KEYS, as a trainer that serves all 13 entries would pass them."""
    batch = {k: b[k] for k in ("logp", "old_logp", "advantages", "mask", "entropy", "exact_term",
                                "current_entropy")}
    batch.update(ref_logp=b["old_logp"] - 0.1, norm_length=b["mask"].shape[1], **losses.batch_totals(b["mask"]))
    assert set(batch) == losses.BATCH_KEYS
    return batch


# ----------------------------------------------------------------------------------- registry (losses.Loss)
CLIPS = ("clip_low", "clip_high", "dual_clip")


RATIO_CLIP = {"grpo", "dapo", "drgrpo", "steer", "entropy_bonus", "adaptive_entropy", "clip_cov", "forking",
              "entropy_adv", "w_reinforce", "ce_gppo", "gppo", "quadrant", "erc_dapo", "erc_gppo", "clip_b",
              "clip_v"}                                                    # built on ppo_clip_loss's ratio clip


PPO = ("logp", "old_logp", "advantages", "mask")


NEEDS = {**{n: PPO for n in ("grpo", "dapo", "drgrpo", "ce_gppo", "gppo", "clip_cov", "kl_cov", "w_reinforce",
                             "gspo", "gspo_token", "cispo", "cispo_trl", "sapo")},
         **{n: PPO + ("entropy",) for n in ("steer", "quadrant", "archer", "aspo", "forking", "entropy_adv",
                                            "clip_b", "clip_v")},
         **{n: PPO + ("entropy", "current_entropy") for n in ("erc_dapo", "erc_gppo")},
         "opefo": ("logp", "advantages", "mask", "entropy"),                    # on-policy: no old_logp
         **{n: PPO + ("current_entropy",) for n in ("entropy_bonus", "adaptive_entropy")}}


@pytest.mark.parametrize("name", ALL)
def test_masked_positions_get_exactly_zero_gradient(name):
    b = random_batch()
    logp = b["logp"].clone()
    logp[b["mask"] == 0] = -math.inf                                       # garbage under the mask
    logp.requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    assert (g[b["mask"] == 0] == 0).all() and g[b["mask"] == 1].abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_gives_finite_zero_loss(name):
    b = random_batch()
    b["mask"] = torch.zeros_like(b["mask"])
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and (g == 0).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("name", ALL)
def test_equal_reward_group_gives_zero_advantage_and_finite_loss(name):
    b = random_batch(B=4)
    b["advantages"] = group_advantages(torch.ones(4), 4)
    loss, metrics = call(name, b)
    assert b["advantages"].eq(0).all() and metrics["pg_loss"] == 0.0
    if name in ("archer", "aspo"):                                         # only the knowledge-token KL
        assert 0 < loss.item() <= 0.001 * metrics["kl_knowledge"]
    elif name in BONUSES:                                                  # only the bonus -coef agg(H)
        assert loss.item() == pytest.approx(-metrics["coef"] * metrics["entropy_bonus"], rel=1e-6)
        assert metrics["entropy_bonus"] == pytest.approx(agg_loss(b["current_entropy"], b["mask"]).item())
    else:
        assert loss.item() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_extreme_log_ratios_do_not_overflow(name):
    b = random_batch()
    logp = b["old_logp"] + torch.tensor([1e4, -1e4, 50.0, -50.0])[:, None]
    logp.requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ALL)
def test_garbage_under_the_mask_changes_neither_loss_nor_gradient(name, value):
    b = random_batch()
    clean = dict(b, advantages=b["advantages"][:, None].expand_as(b["mask"]).clone())
    dirty = garbage_under_mask(b, value)
    results = []
    for batch in (clean, dirty):
        logp = batch["logp"].clone().requires_grad_(True)
        loss, metrics = call(name, batch, logp)
        (g,) = torch.autograd.grad(loss, logp)
        results.append((loss, g, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert l1.item() == l0.item() and torch.equal(g1, g0)
    assert (g1[b["mask"] == 0] == 0).all()
    assert m1 == m0


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_gives_zero_loss_and_empty_gradient(name):
    b = random_batch(B=0)
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and g.shape == (0, 7)
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_empty_batch_statistics():
    empty = torch.zeros(0, 3, 11)
    assert token_entropy(empty).shape == (0, 3)
    h, s2 = token_entropy(empty, exact_term=True)
    assert h.shape == s2.shape == (0, 3)
    assert token_logprobs(empty, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
    assert logprobs.token_stats(empty, torch.zeros(0, 3, dtype=torch.long))[0].shape == (0, 3)


@pytest.mark.parametrize("kind", ["list", "numpy"])
@pytest.mark.parametrize("name", ALL)
def test_advantages_that_are_not_tensors_raise_type_error(name, kind):
    b = random_batch()
    adv = b["advantages"].tolist() if kind == "list" else b["advantages"].numpy()
    with pytest.raises(TypeError, match="advantages must be a torch.Tensor"):
        call(name, dict(b, advantages=adv))


@pytest.mark.parametrize("name", ALL)
def test_float64_inputs_stay_float64(name):
    """Advantages (and Archer's per-token clip range and KL coefficient) keep the input's precision."""
    b = random_batch(dtype=torch.float64)
    b = {k: (v.double() if torch.is_floating_point(v) else v) for k, v in b.items()}
    b["advantages"] = b["advantages"] * (1 + 1e-9)           # a difference that float32 would round away
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = call(name, b, logp)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.dtype == torch.float64 and g.dtype == torch.float64
    b32 = dict(b, advantages=b["advantages"] / (1 + 1e-9))
    loss32, _ = call(name, b32, b["logp"])
    assert loss.item() != loss32.item()                       # the 1e-9 survives in float64


@pytest.mark.parametrize("name", ALL)
def test_every_loss_splits_into_micro_batches_exactly(name):
    """Gradient accumulation: batch_statistics on the whole batch (num_tokens / num_seqs, STEER's M, OPEFO's
    P and N, the Cov centring, cut and choice, the entropy cut) makes the sum of micro-batch losses equal
    the whole-batch loss, gradient included."""
    b = random_batch(B=6, T=5, seed=5)
    b["mask"][3] = 0                                                       # an all-padding row
    stats = whole_batch_statistics(name, b)
    assert stats["num_tokens"] == b["mask"].sum() and stats["num_seqs"] == 5
    logp = b["logp"].clone().requires_grad_(True)
    whole = micro(name, b, logp, slice(0, 6), stats)[0]
    (g_whole,) = torch.autograd.grad(whole, logp)
    total = sum(micro(name, b, logp, r, stats)[0] for r in (slice(0, 1), slice(1, 4), slice(4, 6)))
    (g_micro,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g_micro, g_whole)


@pytest.mark.parametrize("name", ALL)
def test_batch_statistics_equal_the_loss_own_on_policy(name):
    """On the first update (logp = old_logp) the precomputed statistics are what the loss computes itself."""
    b = random_batch(B=5, T=6, seed=8)
    b["logp"] = b["old_logp"]
    own, _ = call(name, b)
    stats = whole_batch_statistics(name, b)
    given, _ = call(name, b, **{k: v for k, v in stats.items() if k != "num_tokens"})
    torch.testing.assert_close(given, own, rtol=1e-6, atol=1e-7)


def test_batch_statistics_rejects_unknown_knobs_and_losses():
    b = random_batch()
    with pytest.raises(TypeError, match="top_fraction"):
        whole_batch_statistics("forking", b, top_fraction=0.2)
    with pytest.raises(TypeError, match="old_logp must be a torch.Tensor"):
        losses.batch_statistics("kl_cov", mask=b["mask"], advantages=b["advantages"])
    with pytest.raises(ValueError, match="unknown loss 'stear'"):
        losses.batch_statistics("stear", mask=b["mask"])


def test_batch_statistics_takes_the_loss_batch_tensors_but_not_its_outputs():
    b = random_batch()
    stats = whole_batch_statistics("drgrpo", b, norm_length=9, kl_coef=0.1)     # batch keys it reads: ignored
    assert stats == {"num_tokens": int(b["mask"].sum()), "num_seqs": 4}
    with pytest.raises(TypeError, match="omega_max"):
        whole_batch_statistics("steer", b, omega_max=1.0)
    with pytest.raises(TypeError, match="current_entropy"):
        whole_batch_statistics("grpo", b, current_entropy=b["current_entropy"])


@pytest.mark.parametrize("name", [n for n in ALL if LOSSES[n].statistics is not None])
def test_statistic_functions_read_only_batch_tensors_and_the_loss_knobs(name):
    entry = LOSSES[name]
    params = inspect.signature(entry.statistics).parameters
    named = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert all(p.default is p.empty for p in params.values())            # no default of its own
    assert named <= {"mask", "advantages", "old_logp", "entropy", "exact_term"} | set(entry.knobs)


@pytest.mark.parametrize("name", ALL)
def test_zero_rows_have_exactly_zero_gradient(name):
    """Rows a trainer may skip (Loss.zero_rows) get exactly zero gradient, with the whole batch's statistics
    and no reference KL; the losses without zero_rows move some zero-advantage row."""
    b = zero_row_batch()
    kw = {"archer": {"kl_knowledge": 0.0}, "aspo": {"kl_knowledge": 0.0}, "kl_cov": {"kl_cov_ratio": 0.5},
          "forking": {"top_frac": 0.5}}.get(name, {})
    assert not losses.uses_reference(name, **knobs(name, **kw))
    stats = whole_batch_statistics(name, b, **kw)
    logp = b["logp"].clone().requires_grad_(True)
    b["current_entropy"] = b["current_entropy"].clone().requires_grad_(True)    # the bonus's own gradient
    loss = micro(name, b, logp, slice(0, 6), stats, **kw)[0]
    grads = torch.autograd.grad(loss, (logp, b["current_entropy"]), allow_unused=True)
    g = sum(x.abs() for x in grads if x is not None)
    moved = g.sum(1) > 0
    zero = LOSSES[name].zero_rows
    if zero is None:
        assert moved[[1, 3, 4]].all()
        return
    rows = zero(b["advantages"], b["mask"], b["entropy"])
    assert rows.tolist() == [False, True, False, True, name != "entropy_adv", False]
    assert (g[rows] == 0).all() and moved.any()
    assert moved[4] == (name == "entropy_adv")                  # A' = alpha H < 0 moves it


@pytest.mark.parametrize("name,knob,value,message", [
    ("steer", "lambda_min", 0.0, r"lambda_min=0.0 must be in \(0, 1\]"),
    ("steer", "lambda_min", -0.5, r"lambda_min=-0.5 must be in \(0, 1\]"),
    ("steer", "lambda_min", 1.5, r"lambda_min=1.5 must be in \(0, 1\]"),
    ("archer", "quantile", 1.5, r"quantile=1.5 must be in \[0, 1\]"),
    ("archer", "quantile", -0.1, r"quantile=-0.1 must be in \[0, 1\]"),
    ("grpo", "clip_low", -0.5, r"clip_low=-0.5 must be in \[0, 1\)"),
    ("grpo", "clip_low", 1.0, r"clip_low=1.0 must be in \[0, 1\)"),
    ("dapo", "clip_high", -0.1, r"clip_high=-0.1 must be >= 0"),
    ("steer", "dual_clip", 1.0, r"dual_clip=1.0 must be > 1"),
    ("archer", "dual_clip", 0.5, r"dual_clip=0.5 must be > 1"),
    ("archer", "clip_reasoning", 1.2, r"clip_reasoning=1.2 must be in \[0, 1\)"),
    ("grpo", "num_tokens", 0, r"num_tokens=0 must be > 0"),
    ("opefo", "num_tokens", -3, r"num_tokens=-3 must be > 0"),
    ("grpo", "num_tokens", torch.tensor(0), r"num_tokens=0 must be > 0"),
    ("aspo", "clip_reasoning", 1.0, r"clip_reasoning=1.0 must be in \[0, 1\)"),
    ("aspo", "clip_knowledge", -0.1, r"clip_knowledge=-0.1 must be in \[0, 1\)"),
    ("aspo", "quantile", 1.5, r"quantile=1.5 must be in \[0, 1\]"),
    ("aspo", "dual_clip", 1.0, r"dual_clip=1.0 must be > 1"),
    ("aspo", "kl_knowledge", -0.001, r"kl_knowledge=-0.001 must be >= 0"),
    ("aspo", "kl_reasoning", -1.0, r"kl_reasoning=-1.0 must be >= 0"),
    ("ce_gppo", "beta_low", -0.5, r"beta_low=-0.5 must be >= 0"),
    ("gppo", "beta_high", -1.0, r"beta_high=-1.0 must be >= 0"),
    ("ce_gppo", "clip_low", 1.0, r"clip_low=1.0 must be in \[0, 1\)"),
    ("gppo", "clip_high", -0.1, r"clip_high=-0.1 must be >= 0"),
    ("ce_gppo", "dual_clip", 0.5, r"dual_clip=0.5 must be > 1"),
])
def test_bad_knobs_raise_one_clear_error(name, knob, value, message):
    b = random_batch()
    with pytest.raises(ValueError, match=message) as err:
        call(name, b, **{knob: value}) if knob != "num_tokens" else LOSSES[name](
            logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"],
            entropy=b["entropy"], exact_term=b["exact_term"], ref_logp=b["old_logp"], num_tokens=value)
    assert "\n" not in str(err.value)


def test_registry_accepts_the_full_batch_and_rejects_typos():
    b = random_batch()
    assert set(LOSSES) == {"grpo", "dapo", "drgrpo", "steer", "quadrant", "opefo", "archer", "aspo", "ce_gppo", "gppo",
                           "entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking", "entropy_adv",
                           "w_reinforce", "gspo", "gspo_token", "cispo", "cispo_trl", "sapo", "erc_dapo", "erc_gppo",
                           "clip_b", "clip_v"}
    with pytest.raises(TypeError):
        call("steer", b, lamda_min=0.5)
    assert call("dapo", b, clip_high=0.2)[0].item() == call("grpo", b)[0].item()
    assert call("dapo", b)[0].item() != call("grpo", b)[0].item()
    assert call("steer", b, form="exact")[0].item() != call("steer", b, form="paper")[0].item()


def test_an_unknown_method_or_a_misspelt_knob_names_the_nearest():
    with pytest.raises(KeyError, match="no loss 'Steer' in LOSSES \\(did you mean 'steer'\\?\\); the methods: grpo"):
        LOSSES["Steer"]
    b = {k: v for k, v in random_batch().items() if k in losses.BATCH_KEYS}
    with pytest.raises(TypeError, match="steer_loss takes no knob 'lamda_min' \\(did you mean 'lambda_min'\\?\\); "
                                        "its knobs: lambda_min, "):
        LOSSES["steer"](**b, lamda_min=0.5)
    with pytest.raises(TypeError, match="grpo_loss takes no knob 'zzz'; its knobs: clip_low"):
        LOSSES["grpo"](**b, zzz=1)


@pytest.mark.parametrize("name", ALL)
def test_registry_reads_off_each_signature_what_the_method_needs(name):
    entry = LOSSES[name]
    assert entry.needs == NEEDS[name]                       # the tensors it cannot run without, in order
    assert set(entry.needs) <= set(entry.inputs) <= losses.BATCH_KEYS
    assert {"num_tokens", "num_seqs", "norm_length"} <= set(entry.inputs)    # every loss aggregates exactly
    assert ("ref_logp" in entry.inputs) == (name in ("grpo", "dapo", "drgrpo", "archer", "aspo"))
    assert ("exact_term" in entry.inputs) == (name in ("steer", "opefo", "clip_v"))
    with pytest.raises(TypeError, match=f"{entry.fn.__name__} needs {entry.needs[-1]} "):
        entry(**{k: v for k, v in random_batch().items() if k in entry.needs[:-1]})


@pytest.mark.parametrize("name", ALL)
def test_registry_knobs_are_what_the_loss_takes_with_its_defaults(name):
    entry, b = LOSSES[name], random_batch()
    knobs = entry.knobs
    assert not set(knobs) & (losses.BATCH_KEYS | losses.STATISTIC_KEYS)
    for knob in CLIPS:                                      # calling the function itself decides who takes what
        try:
            call(name, b, **{knob: 3.0 if knob == "dual_clip" else 0.1})
            takes = True
        except TypeError:
            takes = False
        assert takes == (knob in knobs), knob
    expected = (CLIPS if name in RATIO_CLIP else ("dual_clip",) if name in ("archer", "aspo")
                else ("clip_low", "clip_high") if name in ("gspo", "gspo_token", "cispo", "cispo_trl") else ())
    assert tuple(k for k in CLIPS if k in knobs) == expected
    # the defaults are the ones the loss uses: passing them all changes nothing, to the last bit
    given = {k: v for k, v in knobs.items() if v is not losses.REQUIRED and k != "generator"}
    assert call(name, b, **given)[0].item() == call(name, b)[0].item()
    assert [k for k, v in knobs.items() if v is losses.REQUIRED] == (["coef"] if name == "adaptive_entropy" else [])


def test_registry_knob_defaults_of_presets_come_first():
    assert LOSSES["dapo"].knobs["clip_high"] == 0.28 and LOSSES["grpo"].knobs["clip_high"] == 0.2
    assert LOSSES["drgrpo"].knobs["agg"] == "seq-mean-token-sum-norm" and "kl_coef" in LOSSES["drgrpo"].knobs
    assert LOSSES["steer"].knobs["dual_clip"] == 10.0 and "omega_max" not in LOSSES["steer"].knobs


def test_registry_flags_match_the_papers():
    assert [n for n in ALL if not LOSSES[n].std_normalize] == ["drgrpo"]
    assert [n for n in ALL if LOSSES[n].on_policy] == ["opefo"]
    assert [n for n in ALL if LOSSES[n].adaptive] == ["adaptive_entropy"]
    assert [n for n in ALL if LOSSES[n].ratio_level == "sequence"] == ["gspo", "gspo_token"]   # TRL's option
    assert [n for n in ALL if "current_entropy" in LOSSES[n].inputs] == list(CURRENT_ENTROPY)
    assert {n: LOSSES[n].data_defaults for n in ALL if LOSSES[n].data_defaults} == {
        "dapo": {"drop_equal_groups": True, "max_refill_rounds": 9, "overlong_penalty": True},
        "archer": {"drop_equal_groups": True}, "aspo": {"drop_equal_groups": True},
        "ce_gppo": {"drop_equal_groups": True}, "gppo": {"drop_equal_groups": True},
        "erc_dapo": LOSSES["dapo"].data_defaults, "erc_gppo": LOSSES["dapo"].data_defaults}
    assert [n for n in ALL if LOSSES[n].zero_rows is None] == ["adaptive_entropy", "entropy_bonus", "kl_cov"]
    assert {n for n in ALL if LOSSES[n].statistics is not None} == {"steer", "opefo", "clip_cov", "kl_cov",
                                                                     "forking", "clip_b", "clip_v"}


@pytest.mark.parametrize("name", ALL)
def test_reduce_names_metrics_the_loss_emits(name):
    b = random_batch()
    kw = {"kl_coef": 0.1} if name in ("grpo", "dapo", "drgrpo") else {}
    _, metrics = call(name, b, **kw)
    assert set(LOSSES[name].reductions) <= set(metrics) and LOSSES[name].reductions["pg_loss"] == "sum"
    assert set(LOSSES[name].reductions.values()) <= {"sum", "max", "min"}


def test_reduce_tables_together_are_the_former_trl_window_table():
    union = {}
    for name in ALL:
        for k, v in LOSSES[name].reductions.items():
            assert union.setdefault(k, v) == v                # one rule per metric name across losses
    assert union == {"pg_loss": "sum", "kl": "sum", "weighted_flow": "sum", "entropy_bonus": "sum",
                     "kl_cov": "sum", "omega_max": "max", "weight_max": "max", "weight_min": "min"}


@pytest.mark.parametrize("name", ["entropy_bonus", "adaptive_entropy"])
def test_missing_current_entropy_names_the_tensor_and_its_function(name):
    b = random_batch()
    message = (rf"{name}_loss needs current_entropy \(B, T\) with gradient: "
               r"logprobs.token_logprobs_entropy\(logits, tokens\)\[1\]")
    with pytest.raises(TypeError, match=message):
        call(name, dict(b, current_entropy=None))
    with pytest.raises(TypeError, match=message):
        LOSSES[name](logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"],
                     **knobs(name))
    with pytest.raises(TypeError, match=r"steer_loss needs entropy \(B, T\), the behaviour policy's: "
                                        r"logprobs.token_stats\(old_logits, tokens\)\[1\]"):
        LOSSES["steer"](logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"])


def test_every_entry_takes_the_whole_batch_and_only_bonuses_and_erc_need_current_entropy():
    """The contract of losses.py's Usage: one call with every batch tensor runs every entry (its required
    knobs aside); without current_entropy, the two entropy bonuses and ERC raise one line naming the tensor
    and the function that computes it, and every other entry gives the same value to the last bit."""
    b = random_batch()
    full = whole_batch(b)
    values = {}
    for name in ALL:
        loss, metrics = LOSSES[name](**full, **knobs(name))
        assert torch.isfinite(loss) and metrics, name
        values[name] = loss.item()
    assert [n for n in ALL if "current_entropy" in LOSSES[n].needs] == list(CURRENT_ENTROPY)
    without = {k: v for k, v in full.items() if k != "current_entropy"}
    for batch in (without, dict(without, current_entropy=None)):
        for name in ALL:
            if name in CURRENT_ENTROPY:
                with pytest.raises(TypeError) as err:
                    LOSSES[name](**batch, **knobs(name))
                assert str(err.value) == (f"{name}_loss needs current_entropy (B, T) with gradient: "
                                          "logprobs.token_logprobs_entropy(logits, tokens)[1]")
            else:
                assert LOSSES[name](**batch, **knobs(name))[0].item() == values[name], name


def test_uses_reference_probes_whether_a_loss_reads_ref_logp():
    assert losses.uses_reference("archer") and not losses.uses_reference("archer", kl_knowledge=0.0)
    assert not losses.uses_reference("grpo") and losses.uses_reference("grpo", kl_coef=0.1)
    assert not losses.uses_reference("kl_cov")              # its penalty is to pi_old, not to a reference
    assert not losses.uses_reference("adaptive_entropy")    # no ref_logp: no probe, so no coef is needed
    with pytest.raises(ValueError, match="unknown loss"):
        losses.uses_reference("ppo")
    with pytest.raises(TypeError):
        losses.uses_reference("steer", lamda_min=0.5)


# --------------------------------------------------------------------- every new loss: shared checks
@pytest.mark.parametrize("name", INTERVENTIONS)
def test_bf16_inputs_give_the_float32_result(name):
    b = intervention_batch(seed=9)
    low = {k: (v.to(torch.bfloat16) if torch.is_floating_point(v) and k != "advantages" else v)
           for k, v in b.items()}
    f32 = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in low.items()}
    f32["advantages"] = low["advantages"] = b["advantages"].float()
    lo, _ = run_intervention(name, low)
    hi, _ = run_intervention(name, f32)
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo, hi, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_gradient_equals_finite_differences(name, monkeypatch):
    """Every entry's gradient is the central finite difference of its loss (float64, eps 1e-6), with the
    whole batch's statistics given (so OPEFO's weights, Clip-Cov's choice, KL-Cov's and the forking cut do
    not move with the perturbation) and the quantities each method detaches by design held at the base
    point: STEER's weights lambda, and the per-token gradient of the losses whose value and gradient
    differ by construction (ASPO's flipped ratio, CE-GPPO's and GPPO's preserved clipped gradient, built
    with losses._with_gradient); ERC's gate is open (H = H_old): its detached tokens have no finite
    difference to match."""
    b = intervention_batch(B=2, T=3, seed=10)
    b["mask"] = torch.ones(2, 3)
    b["mask"][1, 2] = 0
    if name.startswith("erc_"):
        b["current_entropy"] = b["entropy"].clone()
    b["ref_logp"] = b["old_logp"] - 0.1
    extra = knobs(name)
    stats = losses.batch_statistics(name, mask=b["mask"], advantages=b["advantages"], old_logp=b["old_logp"],
                                    entropy=b["entropy"], exact_term=b["exact_term"], **extra)
    keys = ("old_logp", "advantages", "mask", "entropy", "exact_term", "ref_logp", "current_entropy")

    def loss_at(lp):
        return LOSSES[name](logp=lp, **{k: b[k] for k in keys}, **stats, **knobs(name))[0]
    held, real_weights, real_with_gradient = {}, losses.steer_weights, losses._with_gradient

    def steer_weights(*a, **k):                             # lambda at the base point, then held
        return held.setdefault("lam", real_weights(*a, **k))

    def with_gradient(value, weight, logp):                 # value and weight at the base point, then held
        v, w, base = held.setdefault(id(real_with_gradient), (value.detach(), weight.detach(), logp.detach()))
        return v + w * (logp - base)
    monkeypatch.setattr(losses, "steer_weights", steer_weights)
    monkeypatch.setattr(losses, "_with_gradient", with_gradient)
    logp = b["logp"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_at(logp), logp)
    eps = 1e-6
    for i, t in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2)):
        up, down = b["logp"].clone(), b["logp"].clone()
        up[i, t] += eps
        down[i, t] -= eps
        fd = (loss_at(up) - loss_at(down)) / (2 * eps)
        assert g[i, t].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8), (name, i, t)
    assert g[1, 2] == 0                                     # masked


@pytest.mark.parametrize("name,typo", [("entropy_bonus", "alpah"), ("adaptive_entropy", "alpha"),
                                       ("clip_cov", "clip_cov_ration"), ("kl_cov", "kl_cov_percent"),
                                       ("forking", "top_fraction"), ("entropy_adv", "kapa"),
                                       ("w_reinforce", "lam")])
def test_misspelt_knob_raises_type_error(name, typo):
    with pytest.raises(TypeError, match=typo):
        run_intervention(name, intervention_batch(), **{typo: 0.1})


@pytest.mark.parametrize("name,knob,value,message", [
    ("entropy_bonus", "coef", -0.1, r"coef=-0.1 must be >= 0"),
    ("clip_cov", "clip_cov_ratio", 0.0, r"clip_cov_ratio=0.0 must be in \(0, 1\]"),
    ("clip_cov", "cov_lb", 6.0, r"cov_lb=6.0 must be < cov_ub=5.0"),
    ("kl_cov", "kl_cov_ratio", 2.0, r"kl_cov_ratio=2.0 must be in \(0, 1\]"),
    ("forking", "top_frac", 0.0, r"top_frac=0.0 must be in \(0, 1\]"),
    ("entropy_adv", "kappa", 0.0, r"kappa=0.0 must be > 0"),
    ("w_reinforce", "positive_weight", -1.0, r"positive_weight=-1.0 must be >= 0"),
    ("forking", "clip_low", 1.5, r"clip_low=1.5 must be in \[0, 1\)"),
])
def test_bad_knob_values_raise_one_clear_error(name, knob, value, message):
    with pytest.raises(ValueError, match=message):
        run_intervention(name, intervention_batch(), **{knob: value})


@pytest.mark.parametrize("name", SUCCESSORS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_batch_totals_equal_the_whole_batch(name, agg):
    b = whole(ratio_random_batch(B=6, T=5, spread=1.5))
    b["mask"][3] = 0
    totals = losses.batch_totals(b["mask"])
    logp = b["logp"].clone().requires_grad_(True)
    full, _ = LOSSES[name](**dict(b, logp=logp), agg=agg, **totals)
    (g_full,) = torch.autograd.grad(full, logp)
    parts = 0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = {k: v[rows] for k, v in b.items()}
        parts = parts + LOSSES[name](**dict(part, logp=logp[rows]), agg=agg, **totals)[0]
    (g_parts,) = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(parts, full, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", SUCCESSORS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_masked_garbage_contributes_nothing(name, value):
    b = whole(ratio_random_batch(spread=1.5))
    b["advantages"] = b["advantages"][:, None].expand_as(b["mask"]).clone()
    dirty = dict(b)
    pad = b["mask"] == 0
    for key in ("logp", "old_logp", "advantages", "entropy", "ref_logp"):
        dirty[key] = b[key].clone().masked_fill(pad, value)
    (l0, g0), (l1, g1) = grads(LOSSES[name], b), grads(LOSSES[name], dirty)
    assert torch.isfinite(l1) and l1.item() == l0.item() and torch.equal(g1, g0)
    assert (g1[pad] == 0).all() and (g1[~pad] != 0).any()


@pytest.mark.parametrize("name", SUCCESSORS)
def test_zero_advantage_rows_have_zero_gradient_unless_a_kl_is_on(name):
    b = whole(ratio_random_batch(spread=1.5))
    b["advantages"][[1, 3]] = 0.0
    kw = {"kl_knowledge": 0.0} if name == "aspo" else {}
    assert LOSSES[name].zero_rows(b["advantages"], b["mask"], b["entropy"]).tolist() == [
        False, True, False, True, False, False]
    _, g = grads(LOSSES[name], b, **kw)
    assert (g[[1, 3]] == 0).all() and (g[[0, 2]] != 0).any()
    if name == "aspo":                                           # the default KL moves them: uses_reference
        _, g = grads(LOSSES[name], b)
        assert (g[[1, 3]] != 0).any()


def test_registry_entries():
    assert LOSSES["aspo"].inputs == ("logp", "old_logp", "advantages", "mask", "entropy", "ref_logp",
                                     "num_tokens", "num_seqs", "norm_length")
    assert LOSSES["aspo"].needs == ("logp", "old_logp", "advantages", "mask", "entropy")
    for name in ("ce_gppo", "gppo"):
        assert LOSSES[name].inputs == ("logp", "old_logp", "advantages", "mask", "entropy", "num_tokens",
                                       "num_seqs", "norm_length")
        assert LOSSES[name].needs == ("logp", "old_logp", "advantages", "mask")
        assert not losses.uses_reference(name)
    assert all(LOSSES[n].data_defaults == {"drop_equal_groups": True} for n in SUCCESSORS)
    assert all(LOSSES[n].zero_rows is losses._advantage_zero_rows and LOSSES[n].reductions == {"pg_loss": "sum"}
               for n in SUCCESSORS)
    assert LOSSES["gppo"].knobs == {**LOSSES["ce_gppo"].knobs, "beta_low": 1.0, "beta_high": 1.0, "clip_high": 0.28}
    assert LOSSES["aspo"].knobs == {"quantile": 0.8, "clip_reasoning": 0.4, "clip_knowledge": 0.2, "dual_clip": 3.0,
                                    "kl_knowledge": 0.001, "kl_reasoning": 0.0, "kl_kind": "k3",
                                    "agg": "token-mean"}
    assert LOSSES["ce_gppo"].knobs == {"beta_low": 0.5, "beta_high": 1.0, "clip_low": 0.2, "clip_high": 0.2,
                                       "dual_clip": 10.0, "agg": "token-mean"}
    assert LOSSES["gppo"].knobs == dict(LOSSES["ce_gppo"].knobs, beta_low=1.0, clip_high=0.28)
