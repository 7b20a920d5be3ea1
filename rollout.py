"""Rollouts for RL with verifiable rewards: prompt formatting, grouped sampling and per-token statistics.

What it does
- `format_prompt` turns a math problem into the text the policy sees: the tokenizer's chat template
  (system + user message, generation prompt appended) when it has one, a plain "Question: / Answer:"
  template otherwise.
- `generate` samples G responses per prompt with `model.generate` (the group of GRPO, DeepSeekMath
  arXiv 2402.03300 section 4.1; the same group sampling is used by DAPO, Dr. GRPO, STEER, OPEFO and Archer)
  and returns a `Rollout` with the token ids, the masks, the decoded completions and a truncated flag.
  A response ends at the first stop token (`stop_token_ids`): the EOS ids of the tokenizer and of the
  model's generation config and, with a chat template, the template's end-of-turn token (`end_of_turn_id`).
- `concat_rollouts` joins rollouts of different widths into one (re-padded; DAPO's dynamic sampling draws
  several rounds per step).
- `response_stats` computes, for the response tokens only, the log-probabilities log pi(o_t | s_t) that the
  ratios r_t of every loss need, the full-vocabulary entropy H(s_t) (with its gradient when asked, for an
  entropy bonus) and the extra term sum_b pi_b^2 (log pi_b + H) of the exact first-order entropy change
  (entropy_math.dh_exact), which STEER (arXiv 2510.10150, section 3), OPEFO (arXiv 2605.11491) and Archer
  (arXiv 2507.15778, token classification by entropy) use.

Memory: logits are never formed for the prompt. The decoder backbone gives the last hidden states
(N, P+R, D); only the R positions P-1 .. P+R-2 (the ones that predict response tokens) go through the
lm_head, and the log-softmax / entropy reductions over the vocabulary are the chunked ones of logprobs.py.

Use:
    from rollout import format_prompt, generate, response_stats
    prompts = [format_prompt(tok, problem) for problem in problems]
    ro = generate(model, tok, prompts, group_size=8, max_new_tokens=1024, temperature=1.0)
    stats = response_stats(model, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask)
"""
from dataclasses import dataclass

import torch

import logprobs

DEFAULT_SYSTEM_PROMPT = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)


@dataclass
class Rollout:
    """G sampled responses for each of B prompts; N = B * G rows, samples of prompt g in rows g*G .. g*G+G-1.

    "EOS" below is any id of stop_token_ids: the EOS ids and the chat template's end-of-turn token.
    input_ids (N, P+R) long: left-padded prompt followed by the response, right-padded with the pad id
        (every token after a row's first EOS is the pad id).
    attention_mask (N, P+R) long: 1 on real prompt tokens and on response tokens up to and including EOS.
    response_mask (N, R) float: 1 on response tokens up to and including the first EOS.
    prompt_length: P, the padded prompt width (response token j of a row sits at column P + j).
    completions: N decoded responses (special tokens skipped).
    truncated (N,) bool: no EOS within max_new_tokens.
    prompt_index (N,) long: index into the list of prompts.
    response_length (N,) long: number of response tokens including the EOS (= response_mask.sum(1)).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int
    completions: list
    truncated: torch.Tensor
    prompt_index: torch.Tensor
    response_length: torch.Tensor


def format_prompt(tokenizer, problem, *, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """Text of the prompt for one problem.

    With a chat template (tokenizer.chat_template set): a system message (omitted when system_prompt is
    empty; the template may then write its own default, as Qwen2.5's does: "You are Qwen, created by Alibaba
    Cloud. You are a helpful assistant.") and a user message holding the problem, rendered with
    add_generation_prompt=True.
    Without one: "{system_prompt}\\n\\nQuestion: {problem}\\nAnswer:" (the first part omitted when empty).
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"format_prompt: problem must be a non-empty string, got {problem!r}")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": problem})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}Question: {problem}\nAnswer:"


_PROBE = "ROLLOUTPROBE"     # assistant content whose rendering shows what the template writes after it


def end_of_turn_id(tokenizer):
    """Id of the special token the chat template closes an assistant turn with, or None.

    Renders one user + assistant exchange whose assistant content is a probe string and tokenizes what
    follows the probe (leading whitespace dropped); its first token counts when it is a special added token
    (<|im_end|> for Qwen2.5, <|eot_id|> for Llama 3, <end_of_turn> for Gemma). None without a chat template,
    when the template drops assistant messages or cannot render them, or when plain text follows.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:
        return None
    _, found, tail = text.partition(_PROBE)
    ids = tokenizer(tail.lstrip(), add_special_tokens=False)["input_ids"] if found and tail.strip() else []
    added = tokenizer.added_tokens_decoder.get(ids[0]) if ids else None
    return ids[0] if added is not None and added.special else None


def stop_token_ids(model, tokenizer):
    """Sorted ids that end a response: the tokenizer's EOS, the model's generation_config EOS ids and, when
    the tokenizer has a chat template, the template's end-of-turn token (end_of_turn_id). Base checkpoints
    such as Qwen2.5-Math-1.5B declare <|endoftext|> as their EOS in both places while the Qwen chat
    template ends the assistant turn with <|im_end|>; without the last source their responses would run on
    past the end of the turn."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   end_of_turn_id(tokenizer)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    if not ids:
        raise ValueError("generate: the tokenizer has no eos_token and the model's generation_config no eos_token_id")
    return sorted(ids)


