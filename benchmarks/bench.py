"""Speed and memory figures for losses.py, on CPU or one CUDA GPU.

    python benchmarks/bench.py                 # all four measurements on the default device (peaks at ~17 GB
                                               # RAM on CPU, from the naive float32 reference; about 5 minutes)
    python benchmarks/bench.py --quick         # bounded: logits (2, 1024, 151936), fewer repeats, no scripts
    python benchmarks/bench.py --only memory   # one of: memory, throughput, losses, scripts
    python benchmarks/bench.py --device cuda
    python benchmarks/bench.py --threads 1     # steadier timings on a shared machine

1. memory      peak extra memory of token_logprobs (with autograd) + token_entropy(exact_term=True) on bf16
               logits of shape (8, 1024, 151936), against a naive float32 log_softmax; and of the entropy
               bonus's token_logprobs_entropy forward + backward, whose logits' gradient (bf16, 1.00 x the
               logits) any backward must allocate, so its working memory beyond that gradient is printed
               too. As a fraction of the logits' own size. On CPU the peak resident set (VmHWM, reset
               through /proc/self/clear_refs) is measured; on CUDA torch.cuda.max_memory_allocated.
2. throughput  the token statistics' time against one plain streaming pass over the same logits
               (logits.amax(-1): read every element once), i.e. the fraction of the memory-bandwidth bound,
               for token_logprobs + token_entropy and for the one-pass token_stats,
               and against one float32 exp over them (every exact entropy needs each element's exp: on a
               CPU that, not memory bandwidth, is the bound).
3. losses      time of every loss in losses.LOSSES (forward + backward, the behaviour policy's entropy and
               the current entropy precomputed; Clip-Cov, KL-Cov and forking make their batch choice in the
               call, and forking once more with the batch's threshold given, as batch_statistics passes it)
               over grpo_loss on B x T = 64 x 4096 tokens: against grpo_loss's defaults, and against
               grpo_loss with the same clip, dual clip and KL settings as the method (what the method adds).
4. scripts     wall time of `python toy_bandit.py` and `python entropy_math.py` with their defaults (the
               tests only assert a generous bound on the toy).
The figures in docs/losses.md (Speed and memory) come from this script; timings are the best of several
repeats.
--quick bounds the run: the memory shapes are (2, 1024, 151936) (peak about a quarter of the full run's;
the chunked functions' fixed working set is then a larger fraction of the logits, so its ratios are upper
bounds of the full shape's), 128 throughput positions, 5 repeats per loss, and no scripts.
"""
import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository: its modules are imported from there
sys.path.insert(0, str(ROOT))

import torch

import logprobs
import losses

SHAPE = (8, 1024, 151_936)


def best_times(fns, device, repeats=5):
    """Best time of each function in fns, run round-robin (a, b, a, b, ...) after two warm-up rounds,
    so that a slow spell on a shared machine hits all of them alike and their ratios stay fair.

    Wall time, except on a CPU with one torch thread (--threads 1): there the process's CPU time, which
    other processes on the machine do not inflate.
    """
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    best = [math.inf] * len(fns)
    for rep in range(repeats + 2):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 2:
                best[i] = min(best[i], clock() - start)
    return best


def best_time(fn, device, repeats=5):
    return best_times([fn], device, repeats)[0]


