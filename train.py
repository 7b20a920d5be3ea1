"""The RLVR training loop: GRPO, DAPO, Dr. GRPO, STEER, OPEFO, Archer and the entropy interventions they are
compared with (entropy bonus, adaptive entropy, Clip-Cov, KL-Cov, forking tokens, entropy-based advantage,
W-REINFORCE) on one machine, end to end.

It composes the other files: rollout.py samples G responses per prompt and scores their tokens,
verifier.py turns each response into a 0/1 reward, losses.py gives group advantages and every loss (LOSSES).
One step (GRPO, DeepSeekMath sec. 4.1; the variations are the losses in losses.py):
    sample prompts -> generate G each -> verify [-> DAPO: refill rounds until enough groups have non-equal
    rewards; overlong penalty added to the reward] -> group advantages (drop all-equal groups with
    --drop-equal-groups: DAPO's dynamic sampling, also Archer's default) -> old log-probs, entropy and the
    exact-term S2 (no grad) [-> reference log-probs when a KL term needs them] -> the chosen loss over U
    mini-batches, each split into micro-batches with gradient accumulation; losses.batch_statistics gives
    each mini-batch's totals (num_tokens / num_seqs) and the loss's batch-wide inputs once, so the gradient
    does not depend on the micro-batch size -> clip -> step.

Algorithm-specific wiring (where the papers or their code leave a choice):
    STEER   omega_max, the M of lambda = lambda_min ** (m / M), is computed once per mini-batch from the
            behaviour policy's statistics (the "global batch scope" of M), so the weights
            do not depend on the micro-batch size. The released code takes M per micro-batch.
    OPEFO   one optimizer step per rollout batch (--updates-per-batch is forced to 1) and the flow totals
            (P, N) of lambda* are computed over the whole batch and passed to every micro-batch.
    Archer  the token types come from each response's own entropy quantile, so they do not depend on the
            split; its KL sits inside the token aggregation (losses.py), so num_tokens keeps it exact.
    GRPO    a frozen reference model is loaded only when --kl-coef > 0 (Archer: when its KL is on).
    DAPO    all four parts (arXiv 2503.14476): clip-higher and token-mean (losses.dapo_loss), dynamic
            sampling with refill (sec. 3.2; --max-refill-rounds, 9 by default: DAPO's released recipe draws
            at most 10 generation batches, of 3x the batch each; here a round is one batch of prompts) and
            the soft overlong punishment (sec. 3.4; overlong_penalty, with L_max = --max-new-tokens and
            L_cache = --overlong-cache, 0.2 L_max by default). Logged: refill_rounds, groups_sampled,
            groups_kept_frac (share of the sampled groups that pass the filter), overlong_penalty (mean).
    entropy_bonus / adaptive_entropy  the current policy's entropy WITH its gradient (response_stats with
            with_grad and with_entropy) as current_entropy; adaptive_entropy's controller
            (losses.entropy_control_step, Skywork-OR1) takes one step per RL step on the rollout's mean token
            entropy, logs entropy_control/alpha and /coef, and is saved in checkpoints.
    clip_cov  the token choice is made once per mini-batch (batch_statistics) with a torch.Generator seeded
            from --seed, whose state is saved in checkpoints. kl_cov, forking: their cut and centring once per
            mini-batch (batch_statistics).

The four-quadrant entropy flow (STEER's factors, OPEFO's flow view): every optimizer step splits the first-order
entropy change of the update, with each token's weight w = -dLoss/dlogp read off the autograd graph, into
(A > 0, A < 0) x (likely pi_a > exp(-H), unlikely) (losses.entropy_flow_quadrants); the RL step logs the sums
over its optimizer steps as flow/<quadrant>_exact, _paper and _count for the quadrants of losses.QUADRANTS,
zero_adv (A = 0 tokens a KL term can move) and total. A gradient that does not pass through log pi(a) (an
entropy bonus's) is not in w, and so not in these sums. --plot draws them stacked over steps.

The tiny lab (--preset tiny; the default on a machine without CUDA) lives in tiny_lab.py: a Countdown-style
task with several correct solutions per problem, a character-level tokenizer, a ~0.1M-parameter Qwen2 built
in code and a cached supervised warm start. There the reward is tiny_lab.score, the held-out sets are
"test" (logged as eval/) and "unique" (eval_unique/), and each step also logs the entropy at the fork
tokens, where valid solutions branch (entropy/fork), and elsewhere (entropy/other). Runs offline on CPU.

Outputs in the run directory (default runs/<preset>-<algo>-seed<seed>): config.json, metrics.jsonl (one
line per step; step 0 holds the evaluation of the starting model; a value that is not finite is written as
null), samples.jsonl (every completion of the first --log-samples prompts of each step, with reward,
correct, truncated, advantage), eval_samples.jsonl (per evaluation and set, the greedy and first sampled
completion of the first --log-samples problems, with verdicts), checkpoints/step_NNNNNN (save_pretrained +
optimizer, scheduler, RNG, data-order, Clip-Cov generator and entropy-controller state; --no-save-optimizer
leaves the optimizer out; written to a temporary folder and renamed, then the `latest` pointer is replaced
atomically; the last two are kept) and, with --plot, curves.png. --resume DIR continues a run bit-for-bit on
CPU (same metrics except timings) when the checkpoint holds the optimizer state.

Learning rate: --warmup-steps (linear, default 0) then --lr-schedule constant (default) or cosine, one
scheduler step per RL step. Rows with zero advantage skip the update's forward and backward when the loss
gives them no gradient (--skip-zero-advantage; zero_advantage_rows). --bf16 runs every forward pass (rollouts,
statistics, update, reference) under bf16 autocast over float32 weights, on CUDA and on CPU alike.

Run directories never lose data:
    a new run refuses a non-empty --out unless --overwrite is given (which removes only the files a run
    writes: config.json, metrics.jsonl, samples.jsonl, eval_samples.jsonl, curves.png, checkpoints/);
    the lock file .lock (an flock held for the whole run, holding the pid) stops a second run into the same
    directory; a lock left by a process that is gone is taken over with a message;
    --resume loads the newest checkpoint that loads, falling back to the previous one with a message when
    the newest is damaged, and drops a half-written last line of metrics.jsonl, samples.jsonl or
    eval_samples.jsonl;
    --resume refuses every flag that would change the run (naming them); only the flags of RESUME_FLAGS
    (--steps, the new total, and settings of what is logged or saved) may differ from the saved ones.
Flags are checked before any work (the run directory and --cache-dir must be writable, every dataset row
must be usable). Exit status (the command line, cli()): 0 done, 2 a user error (one line on stderr: a bad
flag, a bad data file or run directory, an unreachable model or dataset), 130 interrupted by Ctrl-C (the
message names the last checkpoint); a traceback means a bug.

--measure-entropy-change re-computes the entropy on each mini-batch after its update and logs the Pearson /
Spearman correlation between each token's predicted first-order change (exact, STEER-code and paper forms,
losses.first_order_term) and the realised change (the STEER paper's estimator-accuracy experiment, here with
shared parameters). The per-token weight w on log pi is read off the autograd graph (w = -dLoss/dlogp), so it
includes clipping, ratios, STEER / OPEFO weights and KL terms exactly. With AdamW the update is not a plain
gradient step (per-parameter scaling), so the predictions hold only up to that preconditioning; use
--optimizer sgd to test the first-order formulas on a plain step.

Run:
    python train.py --algo grpo                         # tiny lab on CPU
    python train.py --algo clip_cov --clip-cov-ratio 1e-3
    python train.py --algo steer --preset qwen-0.5b-gsm8k --out runs/steer-gsm8k
    python train.py --resume runs/steer-gsm8k
    python train.py --help
"""
import argparse
import contextlib
import fcntl
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch

import losses
import rollout
import tiny_lab
import verifier
from entropy_math import pearson, sign_agreement, spearman

ALGOS = ("grpo", "dapo", "drgrpo", "steer", "opefo", "archer",
         "entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking", "entropy_adv", "w_reinforce")

# ------------------------------------------------------------------------------------------- presets
# Every tunable flag defaults to None; the preset fills it, then ALGO_DEFAULTS, then BASE_DEFAULTS.
BASE_DEFAULTS = dict(
    prompts_per_step=8, group_size=8, max_new_tokens=1024, temperature=1.0, top_p=1.0, lr=1e-6, steps=100,
    updates_per_batch=2, micro_batch_size=8, max_grad_norm=1.0, optimizer="adamw", eval_interval=20,
    eval_k=8, eval_size=None, eval_temperature=1.0, save_interval=20, log_samples=2, seed=0,
    dataset_split="train", eval_split="test", answer_format="auto", bf16=False, gradient_checkpointing=False,
    tiny_sft_steps=1500, drop_equal_groups=False, max_refill_rounds=0, overlong_penalty=False, overlong_cache=None,
    max_prompt_tokens=1024, system_prompt=rollout.DEFAULT_SYSTEM_PROMPT, cache_dir=str(tiny_lab.CACHE_DIR),
    measure_entropy_change=False, plot=False, overwrite=False,
    warmup_steps=0, lr_schedule="constant", save_optimizer=True, skip_zero_advantage=True,
)
PRESETS = {
    "tiny": dict(prompts_per_step=16, group_size=8, max_new_tokens=20, lr=5e-4, steps=100, updates_per_batch=2,
                 micro_batch_size=64, eval_interval=25, eval_k=64, eval_size=64, save_interval=50,
                 max_prompt_tokens=32),    # lab prompts are ~10 characters; the model has 64 positions
    "qwen-math-1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B", dataset="DigitalLearningGmbH/MATH-lighteval",
                           eval_dataset="HuggingFaceH4/MATH-500", dataset_split="train", eval_split="test",
                           prompts_per_step=8, group_size=8, max_new_tokens=1024, lr=1e-6, steps=500,
                           micro_batch_size=8, eval_interval=50, eval_k=4, bf16=True, gradient_checkpointing=True),
    "qwen-0.5b-gsm8k": dict(model="Qwen/Qwen2.5-0.5B-Instruct", dataset="openai/gsm8k:main",
                            eval_dataset="openai/gsm8k:main", dataset_split="train", eval_split="test",
                            prompts_per_step=8, group_size=8, max_new_tokens=512, lr=1e-6, steps=200,
                            micro_batch_size=8, eval_interval=50, eval_k=4, eval_size=500, bf16=True,
                            gradient_checkpointing=True),
}
# Dr. GRPO: no std in the advantage; DAPO (all four of its parts) and Archer drop all-equal groups; OPEFO is
# strictly on-policy; the interventions keep GRPO's settings (every group kept).
ALGO_DEFAULTS = {
    "dapo": dict(drop_equal_groups=True, max_refill_rounds=9, overlong_penalty=True),
    "archer": dict(drop_equal_groups=True),
}
# CLI flag -> keyword of the loss (per algorithm where the names differ). None defaults = the loss's own.
LOSS_KNOBS = {
    "clip_low": "clip_low", "clip_high": "clip_high", "dual_clip": "dual_clip", "agg": "agg",
    "kl_coef": {a: "kl_coef" for a in ("grpo", "dapo", "drgrpo")}, "lambda_min": "lambda_min",
    "first_order_form": {"steer": "omega", "opefo": "flow"},
    "archer_quantile": "quantile", "clip_reasoning": "clip_reasoning", "clip_knowledge": "clip_knowledge",
    "kl_knowledge": "kl_knowledge", "entropy_coef": {"entropy_bonus": "alpha"},
    "clip_cov_ratio": "clip_cov_ratio", "clip_cov_lb": "cov_lb", "clip_cov_ub": "cov_ub",
    "kl_cov_ratio": "kl_cov_ratio", "kl_cov_coef": {"kl_cov": "kl_coef"}, "top_frac": "top_frac",
    "entropy_adv_alpha": {"entropy_adv": "alpha"}, "entropy_adv_kappa": {"entropy_adv": "kappa"},
    "positive_weight": "positive_weight",
}
# CLI flag -> keyword of losses.entropy_control_init (adaptive_entropy's controller; --entropy-coef is its start)
CONTROL_KNOBS = {"target_entropy": "target", "entropy_coef": "coef", "entropy_coef_delta": "delta",
                 "entropy_coef_max": "coef_max"}
