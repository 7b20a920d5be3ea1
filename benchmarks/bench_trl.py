"""train.py's RL step against TRL GRPOTrainer's, side by side on the tiny lab: same model, same settings.

Both start from the tiny lab's warm-started model and train GRPO on the lab's training problems with the
same batch: P prompts x G samples, max new tokens, temperature 1, token-mean loss, clip 0.2, no KL, AdamW
at the same lr (constant, no weight decay), gradient clipping 1.0, U optimizer steps per rollout batch in
micro-batches of M rows, float32 on CPU, no gradient checkpointing. TRL (stock GRPOTrainer, loss_type
"dapo", the same token-mean normaliser) gets the prompts already formatted by rollout.format_prompt and
the lab's exact reward. TRL's window: per_device_train_batch_size = M, gradient_accumulation_steps =
rows per mini-batch / M, steps_per_generation = U x that, so that one generation of P x G completions
feeds U optimizer steps, as in train.py.

Timing, alternating so that neither side gets the quieter moments: TRL's training loop drives; a callback
times each of its optimizer steps (on_step_begin to on_step_end: generation, scoring, forward, backward,
step) and, after every U of them (one rollout batch), runs and times one train.rl_step on train.py's own
model and optimizer. The first --warmup pairs are dropped. Printed: the median train.py / TRL ratio over
the pairs, each side's median, and train.py's share of rows skipped for zero advantage (all-equal groups,
which TRL still runs). Each side follows its own trajectory from the same start.

Run:
    python benchmarks/bench_trl.py          # 16 prompts x 8, 20 new tokens, U = 2, M = 64, 12 pairs
    python benchmarks/bench_trl.py --steps 20 --threads 2
    python benchmarks/bench_trl.py --no-skip-zero-advantage  # train.py without its skip of zero-advantage rows
Exits 2 when TRL is not installed (pip install -r requirements-integrations.txt).
"""
import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository: its modules are imported from there
sys.path.insert(0, str(ROOT))

import torch

import config
import data
import rollout
import tiny_lab
import train


def trainpy_side(path, args):
    """train.py's configuration, state and a timed step: returns step() -> (seconds, metrics)."""
    argv = ["--preset", "tiny", "--algo", "grpo", "--prompts-per-step", str(args.prompts), "--group-size",
            str(args.group_size), "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr),
            "--updates-per-batch", str(args.updates), "--micro-batch-size", str(args.micro_batch_size),
            "--max-grad-norm", "1.0", "--seed", str(args.seed)]
    if not args.skip_zero_advantage:
        argv.append("--no-skip-zero-advantage")
    cfg = config.resolve(config.build_parser().parse_args(argv), log=lambda m: None)
    model, tok = data.load_model(str(path), device=torch.device("cpu"))
    problems, rng = tiny_lab.datasets()[0], random.Random(args.seed)
    state = train.Run(model=model, tok=tok, ref_model=None, optimizer=torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.0), scheduler=None, autocast=contextlib.nullcontext,
        device=torch.device("cpu"), knobs=config.knob_kwargs(cfg)[0], reads_reference=False, generator=None,
        entropy_control=None, data_rng=rng, order=[], start_step=0, train_items=problems, eval_sets={},
        score=tiny_lab.score, fork_mask=tiny_lab.fork_mask, too_long={})

    def draw(n):
        return rng.sample(problems, n)

    def step():
        items = draw(args.prompts)
        t = time.perf_counter()
        metrics, _ = train.rl_step(state, cfg, items, draw)
        return time.perf_counter() - t, metrics
    return step


TRL_REWARDS = []        # every reward TRL asked for, to check that both sides solve the same task alike


