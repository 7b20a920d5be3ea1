"""Tests for rollout.py on a tiny randomly initialised Qwen2 (and a tiny GPT-2 for absolute positions)
with a character-level tokenizer built in code; offline, CPU, budget ~40 s for the whole file."""
import copy
import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import rollout
from conftest import ENDOFTEXT, IM_END, IM_START, PROBLEMS, VOCAB
from rollout import DEFAULT_SYSTEM_PROMPT, format_prompt, generate, response_stats

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n:{}\\.?+|<>")
PAD, EOS = 0, 1
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_tokenizer(chat_template=None, with_pad=True):
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    kwargs = dict(pad_token="<pad>") if with_pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", **kwargs)
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    m = Qwen2ForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = EOS
    m.generation_config.pad_token_id = PAD
    return m


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=len(SPECIALS) + len(CHARS), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


def naive_stats(model, input_ids, attention_mask, prompt_length, temperature):
    """Full-sequence forward, float64 log_softmax over the whole vocabulary (the reference)."""
    pos = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
    logits = logits[:, prompt_length - 1:-1].double() / temperature
    lp = logits.log_softmax(-1)
    p = lp.exp()
    h = -(p * lp).sum(-1)
    return {"logp": lp.gather(-1, input_ids[:, prompt_length:, None]).squeeze(-1), "entropy": h,
            "exact_term": (p * p * (lp + h[..., None])).sum(-1)}


# ---------------------------------------------------------------- prompts

def test_default_system_prompt_asks_for_boxed_answer():
    assert "\\boxed{}" in DEFAULT_SYSTEM_PROMPT and "step by step" in DEFAULT_SYSTEM_PROMPT


def test_format_prompt_plain_template(tok):
    assert format_prompt(tok, "What is 1+1?") == f"{DEFAULT_SYSTEM_PROMPT}\n\nQuestion: What is 1+1?\nAnswer:"
    assert format_prompt(tok, "2+2?", system_prompt="") == "Question: 2+2?\nAnswer:"


def test_format_prompt_chat_template():
    chat = make_tokenizer(CHAT_TEMPLATE)
    assert format_prompt(chat, "2+2?", system_prompt="sys") == "<system>sys\n<user>2+2?\n<assistant>"
    assert format_prompt(chat, "2+2?", system_prompt="") == "<user>2+2?\n<assistant>"


def test_end_of_turn_id_reads_the_template():
    """The special token written right after the assistant's content, else None (tests with the real Qwen
    template are in test_real_model.py)."""
    ends_with_eos = CHAT_TEMPLATE.replace("{{ m['content'] }}\n", "{{ m['content'] }}<eos>\n")
    assert rollout.end_of_turn_id(make_tokenizer(ends_with_eos)) == EOS
    assert rollout.end_of_turn_id(make_tokenizer(CHAT_TEMPLATE)) is None              # plain "\n" follows
    assert rollout.end_of_turn_id(make_tokenizer()) is None                           # no template
    user_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}="
    assert rollout.end_of_turn_id(make_tokenizer(user_only)) is None                  # assistant dropped
    assert rollout.end_of_turn_id(make_tokenizer("{{ raise_exception('no') }}")) is None


def test_format_prompt_rejects_empty_problem(tok):
    with pytest.raises(ValueError, match="problem"):
        format_prompt(tok, "  ")


# ---------------------------------------------------------------- generation: masks from a scripted batch

