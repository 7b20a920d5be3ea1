"""Held-out figures of a policy: avg@k, unbiased pass@k, distinct correct solutions and greedy accuracy.

train.py evaluates the starting model, every --eval-interval steps and the last step (evaluate_sets); the toy
uses the same pass_at_k. Sampling uses torch's global RNG, forked and seeded per evaluation, so evaluating
never changes the training run.

    from evaluation import evaluate, pass_at_k
    figures, samples = evaluate(model, tok, items, k=8, temperature=1.0, top_p=1.0, max_new_tokens=512,
                                chunk=8, system_prompt=None, autocast=contextlib.nullcontext)
"""
import math
import time

import torch

import rollout
import verifier


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k); k <= n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
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


def summary(row):
    """One line with the evaluation figures of a metrics row."""
    return ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                     if k.startswith("eval") and not k.endswith(("/n", "/skipped_gold")))


def evaluate_sets(model, tok, eval_sets, cfg, step, autocast, device, on_samples):
    """evaluate() on every held-out set {prefix: (items, score_fn)} with the run's settings; returns the figures
    and time/eval. Sampling runs on a forked RNG seeded from (--seed, step), so evaluation never moves the
    training RNG. on_samples(record) receives each kept completion (eval_samples.jsonl)."""
    if not eval_sets:
        return {}
    t = time.perf_counter()
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"] * 1_000_003 + step)
        for prefix, (items, fn) in eval_sets.items():
            figures, samples = evaluate(
                model, tok, items, k=cfg["eval_k"], temperature=cfg["eval_temperature"], top_p=cfg["top_p"],
                max_new_tokens=cfg["max_new_tokens"],
                chunk=max(1, cfg["prompts_per_step"] * cfg["group_size"] // cfg["eval_k"]),
                system_prompt=cfg["system_prompt"], autocast=autocast, score_fn=fn, prefix=prefix,
                keep=cfg["log_samples"])
            out.update(figures)
            for r in samples:
                on_samples({"step": step, **r})
    out["time/eval"] = time.perf_counter() - t
    return out
