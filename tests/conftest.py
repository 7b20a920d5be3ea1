"""Shared test set-up: every test runs on CPU, seeded, on one thread.

Tests that read the real benchmark files use the `shared_data` fixture, which skips with a reason when
../shared/data is absent (a fresh clone of the project has no ../shared). Tests with the real Qwen2.5
configuration and tokenizer use `qwen_files` (../shared/models/qwen2.5-0.5b-instruct, no weights), which
skips the same way.
"""
import copy
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

import logprobs
import losses
import train
from benchmarks import bench_train
from logprobs import token_entropy, token_logprobs
from losses import LOSSES
from rollout import format_prompt

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")          # keep the suite on CPU even on a GPU box
os.environ.setdefault("HF_HUB_OFFLINE", "1")               # never reach for the Hub from a test
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_QWEN = ROOT.parent / "shared" / "models" / "qwen2.5-0.5b-instruct"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED_DATA} (only present on the project's machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_files():
    """Path to ../shared/models/qwen2.5-0.5b-instruct (the real Qwen2.5 configuration, generation config,
    tokenizer and chat template; no weights); skips the test when the folder is not beside the checkout."""
    if not (SHARED_QWEN / "config.json").is_file():
        pytest.skip(f"real Qwen2.5 configuration and tokenizer not found at {SHARED_QWEN} "
                    "(only present on the project's machines)")
    return SHARED_QWEN


# ------------------------------------------------------------------ the real Qwen2.5 files (no weights)
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
VOCAB = 151_936
PROBLEMS = ["What is 2+2?", "Compute 17 times 3, then subtract 5."]
# entropy of the chatty model: <|im_end|> at 0.2, the rest close to uniform over the other tokens
H_CHATTY = -0.2 * math.log(0.2) - 0.8 * math.log(0.8 / (VOCAB - 1))


# ------------------------------------------------------------------ train.py runs on the untrained lab model
TINY = ["--preset", "tiny", "--tiny-sft-steps", "0", "--prompts-per-step", "2", "--group-size", "4",
        "--max-new-tokens", "6", "--eval-size", "3", "--eval-k", "2", "--lr", "1e-2", "--log-samples", "1"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One folder for the lab's (untrained, --tiny-sft-steps 0) warm start, shared by the whole session."""
    return str(tmp_path_factory.getbasetemp() / "tiny_cache")


@pytest.fixture
def parity_reward(monkeypatch):
    """The lab's reward -> 1.0 when the completion's character codes have an even sum: every group gets a
    real advantage signal without any training."""
    import tiny_lab
    import verifier

    def score(response, item):
        ok = sum(map(ord, response)) % 2 == 0
        return verifier.Score(float(ok), response[-3:], ok, False)
    monkeypatch.setattr(tiny_lab, "score", score)


def _no_nan(name):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def read_rows(path):
    """The rows of a JSON Lines log; a NaN or inf (not JSON) is an error."""
    return [json.loads(line, parse_constant=_no_nan) for line in Path(path).read_text().splitlines()]


def strip_timing(row):
    """A metrics row without the figures that depend on the machine's speed."""
    import run_dir

    return {k: v for k, v in row.items() if not k.startswith(run_dir.TIMING_KEYS)}


def tiny(cache, out, *extra):
    """train.py's arguments for a short lab run into `out`, evaluated at the start and the end only."""
    return TINY + ["--eval-interval", "0", "--cache-dir", cache, "--out", str(out), *extra]


def error_line(capsys, argv):
    """Run train.py's command line on argv; assert exit status 2 and one line on stderr; return it."""
    import run_dir
    import train

    assert run_dir.cli(train.main, "train.py", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    return err[0]


def pytest_configure(config):
    torch.set_num_threads(1)          # tiny tensors: one thread avoids contention overhead


@pytest.fixture(scope="module")
def qwen_tok(qwen_files):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_files)


@pytest.fixture(scope="module")
def qwen_base_tok(qwen_files):
    """The tokenizer as a base checkpoint (Qwen2.5-Math-1.5B) declares it: EOS <|endoftext|>, same template."""
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(qwen_files)
    t.eos_token = "<|endoftext|>"
    return t


@pytest.fixture(scope="module")
def qwen_model(qwen_files):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(bench_train.qwen_config(qwen_files, toy=True),
                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chatty(qwen_model, qwen_tok):
    """The qwen_model made to emit <|im_end|> with probability ~0.2 at every position."""
    m = copy.deepcopy(qwen_model)
    probe = torch.tensor([qwen_tok(format_prompt(qwen_tok, PROBLEMS[1]), add_special_tokens=False)["input_ids"]])
    bench_train.favour_token(m, IM_END, 0.2, probe)
    return m


def random_batch(B=4, T=7, V=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    if B:
        mask[0, T - 2:] = 0
        mask[-1, T - 4:] = 0
    logp = token_logprobs(logits, tokens).detach()
    old_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=logp.dtype)
    adv = torch.randn(B, generator=g)
    entropy, s2 = token_entropy(logits, exact_term=True)
    current_entropy = logprobs.policy_entropy(logits).detach() + 0.05   # the current policy has moved a little
    return dict(logits=logits, tokens=tokens, mask=mask, logp=logp, old_logp=old_logp, advantages=adv,
                entropy=entropy, exact_term=s2, current_entropy=current_entropy)


# ------------------------------------------------------------------------------------------ all three
SUCCESSORS = ("aspo", "ce_gppo", "gppo")


# ------------------------------------------------------------- the entropy interventions
INTERVENTIONS = ["entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking", "entropy_adv", "w_reinforce"]


def intervention_batch(B=4, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, T - 2:] = 0
    mask[-1, T - 3:] = 0
    old_logp, entropy, s2 = logprobs.token_stats(logits, tokens)
    logp = old_logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 2
    return dict(logits=logits, tokens=tokens, mask=mask, logp=logp, old_logp=old_logp, advantages=adv,
                entropy=entropy, exact_term=s2, current_entropy=entropy + 0.1)


def run_intervention(name, b, **kw):
    """LOSSES[name] on batch b; Clip-Cov draws from a freshly seeded generator."""
    if name == "adaptive_entropy":
        kw.setdefault("coef", 0.01)
    if name == "clip_cov" and "cov_selected" not in kw:
        kw.setdefault("generator", torch.Generator().manual_seed(0))
    keys = ("logp", "old_logp", "advantages", "mask", "entropy", "exact_term", "current_entropy")
    return LOSSES[name](**{k: b[k] for k in keys}, **kw)


def ratio_random_batch(B=6, T=7, seed=0, spread=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = old + spread * torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.ones(B, T)
    mask[0, T - 2:] = 0
    mask[-1, T - 4:] = 0
    return dict(logp=logp, old_logp=old, advantages=torch.randn(B, generator=g, dtype=dtype), mask=mask,
                entropy=torch.rand(B, T, generator=g, dtype=dtype) * 2)


def whole(b):
    return dict(b, ref_logp=b["old_logp"] - 0.1)


KNOBS = {"adaptive_entropy": {"coef": 0.01}}     # knobs a loss cannot run without


def knobs(name, **kw):
    """The knobs for LOSSES[name] in these tests: required ones, and a freshly seeded generator for
    Clip-Cov's random choice (so that two calls draw the same tokens)."""
    out = dict(KNOBS.get(name, {}), **kw)
    if name == "clip_cov" and "cov_selected" not in out:
        out.setdefault("generator", torch.Generator().manual_seed(0))
    return out


def call(name, b, logp=None, **kw):
    return LOSSES[name](logp=b["logp"] if logp is None else logp, old_logp=b["old_logp"],
                        advantages=b["advantages"], mask=b["mask"], entropy=b["entropy"],
                        exact_term=b["exact_term"], ref_logp=b["old_logp"] - 0.1,
                        current_entropy=b["current_entropy"], num_tokens=None, **knobs(name, **kw))


def whole_batch_statistics(name, b, **kw):
    return losses.batch_statistics(name, mask=b["mask"], advantages=b["advantages"], old_logp=b["old_logp"],
                                   entropy=b["entropy"], exact_term=b["exact_term"], **knobs(name, **kw))


def grads(fn, b, **kw):
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = fn(**dict(b, logp=logp), **kw)
    return loss, torch.autograd.grad(loss, logp)[0]


# ------------------------------------------------------------------------- entropy with its gradient
def naive_entropy(logits):
    lsm = torch.log_softmax(logits.double(), -1)
    p = lsm.exp()
    return -(p * torch.where(p > 0, lsm, 0.0)).sum(-1), lsm


REWARD_MODULE = '''
def reward(completion, row):
    """0.5 per '=' sign in the completion, at most 1: a shaped reward the verifier knows nothing of."""
    return min(1.0, 0.5 * completion.count("="))
'''


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished two-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(tiny(cache, out, "--steps", "2", "--save-interval", "1"))
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