# the function whose keywords each algorithm's flags map to (the call goes through losses.LOSSES, whose dapo,
# drgrpo and adaptive_entropy entries forward their keywords to grpo_loss and entropy_bonus_loss)
LOSS_FUNCS = {"grpo": losses.grpo_loss, "dapo": losses.grpo_loss, "drgrpo": losses.grpo_loss,
              "steer": losses.steer_loss, "opefo": losses.opefo_loss, "archer": losses.archer_loss,
              "entropy_bonus": losses.entropy_bonus_loss, "adaptive_entropy": losses.entropy_bonus_loss,
              "clip_cov": losses.clip_cov_loss, "kl_cov": losses.kl_cov_loss, "forking": losses.forking_loss,
              "entropy_adv": losses.entropy_adv_loss, "w_reinforce": losses.w_reinforce_loss}
# loss metrics that are partial sums when micro-batching (global normalisers): summed, the rest token-averaged
SUMMED_METRICS = ("pg_loss", "kl", "weighted_flow", "entropy_bonus", "kl_cov")
# metrics whose values depend on the machine's speed, not on the run's numbers (ignored by resume checks)
TIMING_KEYS = ("time/", "tokens_per_s", "peak_mem_mb")
# the range each flag must lie in, checked on the resolved configuration before any work (unset knobs skipped;
# the loss knobs the loss checks itself are checked by check_knobs)
FLAG_RANGES = {
    **{k: (lambda v: v >= 1, ">= 1") for k in ("prompts_per_step", "group_size", "max_new_tokens", "steps",
                                              "updates_per_batch", "micro_batch_size", "eval_k", "save_interval",
                                              "eval_size", "max_prompt_tokens")},
    **{k: (lambda v: v >= 0, ">= 0") for k in ("log_samples", "tiny_sft_steps", "eval_temperature", "kl_coef",
                                              "kl_knowledge", "max_refill_rounds", "warmup_steps")},
    "eval_interval": (lambda v: v >= 0, ">= 0 (0: evaluate only at the start and the end)"),
    "lr": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0 for RL rollouts"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
}
# flags that --resume accepts with a new value: the new total, and what is evaluated, logged, saved or plotted
# (evaluation forks the RNG, so none of them changes the training numbers)
RESUME_FLAGS = ("steps", "eval_interval", "save_interval", "log_samples", "plot", "cache_dir", "save_optimizer")
# the files and folders a run writes into its directory (what --overwrite removes)
RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "curves.png", "checkpoints")
LOCK_FILE = ".lock"


# ------------------------------------------------------------------------------------------- datasets
class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and the row."""


JSONL_HINT = "expected UTF-8 JSON Lines: one JSON object per line"


def _gsm8k_answer(text):
    """The number after GSM8K's "####" marker (thousands separators removed), or None."""
    if "####" not in text:
        return None
    value = text.rsplit("####", 1)[1].strip().replace(",", "")
    return value or None


def row_to_item(row, where, *, problem_field=None, answer_field=None, answer_format="auto"):
    """Map one dataset row (dict) to {"problem", "answer", "source"}; raise ValueError naming `where` and the field.

    problem_field default: the first of "problem", "question" present. answer_field default: "answer" if
    present, else "solution". answer_format:
        plain  the field's value as text (JSON numbers such as AMC23's 27.0 become "27.0")
        gsm8k  the number after "####"
        boxed  the last \\boxed{...} of the field (verifier.extract_answer), e.g. Minerva's solution
        auto   gsm8k if the text contains "####", boxed if it contains \\boxed or the field is "solution",
               plain otherwise
    """
    if not isinstance(row, dict):
        hint = " (a JSON array: write one object per line instead)" if isinstance(row, list) else ""
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}{hint}; {JSONL_HINT}")
    pf = problem_field or next((f for f in ("problem", "question") if f in row), "problem")
    af = answer_field or ("answer" if "answer" in row else "solution")
    problem = row.get(pf)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field {pf!r} (the problem) is missing or empty; "
                         f"fields present: {sorted(row)} (choose one with --problem-field)")
    raw = row.get(af)
    if raw is None or isinstance(raw, (dict, list, bool)) or (isinstance(raw, str) and not raw.strip()):
        raise DataError(f"{where}: field {af!r} (the answer) is missing, empty or not text/number: {raw!r}; "
                         f"fields present: {sorted(row)} (choose one with --answer-field)")
    text = raw if isinstance(raw, str) else json.dumps(raw)
    fmt = answer_format
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else "boxed" if ("\\boxed" in text or af == "solution") else "plain"
    if fmt == "gsm8k":
        answer = _gsm8k_answer(text)
    elif fmt == "boxed":
        answer = verifier.extract_answer(text)
    elif fmt == "plain":
        answer = text.strip()
    else:
        raise DataError(f"unknown --answer-format {answer_format!r}; choose auto, plain, gsm8k or boxed")
    if not answer:
        raise DataError(f"{where}: field {af!r} has no {fmt} answer in {text[-80:]!r}")
    return {"problem": problem, "answer": answer, "source": where}


def load_items(spec, split, *, problem_field=None, answer_field=None, answer_format="auto", flag="--dataset"):
    """Problems from a local JSON Lines file (path ending .jsonl/.json) or a Hub dataset "name[:config]".

    Every row must be usable: a bad row (not UTF-8, not JSON, not an object, a missing field) raises
    DataError (a ValueError) naming the file, the 1-based row and the problem. A UTF-8 byte-order mark is
    accepted.
    flag: the option that named `spec` (--dataset or --eval-dataset), for the error when the Hub fails.
    """
    fields = dict(problem_field=problem_field, answer_field=answer_field, answer_format=answer_format)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise DataError(f"dataset file {spec} not found")
        items = []
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                where = f"{path}, row {n}"
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                                    f"{e.start + 1}); {JSONL_HINT}") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    hint = (" (the file looks like a JSON array or a pretty-printed object: write one object per "
                            "line instead)" if n == 1 and line.strip() in ("[", "{") else "")
                    raise DataError(f"{where}: not valid JSON ({e.msg}){hint}; {JSONL_HINT}") from None
                items.append(row_to_item(row, where, **fields))
        if not items:
            raise DataError(f"dataset file {path} has no rows")
        return items
    name, _, config = spec.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the hub is unreachable, the name is wrong, or the split does not exist
        raise SystemExit(f"cannot load {flag} {spec!r} (split {split!r}) from the Hugging Face Hub: "
                         f"{type(e).__name__}: {_one_line(e, 200)}. Offline alternatives: local JSON Lines files "
                         f"(--dataset / --eval-dataset path/to/file.jsonl, with --problem-field/--answer-field), "
                         f"or --preset tiny.")
    return [row_to_item(dict(row), f"{spec}[{split}], row {n}", **fields) for n, row in enumerate(ds, 1)]


def _one_line(error, limit):
    """The message of an exception on one line, at most `limit` characters."""
    return " ".join(str(error).split())[:limit]


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' progress bars ("Loading weights", "Writing model shards") inside the block."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def drop_long_prompts(items, tok, limit, system_prompt):
    """(the items whose prompt, as rollout.generate tokenizes it, has at most `limit` tokens; the number left
    out). A prompt is tokenized only when it could be too long: every token covers at least one UTF-8 byte
    (byte-level BPE, character-level) and the chat template puts a fixed text around the problem."""
    special = not getattr(tok, "chat_template", None)      # rollout.generate's rule for special tokens
    template = len(rollout.format_prompt(tok, "x", system_prompt=system_prompt).encode()) - 1
    frame = template + 2                                    # and at most two special tokens

    def fits(problem):
        if len(problem.encode()) + frame <= limit:
            return True
        prompt = rollout.format_prompt(tok, problem, system_prompt=system_prompt)
        return len(tok(prompt, add_special_tokens=special)["input_ids"]) <= limit
    kept = [it for it in items if fits(it["problem"])]
    return kept, len(items) - len(kept)