def lab_reward(completions, numbers, answer, **_):
    """The lab's exact reward for TRL: the dataset columns numbers / answer make the lab item."""
    out = [tiny_lab.score(c, {"numbers": n, "answer": a}).reward for c, n, a in zip(completions, numbers, answer)]
    TRL_REWARDS.extend(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="train.py step vs TRL GRPOTrainer step on the tiny lab (median ratio)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch (P)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="generation budget per sample")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch (U)")
    p.add_argument("--micro-batch-size", type=int, default=64, help="rows per forward / backward (M)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (the tiny preset's)")
    p.add_argument("--steps", type=int, default=12, help="timed pairs (rollout batches per side)")
    p.add_argument("--warmup", type=int, default=2, help="first pairs left out of the medians")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides")
    p.add_argument("--skip-zero-advantage", action=argparse.BooleanOptionalAction, default=True,
                   help="train.py's skip of zero-advantage rows (default on, as train.py runs); off to see its share")
    p.add_argument("--tiny-sft-steps", type=int, default=1500, help="warm-start steps (cached by tiny_lab)")
    p.add_argument("--cache-dir", default=str(tiny_lab.CACHE_DIR), help="tiny-lab warm-start cache")
    args = p.parse_args(argv)
    rows = args.prompts * args.group_size
    if rows % args.updates or (rows // args.updates) % args.micro_batch_size:
        raise SystemExit(f"--prompts x --group-size = {rows} must split into --updates {args.updates} mini-batches "
                         f"of whole --micro-batch-size {args.micro_batch_size} micro-batches")
    try:
        import datasets
        import transformers
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        print(f"bench_trl.py needs TRL ({e}); install it with pip install -r requirements-integrations.txt",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = tiny_lab.warm_start(args.tiny_sft_steps, args.cache_dir)
    trainpy_step = trainpy_side(path, args)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    items = tiny_lab.datasets()[0]
    data = datasets.Dataset.from_dict({"prompt": [rollout.format_prompt(tok, it["problem"]) for it in items],
                                       "numbers": [it["numbers"] for it in items],
                                       "answer": [it["answer"] for it in items]})
    accum = rows // args.updates // args.micro_batch_size
    timings = {"trl": [], "train.py": [], "skipped": [], "reward": [], "phases": []}

    class Alternate(transformers.TrainerCallback):
        """Times TRL's optimizer steps; after each rollout batch of them, one timed train.py step."""

        def __init__(self):
            self.start, self.batch = None, 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **k):
            self.batch += time.perf_counter() - self.start
            if state.global_step % args.updates == 0:
                timings["trl"].append(self.batch)
                self.batch = 0.0
                seconds, metrics = trainpy_step()
                timings["train.py"].append(seconds)
                timings["skipped"].append(metrics.get("rows_skipped_zero_adv", 0) / rows)
                timings["reward"].append(metrics["reward"])
                timings["phases"].append({k[5:]: v for k, v in metrics.items() if k.startswith("time/")})

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size, num_generations=args.group_size,
            gradient_accumulation_steps=accum, steps_per_generation=accum * args.updates,
            max_completion_length=args.max_new_tokens, max_steps=(args.steps + args.warmup) * args.updates,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", loss_type="dapo", epsilon=0.2, beta=0.0, temperature=1.0, top_p=1.0, top_k=0,
            gradient_checkpointing=False, use_cpu=True, bf16=False, seed=args.seed, report_to=[],
            save_strategy="no", logging_steps=10**9, disable_tqdm=True)
        trainer = GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                              reward_funcs=lab_reward, args=config, train_dataset=data, processing_class=tok,
                              callbacks=[Alternate()])
        trainer.train()
    ratios = [a / b for a, b in zip(timings["train.py"], timings["trl"])][args.warmup:]
    ours, theirs = timings["train.py"][args.warmup:], timings["trl"][args.warmup:]
    print(f"tiny lab, GRPO, {args.prompts} prompts x {args.group_size}, {args.max_new_tokens} new tokens, "
          f"{args.updates} updates per batch, micro-batch {args.micro_batch_size}, {args.threads} thread(s), "
          f"{len(ratios)} pairs after {args.warmup} warm-up; TRL {sys.modules['trl'].__version__}")
    print(f"median step: train.py {statistics.median(ours):.3f} s, TRL {statistics.median(theirs):.3f} s; "
          f"train.py skipped {statistics.mean(timings['skipped'][args.warmup:]):.0%} of rows (zero advantage)")
    phases = {k: statistics.median(ph[k] for ph in timings["phases"][args.warmup:]) for k in timings["phases"][0]}
    print("train.py median phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    print(f"mean reward: train.py {statistics.mean(timings['reward']):.3f}, TRL {statistics.mean(TRL_REWARDS):.3f}")
    print(f"median ratio train.py / TRL: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