def generate(model, tokenizer, prompts, *, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
             max_batch_sequences=None):
    """Sample group_size responses for every prompt text; returns a Rollout (shapes in its docstring).

    prompts: list of prompt strings (already formatted, e.g. by format_prompt). They are tokenized without
    adding special tokens when the tokenizer has a chat template (the template wrote them), with them otherwise.
    temperature > 0 samples from softmax(logits / temperature) restricted to the top_p nucleus;
    temperature == 0 is greedy decoding (top_p ignored). Every other logits processor that a checkpoint's
    generation_config may switch on (top_k, repetition penalty, typical_p, min_p) is set to neutral, so the
    sampling distribution is the one response_stats scores (up to the top_p truncation).
    max_batch_sequences: at most this many sequences per model.generate call (default: all N at once).
    Generation stops at, and the response mask closes on, the first of stop_token_ids(model, tokenizer).
    Sampling draws from torch's global RNG; seed it for reproducibility. Runs on the model's device.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"generate: prompts[{i}] must be a non-empty string, got {p!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"generate: group_size must be a positive int, got {group_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if max_batch_sequences is not None and (not isinstance(max_batch_sequences, int) or max_batch_sequences < 1):
        raise ValueError(f"generate: max_batch_sequences must be a positive int or None, got {max_batch_sequences!r}")

    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device

    # left padding by hand, so a tokenizer without a pad token works and its padding_side is left alone
    token_lists = tokenizer(list(prompts), add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    for i, toks in enumerate(token_lists):
        if not toks:
            raise ValueError(f"generate: prompts[{i}] tokenizes to zero tokens")
    p_len = max(len(toks) for toks in token_lists)
    ids = torch.full((len(prompts), p_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), p_len), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        ids[i, p_len - len(toks):] = torch.tensor(toks, dtype=torch.long)
        mask[i, p_len - len(toks):] = 1
    # rows g*G .. g*G+G-1 hold prompt g
    prompt_ids = ids.repeat_interleave(group_size, dim=0)
    prompt_mask = mask.repeat_interleave(group_size, dim=0)
    n = prompt_ids.shape[0]

    if temperature == 0:
        sampling = dict(do_sample=False)
    else:
        sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0,
                        min_p=0.0, typical_p=1.0)
    step = max_batch_sequences or n
    pieces = []
    for start in range(0, n, step):
        out = model.generate(
            input_ids=prompt_ids[start:start + step].to(device), attention_mask=prompt_mask[start:start + step].to(device),
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids,
            repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True, **sampling,
        )
        pieces.append(out[:, p_len:].cpu())
    width = max(piece.shape[1] for piece in pieces)        # calls that all hit EOS early return fewer columns
    response = torch.full((n, width), pad_id, dtype=torch.long)
    row = 0
    for piece in pieces:
        response[row:row + piece.shape[0], :piece.shape[1]] = piece
        row += piece.shape[0]

    # first EOS of each row; everything after it is masked and set to the pad id
    is_eos = torch.isin(response, torch.tensor(eos_ids))
    has_eos = is_eos.any(dim=1)
    response_length = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, torch.full((n,), width))
    keep = torch.arange(width).unsqueeze(0) < response_length.unsqueeze(1)           # (N, R)
    response = torch.where(keep, response, torch.full_like(response, pad_id))
    r_len = max(int(response_length.max()), 1)
    response, keep = response[:, :r_len], keep[:, :r_len]

    completions = tokenizer.batch_decode([response[i, :response_length[i]].tolist() for i in range(n)],
                                         skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response], dim=1).to(device),
        attention_mask=torch.cat([prompt_mask.long(), keep.long()], dim=1).to(device),
        response_mask=keep.float().to(device),
        prompt_length=p_len,
        completions=completions,
        truncated=(~has_eos).to(device),
        prompt_index=torch.arange(len(prompts)).repeat_interleave(group_size).to(device),
        response_length=response_length.to(device),
    )


def concat_rollouts(parts, pad_id):
    """One Rollout from a list of Rollouts (rows in order), re-padded to the widest prompt and response.

    Each part's prompt block is left-padded and its response block right-padded with pad_id (attention
    and response mask 0 there), so every row keeps its tokens and, through position_ids = cumsum of the
    attention mask (response_stats), its positions; prompt_index of part k is offset by the number of
    prompts of the parts before it (max prompt_index + 1). A single part is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    p_max = max(ro.prompt_length for ro in parts)
    r_max = max(ro.response_mask.shape[1] for ro in parts)
    pad = torch.nn.functional.pad
    ids, att, resp, index, offset = [], [], [], [], 0
    for ro in parts:
        p, left, right = ro.prompt_length, p_max - ro.prompt_length, r_max - ro.response_mask.shape[1]
        ids.append(torch.cat([pad(ro.input_ids[:, :p], (left, 0), value=pad_id),
                              pad(ro.input_ids[:, p:], (0, right), value=pad_id)], 1))
        att.append(torch.cat([pad(ro.attention_mask[:, :p], (left, 0)), pad(ro.attention_mask[:, p:], (0, right))], 1))
        resp.append(pad(ro.response_mask, (0, right)))
        index.append(ro.prompt_index + offset)
        offset += int(ro.prompt_index.max()) + 1 if ro.prompt_index.numel() else 0
    return Rollout(input_ids=torch.cat(ids), attention_mask=torch.cat(att), response_mask=torch.cat(resp),
                   prompt_length=p_max, completions=[c for ro in parts for c in ro.completions],
                   truncated=torch.cat([ro.truncated for ro in parts]), prompt_index=torch.cat(index),
                   response_length=torch.cat([ro.response_length for ro in parts]))


