"""Tests with the real Qwen2.5 tokenizer, chat template and configuration (../shared/models, no weights).

The model is the real architecture (Qwen2ForCausalLM, untied lm_head, the 151,936-token vocabulary and the
real special token ids) with random weights, cut to 2 layers of hidden 64 (bench_train.TOY_QWEN) so that a
test takes seconds. A random model emits a given token about once in 150k draws, so the generation tests
use a copy made to emit <|im_end|> with probability ~0.2 per position (bench_train.favour_token): its
responses end at varied places, as a trained model's do. Every test skips when ../shared/models is absent.
"""
import copy
import json
import math
import types

import pytest
import torch

from benchmarks import bench_train
import rollout
import train
import verifier
from rollout import DEFAULT_SYSTEM_PROMPT, format_prompt, generate, response_stats

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
VOCAB = 151_936
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# entropy of the chatty model: <|im_end|> at 0.2, the rest close to uniform over the other tokens
H_CHATTY = -0.2 * math.log(0.2) - 0.8 * math.log(0.8 / (VOCAB - 1))
PROBLEMS = ["What is 2+2?", "Compute 17 times 3, then subtract 5."]


@pytest.fixture(scope="module")
def tok(qwen_files):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_files)


@pytest.fixture(scope="module")
def base_tok(qwen_files):
    """The tokenizer as a base checkpoint (Qwen2.5-Math-1.5B) declares it: EOS <|endoftext|>, same template."""
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(qwen_files)
    t.eos_token = "<|endoftext|>"
    return t


@pytest.fixture(scope="module")
def model(qwen_files):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(bench_train.qwen_config(qwen_files, toy=True),
                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chatty(model, tok):
    """The model made to emit <|im_end|> with probability ~0.2 at every position."""
    m = copy.deepcopy(model)
    probe = torch.tensor([tok(format_prompt(tok, PROBLEMS[1]), add_special_tokens=False)["input_ids"]])
    bench_train.favour_token(m, IM_END, 0.2, probe)
    return m


def spy_generate(net, monkeypatch):
    """Record model.generate's keywords and raw outputs (before rollout.generate's own masking)."""
    calls, real = [], net.generate

    def wrapped(**kw):
        out = real(**kw)
        calls.append((kw, out[:, kw["input_ids"].shape[1]:]))
        return out
    monkeypatch.setattr(net, "generate", wrapped)
    return calls


def check_stops_at_first(ro, raw, stop, pad):
    """Every row of the Rollout ends at its first `stop` id or runs to max_new_tokens; returns (finished, truncated).
    raw: model.generate's response tokens: after a row's stop it holds only pad ids, so generation stopped."""
    resp = ro.input_ids[:, ro.prompt_length:]
    finished = truncated = 0
    for i in range(resp.shape[0]):
        n = int(ro.response_length[i])
        row = resp[i, :n].tolist()
        assert ro.response_mask[i].tolist() == [1.0] * n + [0.0] * (resp.shape[1] - n)
        assert ro.attention_mask[i, ro.prompt_length:].tolist() == [1] * n + [0] * (resp.shape[1] - n)
        assert (resp[i, n:] == pad).all()
        assert stop not in row[:-1]
        if ro.truncated[i]:
            truncated += 1
            assert stop not in row
        else:
            finished += 1
            assert row[-1] == stop
            assert raw[i, :n].tolist() == row and (raw[i, n:] == pad).all()
    return finished, truncated


# ---------------------------------------------------------------- the real files

def test_real_vocabulary_special_tokens_and_configuration(tok, model, qwen_files):
    from transformers import GenerationConfig
    assert model.config.vocab_size == VOCAB and not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape == (VOCAB, 64)
    assert model.get_output_embeddings().weight.shape == (VOCAB, 64)
    assert model.config.num_hidden_layers == 2 and type(model).__name__ == "Qwen2ForCausalLM"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT, IM_START, IM_END]
    assert (tok.eos_token_id, tok.pad_token_id) == (IM_END, ENDOFTEXT)
    assert GenerationConfig.from_pretrained(qwen_files).eos_token_id == IM_END
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == [IM_START, 872, 198, 6023,
                                                                                             IM_END]
    assert rollout.end_of_turn_id(tok) == IM_END
    assert rollout.stop_token_ids(model, tok) == [IM_END]


