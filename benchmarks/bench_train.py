"""Throughput of one train.py RL step, phase by phase, with no download; and a GPU check around it.

The benchmark: a randomly initialised Qwen2 built from the Qwen2.5-Math-1.5B configuration (--size full:
hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151,936) or a few-layer model
with the same vocabulary (--size small, the default without CUDA; --size toy, 2 layers of hidden 64, is
the one of --gpu-check --dry-run), fixed-length generations (min_new_tokens = max_new_tokens, so every run
generates the same number of tokens), and the phases of train.rl_step:

    generate  rollout.generate, against a bare model.generate on the same prompts in the same run
              (the loop's overhead should stay under 10%); best of --repeats alternating runs each
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

The GPU check (--gpu-check; one CUDA GPU, no download; estimated at 4-6 minutes on an H100 / H200, within
a budget of 8, not yet measured) runs
    1. the benchmark at --size full (one run of each generate variant);
    2. three train.py steps (train.main) of a random-weight model with the real Qwen2.5-0.5B configuration
       and tokenizer, bf16 autocast and gradient checkpointing, 8 prompts x 8 samples x 512 new tokens,
       micro-batch 8: Archer with all groups kept, because a random model's rewards are all 0 and so are
       its advantages; Archer's knowledge-token KL keeps every row in the update and adds the frozen
       reference's pass to the stats phase (the run's final checkpoint, about 7.5 GB with the optimizer
       state, is written to a temporary folder and deleted);
    3. the end of turn: with that tokenizer, EOS set to <|endoftext|> in the tokenizer and the generation
       config (a base checkpoint's set-up) and the model made to emit <|im_end|> often (favour_token),
       every finished response must end at its first <|im_end|>, the chat template's end of turn;
and writes one JSON (--json) with the GPU's name, per-phase tokens/s, peak memory and update MFU of 1 and
2, and the verdict of 3 ("ok" is true when every part passed). The configuration and tokenizer are read from
.cache/models/qwen2.5-0.5b-instruct, which is refreshed from ../shared/models/qwen2.5-0.5b-instruct when
that folder exists: only the repository travels to a GPU machine, and .cache is git-ignored, so carry it.
--dry-run runs the same path at toy sizes (a 2-layer, hidden-64 cut of the configuration with the real
151,936-token vocabulary) in seconds on CPU; the test suite runs it.

Run:
    python benchmarks/bench_train.py              # CPU: --size small
    python benchmarks/bench_train.py --size full  # one GPU: 8 prompts x 8 samples x 1024 new tokens
    python benchmarks/bench_train.py --gpu-check  # one GPU: the three parts above -> runs/gpu_check.json
    python benchmarks/bench_train.py --gpu-check --dry-run  # the same code path at toy sizes, seconds on CPU
"""
import argparse
import contextlib
import gc
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository: its modules are imported from there
sys.path.insert(0, str(ROOT))

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import config
import rollout
import run_dir
import train
import verifier