def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, device):
    """Peak memory allocated by fn() beyond what was in use before it, in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:                 # reset the peak resident set (Linux)
        f.write("5")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def bench_memory(device, shape=SHAPE):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(shape, generator=g, device=device) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g, device=device)
    size = logits.numel() * logits.element_size()
    leaf = logits.requires_grad_(True)
    w_lp = torch.randn(shape[:-1], generator=g, device=device)
    w_h = torch.randn(shape[:-1], generator=g, device=device)

    def ours():
        logp = logprobs.token_logprobs(leaf, tokens)                # keeps only (B, T) outputs alive
        ent, s2 = logprobs.token_entropy(leaf, exact_term=True)
        return logp, ent, s2

    def naive():
        lsm = torch.log_softmax(leaf.float(), dim=-1)
        logp = lsm.gather(-1, tokens[..., None]).squeeze(-1)
        ent = -(lsm.exp() * lsm).sum(-1)
        return logp, ent

    def bonus():                                                  # loss on log pi(a) and H, both with gradient
        logp, ent = logprobs.token_logprobs_entropy(leaf, tokens)
        ((logp * w_lp).sum() + (ent * w_h).sum()).backward()
        leaf.grad = None

    print(f"  logits {tuple(shape)} bf16, {size / 2**30:.2f} GiB")
    for name, fn in (("chunked (losses.py)", ours), ("entropy bonus fwd+bwd", bonus),
                     ("naive float32 log_softmax", naive)):             # the naive one last: its freed pages
                                                                         # would hide the others' growth
        extra = peak_extra_bytes(fn, device)
        line = f"  {name:28s} peak extra {extra / 2**30:6.2f} GiB = {extra / size:5.2f} x logits"
        if fn is bonus:
            line += f"; beyond the logits' gradient (1.00 x): {extra / size - 1:5.2f} x"
        print(line)


def bench_throughput(device, n=None):
    g = torch.Generator(device=device).manual_seed(0)
    n = n or (512 if device.type == "cpu" else 8192)
    logits = (torch.randn(n, SHAPE[-1], generator=g, device=device) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, SHAPE[-1], (n,), generator=g, device=device)
    stream = best_time(lambda: logits.amax(-1), device)
    work = torch.empty(logprobs.CHUNK_BYTES // (4 * SHAPE[-1]), SHAPE[-1], device=device)

    def exp_pass():
        for s in range(0, n, work.shape[0]):
            chunk = logits[s:s + work.shape[0]]
            work[:chunk.shape[0]].copy_(chunk).exp_()
    exp_only = best_time(exp_pass, device)
    logp = best_time(lambda: logprobs.token_logprobs(logits, tokens), device)
    ent = best_time(lambda: logprobs.token_entropy(logits, exact_term=True), device)
    fused = best_time(lambda: logprobs.token_stats(logits, tokens), device)
    gb = logits.numel() * 2 / 1e9
    print(f"  {n} positions x V={SHAPE[-1]} bf16 ({gb:.2f} GB)")
    print(f"  streaming pass (amax)          {stream * 1e3:8.1f} ms  {gb / stream:6.1f} GB/s")
    print(f"  float32 exp pass (chunked)     {exp_only * 1e3:8.1f} ms")
    print(f"  token_logprobs                 {logp * 1e3:8.1f} ms")
    print(f"  token_entropy(exact_term)      {ent * 1e3:8.1f} ms")
    print(f"  token_stats (logp, H, S2)      {fused * 1e3:8.1f} ms  (one pass, no gradient)")
    print(f"  streaming pass / statistics    fraction of the bandwidth bound = {stream / (logp + ent):.3f}")
    print(f"  exp pass / statistics          fraction of the exp bound       = {exp_only / (logp + ent):.3f}")
    print(f"  the same two for token_stats                                   = {stream / fused:.3f}, "
          f"{exp_only / fused:.3f}")


def loss_runs(entropy, mask):
    """(LOSSES name, knobs) of every method timed: each entry with its defaults (the knobs it needs given),
    then the variants whose cost differs (the exact first-order forms, forking with a fixed threshold)."""
    needed = {"adaptive_entropy": {"coef": 0.005}, "clip_cov": {"generator": torch.Generator().manual_seed(0)}}
    return [(name, needed.get(name, {})) for name in losses.LOSSES if name != "grpo"] + [
        ("steer", {"form": "exact"}), ("opefo", {"form": "exact"}),
        ("forking", {"entropy_threshold": float(losses.forking_threshold(entropy, mask))})]


def bench_losses(device, B=64, T=4096, repeats=15):
    g = torch.Generator(device=device).manual_seed(0)
    old = -torch.rand(B, T, generator=g, device=device) * 3
    logp0 = old + 0.1 * torch.randn(B, T, generator=g, device=device)
    ref = old + 0.05 * torch.randn(B, T, generator=g, device=device)
    adv = torch.randn(B, generator=g, device=device)
    mask = (torch.rand(B, T, generator=g, device=device) < 0.9).float()
    ent = torch.rand(B, T, generator=g, device=device) * 2
    s2 = torch.rand(B, T, generator=g, device=device) * 0.1
    cur0 = ent + 0.05 * torch.randn(B, T, generator=g, device=device)
    batch = dict(old_logp=old, advantages=adv, mask=mask, entropy=ent, exact_term=s2, ref_logp=ref)

    def step(name, **kw):
        logp = logp0.clone().requires_grad_(True)
        cur = cur0.clone().requires_grad_(True)                   # the bonus's gradient goes to H as well
        loss, _ = losses.LOSSES[name](logp=logp, current_entropy=cur, **batch, **kw)
        loss.backward()

    print(f"  forward+backward on {B}x{T}; each method timed round-robin with grpo_loss (defaults) and,")
    print("  where its PPO settings differ, with grpo_loss at the method's clip/KL settings")
    # the same PPO settings as each method, so the second ratio isolates what the method adds
    same_ppo = {"steer": dict(clip_high=0.28, dual_clip=10.0),
                "archer": dict(dual_clip=10.0, kl_coef=0.001),
                "forking": dict(clip_high=0.28)}
    runs = loss_runs(ent, mask)
    for name, kw in runs:
        fns = [lambda: step(name, **kw), lambda: step("grpo")]
        if name in same_ppo:
            fns.append(lambda: step("grpo", **same_ppo[name]))
        t, base, *ref = best_times(fns, device, repeats)
        shown = {k: v for k, v in kw.items() if k not in ("generator", "entropy_threshold")}
        label = name + "".join(f" {k}={v}" for k, v in shown.items())
        label += " (tau given)" if "entropy_threshold" in kw else ""
        line = f"  {label:28s} {t * 1e3:8.2f} ms  grpo {base * 1e3:6.2f} ms  ratio {t / base:5.2f}"
        if ref:
            line += f"   to grpo at its clip/KL settings ({ref[0] * 1e3:.2f} ms) {t / ref[0]:5.2f}"
        print(line)


def bench_scripts(device):
    for script in ("toy_bandit.py", "entropy_math.py"):
        start = time.perf_counter()
        subprocess.run([sys.executable, script], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        print(f"  python {script:18s} {time.perf_counter() - start:6.1f} s wall (defaults, CPU)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--only", choices=["memory", "throughput", "losses", "scripts"], help="run one measurement")
    p.add_argument("--quick", action="store_true",
                   help="bounded run: smaller memory shapes, fewer repeats, no scripts (see the docstring)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}" + ("; --quick" if args.quick else ""))
    quick_shape = (2,) + SHAPE[1:]
    parts = (("memory", lambda: bench_memory(device, quick_shape if args.quick else SHAPE)),
             ("throughput", lambda: bench_throughput(device, 128 if args.quick else None)),
             ("losses", lambda: bench_losses(device, repeats=5 if args.quick else 15)),
             ("scripts", lambda: bench_scripts(device)))
    for what, fn in parts:
        if args.only == what or (args.only is None and not (args.quick and what == "scripts")):
            print(f"[{what}]")
            fn()


if __name__ == "__main__":
    main()