def test_format_prompt_with_the_real_chat_template(tok):
    text = format_prompt(tok, PROBLEMS[0])
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # an empty system prompt omits our message; Qwen's template then writes its own default one
    assert format_prompt(tok, PROBLEMS[0], system_prompt="").startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 35 and ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    assert ids[-3:] == [IM_START, 77091, 198]                       # "<|im_start|>", "assistant", "\n"


# ---------------------------------------------------------------- generation

def test_generate_with_the_real_tokenizer(chatty, tok, monkeypatch):
    calls = spy_generate(chatty, monkeypatch)
    prompts = [format_prompt(tok, p) for p in PROBLEMS]
    torch.manual_seed(0)
    ro = generate(chatty, tok, prompts, group_size=4, max_new_tokens=8)
    (kw, raw), = calls
    assert kw["eos_token_id"] == [IM_END] and kw["pad_token_id"] == ENDOFTEXT and kw["top_k"] == 0
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    p_len = max(lengths)
    assert ro.prompt_length == p_len and lengths[0] < p_len
    for g, n in enumerate(lengths):                                 # left-padded with <|endoftext|>
        rows = slice(4 * g, 4 * g + 4)
        assert (ro.input_ids[rows, :p_len - n] == ENDOFTEXT).all() and (ro.attention_mask[rows, :p_len - n] == 0).all()
        prompt_ids = torch.tensor(tok(prompts[g], add_special_tokens=False)["input_ids"])
        assert (ro.input_ids[rows, p_len - n:p_len] == prompt_ids).all()
        assert (ro.input_ids[rows, p_len - n] == IM_START).all()
    finished, truncated = check_stops_at_first(ro, raw, IM_END, ENDOFTEXT)
    assert finished >= 2 and truncated >= 1, (finished, truncated)
    assert int(ro.input_ids.max()) < VOCAB
    for i, c in enumerate(ro.completions):
        n = int(ro.response_length[i])
        assert c == tok.decode(ro.input_ids[i, p_len:p_len + n], skip_special_tokens=True) and "<|im_end|>" not in c


def test_end_of_turn_stops_a_base_checkpoint(chatty, base_tok, monkeypatch):
    """EOS = <|endoftext|> in the tokenizer and the generation config (Qwen2.5-Math-1.5B's set-up): the chat
    template's <|im_end|> must still stop generation and close the response mask."""
    monkeypatch.setattr(chatty.generation_config, "eos_token_id", ENDOFTEXT)
    assert base_tok.eos_token_id == ENDOFTEXT
    assert rollout.stop_token_ids(chatty, base_tok) == [ENDOFTEXT, IM_END]
    calls = spy_generate(chatty, monkeypatch)
    torch.manual_seed(1)
    ro = generate(chatty, base_tok, [format_prompt(base_tok, p) for p in PROBLEMS], group_size=4, max_new_tokens=8)
    assert IM_END in calls[0][0]["eos_token_id"]
    finished, _ = check_stops_at_first(ro, calls[0][1], IM_END, ENDOFTEXT)
    assert finished >= 4
    assert all(r == base_tok.decode(ro.input_ids[i, ro.prompt_length:ro.prompt_length + int(n) - 1])
               for i, (r, n) in enumerate(zip(ro.completions, ro.response_length)) if not ro.truncated[i])

    # the same tokenizer without its chat template: <|im_end|> is no stop token, and responses run past it
    plain = copy.copy(base_tok)
    plain.chat_template = None
    assert rollout.end_of_turn_id(plain) is None and rollout.stop_token_ids(chatty, plain) == [ENDOFTEXT]
    torch.manual_seed(1)
    ro = generate(chatty, plain, [format_prompt(plain, p) for p in PROBLEMS], group_size=4, max_new_tokens=8)
    inside = ro.input_ids[:, ro.prompt_length:][ro.response_mask.bool()]
    assert int((inside == IM_END).sum()) >= 4