SIZES = {
    "full": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151_936, tie_word_embeddings=True,
                 max_position_embeddings=4096),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=151_936, tie_word_embeddings=True,
                  max_position_embeddings=4096),
    "toy": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=512),
}
RUN_DEFAULTS = {  # prompts, group size, prompt tokens, new tokens, micro-batch size
    "full": dict(prompts=8, group_size=8, prompt_len=128, new_tokens=1024, micro_batch_size=8),
    "small": dict(prompts=2, group_size=4, prompt_len=32, new_tokens=32, micro_batch_size=8),
    "toy": dict(prompts=1, group_size=2, prompt_len=8, new_tokens=4, micro_batch_size=2),
}
QWEN_NAME = "qwen2.5-0.5b-instruct"
SHARED_QWEN = ROOT.parent / "shared" / "models" / QWEN_NAME
LOCAL_QWEN = ROOT / ".cache" / "models" / QWEN_NAME
# the toy cut of the real configuration (--dry-run and the tests): real vocabulary and special tokens
TOY_QWEN = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128)
GPU_CHECK = {     # per part: the real settings and the --dry-run ones
    "bench": dict(real=dict(size="full", repeats=1, **RUN_DEFAULTS["full"]),
                  dry=dict(size="toy", repeats=1, **RUN_DEFAULTS["toy"])),
    "train": dict(real=dict(steps=3, prompts=8, group_size=8, new_tokens=512, micro_batch_size=8),
                  dry=dict(steps=3, prompts=2, group_size=2, new_tokens=6, micro_batch_size=2)),
    "end_of_turn": dict(real=dict(prompts=4, group_size=8, new_tokens=48, prob=0.1),
                        dry=dict(prompts=2, group_size=4, new_tokens=16, prob=0.25)),
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


def release_memory(device):
    """Return freed tensors' memory (the next part's peak figures start from what is really in use)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device, fn):
    """(result, seconds, peak MB) of fn()."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, run_dir.peak_mem_mb(device)


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


def update_flops(arch, rows, prompt_len, response_len):
    """Model FLOPs of forward + backward over `rows` sequences (see the module docstring)."""
    d, layers, v = arch.hidden_size, arch.num_hidden_layers, arch.vocab_size
    kv = d * arch.num_key_value_heads // arch.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * arch.intermediate_size       # q, o, k, v, gate/up/down
    t = prompt_len + response_len
    forward = rows * (2 * layers * per_layer * t + 2 * d * v * response_len + 2 * layers * d * t * t)
    return 3 * forward


def run_bench(device, size, *, prompts, group_size, prompt_len, new_tokens, micro_batch_size, algo="grpo",
              gradient_checkpointing=True, repeats=3):
    """The benchmark of the module docstring on `device`; returns its figures as a dict (print_bench shows it).

    Phases: generate, bare_generate, score, stats, update, each {seconds, tokens, tokens_per_s, peak_mb}
    (tokens: generated ones for the first three, prompt + response positions of all rows for the others).
    """
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    torch.manual_seed(0)
    arch = Qwen2Config(**SIZES[size], pad_token_id=0, eos_token_id=1, bos_token_id=1)
    with torch.device(device):                          # initialised in place: seconds for 1.5B on a GPU
        model = Qwen2ForCausalLM._from_config(arch, attn_implementation="sdpa")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tok = number_tokenizer(arch.vocab_size)
    model.generation_config.update(min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=1)  # fixed length
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"<{i}>" for i in torch.randint(3, arch.vocab_size, (prompt_len,), generator=g).tolist())
             for _ in range(prompts)]
    n_seq = prompts * group_size
    rate = matmul_rate(device, torch.bfloat16 if bf16 else torch.float32)
    model.eval()

    def gen():
        with torch.no_grad(), autocast():
            return rollout.generate(model, tok, texts, group_size=group_size, max_new_tokens=new_tokens)
    gen()                                                                     # warm-up (kernels, allocator)
    enc = tok(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(device)
    att = enc["attention_mask"].repeat_interleave(group_size, 0).to(device)

    def bare():
        with torch.no_grad(), autocast():
            return model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  pad_token_id=0, eos_token_id=1)
    # alternate the two and keep the best of `repeats` each, so that neither benefits from running second
    gen_runs, bare_runs = [], []
    for _ in range(repeats):
        gen_runs.append(timed(device, gen))
        bare_runs.append(timed(device, bare))
    ro, t_gen, m_gen = min(gen_runs, key=lambda r: r[1])
    _, t_bare, m_bare = min(bare_runs, key=lambda r: r[1])
    gen_tokens = int(ro.response_mask.sum())

    _, t_score, m_score = timed(device, lambda: [verifier.score(c, "0") for c in ro.completions])
    cfg = dict(algo=algo, group_size=group_size, updates_per_batch=2, micro_batch_size=micro_batch_size,
               max_grad_norm=1.0, measure_entropy_change=False, temperature=1.0, max_new_tokens=new_tokens)
    cfg.update({k: None for k in config.KNOB_FLAGS})
    if algo == "archer":
        cfg["kl_knowledge"] = 0.0          # no reference model in the benchmark

    def stats_fn(b, with_grad=False, with_entropy=True):
        with torch.set_grad_enabled(with_grad), autocast():
            return rollout.response_stats(model, b["input_ids"], b["attention_mask"], b["prompt_length"], b["mask"],
                                          with_grad=with_grad, with_entropy=with_entropy,
                                          micro_batch_size=micro_batch_size)
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
             "prompt_length": ro.prompt_length}
    old, t_stats, m_stats = timed(device, lambda: stats_fn(batch))
    batch.update(old_logp=old["logp"], entropy=old["entropy"], exact_term=old["exact_term"],
                 advantages=torch.randn(n_seq, generator=g).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    out, t_upd, m_upd = timed(device, lambda: train.update(model, optimizer, batch, cfg, stats_fn))
    flops = update_flops(arch, n_seq, ro.prompt_length, ro.input_ids.shape[1] - ro.prompt_length)
    total_tokens = n_seq * ro.input_ids.shape[1]

    def phase(sec, tokens, mem):
        return dict(seconds=sec, tokens=tokens, tokens_per_s=tokens / sec, peak_mb=mem)
    return dict(
        size=size, parameters_m=sum(q.numel() for q in model.parameters()) / 1e6, prompts=prompts,
        group_size=group_size, prompt_tokens=ro.prompt_length, new_tokens=new_tokens,
        micro_batch_size=micro_batch_size, algo=algo, precision="bf16 autocast" if bf16 else "float32",
        gradient_checkpointing=gradient_checkpointing, repeats=repeats,
        phases=dict(generate=phase(t_gen, gen_tokens, m_gen), bare_generate=phase(t_bare, gen_tokens, m_bare),
                    score=phase(t_score, gen_tokens, m_score), stats=phase(t_stats, total_tokens, m_stats),
                    update=phase(t_upd, total_tokens, m_upd)),
        generate_overhead_pct=100 * (t_gen / t_bare - 1), update_optimizer_steps=out["updates"],
        update_tflop=flops / 1e12, update_tflops_per_s=flops / t_upd / 1e12, matmul_tflops_per_s=rate / 1e12,
        update_mfu=flops / t_upd / rate)


def print_bench(r, device_name):
    """The benchmark's figures (a run_bench dict) as a table."""
    print(f"device {device_name}, size {r['size']} ({r['parameters_m']:.0f}M parameters), {r['prompts']} prompts x "
          f"{r['group_size']} samples, prompt {r['prompt_tokens']} + {r['new_tokens']} new tokens, algo {r['algo']}, "
          f"{r['precision']}, gradient checkpointing {r['gradient_checkpointing']}")
    print(f"{'phase':<16}{'seconds':>10}{'tokens/s':>12}{'peak MB':>10}")
    for label, ph in r["phases"].items():
        print(f"{label.replace('_', ' '):<16}{ph['seconds']:>10.3f}{ph['tokens_per_s']:>12.0f}{ph['peak_mb']:>10.0f}")
    print(f"generate overhead over bare model.generate: {r['generate_overhead_pct']:+.1f}%")
    print(f"update: {r['update_optimizer_steps']} optimizer steps, {r['update_tflop']:.3f} model TFLOP, "
          f"{r['update_tflops_per_s']:.2f} TFLOP/s; matmul rate {r['matmul_tflops_per_s']:.2f} TFLOP/s -> "
          f"MFU {100 * r['update_mfu']:.1f}%")
    if device_name == "CPU":
        print("(CPU: peak MB is the process's peak resident set so far, not per phase)")


# ------------------------------------------------------------------------------------------- GPU check
def qwen_files():
    """Folder with the real Qwen2.5-0.5B configuration and tokenizer (no weights) inside the repository:
    .cache/models/qwen2.5-0.5b-instruct, refreshed from ../shared/models when that folder exists."""
    if SHARED_QWEN.is_dir():
        shutil.copytree(SHARED_QWEN, LOCAL_QWEN, dirs_exist_ok=True)
    if not (LOCAL_QWEN / "config.json").is_file():
        raise SystemExit(f"--gpu-check needs the Qwen2.5-0.5B configuration and tokenizer in {LOCAL_QWEN}: run "
                         f"it once where {SHARED_QWEN} exists (it copies the folder), or copy the folder there")
    return LOCAL_QWEN


def qwen_config(files, toy=False):
    """The real configuration from `files`; toy=True cuts it to TOY_QWEN (2 layers, hidden 64), keeping
    the 151,936-token vocabulary, the special token ids and the untied lm_head."""
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(files)
    if toy:
        for key, value in TOY_QWEN.items():
            setattr(arch, key, value)
        arch.layer_types = arch.layer_types[:TOY_QWEN["num_hidden_layers"]]
    return arch


def favour_token(model, token_id, prob, probe_ids, offset=10.0):
    """Make a random-weight model emit token_id with probability about `prob` at every position, so that its
    generations end at varied places (a random model hits one given token once in ~150k draws).

    Every input embedding gets the constant `offset` on coordinate 0, which then dominates coordinate 0 of
    the final hidden states (post-norm; measured over the positions of probe_ids (B, T)); token_id's lm_head
    row is set to zero but for that coordinate, sized so that its logit sits log(prob / (1 - prob) (V - 1))
    above the others' (which stay near 0). In place; untied lm_head only.
    """
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() == head.data_ptr():
        raise ValueError("favour_token: the lm_head is tied to the input embeddings")
    with torch.no_grad():
        emb[:, 0] = offset
        h0 = model.base_model(input_ids=probe_ids.to(emb.device)).last_hidden_state[..., 0].float().mean()
        head[token_id] = 0.0
        head[token_id, 0] = math.log(prob / (1 - prob) * (head.shape[0] - 1)) / h0


def arithmetic_items(count, seed=0):
    """`count` problems "What is a + b?" (one-digit a, b: every prompt has the same token count) with gold a + b."""
    rng = random.Random(seed)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(count)]
    return [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]