def test_masks_from_scripted_generate(model, tok, monkeypatch):
    """model.generate replaced by a script: EOS at known places, junk after it, calls of different widths."""
    a, b, c, d = (tok.convert_tokens_to_ids(x) for x in "abcd")
    script = [torch.tensor([[a, b, EOS, c], [a, b, c, d]]),     # call 1 (rows 0, 1): EOS at 2; none
              torch.tensor([[EOS, c], [a, EOS]])]               # call 2 (rows 2, 3): stopped early, width 2
    calls = []

    def fake_generate(input_ids, attention_mask, **kw):
        calls.append(kw)
        return torch.cat([input_ids, script[len(calls) - 1]], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    ro = generate(model, tok, ["ab", "abcd"], group_size=2, max_new_tokens=4, max_batch_sequences=2)
    assert ro.prompt_length == 4
    expected_resp = torch.tensor([[a, b, EOS, PAD], [a, b, c, d], [EOS, PAD, PAD, PAD], [a, EOS, PAD, PAD]])
    assert torch.equal(ro.input_ids[:, 4:], expected_resp)
    assert torch.equal(ro.input_ids[:, :4], torch.tensor([[PAD, PAD, a, b]] * 2 + [[a, b, c, d]] * 2))
    expected_rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float)
    assert torch.equal(ro.response_mask, expected_rmask)
    assert ro.response_mask.dtype == torch.float32
    assert torch.equal(ro.attention_mask[:, :4], torch.tensor([[0, 0, 1, 1]] * 2 + [[1, 1, 1, 1]] * 2))
    assert torch.equal(ro.attention_mask[:, 4:], expected_rmask.long())
    assert ro.truncated.tolist() == [False, True, False, False]
    assert ro.response_length.tolist() == [3, 4, 1, 2]
    assert ro.completions == ["ab", "abcd", "", "a"]
    assert ro.prompt_index.tolist() == [0, 0, 1, 1]
    # sampling switches off every processor a checkpoint's generation_config could add
    assert calls[0]["do_sample"] is True and calls[0]["top_k"] == 0 and calls[0]["repetition_penalty"] == 1.0
    assert calls[0]["pad_token_id"] == PAD and EOS in calls[0]["eos_token_id"]
    calls.clear()
    generate(model, tok, ["ab", "abcd"], group_size=1, max_new_tokens=4, temperature=0)
    assert calls[0]["do_sample"] is False and len(calls) == 1