def load_model(name_or_path, *, device, gradient_checkpointing=False, trainable=True):
    """(model, tokenizer) from a Hub name or local folder, SDPA attention; a clear error when unreachable.

    Weights stay float32 (the master copy AdamW updates); --bf16 runs the forward passes under autocast.
    A frozen reference (trainable=False) keeps float32 weights too and runs under the same autocast, so at
    identical weights its log-probs equal the policy's bit for bit (the KL is exactly 0); a bf16 copy would
    save 2 bytes per parameter but put a floor under the KL (6e-4 measured on Qwen2.5-0.5B).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch.float32, attn_implementation="sdpa")
    except OSError as e:
        raise SystemExit(f"cannot load model {name_or_path!r}: {_one_line(e, 300)}. Offline alternatives: a local "
                         f"folder written by save_pretrained (--model path/to/model), or --preset tiny.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    if trainable:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval().requires_grad_(False)
    return model, tok


# ------------------------------------------------------------------------------------------- evaluation
def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(k):
    """The j of the reported pass@j: 1, 2, 4, ... up to k, and k itself."""
    ks = [1 << i for i in range(k.bit_length()) if 1 << i <= k]
    return ks if ks[-1] == k else ks + [k]


def verify(completion, item):
    """Reward of a completion for a dataset item: verifier.score against the item's gold answer."""
    return verifier.score(completion, item["answer"])