def test_favour_token_sets_the_probability(chatty, model, tok):
    ids = torch.tensor([tok(format_prompt(tok, PROBLEMS[0]), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        p = chatty(input_ids=ids).logits.softmax(-1)[0, :, IM_END]
        p0 = model(input_ids=ids).logits.softmax(-1)[0, :, IM_END]
    assert 0.12 < float(p.min()) and float(p.max()) < 0.3, p
    assert float(p0.max()) < 1e-4                                    # the plain random model: ~1 / 151,936


# ---------------------------------------------------------------- statistics over the real vocabulary

def test_response_stats_over_the_real_vocabulary(model, chatty, tok):
    torch.manual_seed(2)
    ro = generate(chatty, tok, [format_prompt(tok, p) for p in PROBLEMS], group_size=2, max_new_tokens=6)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask)
    stats = response_stats(model, *args, temperature=0.7)
    pos = (ro.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    lp = (logits[:, ro.prompt_length - 1:-1].double() / 0.7).log_softmax(-1)             # float64 reference
    p = lp.exp()
    h = -(p * lp).sum(-1)
    ref = {"logp": lp.gather(-1, ro.input_ids[:, ro.prompt_length:, None]).squeeze(-1), "entropy": h,
           "exact_term": (p * p * (lp + h[..., None])).sum(-1)}
    m = ro.response_mask.bool()
    for key, tol in (("logp", 1e-4), ("entropy", 1e-4), ("exact_term", 1e-9)):
        torch.testing.assert_close(stats[key][m].double(), ref[key][m], atol=tol, rtol=1e-5)
        assert (stats[key][~m] == 0).all()
    # a random model is close to uniform over the 151,936 tokens: H just below log V = 11.93
    assert (stats["entropy"][m] > 11.0).all() and (stats["entropy"][m] < math.log(VOCAB)).all()
    assert (stats["logp"][m] < -9).all()
    grad = response_stats(model, *args, temperature=0.7, with_grad=True, with_entropy=False)["logp"]
    torch.testing.assert_close(grad.detach(), stats["logp"], atol=1e-5, rtol=1e-5)
    model.zero_grad()
    grad.sum().backward()
    head = model.get_output_embeddings().weight.grad
    sampled = ro.input_ids[:, ro.prompt_length:][m].unique()
    assert (head[sampled].abs().sum(1) > 0).all()
    model.zero_grad()


# ---------------------------------------------------------------- train.py end to end

@pytest.fixture
def parity_reward(monkeypatch):
    """verifier.score -> reward 1.0 when the completion has an even number of characters, so that a random
    model's groups get real advantages (the gold is still parsed by the real verifier)."""
    real = verifier.score

    def score(response, gold):
        s = real("\\boxed{0}", gold)
        ok = len(response) % 2 == 0
        return types.SimpleNamespace(reward=float(ok), answer=response[-3:], correct=ok, timed_out=False) \
            if s.correct is not None else s
    monkeypatch.setattr(verifier, "score", score)


def test_train_two_steps_with_the_real_tokenizer(chatty, tok, tmp_path, parity_reward):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    chatty.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in bench_train.arithmetic_items(6)))
    run = tmp_path / "run"
    rows = train.main(["--model", str(tmp_path / "model"), "--dataset", str(data), "--algo", "grpo", "--steps", "2",
                       "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8",
                       "--micro-batch-size", "4", "--lr", "1e-3", "--eval-interval", "0", "--save-interval", "2",
                       "--log-samples", "2", "--out", str(run)])
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 1 <= r["response_length"] <= 8 and r["truncation_rate"] < 1      # <|im_end|> ended some responses
        assert r["entropy"] == pytest.approx(H_CHATTY, abs=0.3)
        assert r["updates"] == 2 and r["skipped_nonfinite"] == 0 and r["grad_norm"] > 0
    samples = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4 and all(s["prompt"].startswith("What is ") for s in samples)  # steps x prompts x G
    assert not any("<|" in s["completion"] for s in samples)
    saved = run / "checkpoints" / "step_000002" / "model"
    reloaded_tok = AutoTokenizer.from_pretrained(saved)
    assert reloaded_tok.chat_template == tok.chat_template and rollout.end_of_turn_id(reloaded_tok) == IM_END
    assert (reloaded_tok.eos_token_id, reloaded_tok.pad_token_id) == (IM_END, ENDOFTEXT)
    trained = AutoModelForCausalLM.from_pretrained(saved)
    moved = [n for n, q in trained.named_parameters() if not torch.equal(q, chatty.state_dict()[n])]
    assert "lm_head.weight" in moved and len(moved) > 10


# ---------------------------------------------------------------- the GPU check, dry run

def test_gpu_check_dry_run_writes_the_figures(qwen_files, tmp_path, monkeypatch):
    local = tmp_path / "cache" / qwen_files.name
    monkeypatch.setattr(bench_train, "SHARED_QWEN", qwen_files)
    monkeypatch.setattr(bench_train, "LOCAL_QWEN", local)
    out = tmp_path / "gpu_check.json"
    report = bench_train.main(["--gpu-check", "--dry-run", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (local / "tokenizer.json").is_file() and (local / "chat_template.jinja").is_file()   # the copied files
    assert report["device"] == "CPU" and report["dry_run"] is True and report["ok"] is True
    assert set(report) == {"device", "dry_run", "torch", "transformers", "bench", "train", "end_of_turn", "seconds",
                           "ok"}
    bench = report["bench"]
    assert set(bench["phases"]) == {"generate", "bare_generate", "score", "stats", "update"}
    for name, ph in bench["phases"].items():
        assert ph["seconds"] > 0 and ph["peak_mb"] > 0, name
        assert ph["tokens_per_s"] == pytest.approx(ph["tokens"] / ph["seconds"])
    assert bench["phases"]["generate"]["tokens"] == 1 * 2 * 4                        # prompts x G x new tokens
    assert bench["phases"]["update"]["tokens"] == 2 * (8 + 4)
    assert 0 < bench["update_mfu"] < 1 and bench["matmul_tflops_per_s"] > 0
    tr = report["train"]
    assert tr["steps"] == 3 and [s["step"] for s in tr["per_step"]] == [1, 2, 3] and tr["prompt_tokens"] == 36
    for s in tr["per_step"]:
        assert set(s["tokens_per_s"]) == {"generate", "score", "stats", "update"}
        assert all(v > 0 for v in s["tokens_per_s"].values()) and s["peak_mem_mb"] > 0
        assert s["tokens_per_s"]["update"] == pytest.approx(2 * 2 * (36 + 6) / s["seconds"]["update"])
        assert s["response_length"] == 6 and s["truncation_rate"] == 1.0 and s["optimizer_steps"] == 2
        assert 0 < s["update_mfu"] < 1
    eot = report["end_of_turn"]
    assert eot["stop_token_ids"] == [ENDOFTEXT, IM_END] and eot["end_of_turn_id"] == IM_END
    assert eot["rows"] == 8 and eot["ended_at_im_end"] >= 4 and eot["im_end_inside_a_response"] == 0
    assert eot["pad_after_stop"] and eot["completions_showing_special_tokens"] == 0


def test_gpu_check_needs_the_files_and_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "SHARED_QWEN", tmp_path / "absent")
    monkeypatch.setattr(bench_train, "LOCAL_QWEN", tmp_path / "empty")
    with pytest.raises(SystemExit, match="configuration and tokenizer"):
        bench_train.qwen_files()
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_train.main(["--gpu-check", "--json", str(tmp_path / "x.json")])