def test_pad_falls_back_to_eos(model, monkeypatch):
    no_pad = make_tokenizer(with_pad=False)
    a = no_pad.convert_tokens_to_ids("a")
    seen = {}

    def fake_generate(input_ids, attention_mask, **kw):
        seen.update(kw, prompt=input_ids)
        return torch.cat([input_ids, torch.tensor([[a, EOS, a], [a, a, a]])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    ro = generate(model, no_pad, ["a", "aa"], group_size=1, max_new_tokens=3)
    assert seen["pad_token_id"] == EOS
    assert seen["prompt"][0, 0].item() == EOS                  # left padding uses the fallback id
    assert ro.input_ids[0, 2:].tolist() == [a, EOS, EOS]       # after the first EOS: pad (= EOS) id
    assert ro.truncated.tolist() == [False, True]


# ---------------------------------------------------------------- generation: the real model

@pytest.fixture(scope="module")
def sampled(model, tok):
    torch.manual_seed(3)
    prompts = ["1+1?", "what is 12+30?"]
    return prompts, generate(model, tok, prompts, group_size=8, max_new_tokens=12, temperature=1.0,
                             max_batch_sequences=5)


def test_rollout_shapes_and_group_layout(sampled, tok):
    prompts, ro = sampled
    n, G = 16, 8
    p_len = len(tok(prompts[1])["input_ids"])
    assert ro.prompt_length == p_len
    r_len = ro.input_ids.shape[1] - p_len
    assert 1 <= r_len <= 12
    assert ro.input_ids.shape == ro.attention_mask.shape == (n, p_len + r_len)
    assert ro.response_mask.shape == (n, r_len) and ro.truncated.shape == (n,) and len(ro.completions) == n
    assert ro.input_ids.dtype == ro.attention_mask.dtype == torch.long and ro.truncated.dtype == torch.bool
    assert ro.prompt_index.tolist() == [0] * G + [1] * G
    short = tok(prompts[0])["input_ids"]
    for g, toks in enumerate([short, tok(prompts[1])["input_ids"]]):
        rows = slice(g * G, g * G + G)
        assert (ro.input_ids[rows, p_len - len(toks):p_len] == torch.tensor(toks)).all()
        assert (ro.input_ids[rows, :p_len - len(toks)] == PAD).all()
        assert (ro.attention_mask[rows, :p_len].sum(1) == len(toks)).all()


def test_real_masks_follow_first_eos(sampled, tok):
    _, ro = sampled
    p_len = ro.prompt_length
    resp = ro.input_ids[:, p_len:]
    r_len = resp.shape[1]
    assert ro.truncated.any() and (~ro.truncated).any(), "seed should give both finished and truncated rows"
    for i in range(resp.shape[0]):
        length = int(ro.response_length[i])
        assert ro.response_mask[i].tolist() == [1.0] * length + [0.0] * (r_len - length)
        assert (resp[i, :length - 1] != EOS).all()
        assert (resp[i, length:] == PAD).all()
        if ro.truncated[i]:
            assert length == r_len == 12 and resp[i, -1] != EOS
        else:
            assert resp[i, length - 1] == EOS
        assert ro.completions[i] == tok.decode(resp[i, :length], skip_special_tokens=True)
    assert torch.equal(ro.attention_mask[:, p_len:].float(), ro.response_mask)


def test_checkpoint_generation_config_does_not_change_sampling(model, tok, monkeypatch):
    """A checkpoint asking for top_k=1 would make all samples equal; generate must override it."""
    monkeypatch.setattr(model.generation_config, "top_k", 1)
    ro = generate(model, tok, ["1+1?"], group_size=6, max_new_tokens=6)
    assert len({tuple(r.tolist()) for r in ro.input_ids}) > 1


def test_greedy_is_deterministic_and_batch_invariant(model, tok):
    prompts = ["1+1?", "what is 12+30?"]
    ro = generate(model, tok, prompts, group_size=3, max_new_tokens=6, temperature=0)
    ro1 = generate(model, tok, prompts, group_size=3, max_new_tokens=6, temperature=0, max_batch_sequences=1)
    assert torch.equal(ro.input_ids, ro1.input_ids)
    for g in range(2):
        assert (ro.input_ids[3 * g:3 * g + 3] == ro.input_ids[3 * g]).all()
    # the first greedy token is the argmax of the next-token logits of the unpadded prompt
    ids = torch.tensor([tok(prompts[0])["input_ids"]])
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].argmax()
    assert ro.input_ids[0, ro.prompt_length] == first


def test_generate_validates_arguments(model, tok):
    with pytest.raises(ValueError, match="group_size"):
        generate(model, tok, ["a"], group_size=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, tok, "a", group_size=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, ["a"], group_size=1, max_new_tokens=2, top_p=0.0)


# ---------------------------------------------------------------- response statistics

def test_stats_match_naive_full_softmax(model, sampled):
    _, ro = sampled
    stats = response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask,
                           temperature=0.7, chunk_size=5)
    ref = naive_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, 0.7)
    m = ro.response_mask.bool()
    for key in ("logp", "entropy", "exact_term"):
        assert stats[key].shape == ro.response_mask.shape
        torch.testing.assert_close(stats[key][m].double(), ref[key][m], atol=2e-5, rtol=1e-5)
        assert (stats[key][~m] == 0).all()
        assert not stats[key].requires_grad
    assert (stats["entropy"][m] > 0).all()
    # micro-batching over rows gives the same numbers
    micro = response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask,
                           temperature=0.7, chunk_size=5, micro_batch_size=3)
    for key in ("logp", "entropy", "exact_term"):
        torch.testing.assert_close(micro[key], stats[key], atol=1e-6, rtol=1e-6)
    assert set(response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask,
                              with_entropy=False)) == {"logp"}


