"""Throughput of one train.py RL step, phase by phase, with no download (issue 7).

A randomly initialised Qwen2 built from the Qwen2.5-Math-1.5B configuration (--size full: hidden 1536,
28 layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151,936) or a few-layer model with the same
vocabulary (--size small, the default without CUDA), fixed-length generations (min_new_tokens =
max_new_tokens, so every run generates the same number of tokens), and the phases of train.rl_step:

    generate  rollout.generate, against a bare model.generate on the same prompts in the same run
              (the loop's overhead should stay under 10%); best of 3 alternating runs each
    score     verifier.score on every completion
    stats     rollout.response_stats without gradient (old log-probs, entropy, exact term)
    update    train.update: the chosen loss over the mini-batches with micro-batch gradient accumulation,
              clipping and AdamW steps; its model FLOP utilisation (MFU) is taken against the bf16 (fp32 on
              CPU) matrix-multiply rate measured on the same device in the same run.

Model FLOPs of the update: 3 x forward (backward = 2 x forward), forward = 2 x (non-embedding weights) per
token over prompt + response, + 2 x hidden x vocab per response token (only those reach the lm_head), +
the causal attention products 2 x 2 x layers x hidden x T^2 / 2 per sequence. Activation recomputation of
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs). Precision follows train.py: float32
master weights with bf16 autocast on CUDA.

Run:
    python bench_train.py                         # CPU: --size small
    python bench_train.py --size full             # one GPU: 8 prompts x 8 samples x 1024 new tokens
"""
import argparse
import contextlib
import resource
import time

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import rollout
import train
import verifier

SIZES = {
    "full": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151_936, tie_word_embeddings=True,
                 max_position_embeddings=4096),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=151_936, tie_word_embeddings=True,
                  max_position_embeddings=4096),
}
REPEATS = 3       # generate and bare generate: best of this many alternating runs
RUN_DEFAULTS = {  # prompts, group size, prompt tokens, new tokens, micro-batch size
    "full": dict(prompts=8, group_size=8, prompt_len=128, new_tokens=1024, micro_batch_size=8),
    "small": dict(prompts=2, group_size=4, prompt_len=32, new_tokens=32, micro_batch_size=8),
}


