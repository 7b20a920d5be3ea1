"""The RLVR training loop: GRPO, DAPO, Dr. GRPO, STEER, OPEFO, Archer and the entropy interventions they are
compared with, on one machine, end to end. Read it top to bottom: one RL step, the update, then main().

One step (GRPO, DeepSeekMath arXiv 2402.03300 sec. 4.1; the methods differ in their loss, losses.LOSSES):
    sample G responses for each prompt (rollout.generate) -> verify them (verifier.score, or the lab's
    reward) [-> DAPO: refill rounds until enough groups have non-equal rewards; overlong penalty added to
    the reward] -> group advantages (losses.group_advantages; all-equal groups dropped for DAPO and
    Archer) -> the behaviour policy's log-probs, entropy H and exact-term S2 (no grad)
    [-> the frozen reference's log-probs when a KL term reads them] -> U mini-batches, one optimizer step
    each: the loss's whole-batch statistics once (losses.batch_statistics), then micro-batches with
    gradient accumulation -> clip -> step.

Batch scope: every whole-batch quantity (STEER's M, OPEFO's (P, N), Archer's token types, Clip-Cov's draw,
...) is computed once per mini-batch from the behaviour policy, so no gradient depends on the micro-batch
size; where each method's papers or code chose otherwise: docs/training.md.
Every optimizer step's first-order entropy change is split into STEER's four quadrants
(losses.entropy_flow_quadrants) with each token's weight w = -dLoss/dlogp read off the autograd graph.

The tiny lab (the default without CUDA) is tiny_lab.py; the flags and presets are config.py; the run
directory, checkpoints, resume and exit codes are run_dir.py; datasets and model loading data.py.

    python train.py --algo grpo                         # tiny lab on CPU
    python train.py --algo steer --preset qwen-0.5b-gsm8k --out runs/steer-gsm8k
    python train.py --resume runs/steer-gsm8k
"""
import math
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import config
import data
import evaluation
import losses
import plots
import rollout
import run_dir
import tiny_lab
from entropy_math import estimator_report, estimator_terms


@dataclass
class Run:
    """What a run holds from setup to its last step: resolved once, read by every step (setup builds it)."""
    model: torch.nn.Module
    tok: object                              # the tokenizer
    ref_model: Optional[torch.nn.Module]     # the frozen start model, when the loss reads ref_logp
    optimizer: torch.optim.Optimizer
    scheduler: object                        # LambdaLR over lr_factor
    autocast: Callable                       # data.autocast_factory's context-manager factory
    device: torch.device
    knobs: dict                              # the loss's keywords set by flags (config.knob_kwargs)
    reads_reference: bool                    # losses.uses_reference with those knobs
    generator: Optional[torch.Generator]     # Clip-Cov's token draws
    entropy_control: Optional[dict]          # adaptive entropy's controller state
    data_rng: random.Random                  # the data order
    order: list                              # the rest of the current epoch's shuffled problem indices
    start_step: int
    train_items: list
    eval_sets: dict                          # {prefix: (items, score_fn)}
    score: Callable                          # score(completion, item) -> verifier.Score
    fork_mask: Optional[Callable]            # the lab's fork tokens, for entropy/fork
    too_long: dict                           # problems left out per set (--max-prompt-tokens)
    phase: Callable = field(default=lambda name: None)     # progress inside a step (loop sets it)