def response_stats(model, input_ids, attention_mask, prompt_length, response_mask, *, temperature=1.0,
                   with_grad=False, with_entropy=True, chunk_size=None, micro_batch_size=None):
    """Per-token statistics of the response part of a batch under the temperature-scaled policy.

    input_ids, attention_mask (N, P+R); response_mask (N, R); prompt_length = P.
    Returns {"logp": (N, R)} (log pi(o_t | s_t), with gradient iff with_grad) and, when with_entropy,
    "entropy" (N, R) = H(s_t) (with gradient iff with_grad: the current policy's entropy that an entropy
    bonus differentiates) and "exact_term" (N, R) = sum_b pi_b^2 (log pi_b + H) (never with gradient);
    all are 0 where response_mask is 0.
    The backbone runs with position_ids = cumsum(attention_mask) - 1 (clamped at 0), so left padding does
    not move a sample's positions; hidden states at P-1 .. P+R-2 go through the lm_head, the logits are
    divided by temperature in place (in the model's dtype; logprobs.py upcasts chunk by chunk), and logprobs.py
    reduces over the vocabulary in chunks of chunk_size positions (None: its default working set):
    token_stats (one pass for logp, H and S2) without gradient; with it, token_logprobs, or
    token_logprobs_entropy (logp and H, one pass forward and one backward) plus token_entropy for S2.
    micro_batch_size splits the N rows into forward passes of at most that many rows (bounds activation
    memory, mainly useful with with_grad=False).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"response_stats: input_ids must be (N, P+R), got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"response_stats: attention_mask shape {tuple(attention_mask.shape)} != "
                         f"input_ids shape {tuple(input_ids.shape)}")
    n, total = input_ids.shape
    if not isinstance(prompt_length, int) or not 1 <= prompt_length < total:
        raise ValueError(f"response_stats: prompt_length must be an int in [1, {total - 1}], got {prompt_length!r}")
    r_len = total - prompt_length
    if tuple(response_mask.shape) != (n, r_len):
        raise ValueError(f"response_stats: response_mask must be (N, R) = {(n, r_len)}, "
                         f"got {tuple(response_mask.shape)}")
    if temperature <= 0:
        raise ValueError(f"response_stats: temperature must be > 0 (score greedy samples at 1.0), got {temperature}")
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
        raise ValueError(f"response_stats: micro_batch_size must be a positive int or None, got {micro_batch_size!r}")

    backbone = model.base_model                 # the decoder stack without the lm_head
    lm_head = model.get_output_embeddings()
    device = next(model.parameters()).device
    valid = response_mask.to(device).bool()
    step = micro_batch_size or n
    logps, entropies, exact_terms = [], [], []
    for start in range(0, n, step):
        ids = input_ids[start:start + step].to(device)
        mask = attention_mask[start:start + step].to(device).long()
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.set_grad_enabled(with_grad):
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state                      # (n, P+R, D)
            # position t predicts token t+1: response token j (column P+j) comes from position P-1+j
            logits = lm_head(hidden[:, prompt_length - 1:total - 1])                    # (n, R, V)
            if temperature != 1.0:
                logits.div_(temperature)      # in place: no second (n, R, V) tensor (linear keeps no output)
            targets = ids[:, prompt_length:]
            if with_entropy and not with_grad:      # behaviour-policy statistics: one pass over the logits
                lp, ent, ex = logprobs.token_stats(logits, targets, chunk_size=chunk_size)
            elif with_entropy:                      # the current policy's H with its gradient (entropy bonus)
                lp, ent = logprobs.token_logprobs_entropy(logits, targets, chunk_size=chunk_size)
                ex = logprobs.token_entropy(logits.detach(), exact_term=True, chunk_size=chunk_size)[1]
            else:
                lp = logprobs.token_logprobs(logits, targets, chunk_size=chunk_size)
        logps.append(lp)
        if with_entropy:
            entropies.append(ent)
            exact_terms.append(ex)
        del hidden, logits

    zero = torch.zeros((), device=device)
    out = {"logp": torch.where(valid, torch.cat(logps), zero)}
    if with_entropy:
        out["entropy"] = torch.where(valid, torch.cat(entropies), zero)
        out["exact_term"] = torch.where(valid, torch.cat(exact_terms), zero)
    return out