def number_tokenizer(vocab_size):
    """A word-level tokenizer whose token i is "<i>" (whitespace separated): any id decodes, none is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<2>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<0>", eos_token="<1>", unk_token="<2>",
                                   clean_up_tokenization_spaces=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device):
    """Peak memory since the last reset: CUDA allocator peak, or (CPU) the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(device, fn):
    """(result, seconds, peak MB) of fn()."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, peak_mb(device)


def matmul_rate(device, dtype):
    """Measured dense matmul FLOP/s (best of 5) at n = 8192 on CUDA, 1024 on CPU."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def update_flops(config, rows, prompt_len, response_len):
    """Model FLOPs of forward + backward over `rows` sequences (see the module docstring)."""
    d, layers, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size       # q, o, k, v, gate/up/down
    t = prompt_len + response_len
    forward = rows * (2 * layers * per_layer * t + 2 * d * v * response_len + 2 * layers * d * t * t)
    return 3 * forward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), help="model size (default: full on CUDA, small on CPU)")
    p.add_argument("--algo", choices=train.ALGOS, default="grpo", help="loss of the update phase")
    p.add_argument("--prompts", type=int, help="prompts per step")
    p.add_argument("--group-size", type=int, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, help="generated tokens per sample (fixed length)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing in the update")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.type == "cuda" else "small")
    run = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in RUN_DEFAULTS[size].items()}
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    torch.manual_seed(0)
    config = Qwen2Config(**SIZES[size], pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tok = number_tokenizer(config.vocab_size)
    n_new = run["new_tokens"]
    model.generation_config.update(min_new_tokens=n_new, pad_token_id=0, eos_token_id=1)  # fixed length
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"<{i}>" for i in torch.randint(3, config.vocab_size, (run["prompt_len"],), generator=g).tolist())
               for _ in range(run["prompts"])]
    n_seq = run["prompts"] * run["group_size"]
    rate = matmul_rate(device, torch.bfloat16 if bf16 else torch.float32)
    model.eval()

    def gen():
        with torch.no_grad(), autocast():
            return rollout.generate(model, tok, prompts, group_size=run["group_size"], max_new_tokens=n_new)
    gen()                                                                     # warm-up (kernels, allocator)
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids = enc["input_ids"].repeat_interleave(run["group_size"], 0).to(device)
    att = enc["attention_mask"].repeat_interleave(run["group_size"], 0).to(device)

    def bare():
        with torch.no_grad(), autocast():
            return model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0,
                                  eos_token_id=1)
    # alternate the two and keep the best of REPEATS each, so that neither benefits from running second
    gen_runs, bare_runs = [], []
    for _ in range(REPEATS):
        gen_runs.append(timed(device, gen))
        bare_runs.append(timed(device, bare))
    ro, t_gen, m_gen = min(gen_runs, key=lambda r: r[1])
    _, t_bare, m_bare = min(bare_runs, key=lambda r: r[1])
    gen_tokens = int(ro.response_mask.sum())

    _, t_score, m_score = timed(device, lambda: [verifier.score(c, "0") for c in ro.completions])
    cfg = dict(algo=args.algo, group_size=run["group_size"], updates_per_batch=2, micro_batch_size=run["micro_batch_size"],
               max_grad_norm=1.0, measure_entropy_change=False, temperature=1.0, max_new_tokens=n_new)
    cfg.update({k: None for k in train.LOSS_KNOBS})
    if args.algo == "archer":
        cfg["kl_knowledge"] = 0.0          # no reference model in the benchmark

    def stats_fn(b, with_grad=False, with_entropy=True):
        with torch.set_grad_enabled(with_grad), autocast():
            return rollout.response_stats(model, b["input_ids"], b["attention_mask"], b["prompt_length"], b["mask"],
                                          with_grad=with_grad, with_entropy=with_entropy,
                                          micro_batch_size=run["micro_batch_size"])
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
             "prompt_length": ro.prompt_length}
    old, t_stats, m_stats = timed(device, lambda: stats_fn(batch))
    batch.update(old_logp=old["logp"], entropy=old["entropy"], exact_term=old["exact_term"],
                 advantages=torch.randn(n_seq, generator=g).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    out, t_upd, m_upd = timed(device, lambda: train.update(model, optimizer, batch, cfg, stats_fn))
    flops = update_flops(config, n_seq, ro.prompt_length, ro.input_ids.shape[1] - ro.prompt_length)
    total_tokens = n_seq * ro.input_ids.shape[1]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    params = sum(q.numel() for q in model.parameters()) / 1e6
    print(f"device {name}, size {size} ({params:.0f}M parameters), {run['prompts']} prompts x "
          f"{run['group_size']} samples, prompt {ro.prompt_length} + {n_new} new tokens, algo {args.algo}, "
          f"{'bf16 autocast' if bf16 else 'float32'}, gradient checkpointing {args.gradient_checkpointing}")
    print(f"{'phase':<16}{'seconds':>10}{'tokens/s':>12}{'peak MB':>10}")
    for label, sec, tokens, mem in (("generate", t_gen, gen_tokens, m_gen),
                                    ("bare generate", t_bare, gen_tokens, m_bare),
                                    ("score", t_score, gen_tokens, m_score),
                                    ("stats", t_stats, total_tokens, m_stats),
                                    ("update", t_upd, total_tokens, m_upd)):
        print(f"{label:<16}{sec:>10.3f}{tokens / sec:>12.0f}{mem:>10.0f}")
    print(f"generate overhead over bare model.generate: {100 * (t_gen / t_bare - 1):+.1f}%")
    print(f"update: {out['updates']} optimizer steps, {flops / 1e12:.3f} model TFLOP, {flops / t_upd / 1e12:.2f} TFLOP/s; "
          f"matmul rate {rate / 1e12:.2f} TFLOP/s -> MFU {100 * flops / t_upd / rate:.1f}%")
    if device.type == "cpu":
        print("(CPU: peak MB is the process's peak resident set so far, not per phase)")


if __name__ == "__main__":
    main()