@pytest.mark.parametrize("which", ["model", "gpt2"])
def test_left_padding_does_not_change_logp(which, request):
    """Same prompt + response with 0, 2 and 5 pads on the left (junk ids under the pads) -> same log-probs.
    GPT-2 has absolute positions, so this fails there unless position_ids follow the attention mask."""
    net = request.getfixturevalue(which)
    prompt, resp = [7, 8, 9, 10, 11], [12, 13, EOS, PAD]
    rmask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    alone = response_stats(net, torch.tensor([prompt + resp]), torch.tensor([[1] * 8 + [0]]), 5, rmask)["logp"]
    for pads in (2, 5):
        junk = [20 + k for k in range(pads)]                        # whatever sits under a pad must not matter
        ids = torch.tensor([junk + prompt + resp, [30] * (pads + 5) + resp])
        mask = torch.tensor([[0] * pads + [1] * 8 + [0], [1] * (pads + 8) + [0]])
        padded = response_stats(net, ids, mask, 5 + pads, rmask.repeat(2, 1))["logp"]
        torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    assert (alone[0, :3] < 0).all() and alone[0, 3] == 0


@pytest.mark.parametrize("with_entropy", [False, True])
def test_with_grad_gives_gradients_equal_to_naive(model, sampled, with_entropy):
    """log pi(a) and, with with_entropy, the entropy H carry the gradients of a naive float32 softmax
    (the objective sum logp + 0.3 sum H); S2 never carries one."""
    _, ro = sampled
    stats = response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask,
                           temperature=0.7, with_grad=True, with_entropy=with_entropy)
    assert stats["logp"].requires_grad
    assert set(stats) == ({"logp", "entropy", "exact_term"} if with_entropy else {"logp"})
    model.zero_grad()
    objective = stats["logp"].sum() + (0.3 * stats["entropy"].sum() if with_entropy else 0.0)
    objective.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    pos = (ro.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    full = (logits[:, ro.prompt_length - 1:-1] / 0.7).log_softmax(-1)
    lp = full.gather(-1, ro.input_ids[:, ro.prompt_length:, None]).squeeze(-1)
    naive = (lp * ro.response_mask).sum()
    if with_entropy:
        assert stats["entropy"].requires_grad and not stats["exact_term"].requires_grad
        h = -(full.exp() * full).sum(-1)
        torch.testing.assert_close(stats["entropy"].detach(), (h * ro.response_mask).detach(), atol=1e-5, rtol=1e-5)
        naive = naive + 0.3 * (h * ro.response_mask).sum()
    naive.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-3, msg=name)
    assert grads["lm_head.weight"].abs().sum() > 0 and grads["model.embed_tokens.weight"].abs().sum() > 0
    model.zero_grad()


def test_concat_rollouts_keeps_every_row(model, tok):
    """Two rounds of different prompt and response widths, joined: every row's tokens, masks and statistics
    are those of its own round (re-padding moves nothing), prompt_index continues across the rounds."""
    torch.manual_seed(5)
    a = generate(model, tok, ["1+1?"], group_size=2, max_new_tokens=4)
    b = generate(model, tok, ["what is 12+30?", "7?"], group_size=2, max_new_tokens=9)
    joined = rollout.concat_rollouts([a, b], PAD)
    assert rollout.concat_rollouts([a], PAD) is a
    assert joined.prompt_length == max(a.prompt_length, b.prompt_length) and len(joined.completions) == 6
    assert joined.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert joined.response_length.tolist() == a.response_length.tolist() + b.response_length.tolist()
    assert torch.equal(joined.response_mask.sum(1), joined.response_length.float())
    ours = response_stats(model, joined.input_ids, joined.attention_mask, joined.prompt_length, joined.response_mask)
    for rows, part in ((slice(0, 2), a), (slice(2, 6), b)):
        width = part.response_mask.shape[1]
        alone = response_stats(model, part.input_ids, part.attention_mask, part.prompt_length, part.response_mask)
        for key in ("logp", "entropy", "exact_term"):
            torch.testing.assert_close(ours[key][rows, :width], alone[key], atol=1e-5, rtol=1e-5)
            assert (ours[key][rows, width:] == 0).all()
        pads = joined.attention_mask[rows] == 0
        assert (joined.input_ids[rows][pads] == PAD).all()
        assert joined.attention_mask[rows].sum() == part.attention_mask.sum()