# ------------------------------------------------------------------------------------------- one RL step
def sample(state, cfg, items, draw):
    """Generate G responses per prompt and verify them; with DAPO's dynamic sampling (arXiv 2503.14476
    sec. 3.2; --drop-equal-groups with --max-refill-rounds K > 0), while fewer than len(items) groups have
    non-equal rewards, up to K more rounds of len(items) prompts from draw(n). Groups are judged on the
    verifier's rewards (DAPO filters on accuracy), before any overlong penalty.
    Returns (rollout of every response, their prompts, their scores, refill rounds, timings)."""
    model, tok, g, target = state.model, state.tok, cfg["group_size"], len(items)
    refill = cfg["max_refill_rounds"] if cfg["drop_equal_groups"] else 0
    timings = {"generate": 0.0, "score": 0.0}
    parts, sampled, scores, kept, rounds = [], [], [], 0, 0
    while True:
        t = time.perf_counter()
        state.phase(f"generating {len(items)} x {g} responses")
        prompts = [rollout.format_prompt(tok, it["problem"], system_prompt=cfg["system_prompt"]) for it in items]
        model.eval()
        with torch.no_grad(), state.autocast():
            part = rollout.generate(model, tok, prompts, group_size=g, max_new_tokens=cfg["max_new_tokens"],
                                    temperature=cfg["temperature"], top_p=cfg["top_p"])
        timings["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        state.phase("scoring")
        part_scores = [state.score(c, items[int(i)]) for c, i in zip(part.completions, part.prompt_index.tolist())]
        timings["score"] += time.perf_counter() - t
        parts.append(part)
        sampled += items
        scores += part_scores
        kept += sum(group_filter(part_scores, g, cfg["drop_equal_groups"])[2])
        if kept >= target or rounds >= refill:
            break
        rounds += 1
        items = draw(target)
    return rollout.concat_rollouts(parts, tok.pad_token_id), sampled, scores, rounds, timings


def group_filter(scores, g, drop_equal):
    """Per group of g consecutive scores: (unparseable gold, all rewards equal, kept) lists of bools."""
    n = len(scores) // g
    bad = [any(scores[i * g + j].correct is None for j in range(g)) for i in range(n)]
    equal = [len({scores[i * g + j].reward for j in range(g)}) == 1 for i in range(n)]
    return bad, equal, [not b and not (drop_equal and e) for b, e in zip(bad, equal)]


def rl_step(state, cfg, items, draw):
    """One RL step on the prompts `items`; returns (metrics dict, sample records). draw(n) -> n more prompts.

    The kept groups train in sampling order, at most len(items) of them (a refill's surplus is dropped, as
    DAPO's recipe does). The sample metrics (reward, accuracy, entropy, lengths) are over every response.
    """
    g, target, method = cfg["group_size"], len(items), losses.LOSSES[cfg["algo"]]
    # 1. sample G responses per prompt and score them (DAPO: refill until enough groups differ)
    ro, items, scores, rounds, timings = sample(state, cfg, items, draw)
    rewards = torch.tensor([s.reward for s in scores])
    bad_gold, all_equal, passed = group_filter(scores, g, cfg["drop_equal_groups"])
    keep_groups = [i for i, ok in enumerate(passed) if ok][:target]
    # 2. group advantages from the rewards (DAPO: plus the overlong penalty)
    shaped = rewards
    if cfg["overlong_penalty"]:                                        # DAPO sec. 3.4
        penalty = losses.overlong_penalty(ro.response_length.cpu(), cfg["max_new_tokens"], cfg["overlong_cache"])
        shaped = rewards + penalty
    adv = losses.group_advantages(shaped, g, std_normalize=method.std_normalize).to(ro.response_mask.device)
    valid_resp = ro.response_mask.sum()
    metrics = {
        "reward": float(rewards.mean()), "accuracy": sum(s.correct is True for s in scores) / len(scores),
        "response_length": float(ro.response_length.float().mean()),
        "truncation_rate": float(ro.truncated.float().mean()), "groups_kept": len(keep_groups),
        "groups_all_equal": sum(all_equal), "groups_sampled": len(items),
        "groups_kept_frac": sum(passed) / len(items), "refill_rounds": rounds,
        "skipped_unparseable_gold": sum(bad_gold), "timed_out_verifications": sum(bool(s.timed_out) for s in scores),
    }
    records = [{"prompt": items[i // g]["problem"], "gold": items[i // g]["answer"],
                "completion": ro.completions[i], "answer": scores[i].answer, "reward": scores[i].reward,
                "correct": scores[i].correct, "truncated": bool(ro.truncated[i]), "advantage": float(adv[i])}
               for i in range(min(cfg["log_samples"], len(items)) * g)]
    stats_fn = make_stats_fn(state, cfg)
    t = time.perf_counter()
    full = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
            "prompt_length": ro.prompt_length}
    # 3. the behaviour policy's log pi, H and S2 on every response (the losses' old_logp, entropy, exact_term)
    state.phase("log-probs")
    old = stats_fn(full)                                           # the behaviour policy: log pi, H, S2
    metrics["entropy"] = float((old["entropy"] * ro.response_mask).sum() / valid_resp.clamp(min=1))
    if state.fork_mask:
        metrics.update(tiny_lab.fork_entropy(state.fork_mask, ro, items, old["entropy"]))
    if cfg["overlong_penalty"]:
        metrics["overlong_penalty"] = float(penalty.mean())
    # 4. this step's knobs, then U optimizer steps on the kept groups (with the reference's log pi if read)
    knobs = {}
    if method.adaptive:  # Skywork-OR1: one controller step per RL step, on the rollout's entropy
        knobs["coef"], state.entropy_control = losses.entropy_control_step(state.entropy_control,
                                                                               metrics["entropy"])
        metrics["entropy_control/alpha"] = knobs["coef"]         # Skywork-OR1's alpha_k
        metrics["entropy_control/coef"] = state.entropy_control["coef"]          # the next step's c
    if "generator" in method.knobs:
        knobs["generator"] = state.generator
    rows = [i * g + j for i in keep_groups for j in range(g)]
    timings["stats"] = time.perf_counter() - t
    if rows:
        batch = take(dict(full, advantages=adv, old_logp=old["logp"], entropy=old["entropy"],
                          exact_term=old["exact_term"]), rows)
        if state.ref_model is not None:
            t = time.perf_counter()
            batch["ref_logp"] = stats_fn(batch, with_entropy=False, net=state.ref_model)["logp"]
            timings["stats"] += time.perf_counter() - t
        t = time.perf_counter()
        state.phase("update")
        metrics.update(update(state.model, state.optimizer, batch, cfg, stats_fn, knobs=knobs,
                              loss_knobs=state.knobs, reads_reference=state.reads_reference))
        timings["update"] = time.perf_counter() - t
        metrics["update_tokens"] = int(batch["mask"].sum())
    else:
        metrics.update(updates=0, skipped_nonfinite=0, rows_skipped_zero_adv=0, update_tokens=0, **flow_report([]))
        timings["update"] = 0.0
    metrics["tokens_per_s/generate"] = int(valid_resp) / max(timings["generate"], 1e-9)
    metrics["tokens_per_s/step"] = int(valid_resp) / max(sum(timings.values()), 1e-9)
    metrics.update({f"time/{k}": v for k, v in timings.items()})
    return metrics, records


def make_stats_fn(state, cfg):
    """stats_fn(b, with_grad=False, with_entropy=True, net=None) -> rollout.response_stats of the batch dict b
    (log pi, and H and S2 with with_entropy) at the sampling temperature, under the run's autocast, in
    forward micro-batches of --micro-batch-size."""
    def stats_fn(b, with_grad=False, with_entropy=True, net=None):
        with torch.set_grad_enabled(with_grad), state.autocast():
            return rollout.response_stats(net or state.model, b["input_ids"], b["attention_mask"],
                                          b["prompt_length"], b["mask"], temperature=cfg["temperature"],
                                          with_grad=with_grad, with_entropy=with_entropy,
                                          micro_batch_size=cfg["micro_batch_size"])
    return stats_fn


# ------------------------------------------------------------------------------------------- the update
def update(model, optimizer, batch, cfg, stats_fn, *, knobs=None, loss_knobs=None, reads_reference=None):
    """The loss over U mini-batches (one optimizer step each) of the kept responses; returns a metrics dict.

    batch: input_ids, attention_mask (N, P+R); mask (N, R); advantages (N,); old_logp, entropy, exact_term
    and optionally ref_logp (N, R); prompt_length. Mini-batches are whole groups (optimizer_step).
    knobs: loss keywords the loop sets per step on top of the flags' (adaptive_entropy's coef, Clip-Cov's
    generator); without a coef adaptive_entropy takes the controller's starting coefficient. loss_knobs,
    reads_reference: the run's (Run.knobs, Run.reads_reference); None: worked out from cfg here, once.
    Loss metrics are averaged over the optimizer steps; flow/<q>_{exact,paper,count} summed (flow_report).
    """
    method, g = losses.LOSSES[cfg["algo"]], cfg["group_size"]
    loss_kw, control_kw = config.knob_kwargs(cfg) if loss_knobs is None else (loss_knobs, {})
    kwargs = dict(loss_kw, **(knobs or {}))
    if method.adaptive:
        kwargs.setdefault("coef", losses.entropy_control_init(**control_kw)["coef"])
    if reads_reference is None:
        reads_reference = losses.uses_reference(cfg["algo"], **loss_kw)
    groups = list(range(batch["mask"].shape[0] // g))
    n_mini = min(cfg["updates_per_batch"], len(groups))        # OPEFO: 1 (config.resolve forces it)
    minis = [sum(([i * g + j for j in range(g)] for i in groups[m::n_mini]), []) for m in range(n_mini)]
    steps = [optimizer_step(model, optimizer, take(batch, rows), cfg, stats_fn, kwargs, reads_reference)
             for rows in minis]
    taken = [s for s in steps if s["finite"]]
    out = {f"loss/{k}": v for k, v in mean_over_steps([s["metrics"] for s in taken]).items()}
    out.update({"updates": len(taken), "skipped_nonfinite": len(steps) - len(taken),
                "rows_skipped_zero_adv": sum(s["rows_skipped"] for s in steps),
                "grad_norm": sum(s["grad_norm"] for s in taken) / len(taken) if taken else None})
    out.update(flow_report([s["flow"] for s in taken]))
    measured = [s["measured"] for s in taken if "measured" in s]
    if measured:
        out.update(estimator_report(measured))
    return out


def optimizer_step(model, optimizer, mb, cfg, stats_fn, kwargs, reads_reference):
    """One optimizer step on the mini-batch mb: the loss's whole-batch statistics once
    (losses.batch_statistics: num_tokens, num_seqs and the method's own, per-row ones sliced with each
    micro-batch), then micro-batches of at most --micro-batch-size rows accumulate gradients, so the
    gradient does not depend on the micro-batch size.
    Rows whose gradient is exactly 0 (zero_advantage_rows) stay in num_tokens / num_seqs but get no forward
    or backward: the parameters after the step are the same. A non-finite loss or gradient norm skips the
    step (parameters untouched). Returns finite, metrics, grad_norm, flow (losses.entropy_flow_quadrants),
    measured (entropy_math.estimator_terms with --measure-entropy-change), rows_skipped."""
    algo = cfg["algo"]
    method = losses.LOSSES[algo]
    stats = losses.batch_statistics(algo, mask=mb["mask"], advantages=mb["advantages"], old_logp=mb["old_logp"],
                                    entropy=mb["entropy"], exact_term=mb["exact_term"], **kwargs)
    per_row = [k for k, v in stats.items() if torch.is_tensor(v)]        # (rows, R): sliced per micro-batch
    mb.update({k: stats.pop(k) for k in per_row})
    before = stats_fn(mb, with_entropy=True) if cfg["measure_entropy_change"] else None
    weights, current = torch.zeros_like(mb["mask"]), mb["old_logp"].clone()   # w and log pi per token
    live = (~zero_advantage_rows(mb, cfg, reads_reference)).nonzero().flatten().tolist()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    parts, loss_sum, finite = [], 0.0, True
    for s in range(0, len(live), cfg["micro_batch_size"]):
        sub = live[s:s + cfg["micro_batch_size"]]
        mu = take(mb, sub)
        out = stats_fn(mu, with_grad=True, with_entropy="current_entropy" in method.inputs)
        logp = out["logp"]
        logp.retain_grad()
        loss, metrics = method(logp=logp, old_logp=mu["old_logp"], advantages=mu["advantages"], mask=mu["mask"],
                               entropy=mu["entropy"], exact_term=mu["exact_term"], ref_logp=mu.get("ref_logp"),
                               current_entropy=out.get("entropy"), norm_length=cfg["max_new_tokens"],
                               **stats, **{k: mu[k] for k in per_row}, **kwargs)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        if logp.grad is not None:
            weights[sub] = -logp.grad.detach()          # w = -dLoss/dlogp per token
        current[sub] = logp.detach()
        loss_sum += float(loss.detach())
        parts.append((int(mu["mask"].sum()), metrics))
    if not live:                        # every row skipped: the exactly zero gradient a pass would have given
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"]) if finite else None
    result = dict(finite=finite and bool(torch.isfinite(norm)), rows_skipped=len(mb["advantages"]) - len(live))
    if not result["finite"]:
        optimizer.zero_grad(set_to_none=True)           # skip: parameters untouched
        return result
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    change = losses.grpo_weight_change(weights, current, mb["old_logp"], mb["advantages"], mb["mask"],
                                       num_tokens=stats["num_tokens"], num_seqs=stats["num_seqs"])
    result.update(grad_norm=float(norm), metrics=dict(losses.merge_metrics(algo, parts), loss=loss_sum,
                                                      **{f"grpo_weight_{k}": v for k, v in change.items()}),
                  flow=losses.entropy_flow_quadrants(mb["old_logp"], mb["entropy"], mb["exact_term"],
                                                     mb["advantages"], weights, mb["mask"]))
    if before is not None:              # the realised change of this step against the first-order forms
        result["measured"] = estimator_terms(before, stats_fn(mb, with_entropy=True), weights, mb["mask"].bool())
    return result


def mean_over_steps(metrics):
    """Each key's mean over the optimizer steps' metric dicts that hold it."""
    keys = dict.fromkeys(k for m in metrics for k in m)
    return {k: sum(m[k] for m in metrics if k in m) / sum(k in m for m in metrics) for k in keys}


def zero_advantage_rows(mb, cfg, reads_reference):
    """(rows,) bool: the rows of mini-batch mb that the update's forward and backward leave out
    (--skip-zero-advantage, on by default): those whose gradient is exactly 0 (losses.LOSSES[algo].zero_rows,
    a zero advantage); none when the loss reads every row (no zero_rows, or a KL to the reference is on)."""
    method, none = losses.LOSSES[cfg["algo"]], torch.zeros_like(mb["advantages"], dtype=torch.bool)
    if not cfg.get("skip_zero_advantage", True) or method.zero_rows is None or reads_reference:
        return none
    return method.zero_rows(mb["advantages"], mb["mask"], mb["entropy"])


def take(batch, rows):
    """Rows `rows` (list of int) of every (N, ...) tensor in dict `batch`."""
    idx = torch.as_tensor(rows, device=batch["mask"].device)
    return {k: (v.index_select(0, idx) if torch.is_tensor(v) else v) for k, v in batch.items()}


def flow_report(flows):
    """flow/<q>_{exact,paper,count} for q in losses.QUADRANTS, zero_adv and total, summed over the optimizer
    steps' quadrant dicts (losses.entropy_flow_quadrants); None when no step was taken."""
    return {f"flow/{q}_{k}": (sum(f[f"{q}_{k}"] for f in flows) if flows else None)
            for q in losses.QUADRANTS + ("zero_adv", "total") for k in ("exact", "paper", "count")}


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


# ------------------------------------------------------------------------------------------- the run
def setup(cfg, out, log):
    """Everything a run needs before its first step, new or resumed: the problems and the policy (data.py),
    the reference when the loss reads it, the optimizer and schedule, the RNGs and the logs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    if cfg["preset"] == "tiny":
        run_dir.check_writable(Path(cfg["cache_dir"]), "--cache-dir")
    ckpt, saved = run_dir.resume_checkpoint(out, log) if cfg.get("resume") else (None, None)
    if saved and cfg["steps"] <= saved["step"]:
        raise SystemExit(f"the run in {out} is already at step {saved['step']} (--steps is {cfg['steps']}): "
                         f"give --steps above {saved['step']} to continue it")
    data_rng = random.Random(cfg["seed"])
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    problems = data.load_problems(cfg, log)
    model, tok = data.load_model(str(ckpt / "model") if ckpt else cfg["start_model"], device=device,
                                 gradient_checkpointing=cfg["gradient_checkpointing"])
    problems.update(data.drop_too_long(problems, tok, cfg, log))
    knobs, control_knobs = config.knob_kwargs(cfg)
    reads_reference = losses.uses_reference(cfg["algo"], **knobs)
    ref_model = data.load_model(cfg["start_model"], device=device, trainable=False)[0] if reads_reference else None
    opt_cls = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.SGD
    optimizer = opt_cls(model.parameters(), lr=cfg["lr"], **(dict(weight_decay=0.0) if cfg["optimizer"] == "adamw"
                                                              else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: lr_factor(done, cfg))
    method = losses.LOSSES[cfg["algo"]]
    generator = torch.Generator().manual_seed(cfg["seed"]) if "generator" in method.knobs else None
    control = losses.entropy_control_init(**control_knobs) if method.adaptive else None
    order = []
    if ckpt:
        order = run_dir.restore(out, ckpt, saved, cfg, optimizer=optimizer, scheduler=scheduler, data_rng=data_rng,
                                generator=generator, log=log)
        control = saved.get("entropy_control", control)
    else:
        for name in run_dir.LOGS:
            (out / name).write_text("")
    run_dir.write_config(out, cfg)
    autocast = data.autocast_factory(device, cfg["bf16"])
    return Run(model=model, tok=tok, ref_model=ref_model, optimizer=optimizer, scheduler=scheduler, autocast=autocast,
               device=device, knobs=knobs, reads_reference=reads_reference, generator=generator,
               entropy_control=control, data_rng=data_rng, order=order, start_step=saved["step"] if saved else 0,
               **problems)


def main(argv=None, log=None):
    """The command line: parse and check the flags (config.py), hold the run directory (run_dir.py), then the
    step loop. Returns the metric rows written. A user error is SystemExit with a one-line message."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg, out = config.parse(argv)
    with run_dir.open_run(out, cfg, log):
        state = setup(cfg, out, log)
        log(f"run directory: {out}")
        return loop(state, cfg, out, log)


def loop(state, cfg, out, log):
    """Steps start_step + 1 .. --steps: one RL step, the schedule, evaluation, logs and checkpoints."""
    from tqdm import tqdm

    def draw(n):
        """n training prompts, in epochs over a shuffled order drawn from the data-order RNG."""
        picked = []
        for _ in range(n):
            if not state.order:
                state.order = list(range(len(state.train_items)))
                state.data_rng.shuffle(state.order)
            picked.append(state.train_items[state.order.pop()])
        return picked

    def evaluate(step):
        return evaluation.evaluate_sets(state.model, state.tok, state.eval_sets, cfg, step, state.autocast,
                                        state.device, lambda r: run_dir.append_jsonl(out / "eval_samples.jsonl", r))

    rows, start, report = [], state.start_step, run_dir.reporter(out, cfg.get("report_to"))
    if start == 0:
        rows.append({"step": 0, **evaluate(0), **{f"too_long_prompts/{k}": n for k, n in state.too_long.items()}})
        run_dir.append_jsonl(out / "metrics.jsonl", rows[-1])
        report(rows[-1])
        if state.eval_sets:
            log(f"step 0 (start model): {evaluation.summary(rows[-1])}")
    interactive, began = sys.stderr.isatty(), time.perf_counter()   # a bar on a terminal, lines in a log
    bar = tqdm(range(start + 1, cfg["steps"] + 1), initial=start, total=cfg["steps"], disable=not interactive,
               desc=cfg["algo"])
    with run_dir.stop_on_ctrl_c(log) as stop_asked:
        for step in bar:
            # progress inside a step: its phase on the bar, or a line per phase in a log (--model steps are long)
            state.phase = lambda name: (bar.set_postfix_str(name) if interactive
                                           else cfg.get("model") and log(f"step {step}: {name}"))
            started = time.perf_counter()
            if state.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(state.device)
            lr = state.optimizer.param_groups[0]["lr"]
            # one RL step, then the schedule, evaluation, logs and a checkpoint
            metrics, records = rl_step(state, cfg, draw(cfg["prompts_per_step"]), draw)
            metrics["lr"] = lr
            with warnings.catch_warnings():      # one schedule step per RL step, also when no update was made
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                state.scheduler.step()
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", entropy=f"{metrics['entropy']:.3f}")
            if not interactive:
                log(f"step {step}/{cfg['steps']}: reward {metrics['reward']:.3f}, entropy "
                    f"{metrics['entropy']:.3f}, {time.perf_counter() - started:.1f}s")
            if (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or step == cfg["steps"]:
                metrics.update(evaluate(step))
                if state.eval_sets:
                    log(f"step {step} evaluation, {metrics['time/eval']:.1f}s: {evaluation.summary(metrics)}")
            metrics["peak_mem_mb"] = run_dir.peak_mem_mb(state.device)
            rows.append(run_dir.json_safe({"step": step, **metrics}))
            run_dir.append_jsonl(out / "metrics.jsonl", rows[-1])
            report(rows[-1])
            for r in records:
                run_dir.append_jsonl(out / "samples.jsonl", {"step": step, **r})
            if step % cfg["save_interval"] == 0 or step == cfg["steps"] or stop_asked():
                t = time.perf_counter()
                run_dir.save_checkpoint(out, step, model=state.model, tok=state.tok, optimizer=state.optimizer,
                                        scheduler=state.scheduler, data_rng=state.data_rng, order=state.order,
                                        generator=state.generator, entropy_control=state.entropy_control,
                                        with_optimizer=cfg["save_optimizer"])
                log(f"step {step}: checkpoint in {time.perf_counter() - t:.1f}s")
            if stop_asked():
                raise KeyboardInterrupt          # open_run names the checkpoint just written
    if cfg["plot"]:
        plots.plot_curves(out)
        log(f"wrote {out / 'curves.png'}")
    last = rows[-1] if rows else {}
    log(f"done: {cfg['steps']} steps, {time.perf_counter() - began:.0f}s this session; last step reward "
        f"{last.get('reward', float('nan')):.3f}, entropy {last.get('entropy', float('nan')):.3f}; "
        f"{evaluation.summary(last) or 'no evaluation set'}; run directory {out}")
    return rows


if __name__ == "__main__":
    sys.exit(run_dir.cli(main, "train.py"))