def evaluate(model, tok, items, *, k, temperature, top_p, max_new_tokens, chunk, system_prompt, autocast,
             score_fn=verify, prefix="eval", keep=0):
    """Held-out figures under `prefix`/: avg@k and unbiased pass@j (j = 1, 2, 4, .. and k) from k samples at
    `temperature`; "distinct", the mean number of distinct correct completions per problem among the k
    (whitespace-collapsed text: a diversity measure that falls when a policy narrows onto one solution);
    and greedy accuracy. score_fn(completion, item) -> verifier.Score. Items whose gold cannot be parsed
    (correct None) are skipped and counted.
    Returns (figures, samples): samples holds, for the first `keep` problems, the greedy completion and the
    first sampled one with their verdicts (set, problem index, prompt, gold, kind, completion, answer,
    correct, truncated).

    Sampling uses torch's global RNG: the caller forks it so that evaluation does not change training.
    """
    model.eval()
    correct, distinct, greedy, skipped, samples = [], [], [], 0, []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        prompts = [rollout.format_prompt(tok, it["problem"], system_prompt=system_prompt) for it in part]
        with torch.no_grad(), autocast():
            sampled = rollout.generate(model, tok, prompts, group_size=k, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p)
            greedy_ro = rollout.generate(model, tok, prompts, group_size=1, max_new_tokens=max_new_tokens,
                                         temperature=0.0)
        for j, it in enumerate(part):
            texts = sampled.completions[j * k:(j + 1) * k]
            scores = [score_fn(c, it) for c in texts]
            verdicts = [sc.correct for sc in scores]
            greedy_score = score_fn(greedy_ro.completions[j], it)
            if start + j < keep:
                shown = (("greedy", greedy_ro.completions[j], greedy_score, greedy_ro.truncated[j]),
                         ("sample", texts[0], scores[0], sampled.truncated[j * k]))
                for kind, text, sc, cut in shown:
                    samples.append({"set": prefix, "problem_index": start + j, "prompt": it["problem"],
                                    "gold": it["answer"], "kind": kind, "completion": text, "answer": sc.answer,
                                    "correct": sc.correct, "truncated": bool(cut)})
            if any(v is None for v in verdicts):
                skipped += 1
                continue
            correct.append(sum(verdicts))
            distinct.append(len({" ".join(c.split()) for c, v in zip(texts, verdicts) if v}))
            greedy.append(bool(greedy_score.correct))
    out = {f"{prefix}/skipped_gold": skipped, f"{prefix}/n": len(correct)}
    if correct:
        out[f"{prefix}/avg@{k}"] = sum(c / k for c in correct) / len(correct)
        for j in pass_ks(k):
            out[f"{prefix}/pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct) / len(correct)
        out[f"{prefix}/distinct"] = sum(distinct) / len(distinct)
        out[f"{prefix}/greedy_acc"] = sum(greedy) / len(greedy)
    return out, samples


# ------------------------------------------------------------------------------------------- one RL step
def loss_kwargs(cfg):
    """The loss knobs the user set, renamed to the chosen loss's keywords; an error for a knob it does not take."""
    algo = cfg["algo"]
    takes = set(inspect.signature(LOSS_FUNCS[algo]).parameters)
    kwargs = {}
    for flag, target in LOSS_KNOBS.items():
        if cfg.get(flag) is None or (algo == "adaptive_entropy" and flag in CONTROL_KNOBS):
            continue
        name = target.get(algo) if isinstance(target, dict) else target
        if name is None or name not in takes:
            raise SystemExit(f"--{flag.replace('_', '-')} does not apply to --algo {algo}")
        kwargs[name] = cfg[flag]
    if algo == "drgrpo":
        kwargs.setdefault("norm_length", cfg["max_new_tokens"])   # Dr. GRPO's constant: the generation budget
    return kwargs


def control_kwargs(cfg):
    """adaptive_entropy's controller flags as losses.entropy_control_init keywords; an error for another algo
    (--entropy-coef is also entropy_bonus's alpha, so loss_kwargs judges it there)."""
    given = [flag for flag in CONTROL_KNOBS if cfg.get(flag) is not None]
    if cfg["algo"] == "adaptive_entropy":
        return {CONTROL_KNOBS[flag]: cfg[flag] for flag in given}
    for flag in given:
        if flag not in LOSS_KNOBS:
            raise SystemExit(f"--{flag.replace('_', '-')} does not apply to --algo {cfg['algo']}")
    return {}


def check_knobs(cfg):
    """The loss and controller flags, checked before the run: a flag the algorithm does not take, or a value
    out of range (the loss's own check, on a one-token batch), is one SystemExit line naming the flag."""
    algo = cfg["algo"]
    kwargs, control = loss_kwargs(cfg), control_kwargs(cfg)
    flag_of = {v: f for f, v in CONTROL_KNOBS.items()} if algo == "adaptive_entropy" else {}
    for flag, target in LOSS_KNOBS.items():
        name = target.get(algo) if isinstance(target, dict) else target
        if cfg.get(flag) is not None and name not in flag_of:
            flag_of[name] = flag
    one = torch.zeros(1, 1)
    try:
        if algo == "adaptive_entropy":
            kwargs["alpha"] = losses.entropy_control_init(**control)["coef"]
        if algo == "clip_cov":
            kwargs["generator"] = torch.Generator()                 # leaves the global RNG alone
        losses.LOSSES[algo](logp=one, old_logp=one, advantages=torch.zeros(1), mask=torch.ones(1, 1), entropy=one,
                            exact_term=one, ref_logp=one, current_entropy=one, **kwargs)
    except ValueError as e:
        flag = flag_of.get(str(e).split("=", 1)[0])
        raise SystemExit(f"--{flag.replace('_', '-')}: {e}" if flag else str(e)) from None


def loss_default(algo, name):
    """Default value of keyword `name` of the algorithm's loss function."""
    return inspect.signature(LOSS_FUNCS[algo]).parameters[name].default


def needs_reference(cfg):
    """A frozen reference model is needed for Archer's KL (on unless both coefficients are 0) and GRPO's
    --kl-coef (KL-Cov's penalty is to pi_old: no reference)."""
    kw = loss_kwargs(cfg)
    if cfg["algo"] == "archer":
        return bool(kw.get("kl_knowledge", loss_default("archer", "kl_knowledge"))
                    or kw.get("kl_reasoning", loss_default("archer", "kl_reasoning")))
    return bool(cfg.get("kl_coef"))


def _take(batch, rows):
    """Rows `rows` (list of int) of every (N, ...) tensor in dict `batch`."""
    idx = torch.as_tensor(rows, device=batch["mask"].device)
    return {k: (v.index_select(0, idx) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _mean_metrics(parts):
    """Average of a list of (weight, metrics dict) pairs, key by key."""
    total, acc = {}, {}
    for w, m in parts:
        for k, v in m.items():
            acc[k] = acc.get(k, 0.0) + w * v
            total[k] = total.get(k, 0.0) + w
    return {k: acc[k] / total[k] for k in acc if total[k] > 0}


# Losses in which every term on a row is its advantage times something (clipped surrogates, REINFORCE,
# reweightings and masks from whole-batch statistics computed before the micro-batches): a row with A = 0
# adds exactly 0 to the value and the gradient, unless a KL to the reference is on (needs_reference).
# Not here: the entropy bonuses (act on every row), KL-Cov (its covariance KL can pick rows with A = 0).
ADVANTAGE_ONLY_LOSSES = frozenset({"grpo", "dapo", "drgrpo", "steer", "opefo", "archer", "clip_cov", "forking",
                                   "w_reinforce", "entropy_adv"})


def zero_advantage_rows(mb, cfg):
    """(rows,) bool: the rows of mini-batch `mb` that the update's forward and backward can leave out
    (--skip-zero-advantage, on by default; cfg without the key: on), all False when the loss needs them.
    A row qualifies when its advantage is exactly 0; for entropy_adv also no valid token may have a
    negative entropy (rounding), since A' = A + min(alpha H, |A| / kappa) is then exactly 0."""
    zero = mb["advantages"] == 0                                                    # (rows,)
    if not cfg.get("skip_zero_advantage", True) or cfg["algo"] not in ADVANTAGE_ONLY_LOSSES \
            or needs_reference(cfg):
        return torch.zeros_like(zero)
    if cfg["algo"] == "entropy_adv":
        zero &= (torch.where(mb["mask"].bool(), mb["entropy"], 0.0) >= 0).all(1)
    return zero


def update(model, optimizer, batch, cfg, stats_fn, *, knobs=None):
    """The loss over U mini-batches (one optimizer step each) of the kept responses; returns a metrics dict.

    batch: input_ids, attention_mask (N, P+R); mask (N, R); advantages (N,); old_logp, entropy, exact_term
    and optionally ref_logp (N, R); prompt_length. Mini-batches are whole groups. For each, one call of
    losses.batch_statistics gives the mini-batch's num_tokens / num_seqs and the loss's batch-wide inputs
    (STEER's omega_max, OPEFO's flow totals, Clip-Cov's token choice, KL-Cov's centring and cut, the forking
    threshold); micro-batches of at most cfg["micro_batch_size"] rows accumulate gradients with them (the
    per-row ones, such as cov_selected (N, R), sliced with the micro-batch's rows), so the gradient does
    not depend on the micro-batch size. The entropy-bonus losses (losses.CURRENT_ENTROPY_LOSSES) get the
    current policy's entropy with its gradient as current_entropy.
    knobs: loss keywords the loop sets per step on top of the flags' (adaptive_entropy's alpha, clip_cov's
    generator); without an alpha (one update on its own, as bench_train.py runs it) adaptive_entropy takes
    the controller's starting coefficient.
    Each optimizer step's first-order entropy change is split into STEER's four quadrants with
    losses.entropy_flow_quadrants, w = -dLoss/dlogp read off the graph, and summed over the mini-batches
    (flow/<quadrant>_{exact,paper,count}, quadrants losses.QUADRANTS, zero_adv and total).
    A non-finite loss or gradient norm skips that optimizer step (parameters untouched) and is counted.
    Rows whose gradient is exactly 0 (zero_advantage_rows) stay in num_tokens / num_seqs but get no forward
    or backward: the parameters after the step are the same (bit for bit when the micro-batches of the
    other rows are unchanged, e.g. whole all-equal groups with micro-batches of one group); token-averaged
    loss metrics are then over the rows that were run. Counted in "rows_skipped_zero_adv".
    stats_fn(b, with_grad=False, with_entropy=True) -> rollout.response_stats of the batch dict b (the caller
    sets temperature, precision and forward micro-batching).
    """
    algo, g = cfg["algo"], cfg["group_size"]
    kwargs = dict(loss_kwargs(cfg), **(knobs or {}))
    if algo == "adaptive_entropy":
        kwargs.setdefault("alpha", losses.entropy_control_init(**control_kwargs(cfg))["coef"])
    current = algo in losses.CURRENT_ENTROPY_LOSSES
    n = batch["mask"].shape[0]
    groups = list(range(n // g))
    n_mini = 1 if algo == "opefo" else min(cfg["updates_per_batch"], len(groups))
    minis = [sum(([i * g + j for j in range(g)] for i in groups[m::n_mini]), []) for m in range(n_mini)]
    parts, skipped, grad_norms, measured, flows, rows_skipped = [], 0, [], [], [], 0
    for rows in minis:
        mb = _take(batch, rows)
        mask = mb["mask"].bool()
        stats = losses.batch_statistics(algo, mask=mb["mask"], advantages=mb["advantages"], old_logp=mb["old_logp"],
                                        entropy=mb["entropy"], exact_term=mb["exact_term"], **kwargs)
        per_row = [k for k, v in stats.items() if torch.is_tensor(v)]        # (rows, R): sliced per micro-batch
        mb.update({k: stats.pop(k) for k in per_row})
        before = stats_fn(mb, with_entropy=True) if cfg["measure_entropy_change"] else None
        weights = torch.zeros_like(mb["mask"])
        live = (~zero_advantage_rows(mb, cfg)).nonzero().flatten().tolist()
        rows_skipped += len(rows) - len(live)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        step_parts, loss_sum, finite = [], 0.0, True
        for s in range(0, len(live), cfg["micro_batch_size"]):
            sub = live[s:s + cfg["micro_batch_size"]]
            mu = _take(mb, sub)
            out = stats_fn(mu, with_grad=True, with_entropy=current)
            logp = out["logp"]
            logp.retain_grad()
            loss, metrics = losses.LOSSES[algo](
                logp=logp, old_logp=mu["old_logp"], advantages=mu["advantages"], mask=mu["mask"],
                entropy=mu["entropy"], exact_term=mu["exact_term"], ref_logp=mu.get("ref_logp"),
                current_entropy=out.get("entropy"), **stats, **{k: mu[k] for k in per_row}, **kwargs)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            if logp.grad is not None:
                weights[sub] = -logp.grad.detach()          # w = -dLoss/dlogp per token
            loss_sum += float(loss.detach())
            step_parts.append((int(mu["mask"].sum()), metrics))
        if not live:                    # every row skipped: the exactly zero gradient a pass would have given
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if p.requires_grad else None
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"]) if finite else None
        if not finite or not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)           # skip: parameters untouched
            skipped += 1
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norms.append(float(norm))
        merged = _mean_metrics(step_parts)
        for key in SUMMED_METRICS:         # partial sums under the mini-batch's normalisers: add them up
            if key in merged:
                merged[key] = sum(m[key] for _, m in step_parts)
        parts.append((1.0, dict(merged, loss=loss_sum)))
        flows.append(losses.entropy_flow_quadrants(mb["old_logp"], mb["entropy"], mb["exact_term"],
                                                   mb["advantages"], weights, mb["mask"]))
        if before is not None:
            after = stats_fn(mb, with_entropy=True)
            measured.append(_entropy_change_terms(before, after, weights, mask))
    out = {f"loss/{k}": v for k, v in _mean_metrics(parts).items()}
    out.update({"updates": len(parts), "skipped_nonfinite": skipped, "rows_skipped_zero_adv": rows_skipped,
                "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None})
    out.update(_flow_report(flows))
    if measured:
        out.update(_entropy_change_report(measured))
    return out


FLOW_GROUPS = losses.QUADRANTS + ("zero_adv", "total")


def _flow_report(flows):
    """flow/<q>_{exact,paper,count} for q in FLOW_GROUPS, summed over the optimizer steps' quadrant dicts
    (losses.entropy_flow_quadrants); None when no step was taken."""
    return {f"flow/{q}_{k}": (sum(f[f"{q}_{k}"] for f in flows) if flows else None)
            for q in FLOW_GROUPS for k in ("exact", "paper", "count")}


def _entropy_change_terms(before, after, weights, mask):
    """Per token that carries gradient (valid, w != 0): realised entropy change, the three first-order
    predictions -w * g, g = losses.first_order_term(form) at the pre-update policy (entropy_math.py;
    eta dropped: correlations are scale-free), and pi_a before the update. Tokens with w = 0 (zero
    advantage, clipped) are left out: their only change is the spill-over through shared parameters,
    which no tabular form predicts.
    """
    carries = mask & (weights != 0)
    realised = (after["entropy"] - before["entropy"])[carries]
    pred = {form: (-weights * losses.first_order_term(before["logp"], before["entropy"], before["exact_term"],
                                                      form))[carries]
            for form in losses.FIRST_ORDER_FORMS}
    return realised, pred, before["logp"].exp()[carries]


UNCERTAIN = 0.99     # the estimator report is repeated over the tokens with pi_a below this


def _entropy_change_report(measured):
    """Pearson / Spearman / sign agreement between realised and predicted per-token entropy changes, over
    all tokens that carry gradient (dH/<stat>_<form>) and over those with pi_a < UNCERTAIN
    (dH/<stat>_<form>_uncertain), where the forms differ most."""
    realised = torch.cat([r for r, _, _ in measured]).double()
    pi = torch.cat([p for _, _, p in measured])
    out = {"dH/realised_mean": float(realised.mean()) if realised.numel() else None, "dH/tokens": realised.numel(),
           "dH/tokens_uncertain": int((pi < UNCERTAIN).sum())}
    for form in losses.FIRST_ORDER_FORMS:
        pred = torch.cat([p[form] for _, p, _ in measured]).double()
        for suffix, keep in (("", torch.ones_like(pi, dtype=torch.bool)), ("_uncertain", pi < UNCERTAIN)):
            x, y = pred[keep], realised[keep]
            if y.numel() > 2 and x.std() > 0 and y.std() > 0:
                out[f"dH/pearson_{form}{suffix}"] = pearson(x, y)
                out[f"dH/spearman_{form}{suffix}"] = spearman(x, y)
                out[f"dH/sign_agree_{form}{suffix}"] = sign_agreement(x, y)
    return out


def overlong_penalty(lengths, max_len, cache):
    """DAPO's soft overlong punishment (arXiv 2503.14476 sec. 3.4), added to the reward: (N,) float32.

        R_length(y) = 0                                     if |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                      -1                                    if |y| > L_max
    lengths (N,): response tokens (EOS included). The paper's values: L_max = 20480, L_cache = 4096 (a
    16384-token expected length plus a 4096-token soft window). Scaled here: L_max = --max-new-tokens and
    L_cache = --overlong-cache, by default round(L_max * 4096 / 20480) = round(0.2 L_max), at least 1; a
    response cut at the budget (|y| = L_max) gets -1.
    """
    return ((max_len - cache - lengths.float()) / cache).clamp(-1.0, 0.0)


def default_overlong_cache(max_new_tokens):
    """L_cache for a budget L_max: the paper's ratio 4096 / 20480 = 0.2 of it, rounded, at least 1 token."""
    return max(1, round(max_new_tokens * 4096 / 20480))


def _group_filter(scores, g, drop_equal):
    """Per group of g consecutive scores: (unparseable gold, all rewards equal, kept) lists of bools."""
    n = len(scores) // g
    bad = [any(scores[i * g + j].correct is None for j in range(g)) for i in range(n)]
    equal = [len({scores[i * g + j].reward for j in range(g)}) == 1 for i in range(n)]
    return bad, equal, [not b and not (drop_equal and e) for b, e in zip(bad, equal)]


def rl_step(state, cfg, items, draw):
    """One RL step on the prompts `items`; returns (metrics dict, sample records). draw(n) -> n more prompts.

    Dynamic sampling with refill (DAPO, arXiv 2503.14476 sec. 3.2; --drop-equal-groups with
    --max-refill-rounds K > 0): while fewer than len(items) groups have non-equal rewards, up to K more
    rounds of len(items) prompts from draw(n) are sampled; the kept groups then train, in sampling order, up
    to len(items) of them (the surplus is dropped, as DAPO's recipe does; at the cap, fewer). The groups are
    judged on the verifier's rewards (DAPO filters on accuracy), before any overlong penalty. The step's
    sample metrics (reward, accuracy, entropy, lengths) are over every response sampled in the step.
    """
    model, tok, ref_model = state["model"], state["tok"], state["ref_model"]
    autocast, g, target = state["autocast"], cfg["group_size"], len(items)
    score_fn = state["score"]
    refill = cfg["max_refill_rounds"] if cfg["drop_equal_groups"] else 0
    timings = {"generate": 0.0, "score": 0.0}
    parts, sampled, scores, kept, rounds = [], [], [], 0, 0
    while True:
        t = time.perf_counter()
        prompts = [rollout.format_prompt(tok, it["problem"], system_prompt=cfg["system_prompt"]) for it in items]
        model.eval()
        with torch.no_grad(), autocast():
            part = rollout.generate(model, tok, prompts, group_size=g, max_new_tokens=cfg["max_new_tokens"],
                                    temperature=cfg["temperature"], top_p=cfg["top_p"])
        timings["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        part_scores = [score_fn(c, items[int(i)]) for c, i in zip(part.completions, part.prompt_index.tolist())]
        timings["score"] += time.perf_counter() - t
        parts.append(part)
        sampled += items
        scores += part_scores
        kept += sum(_group_filter(part_scores, g, cfg["drop_equal_groups"])[2])
        if kept >= target or rounds >= refill:
            break
        rounds += 1
        items = draw(target)
    ro, items = rollout.concat_rollouts(parts, tok.pad_token_id), sampled
    rewards = torch.tensor([s.reward for s in scores])
    bad_gold, all_equal, passed = _group_filter(scores, g, cfg["drop_equal_groups"])
    keep_groups = [i for i, ok in enumerate(passed) if ok][:target]
    shaped = rewards
    if cfg["overlong_penalty"]:
        penalty = overlong_penalty(ro.response_length.cpu(), cfg["max_new_tokens"], cfg["overlong_cache"])
        shaped = rewards + penalty
    adv = losses.group_advantages(shaped, g, std_normalize=cfg["algo"] != "drgrpo").to(ro.response_mask.device)
    lengths = ro.response_length.float()
    valid_resp = ro.response_mask.sum()
    metrics = {
        "reward": float(rewards.mean()), "accuracy": sum(s.correct is True for s in scores) / len(scores),
        "response_length": float(lengths.mean()), "truncation_rate": float(ro.truncated.float().mean()),
        "groups_kept": len(keep_groups), "groups_all_equal": sum(all_equal),
        "groups_sampled": len(items), "groups_kept_frac": sum(passed) / len(items), "refill_rounds": rounds,
        "skipped_unparseable_gold": sum(bad_gold),
        "timed_out_verifications": sum(bool(s.timed_out) for s in scores),
    }
    records = [{"prompt": items[i // g]["problem"], "gold": items[i // g]["answer"],
                "completion": ro.completions[i], "answer": scores[i].answer, "reward": scores[i].reward,
                "correct": scores[i].correct, "truncated": bool(ro.truncated[i]), "advantage": float(adv[i])}
               for i in range(min(cfg["log_samples"], len(items)) * g)]

    def stats_fn(b, with_grad=False, with_entropy=True, net=None):
        with torch.set_grad_enabled(with_grad), autocast():
            return rollout.response_stats(net or model, b["input_ids"], b["attention_mask"], b["prompt_length"],
                                          b["mask"], temperature=cfg["temperature"], with_grad=with_grad,
                                          with_entropy=with_entropy, micro_batch_size=cfg["micro_batch_size"])

    t = time.perf_counter()
    model.eval()
    full = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
            "prompt_length": ro.prompt_length}
    old = stats_fn(full)
    metrics["entropy"] = float((old["entropy"] * ro.response_mask).sum() / valid_resp.clamp(min=1))
    if state.get("fork_mask"):      # the lab marks the tokens where valid solutions branch
        forks = state["fork_mask"](ro.completions, [items[int(i)] for i in ro.prompt_index.tolist()],
                                   ro.response_mask.shape[1]).to(ro.response_mask.device) & ro.response_mask.bool()
        rest = ro.response_mask.bool() & ~forks
        metrics["entropy/fork"] = float(old["entropy"][forks].mean()) if forks.any() else None
        metrics["entropy/other"] = float(old["entropy"][rest].mean()) if rest.any() else None
        metrics["fork_tokens"] = int(forks.sum())
    if cfg["overlong_penalty"]:
        metrics["overlong_penalty"] = float(penalty.mean())
    knobs = {}
    if cfg["algo"] == "adaptive_entropy":  # Skywork-OR1: one controller step per RL step, on the rollout's entropy
        knobs["alpha"], state["entropy_control"] = losses.entropy_control_step(state["entropy_control"],
                                                                               metrics["entropy"])
        metrics["entropy_control/alpha"] = knobs["alpha"]
        metrics["entropy_control/coef"] = state["entropy_control"]["coef"]          # the next step's c
    if cfg["algo"] == "clip_cov":
        knobs["generator"] = state["generator"]
    rows = [i * g + j for i in keep_groups for j in range(g)]
    timings["stats"] = time.perf_counter() - t
    if rows:
        batch = _take(dict(full, advantages=adv, old_logp=old["logp"], entropy=old["entropy"],
                           exact_term=old["exact_term"]), rows)
        if ref_model is not None:
            t = time.perf_counter()
            batch["ref_logp"] = stats_fn(batch, with_entropy=False, net=ref_model)["logp"]
            timings["stats"] += time.perf_counter() - t
        t = time.perf_counter()
        metrics.update(update(model, state["optimizer"], batch, cfg, stats_fn, knobs=knobs))
        timings["update"] = time.perf_counter() - t
        metrics["update_tokens"] = int(batch["mask"].sum())
    else:
        metrics.update(updates=0, skipped_nonfinite=0, rows_skipped_zero_adv=0, update_tokens=0, **_flow_report([]))
        timings["update"] = 0.0
    gen_tokens = int(valid_resp)
    metrics["tokens_per_s/generate"] = gen_tokens / max(timings["generate"], 1e-9)
    metrics["tokens_per_s/step"] = gen_tokens / max(sum(timings.values()), 1e-9)
    metrics.update({f"time/{k}": v for k, v in timings.items()})
    return metrics, records


# ------------------------------------------------------------------------------------------- checkpoints
def rng_state(data_rng, order, generator=None):
    """Every RNG the run draws from: torch (CPU and CUDA), python's global random, the data order (the
    data-order RNG and the unvisited rest of the current epoch's shuffled order) and Clip-Cov's generator."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "data": data_rng.getstate(),
            "order": list(order), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "clip_cov": generator.get_state() if generator is not None else None}


def set_rng_state(saved, data_rng, generator=None):
    """Restore what rng_state saved; returns the data order to continue with."""
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    data_rng.setstate(saved["data"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    if generator is not None:
        generator.set_state(saved["clip_cov"])
    return list(saved["order"])


def save_checkpoint(run_dir, step, model, tok, optimizer, data_rng, order, *, generator=None,
                    entropy_control=None, scheduler=None, with_optimizer=True):
    """checkpoints/step_NNNNNN with model + tokenizer (save_pretrained) and trainer_state.pt, atomically.

    trainer_state.pt: the step, rng_state (with Clip-Cov's generator), the adaptive entropy controller's
    state (losses.entropy_control_init's dict, or None), the learning-rate scheduler's state and, unless
    with_optimizer is False (--no-save-optimizer: weights-only, about a third of the size with AdamW),
    the optimizer's state.
    Written into a temporary folder, checked to load (check_checkpoint), renamed into place, then the
    `latest` pointer file is replaced with os.replace. The previous checkpoint (the one `latest` named) is
    kept, so a new one damaged later (a truncated file) still leaves one to resume from; older ones are
    removed. A crash at any point leaves the previous checkpoint as `latest`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    state = {"step": step, "rng": rng_state(data_rng, order, generator), "entropy_control": entropy_control,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    if with_optimizer:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, tmp / "trainer_state.pt")
    check_checkpoint(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    point_latest(run_dir, final)
    for old in root.glob("step_*"):
        if old not in (final, previous):
            shutil.rmtree(old, ignore_errors=True)
    return final


def point_latest(run_dir, ckpt):
    """Make checkpoints/latest name the checkpoint folder `ckpt` (atomic replace)."""
    pointer = Path(run_dir) / "checkpoints" / ".latest.tmp"
    pointer.write_text(Path(ckpt).name)
    os.replace(pointer, pointer.with_name("latest"))


def check_checkpoint(ckpt):
    """Raise if checkpoint folder `ckpt` is incomplete or truncated, without reading the tensors: the zip
    directory at the end of trainer_state.pt (torch.save's format) and every model/*.safetensors file's
    header and length are checked."""
    from safetensors import safe_open

    with zipfile.ZipFile(Path(ckpt) / "trainer_state.pt"):
        pass
    weights = sorted((Path(ckpt) / "model").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no model weights (*.safetensors) in {Path(ckpt) / 'model'}")
    for path in weights:
        with safe_open(path, "pt"):
            pass


def resume_checkpoint(run_dir, log):
    """(checkpoint folder, trainer state) to resume from: the one `latest` names, or, when it does not load,
    the newest older one that does (with a message; `latest` is pointed at it)."""
    root = Path(run_dir) / "checkpoints"
    named = latest_checkpoint(run_dir)
    older = sorted((p for p in root.glob("step_*") if p != named), key=lambda p: p.name, reverse=True)
    candidates = ([named] if named else []) + older
    for n, ckpt in enumerate(candidates):
        try:
            check_checkpoint(ckpt)
            state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        except Exception as e:          # whatever the damage, the next candidate may load
            nxt = f"falling back to {candidates[n + 1].name}" if n + 1 < len(candidates) else "no older checkpoint"
            log(f"checkpoint {ckpt} does not load ({type(e).__name__}: {_one_line(e, 120)}); {nxt}")
            continue
        if ckpt != named:
            point_latest(run_dir, ckpt)
        return ckpt, state
    raise SystemExit(f"--resume {run_dir}: no checkpoint that loads under {root}")


def lr_factor(done, cfg):
    """Multiplier of --lr for the RL step that follows `done` finished steps (one scheduler step per RL
    step, as verl's: every mini-batch of a rollout batch uses the same rate). Warmup: (done + 1) / W for
    the first W = --warmup-steps steps, so the first step already moves (verl's formula gives it 0);
    then 1 (constant) or 0.5 (1 + cos(pi (done - W) / (steps - W))) (cosine, above 0 at the last step)."""
    warm = cfg["warmup_steps"]
    if done < warm:
        return (done + 1) / warm
    if cfg["lr_schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (done - warm) / max(1, cfg["steps"] - warm)))
    return 1.0


def latest_checkpoint(run_dir):
    """Path of the checkpoint named by checkpoints/latest, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def _truncate_jsonl(path, last_step, log):
    """Keep only the lines of a JSON Lines log whose "step" is <= last_step (the resumed run rewrites the rest).

    A half-written last line (a run killed while writing it) is dropped with a message; a damaged line
    elsewhere is an error naming the file and the line.
    """
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if n == len(lines):
                log(f"{path}: dropping the half-written last line {n}")
                break
            raise SystemExit(f"{path}, line {n}: not valid JSON; the run's log is damaged (remove or repair "
                             f"that line to resume)") from None
        if row["step"] <= last_step:
            kept.append(raw.decode("utf-8") + "\n")
    path.write_text("".join(kept), encoding="utf-8")


def json_safe(value):
    """`value` with every NaN or infinite float (also inside dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------- run directory
def _check_writable(folder, flag):
    """Create `folder` if needed and write a file into it; a one-line error naming `flag` when that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"{flag} {folder} is not writable ({e.strerror or e})") from None


def take_lock(run_dir, log):
    """Hold run_dir/.lock for the life of the run: an exclusive flock on a file holding "pid host". Returns
    the open file (closing it, or the process ending, releases the lock). A lock held by another process is
    an error naming it; a lock file left behind by a process that has ended is taken over with a message."""
    path = Path(run_dir) / LOCK_FILE
    while True:
        try:
            fh = open(path, "a+")
        except OSError as e:
            raise SystemExit(f"--out {run_dir} is not writable ({e.strerror or e})") from None
        fh.seek(0)
        owner = fh.read().split()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            who = f"process {owner[0]} on {owner[1]}" if len(owner) == 2 else "another process"
            raise SystemExit(f"{run_dir} is in use by another run ({who}, lock file {path}); wait for it to "
                             f"end or choose another --out") from None
        except OSError as e:            # a file system without locks
            fh.close()
            raise SystemExit(f"--out {run_dir}: cannot lock {path} ({e.strerror or e})") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()                      # the file was removed by its owner in between: lock the new one
    if owner:
        log(f"{path}: taking over the lock of process {' on '.join(owner[:2])}, which is no longer running")
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()} {socket.gethostname()}\n")
    fh.flush()
    return fh


def release_lock(run_dir, fh):
    """Remove run_dir/.lock and release the flock taken by take_lock."""
    (Path(run_dir) / LOCK_FILE).unlink(missing_ok=True)
    fh.close()


def claim_run_dir(run_dir, cfg, log):
    """Create the run directory, take its lock (take_lock) and check it may be written: a new run refuses a
    directory that holds anything unless cfg["overwrite"], which removes the RUN_FILES of the previous run
    (nothing else). Returns the lock's file."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {run_dir}: cannot create the run directory ({e.strerror or e})") from None
    lock = take_lock(run_dir, log)
    try:
        present = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if not cfg.get("resume") and present:
            if not cfg["overwrite"]:
                shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
                raise SystemExit(f"--out {run_dir} is not empty ({shown}): continue that run with --resume "
                                 f"{run_dir}, choose another --out, or give --overwrite to replace it")
            for name in RUN_FILES:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            log(f"--overwrite: removed the previous run's files in {run_dir}")
        _check_writable(run_dir, "--out")
    except BaseException:
        release_lock(run_dir, lock)
        raise
    return lock


# ------------------------------------------------------------------------------------------- driver
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block) and negative numbers in any notation as values:
    "--lr -1e-4" is read as --lr=-1e-4 (plain argparse takes "-1e-4" for an option), and then refused by
    resolve_config as out of range."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        joined = []
        for arg in args:
            if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _is_negative_number(arg):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return super().parse_args(joined, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _is_negative_number(text):
    """True for "-1", "-1e-4", "-.5", "-inf": a value, not an option."""
    try:
        float(text)
    except ValueError:
        return False
    return text.startswith("-")


def build_parser():
    p = ArgumentParser(prog="train.py", description="RLVR training loop (GRPO, DAPO, Dr. GRPO, STEER, OPEFO, "
                       "Archer and the entropy interventions). "
                                "A flag left unset takes the preset's value, then the algorithm's, then "
                                "BASE_DEFAULTS (all in train.py); unset loss knobs keep losses.py's defaults.")
    a = p.add_argument
    a("--algo", choices=ALGOS, help="loss / algorithm (default grpo)")
    a("--preset", choices=sorted(PRESETS), help="settings bundle; default: tiny without CUDA")
    a("--model", help="Hub name or local folder of the policy (not with --preset tiny)")
    a("--dataset", help="training problems: a .jsonl file or a Hub dataset name[:config]")
    a("--eval-dataset", help="held-out problems, same forms as --dataset")
    a("--dataset-split", help="Hub split of --dataset")
    a("--eval-split", help="Hub split of --eval-dataset")
    a("--problem-field", help="row field holding the problem (default: problem or question)")
    a("--answer-field", help="row field holding the gold (default: answer, else solution)")
    a("--answer-format", choices=("auto", "plain", "gsm8k", "boxed"), help="how to read the gold from its field")
    a("--prompts-per-step", type=int, help="prompts sampled per RL step")
    a("--group-size", type=int, help="responses per prompt (G)")
    a("--max-new-tokens", type=int, help="generation budget per response")
    a("--temperature", type=float, help="sampling temperature (also scales the scored logits)")
    a("--top-p", type=float, help="nucleus sampling threshold for rollouts")
    a("--lr", type=float, help="learning rate")
    a("--optimizer", choices=("adamw", "sgd"), help="AdamW (default) or plain SGD (for first-order checks)")
    a("--steps", type=int, help="RL steps (with --resume: the new total)")
    a("--updates-per-batch", type=int, help="optimizer steps (mini-batches) per rollout batch; 1 for OPEFO")
    a("--micro-batch-size", type=int, help="sequences per forward/backward (gradient accumulation)")
    a("--max-grad-norm", type=float, help="gradient clipping norm")
    a("--warmup-steps", type=int, help="linear learning-rate warmup over the first N RL steps, --lr * n / N at "
      "step n (default 0, verl's; verl's DAPO recipe scripts use 10 at lr 1e-6)")
    a("--lr-schedule", choices=("constant", "cosine"), help="after the warmup: constant (default, verl's and "
      "DAPO's) or cosine decay towards 0 over the remaining --steps")
    a("--drop-equal-groups", action=argparse.BooleanOptionalAction, default=None,
      help="drop groups whose rewards are all equal (default: on for dapo, archer)")
    a("--max-refill-rounds", type=int, help="DAPO's dynamic sampling: at most this many extra rounds of "
      "prompts per step until the batch holds --prompts-per-step groups with non-equal rewards (default: 9 "
      "for dapo, 0 = no refill otherwise; needs --drop-equal-groups)")
    a("--overlong-penalty", action=argparse.BooleanOptionalAction, default=None,
      help="DAPO's soft overlong punishment added to the reward (default: on for dapo)")
    a("--overlong-cache", type=int, help="L_cache of the overlong penalty in tokens: 0 up to "
      "max-new-tokens - L_cache, then linear to -1 at --max-new-tokens (default: 0.2 x --max-new-tokens)")
    a("--clip-low", type=float, help="PPO clip epsilon below 1 (every algo but opefo, archer, kl_cov)")
    a("--clip-high", type=float, help="PPO clip epsilon above 1 (every algo but opefo, archer, kl_cov)")
    a("--dual-clip", type=float, help="dual-clip constant c for negative advantages")
    a("--agg", choices=losses.AGG_MODES, help="loss aggregation mode")
    a("--kl-coef", type=float, help="GRPO's k3 KL coefficient to the frozen start model")
    a("--lambda-min", type=float, help="STEER's smallest token weight")
    a("--first-order-form", choices=losses.FIRST_ORDER_FORMS, help="STEER Omega / OPEFO flow form")
    a("--archer-quantile", type=float, help="Archer's per-response entropy quantile rho")
    a("--clip-reasoning", type=float, help="Archer's clip range on high-entropy tokens")
    a("--clip-knowledge", type=float, help="Archer's clip range on low-entropy tokens")
    a("--kl-knowledge", type=float, help="Archer's KL coefficient on low-entropy tokens")
    a("--entropy-coef", type=float, help="entropy_bonus's alpha (default 0.001); adaptive_entropy's "
      "starting coefficient (default 0.005)")
    a("--target-entropy", type=float, help="adaptive_entropy's target mean token entropy (default 0.2)")
    a("--entropy-coef-delta", type=float, help="adaptive_entropy's coefficient step per RL step (default 0.001)")
    a("--entropy-coef-max", type=float, help="adaptive_entropy's largest coefficient (default 0.5)")
    a("--clip-cov-ratio", type=float, help="Clip-Cov's fraction of tokens whose gradient is removed (default 2e-4)")
    a("--clip-cov-lb", type=float, help="Clip-Cov's lower covariance bound (default 1)")
    a("--clip-cov-ub", type=float, help="Clip-Cov's upper covariance bound (default 5)")
    a("--kl-cov-ratio", type=float, help="KL-Cov's fraction (not percent) of top-covariance tokens (default 2e-3)")
    a("--kl-cov-coef", type=float, help="KL-Cov's coefficient beta of |log pi - log pi_old| (default 1)")
    a("--top-frac", type=float, help="forking: share of highest-entropy tokens that get the gradient (default 0.2)")
    a("--entropy-adv-alpha", type=float, help="entropy_adv's alpha in A + min(alpha H, |A| / kappa) (default 0.4)")
    a("--entropy-adv-kappa", type=float, help="entropy_adv's kappa in A + min(alpha H, |A| / kappa) (default 2)")
    a("--positive-weight", type=float, help="w_reinforce's weight lambda on positive samples (default 0.1)")
    a("--eval-interval", type=int, help="evaluate every N steps (0: only at start and end)")
    a("--eval-k", type=int, help="samples per held-out problem for avg@k / pass@k")
    a("--eval-size", type=int, help="use the first N held-out problems")
    a("--eval-temperature", type=float, help="sampling temperature of avg@k / pass@k")
    a("--save-interval", type=int, help="checkpoint every N steps (and at the end)")
    a("--save-optimizer", action=argparse.BooleanOptionalAction, default=None,
      help="keep the optimizer state in checkpoints (default on); --no-save-optimizer saves weights, RNG and "
      "scheduler only: --resume then restarts AdamW's moments from zero (warned)")
    a("--log-samples", type=int, help="prompts per step whose G completions go to samples.jsonl, and problems "
      "per evaluation set whose greedy and first sampled completions go to eval_samples.jsonl")
    a("--system-prompt", help="system message of the chat template "
      "(default: rollout.DEFAULT_SYSTEM_PROMPT; the tiny lab's template ignores it)")
    a("--seed", type=int, help="seed of sampling and data order")
    a("--max-prompt-tokens", type=int, help="problems whose prompt is longer are left out and counted "
      "(default 1024; 32 in the tiny lab)")
    a("--out", help="run directory (default runs/<preset>-<algo>-seed<seed>); must be empty or new")
    a("--overwrite", action="store_true", default=None,
      help="replace the run in a non-empty --out (removes only the files a run writes)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint; other flags "
      f"may only repeat the saved values, except --{', --'.join(f.replace('_', '-') for f in RESUME_FLAGS)}")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast of every forward pass "
      "over float32 weights, on CUDA or CPU (on CPU faster only with bf16 matrix hardware such as AMX)")
    a("--skip-zero-advantage", action=argparse.BooleanOptionalAction, default=None,
      help="leave rows with zero advantage out of the update's forward and backward when the loss gives them "
      "no gradient (no KL or entropy bonus; default on; parameters are the same)")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute activations in the backward pass")
    a("--measure-entropy-change", action="store_true", default=None, help="log predicted vs realised per-token entropy change")
    a("--plot", action="store_true", default=None, help="write curves.png (needs matplotlib)")
    a("--tiny-sft-steps", type=int, help="supervised warm-start steps of the tiny lab (cached)")
    a("--cache-dir", help=f"tiny-lab warm-start cache (default {tiny_lab.CACHE_DIR})")
    return p


def resolve_config(args, log=print):
    """Fill None flags from the preset, the algorithm's defaults and BASE_DEFAULTS; validate.

    A preset's evaluation set belongs with its training set: with --dataset given, the preset's
    eval_dataset is not used (so a run on local files never reaches for the Hub); --eval-dataset names one.
    """
    cfg = vars(args).copy()
    cfg["algo"] = cfg["algo"] or "grpo"
    given = {k for k, v in cfg.items() if v is not None}
    if cfg["preset"] is None and cfg["model"] is None:
        cfg["preset"] = "tiny" if not torch.cuda.is_available() else "qwen-0.5b-gsm8k"
        log(f"no --preset or --model: using --preset {cfg['preset']}"
            + (" (the offline tiny lab, since CUDA is not available)" if cfg["preset"] == "tiny" else ""))
    if cfg["preset"] == "tiny" and cfg["model"]:
        raise SystemExit("--model does not apply to --preset tiny (the tiny lab builds its own model)")
    preset = dict(PRESETS.get(cfg["preset"], {}))
    if "dataset" in given and "eval_dataset" not in given and preset.get("eval_dataset"):
        log(f"--dataset given: the preset's evaluation set {preset.pop('eval_dataset')} is not used "
            "(name it with --eval-dataset to evaluate on it)")
    for source in (preset, ALGO_DEFAULTS.get(cfg["algo"], {}), BASE_DEFAULTS):
        for k, v in source.items():
            if cfg.get(k) is None:
                cfg[k] = v
    if cfg["algo"] == "opefo" and cfg["updates_per_batch"] != 1:
        log(f"--algo opefo: updates_per_batch {cfg['updates_per_batch']} -> 1 "
            "(strictly on-policy: one optimizer step per rollout batch)")
        cfg["updates_per_batch"] = 1
    unused = [f"--{k.replace('_', '-')}" for k in ("eval_size", "eval_k") if k in given]
    if unused and cfg["preset"] != "tiny" and not cfg.get("eval_dataset"):
        log(f"{' and '.join(unused)} ignored: there is no evaluation set (name one with --eval-dataset)")
    validate_config(cfg)
    if cfg["preset"] != "tiny" and not cfg.get("dataset"):
        raise SystemExit("--dataset is required with --model (a .jsonl file or a Hub dataset name)")
    if cfg["max_refill_rounds"] and not cfg["drop_equal_groups"]:
        raise SystemExit("--max-refill-rounds needs --drop-equal-groups (a refill looks for groups to keep)")
    if cfg["overlong_penalty"]:
        if cfg["overlong_cache"] is None:
            cfg["overlong_cache"] = default_overlong_cache(cfg["max_new_tokens"])
        if not 1 <= cfg["overlong_cache"] <= cfg["max_new_tokens"]:
            raise SystemExit(f"--overlong-cache must be in [1, --max-new-tokens={cfg['max_new_tokens']}], "
                             f"got {cfg['overlong_cache']}")
    elif cfg["overlong_cache"] is not None:
        raise SystemExit("--overlong-cache needs --overlong-penalty")
    check_knobs(cfg)                          # raises on a knob the loss does not take, or out of its range
    if cfg["out"] is None:
        name = cfg["preset"] or Path(cfg["model"]).name
        cfg["out"] = str(Path("runs") / f"{name}-{cfg['algo']}-seed{cfg['seed']}")
    return cfg


def validate_config(cfg):
    """A one-line error naming the flag for a value out of FLAG_RANGES, or a group size that trains nothing."""
    for key, (ok, wanted) in FLAG_RANGES.items():
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise SystemExit(f"--{key.replace('_', '-')} must be {wanted}, got {value}")
    if cfg["group_size"] == 1:
        raise SystemExit(f"--group-size 1 trains nothing with --algo {cfg['algo']}: every advantage is relative "
                         f"to the group, so a lone response gets 0 and the reward never reaches the update; use "
                         f"2 or more")


def resume_config(args):
    """The saved configuration of the run in args.resume, with the RESUME_FLAGS the user gave; an error naming
    every other flag whose value differs from the saved one (it would change the run)."""
    run_dir = Path(args.resume)
    path = run_dir / "config.json"
    if not path.is_file():
        raise SystemExit(f"--resume {run_dir}: no config.json there")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path} is damaged, not valid JSON ({_one_line(e, 120)}): the run cannot be resumed")
    if not isinstance(cfg, dict) or "algo" not in cfg:
        raise SystemExit(f"{path} is not a train.py configuration: the run cannot be resumed")
    cfg = {**BASE_DEFAULTS, **cfg}          # a setting newer than the run: its default, as the run had it
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if given.pop("overwrite", False):
        raise SystemExit("--overwrite and --resume exclude each other: --resume continues the run, "
                         "--overwrite starts a new one")
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise SystemExit(f"--out {out} differs from --resume {run_dir}: a resumed run stays in its directory")
    changed = [k for k, v in given.items() if k not in RESUME_FLAGS and v != cfg.get(k)]
    if changed:
        listed = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (saved: {cfg.get(k)!r})" for k in changed)
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_FLAGS)
        raise SystemExit(f"--resume {run_dir}: {listed} would change the run; with --resume only {allowed} "
                         f"may take new values")
    cfg.update({k: v for k, v in given.items() if k in RESUME_FLAGS})
    validate_config(cfg)
    cfg["resume"] = str(run_dir)
    return cfg


def _fields(cfg):
    """The dataset field-mapping flags as load_items keywords."""
    return dict(problem_field=cfg["problem_field"], answer_field=cfg["answer_field"],
                answer_format=cfg["answer_format"])


def _eval_summary(row):
    """One line with the evaluation figures of a metrics row."""
    return ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                     if k.startswith("eval") and not k.endswith(("/n", "/skipped_gold")))


def _autocast_factory(device, bf16):
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def moving_average(values, window):
    """Trailing mean over the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _series(rows, key):
    """(steps, values) of `key` over the rows that hold a number for it (null, from a NaN, is skipped)."""
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def curves_figure(run_dir):
    """The figure of curves.png: reward and entropy per step (raw, faint, and a moving average over about a
    tenth of the steps), held-out avg@k and greedy accuracy at each evaluation, and the four-quadrant
    first-order entropy change per step (flow/<q>_exact, stacked: increases above 0, decreases below); a
    null value (a step without an update) is skipped. Titled with the algorithm, the preset (or model) and
    the seed of the run's config.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in rows if any(k.startswith("eval/avg@") for k in r)]
    train = [r for r in rows if "reward" in r]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, label in zip(axes, ("reward", "entropy"), ("mean reward", "mean token entropy (nats)")):
        steps, values = _series(train, key)
        window = max(1, len(values) // 10)
        ax.plot(steps, values, color="C0", alpha=0.3, lw=0.8, label="per step")
        ax.plot(steps, moving_average(values, window), color="C0", label=f"moving average of {window}")
        ax.set(title=key, xlabel="RL step", ylabel=label)
        ax.legend(fontsize=8)
    avg = next((k for k in evals[0] if k.startswith("eval/avg@")), None) if evals else None
    if avg:
        for key, marker, label in ((avg, "o", avg), ("eval/greedy_acc", "s", "greedy")):
            axes[2].plot(*_series(evals, key), marker=marker, label=label)
        axes[2].legend(fontsize=8)
    axes[2].set(title="held-out accuracy", xlabel="RL step", ylabel="accuracy")
    flow = [r for r in train if all(r.get(f"flow/{q}_exact") is not None for q in losses.QUADRANTS)]
    steps = [r["step"] for r in flow]
    up, down = [0.0] * len(flow), [0.0] * len(flow)
    for q in losses.QUADRANTS:
        values = [r[f"flow/{q}_exact"] for r in flow]
        base = [u if v >= 0 else d for v, u, d in zip(values, up, down)]
        axes[3].bar(steps, values, bottom=base, label=q, width=0.8)
        up = [u + max(v, 0.0) for v, u in zip(values, up)]
        down = [d + min(v, 0.0) for v, d in zip(values, down)]
    if flow:
        axes[3].plot(steps, [r["flow/total_exact"] for r in flow], color="k", marker=".", label="total")
        axes[3].legend(fontsize="x-small", ncol=2)
    axes[3].axhline(0.0, color="grey", linewidth=0.5)
    axes[3].set(title="first-order entropy change by quadrant", xlabel="RL step", ylabel="first-order dH (nats)")
    fig.suptitle(f"{cfg['algo']}, preset {cfg.get('preset') or cfg.get('model')}, seed {cfg['seed']}")
    fig.tight_layout()
    return fig


def plot_curves(run_dir):
    """Write curves.png (curves_figure) into the run directory."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dir)
    fig.savefig(Path(run_dir) / "curves.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    """Parse and check the flags, then train; returns the metric rows. A user error raises SystemExit with a
    one-line message (cli() prints it and exits with status 2)."""
    args = build_parser().parse_args(argv)
    if args.resume:
        cfg = resume_config(args)
        run_dir = Path(args.resume)
    else:
        cfg = resolve_config(args)
        run_dir = Path(cfg["out"])
    if cfg["plot"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return train(cfg, run_dir)


def cli(argv=None):
    """The command line: main(), with a user error printed as one line (exit status 2) and Ctrl-C as 130."""
    try:
        main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"train.py: error: {e.code}", file=sys.stderr)
            return 2
        return e.code
    except KeyboardInterrupt:
        print("interrupted before the run started", file=sys.stderr)
        return 130
    return 0


def _log(msg):
    print(msg, file=sys.stderr)


def train(cfg, run_dir, log=_log):
    """Run (or resume) the loop described in the module docstring; returns the list of metric rows written.

    The run directory is claimed (claim_run_dir) and locked for the whole run. Ctrl-C ends the run with
    SystemExit(130) after naming the last checkpoint.
    """
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    lock = claim_run_dir(run_dir, cfg, log)
    try:
        return _train(cfg, run_dir, log)
    except KeyboardInterrupt:
        ckpt = latest_checkpoint(run_dir)
        where = (f"the last checkpoint is {ckpt}; continue with: python train.py --resume {run_dir}" if ckpt
                 else "no checkpoint was written yet, so it cannot be resumed")
        log(f"interrupted: {where}")
        raise SystemExit(130) from None
    finally:
        release_lock(run_dir, lock)
        if fresh and not any(run_dir.iterdir()):      # failed before writing anything (data, model): no folder
            run_dir.rmdir()


def _load(spec, split, cfg, flag="--dataset"):
    """load_items with the run's field mapping; a bad file or row becomes a one-line user error."""
    try:
        return load_items(spec, split, flag=flag, **_fields(cfg))
    except DataError as e:
        raise SystemExit(str(e)) from None


def _train(cfg, run_dir, log):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["preset"] == "tiny":
        _check_writable(Path(cfg["cache_dir"]), "--cache-dir")
    ckpt, saved = resume_checkpoint(run_dir, log) if cfg.get("resume") else (None, None)
    if saved and cfg["steps"] <= saved["step"]:
        raise SystemExit(f"the run in {run_dir} is already at step {saved['step']} (--steps is {cfg['steps']}): "
                         f"give --steps above {saved['step']} to continue it")

    data_rng = random.Random(cfg["seed"])
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])

    # data (the user's files first: a bad row stops the run before the warm start) and starting model;
    # each evaluation set is (items, score function), logged under its prefix
    score_fn, fork_mask, eval_sets = verify, None, {}
    train_items = _load(cfg["dataset"], cfg["dataset_split"], cfg) if cfg.get("dataset") else None
    if cfg.get("eval_dataset"):
        eval_sets = {"eval": (_load(cfg["eval_dataset"], cfg["eval_split"], cfg, "--eval-dataset"), verify)}
    if cfg["preset"] == "tiny":
        start_model = str(tiny_lab.warm_start(cfg["tiny_sft_steps"], cfg["cache_dir"], log))
        lab_train, lab_evals = tiny_lab.datasets()
        eval_sets = eval_sets or {"eval" if name == "test" else f"eval_{name}": (items, tiny_lab.score)
                                  for name, items in lab_evals.items()}
        if train_items is None:
            train_items, score_fn, fork_mask = lab_train, tiny_lab.score, tiny_lab.fork_mask
    else:
        start_model = cfg["model"]
    if cfg["eval_size"]:
        eval_sets = {name: (items[:cfg["eval_size"]], fn) for name, (items, fn) in eval_sets.items()}
    cfg["start_model"] = start_model

    model, tok = load_model(str(ckpt / "model") if ckpt else start_model, device=device,
                            gradient_checkpointing=cfg["gradient_checkpointing"])
    too_long = {}                 # problems whose prompt exceeds --max-prompt-tokens never reach the model
    train_items, too_long["train"] = drop_long_prompts(train_items, tok, cfg["max_prompt_tokens"],
                                                       cfg["system_prompt"])
    for name, (items, fn) in list(eval_sets.items()):
        kept, too_long[name] = drop_long_prompts(items, tok, cfg["max_prompt_tokens"], cfg["system_prompt"])
        eval_sets[name] = (kept, fn)
    for name, n in too_long.items():
        if n:
            log(f"left out {n} {name} problems whose prompt is longer than --max-prompt-tokens "
                f"{cfg['max_prompt_tokens']}")
    if not train_items:
        raise SystemExit(f"every training problem's prompt is longer than --max-prompt-tokens "
                         f"{cfg['max_prompt_tokens']}")
    ref_model = None
    if needs_reference(cfg):
        ref_model, _ = load_model(start_model, device=device, trainable=False)
    opt_cls = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.SGD
    opt_kw = dict(weight_decay=0.0) if cfg["optimizer"] == "adamw" else {}
    optimizer = opt_cls(model.parameters(), lr=cfg["lr"], **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: lr_factor(done, cfg))
    start_step, order = 0, []
    # Clip-Cov's token draw has its own generator, seeded from --seed; adaptive_entropy's controller state
    generator = torch.Generator().manual_seed(cfg["seed"]) if cfg["algo"] == "clip_cov" else None
    control = losses.entropy_control_init(**control_kwargs(cfg)) if cfg["algo"] == "adaptive_entropy" else None
    logs = [run_dir / name for name in ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl")]
    metrics_path, samples_path, eval_samples_path = logs
    if ckpt:
        if "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        elif cfg["optimizer"] == "adamw":
            log(f"--resume: {ckpt.name} holds no optimizer state (--no-save-optimizer): AdamW restarts from "
                "zero moments, so the run will differ from an uninterrupted one")
        if saved.get("scheduler") is not None:      # a checkpoint from before the schedule flags: constant
            scheduler.load_state_dict(saved["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        order = set_rng_state(saved["rng"], data_rng, generator)
        control = saved.get("entropy_control", control)
        start_step = saved["step"]
        for path in logs:
            _truncate_jsonl(path, start_step, log)
        log(f"resuming {run_dir} from step {start_step} ({ckpt.name})")
    else:
        for path in logs:
            path.write_text("")
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    autocast = _autocast_factory(device, cfg["bf16"])
    state = dict(model=model, tok=tok, ref_model=ref_model, optimizer=optimizer, autocast=autocast,
                 score=score_fn, fork_mask=fork_mask, generator=generator, entropy_control=control)

    def draw(n):
        """n training prompts, in epochs over a shuffled order drawn from data_rng."""
        nonlocal order
        picked = []
        for _ in range(n):
            if not order:
                order = list(range(len(train_items)))
                data_rng.shuffle(order)
            picked.append(train_items[order.pop()])
        return picked

    def write(path, record):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def run_eval(step):
        if not eval_sets:
            return {}
        t = time.perf_counter()
        out = {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg["seed"] * 1_000_003 + step)     # evaluation never moves the training RNG
            for prefix, (items, fn) in eval_sets.items():
                figures, samples = evaluate(
                    model, tok, items, k=cfg["eval_k"], temperature=cfg["eval_temperature"], top_p=cfg["top_p"],
                    max_new_tokens=cfg["max_new_tokens"],
                    chunk=max(1, cfg["prompts_per_step"] * cfg["group_size"] // cfg["eval_k"]),
                    system_prompt=cfg["system_prompt"], autocast=autocast, score_fn=fn, prefix=prefix,
                    keep=cfg["log_samples"])
                out.update(figures)
                for r in samples:
                    write(eval_samples_path, {"step": step, **r})
        out["time/eval"] = time.perf_counter() - t
        return out

    rows = []

    if start_step == 0:
        row = {"step": 0, **run_eval(0), **{f"too_long_prompts/{k}": n for k, n in too_long.items()}}
        write(metrics_path, row)
        rows.append(row)
        if eval_sets:
            log(f"step 0 (start model): {_eval_summary(row)}")
    from tqdm import tqdm
    interactive = sys.stderr.isatty()       # a bar on a terminal, one line per step in a log file
    bar = tqdm(range(start_step + 1, cfg["steps"] + 1), initial=start_step, total=cfg["steps"],
               disable=not interactive, desc=cfg["algo"])
    for step in bar:
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lr = optimizer.param_groups[0]["lr"]
        metrics, records = rl_step(state, cfg, draw(cfg["prompts_per_step"]), draw)
        metrics["lr"] = lr
        with warnings.catch_warnings():      # one schedule step per RL step, also when no update was made
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
        if (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or step == cfg["steps"]:
            metrics.update(run_eval(step))
        metrics["peak_mem_mb"] = _peak_mem_mb(device)
        row = json_safe({"step": step, **metrics})
        write(metrics_path, row)
        for r in records:
            write(samples_path, {"step": step, **r})
        rows.append(row)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", entropy=f"{metrics['entropy']:.3f}")
        if not interactive:
            log(f"step {step}/{cfg['steps']}: reward {metrics['reward']:.3f}, entropy {metrics['entropy']:.3f}, "
                f"{time.perf_counter() - started:.1f}s")
        if step % cfg["save_interval"] == 0 or step == cfg["steps"]:
            t = time.perf_counter()
            save_checkpoint(run_dir, step, model, tok, optimizer, data_rng, order, generator=generator,
                            entropy_control=state["entropy_control"], scheduler=scheduler,
                            with_optimizer=cfg["save_optimizer"])
            log(f"step {step}: checkpoint in {time.perf_counter() - t:.1f}s")
    if rows and "eval/n" in rows[-1]:
        log(f"step {rows[-1]['step']}: {_eval_summary(rows[-1])}")
    if cfg["plot"]:
        plot_curves(run_dir)
    return rows


if __name__ == "__main__":
    sys.exit(cli())