def test_response_stats_validates_shapes(model, sampled):
    _, ro = sampled
    with pytest.raises(ValueError, match="response_mask"):
        response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask[:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        response_stats(model, ro.input_ids, ro.attention_mask[:, 1:], ro.prompt_length, ro.response_mask)
    with pytest.raises(ValueError, match="temperature"):
        response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask, temperature=0)
    assert rollout.Rollout.__dataclass_fields__.keys() == {
        "input_ids", "attention_mask", "response_mask", "prompt_length", "completions", "truncated",
        "prompt_index", "response_length"}


# ---------------------------------------------------- the real Qwen2.5 tokenizer, chat template and configuration




QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."






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


def test_real_vocabulary_special_tokens_and_configuration(qwen_tok, qwen_model, qwen_files):
    from transformers import GenerationConfig
    assert qwen_model.config.vocab_size == VOCAB and not qwen_model.config.tie_word_embeddings
    assert qwen_model.get_input_embeddings().weight.shape == (VOCAB, 64)
    assert qwen_model.get_output_embeddings().weight.shape == (VOCAB, 64)
    assert qwen_model.config.num_hidden_layers == 2 and type(qwen_model).__name__ == "Qwen2ForCausalLM"
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT, IM_START, IM_END]
    assert (qwen_tok.eos_token_id, qwen_tok.pad_token_id) == (IM_END, ENDOFTEXT)
    assert GenerationConfig.from_pretrained(qwen_files).eos_token_id == IM_END
    assert qwen_tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == [IM_START, 872, 198, 6023,
                                                                                             IM_END]
    assert rollout.end_of_turn_id(qwen_tok) == IM_END
    assert rollout.stop_token_ids(qwen_model, qwen_tok) == [IM_END]


def test_format_prompt_with_the_real_chat_template(qwen_tok):
    text = format_prompt(qwen_tok, PROBLEMS[0])
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # an empty system prompt omits our message; Qwen's template then writes its own default one
    assert format_prompt(qwen_tok, PROBLEMS[0], system_prompt="").startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}")
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 35 and ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    assert ids[-3:] == [IM_START, 77091, 198]                       # "<|im_start|>", "assistant", "\n"