def train_check(device, files, work, *, toy, steps, prompts, group_size, new_tokens, micro_batch_size, rate):
    """`steps` train.py steps (Archer, all groups kept, bf16 autocast, gradient checkpointing) of a random model
    with the configuration and tokenizer in `files`, saved to work/model (float32); returns the figures.

    Per step: seconds and tokens/s of generate / score (generated tokens) and stats / update (prompt +
    response positions of all rows; stats holds the policy's and the frozen reference's passes), peak
    memory, and the update's MFU against `rate` (FLOP/s). Every response is max_new_tokens long (a random
    model almost never emits a stop token; the step's truncation rate says so), so the update's batch is
    (rows, P + new_tokens).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    arch = qwen_config(files, toy)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(arch, dtype=torch.float32)
    parameters = sum(q.numel() for q in model.parameters())
    tok = AutoTokenizer.from_pretrained(files)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model                                       # train.main loads its own copies
    release_memory(device)
    items = arithmetic_items(max(64, prompts))
    with open(work / "problems.jsonl", "w") as fh:
        fh.writelines(json.dumps(it) + "\n" for it in items)
    prompt_len = max(len(tok(rollout.format_prompt(tok, it["problem"]), add_special_tokens=False)["input_ids"])
                     for it in items)
    argv = ["--model", str(work / "model"), "--dataset", str(work / "problems.jsonl"), "--algo", "archer",
            "--no-drop-equal-groups", "--steps", str(steps), "--prompts-per-step", str(prompts),
            "--group-size", str(group_size), "--max-new-tokens", str(new_tokens),
            "--micro-batch-size", str(micro_batch_size), "--bf16", "--gradient-checkpointing",
            "--eval-interval", "0", "--save-interval", str(steps), "--log-samples", "1", "--out", str(work / "run")]
    t = time.perf_counter()
    rows = [r for r in train.main(argv) if r["step"] > 0]
    seconds = time.perf_counter() - t
    per_step = []
    for r in rows:
        n_rows = r["groups_kept"] * group_size
        positions = n_rows * (prompt_len + new_tokens)
        gen_tokens = r["response_length"] * prompts * group_size
        times = {k: r[f"time/{k}"] for k in ("generate", "score", "stats", "update")}
        width_known = r["truncation_rate"] > 0            # some row ran to max_new_tokens: R = new_tokens
        flops = update_flops(arch, n_rows, prompt_len, new_tokens)
        per_step.append(dict(
            step=r["step"], seconds=times, peak_mem_mb=r["peak_mem_mb"], response_length=r["response_length"],
            truncation_rate=r["truncation_rate"], optimizer_steps=r["updates"],
            tokens_per_s=dict(generate=gen_tokens / times["generate"], score=gen_tokens / times["score"],
                              stats=positions / times["stats"], update=positions / times["update"]),
            update_mfu=flops / times["update"] / rate if width_known and times["update"] > 0 else None))
    figures = dict(model=f"{files.name} configuration{' cut to ' + str(TOY_QWEN) if toy else ''}, random weights",
                   parameters_m=parameters / 1e6, algo="archer", steps=steps,
                   prompts=prompts, group_size=group_size, prompt_tokens=prompt_len, new_tokens=new_tokens,
                   micro_batch_size=micro_batch_size, precision="bf16 autocast", gradient_checkpointing=True,
                   seconds=seconds, per_step=per_step)
    return figures


def end_of_turn_check(device, files, model_dir, *, prompts, group_size, new_tokens, prob):
    """Generation with the tokenizer in `files` set up as a base checkpoint's (EOS = <|endoftext|> in the
    tokenizer and in the generation config) and the model in model_dir made to emit <|im_end|> with
    probability `prob` (favour_token), under bf16 autocast on CUDA.

    Returns counts and "ok": true when some response ended at <|im_end|>, none holds an <|im_end|> before its
    end, every finished one ends at a stop token, pad ids follow, and no completion text shows a special token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(files)
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = endoftext
    texts = [rollout.format_prompt(tok, it["problem"]) for it in arithmetic_items(prompts, seed=1)]
    favour_token(model, im_end, prob, torch.tensor([tok(texts[0], add_special_tokens=False)["input_ids"]]))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    torch.manual_seed(0)
    with torch.no_grad(), autocast():
        ro = rollout.generate(model, tok, texts, group_size=group_size, max_new_tokens=new_tokens)
    resp = ro.input_ids[:, ro.prompt_length:].cpu()
    lengths = ro.response_length.cpu().tolist()
    last = [int(resp[i, n - 1]) for i, n in enumerate(lengths)]
    finished = [not t for t in ro.truncated.cpu().tolist()]
    inside = sum(int((resp[i, :n - 1] == im_end).sum()) for i, n in enumerate(lengths))
    pad_after = all(bool((resp[i, n:] == tok.pad_token_id).all()) for i, n in enumerate(lengths))
    at_im_end = sum(f and t == im_end for f, t in zip(finished, last))
    at_eot = sum(f and t == endoftext for f, t in zip(finished, last))
    shown = sum("<|" in c for c in ro.completions)
    return dict(stop_token_ids=rollout.stop_token_ids(model, tok), end_of_turn_id=rollout.end_of_turn_id(tok),
                rows=len(lengths), ended_at_im_end=at_im_end, ended_at_endoftext=at_eot,
                truncated=len(lengths) - sum(finished), im_end_inside_a_response=inside,
                mean_response_length=sum(lengths) / len(lengths), pad_after_stop=pad_after,
                completions_showing_special_tokens=shown,
                ok=at_im_end > 0 and inside == 0 and at_im_end + at_eot == sum(finished) and pad_after
                and shown == 0)


