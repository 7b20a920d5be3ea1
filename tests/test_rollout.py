"""Tests for rollout.py on a tiny randomly initialised Qwen2 (and a tiny GPT-2 for absolute positions)
with a character-level tokenizer built in code; offline, CPU, budget ~40 s for the whole file."""
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import rollout
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