def test_generate_with_the_real_tokenizer(chatty, qwen_tok, monkeypatch):
    calls = spy_generate(chatty, monkeypatch)
    prompts = [format_prompt(qwen_tok, p) for p in PROBLEMS]
    torch.manual_seed(0)
    ro = generate(chatty, qwen_tok, prompts, group_size=4, max_new_tokens=8)
    (kw, raw), = calls
    assert kw["eos_token_id"] == [IM_END] and kw["pad_token_id"] == ENDOFTEXT and kw["top_k"] == 0
    lengths = [len(qwen_tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    p_len = max(lengths)
    assert ro.prompt_length == p_len and lengths[0] < p_len
    for g, n in enumerate(lengths):                                 # left-padded with <|endoftext|>
        rows = slice(4 * g, 4 * g + 4)
        assert (ro.input_ids[rows, :p_len - n] == ENDOFTEXT).all() and (ro.attention_mask[rows, :p_len - n] == 0).all()
        prompt_ids = torch.tensor(qwen_tok(prompts[g], add_special_tokens=False)["input_ids"])
        assert (ro.input_ids[rows, p_len - n:p_len] == prompt_ids).all()
        assert (ro.input_ids[rows, p_len - n] == IM_START).all()
    finished, truncated = check_stops_at_first(ro, raw, IM_END, ENDOFTEXT)
    assert finished >= 2 and truncated >= 1, (finished, truncated)
    assert int(ro.input_ids.max()) < VOCAB
    for i, c in enumerate(ro.completions):
        n = int(ro.response_length[i])
        assert c == qwen_tok.decode(ro.input_ids[i, p_len:p_len + n], skip_special_tokens=True) and "<|im_end|>" not in c


def test_end_of_turn_stops_a_base_checkpoint(chatty, qwen_base_tok, monkeypatch):
    """EOS = <|endoftext|> in the tokenizer and the generation config (Qwen2.5-Math-1.5B's set-up): the chat
    template's <|im_end|> must still stop generation and close the response mask."""
    monkeypatch.setattr(chatty.generation_config, "eos_token_id", ENDOFTEXT)
    assert qwen_base_tok.eos_token_id == ENDOFTEXT
    assert rollout.stop_token_ids(chatty, qwen_base_tok) == [ENDOFTEXT, IM_END]
    calls = spy_generate(chatty, monkeypatch)
    torch.manual_seed(1)
    ro = generate(chatty, qwen_base_tok, [format_prompt(qwen_base_tok, p) for p in PROBLEMS], group_size=4, max_new_tokens=8)
    assert IM_END in calls[0][0]["eos_token_id"]
    finished, _ = check_stops_at_first(ro, calls[0][1], IM_END, ENDOFTEXT)
    assert finished >= 4
    assert all(r == qwen_base_tok.decode(ro.input_ids[i, ro.prompt_length:ro.prompt_length + int(n) - 1])
               for i, (r, n) in enumerate(zip(ro.completions, ro.response_length)) if not ro.truncated[i])

    # the same tokenizer without its chat template: <|im_end|> is no stop token, and responses run past it
    plain = copy.copy(qwen_base_tok)
    plain.chat_template = None
    assert rollout.end_of_turn_id(plain) is None and rollout.stop_token_ids(chatty, plain) == [ENDOFTEXT]
    torch.manual_seed(1)
    ro = generate(chatty, plain, [format_prompt(plain, p) for p in PROBLEMS], group_size=4, max_new_tokens=8)
    inside = ro.input_ids[:, ro.prompt_length:][ro.response_mask.bool()]
    assert int((inside == IM_END).sum()) >= 4


def test_favour_token_sets_the_probability(chatty, qwen_model, qwen_tok):
    ids = torch.tensor([qwen_tok(format_prompt(qwen_tok, PROBLEMS[0]), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        p = chatty(input_ids=ids).logits.softmax(-1)[0, :, IM_END]
        p0 = qwen_model(input_ids=ids).logits.softmax(-1)[0, :, IM_END]
    assert 0.12 < float(p.min()) and float(p.max()) < 0.3, p
    assert float(p0.max()) < 1e-4                                    # the plain random qwen_model: ~1 / 151,936


def test_response_stats_over_the_real_vocabulary(qwen_model, chatty, qwen_tok):
    torch.manual_seed(2)
    ro = generate(chatty, qwen_tok, [format_prompt(qwen_tok, p) for p in PROBLEMS], group_size=2, max_new_tokens=6)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask)
    stats = response_stats(qwen_model, *args, temperature=0.7)
    pos = (ro.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = qwen_model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    lp = (logits[:, ro.prompt_length - 1:-1].double() / 0.7).log_softmax(-1)             # float64 reference
    p = lp.exp()
    h = -(p * lp).sum(-1)
    ref = {"logp": lp.gather(-1, ro.input_ids[:, ro.prompt_length:, None]).squeeze(-1), "entropy": h,
           "exact_term": (p * p * (lp + h[..., None])).sum(-1)}
    m = ro.response_mask.bool()
    for key, tol in (("logp", 1e-4), ("entropy", 1e-4), ("exact_term", 1e-9)):
        torch.testing.assert_close(stats[key][m].double(), ref[key][m], atol=tol, rtol=1e-5)
        assert (stats[key][~m] == 0).all()
    # a random qwen_model is close to uniform over the 151,936 tokens: H just below log V = 11.93
    assert (stats["entropy"][m] > 11.0).all() and (stats["entropy"][m] < math.log(VOCAB)).all()
    assert (stats["logp"][m] < -9).all()
    grad = response_stats(qwen_model, *args, temperature=0.7, with_grad=True, with_entropy=False)["logp"]
    torch.testing.assert_close(grad.detach(), stats["logp"], atol=1e-5, rtol=1e-5)
    qwen_model.zero_grad()
    grad.sum().backward()
    head = qwen_model.get_output_embeddings().weight.grad
    sampled = ro.input_ids[:, ro.prompt_length:][m].unique()
    assert (head[sampled].abs().sum(1) > 0).all()
    qwen_model.zero_grad()