def gpu_check(json_path, dry_run=False):
    """The GPU check of the module docstring; writes its JSON to json_path and returns the dict."""
    import transformers

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not dry_run:
        raise SystemExit("--gpu-check needs a CUDA GPU (--dry-run runs the same code path at toy sizes on CPU)")
    files = qwen_files()
    which = "dry" if dry_run else "real"
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", dry_run=dry_run,
                  torch=torch.__version__, transformers=transformers.__version__)
    bench = dict(GPU_CHECK["bench"][which])
    report["bench"] = run_bench(device, bench.pop("size"), **bench)
    release_memory(device)
    rate = report["bench"]["matmul_tflops_per_s"] * 1e12
    with tempfile.TemporaryDirectory() as work:
        report["train"] = train_check(device, files, Path(work), toy=dry_run, rate=rate, **GPU_CHECK["train"][which])
        release_memory(device)
        report["end_of_turn"] = end_of_turn_check(device, files, Path(work) / "model",
                                                  **GPU_CHECK["end_of_turn"][which])
    report["seconds"] = time.perf_counter() - start
    report["ok"] = report["end_of_turn"]["ok"] and all(
        s["optimizer_steps"] > 0 and math.isfinite(s["peak_mem_mb"]) for s in report["train"]["per_step"])
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), help="model size (default: full on CUDA, small on CPU)")
    p.add_argument("--algo", choices=config.ALGOS, default="grpo", help="loss of the update phase")
    p.add_argument("--prompts", type=int, help="prompts per step")
    p.add_argument("--group-size", type=int, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, help="generated tokens per sample (fixed length)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each generate variant (best kept)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing in the update")
    p.add_argument("--gpu-check", action="store_true", help="the GPU check of the module docstring (one JSON)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: toy sizes, seconds on CPU")
    p.add_argument("--json", default="runs/gpu_check.json", help="where --gpu-check writes its JSON")
    args = p.parse_args(argv)
    if args.dry_run and not args.gpu_check:
        p.error("--dry-run goes with --gpu-check")
    if args.gpu_check:
        report = gpu_check(args.json, args.dry_run)
        eot, steps = report["end_of_turn"], report["train"]["per_step"]
        print(f"{report['device']}: bench update MFU {100 * report['bench']['update_mfu']:.1f}%; train steps "
              f"peak {max(s['peak_mem_mb'] for s in steps):.0f} MB; end of turn: {eot['ended_at_im_end']} of "
              f"{eot['rows']} responses ended at <|im_end|>; ok {report['ok']}; {report['seconds']:.0f} s "
              f"-> {args.json}", file=sys.stderr)
        return report
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.type == "cuda" else "small")
    run = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in RUN_DEFAULTS[size].items()}
    result = run_bench(device, size, algo=args.algo, gradient_checkpointing=args.gradient_checkpointing,
                       repeats=args.repeats, **run)
    print_bench(result, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    return result


if __name__ == "__main__":
    main()
