"""The lab comparison in one command: every algorithm x 5 seeds on the tiny lab, a table and a plot.

Each run is `python train.py --algo ALGO --seed S --measure-entropy-change [setting flags]` in its own
directory under runs/compare/SETTING/NAME-seedS. The script
    - builds the lab's warm start once, then runs the cells, --jobs at a time (one process each; 2 by
      default, one per core, each on one thread);
    - resumes: a finished run (its last metrics row is the final step) is read, not redone; an unfinished
      one continues from its checkpoint with train.py --resume;
    - writes SETTING/table.md (mean +- 95% confidence interval over the seeds, Student t; the clip
      fractions and approximate KL per cell; the claims of claims.py decided for the setting: seed-matched
      differences with Holm-corrected intervals, the detectable difference, the leverage), results.json
      (every run's figures, the claims, the warm start's fingerprint), curves.png and strips.png (each seed's
      value per cell), and ends with one line per written file: "wrote PATH".

Settings (the flags each cell adds to train.py's lab defaults; claims.py names the claims each decides):
    default          every algorithm of the first three papers and the interventions, paper defaults, and
                     GRPO dropping all-equal groups (the normaliser control of DAPO, Archer, ASPO, CE-GPPO)
    clip-regime      where the clip acts: 8 optimizer steps per rollout batch (the recipes take 4-16) at
                     lr / 2 = 2.5e-4, chosen on GRPO seed 0 alone before any other method ran (the largest
                     of lr/2, lr/4, lr/8 whose held-out avg@64 gain by step 100 is at least the default's);
                     GRPO (also dropping equal groups), DAPO, STEER's extreme scenario (eps_low 0.99, eps_high
                     5, paper and exact) with GRPO in it, Archer and two ablations, ASPO, CE-GPPO
    successors       the clip regime for the newer losses: GSPO, CISPO, SAPO, ERC on DAPO and on GPPO (ERC
                     acts only off-policy), Clip_B, Clip_V (exact and paper scores), beside GRPO, DAPO, GPPO
    opefo-onpolicy   OPEFO's own control: GRPO strictly on-policy (1 update) at OPEFO's lr x sqrt(2)
    steer-search     where might GRPO without a clip collapse? GRPO and GRPO-extreme at 8 or 16 updates per
                     batch and lr / 2, lr, 2 lr, two seeds (the rule is in RESULTS.md)
    steer-regime     the point it found (8 updates, lr 5e-4): GRPO, GRPO-extreme, STEER-extreme (paper, exact)
    steer-seeds      the default's GRPO and STEER, run to 10 seeds (STEER's claims lean on fork entropy)
    steer-dose       STEER at lambda_min 1 (the pipeline control), 0.8, 0.7, 0.6, 0.5, 0.3, 0.1
    quadrant         GRPO with one quadrant's update doubled or halved (STEER's interventions)
    archer-leverage  the clip regime with Archer's KL and knowledge clip turned up, and forking tokens
    dapo-generation  DAPO against GRPO trained for 220 steps (about as many generated groups)

Run:
    python compare.py                                    # default setting, 5 seeds, 2 jobs
    python compare.py --setting clip-regime
    python compare.py --algos grpo steer --seeds 2 --steps 20 --jobs 1
    python compare.py --setting default --train-flags "--updates-per-batch 8" --out runs/compare-u8
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import claims
import config
import losses
import plots
import tiny_lab
import toy_bandit
from claims import mean_ci, t_ppf
from run_dir import json_safe, read_jsonl

ROOT = Path(__file__).resolve().parent
LAB_LR = config.PRESETS["tiny"]["lr"]
EXTREME = ["--clip-low", "0.99", "--clip-high", "5"]                   # STEER's extreme scenario (Table 6)
REGIME = ["--updates-per-batch", "8", "--lr", f"{LAB_LR / 2:.6g}"]      # clip-regime (module docstring)
OPEFO_LR = ["--lr", f"{LAB_LR * math.sqrt(2):.6g}"]                    # lr x sqrt(U), U = 2, as OPEFO scales it
DROP = ["--drop-equal-groups"]       # the normaliser control of the methods that drop all-equal groups
SEARCH = [(u, lr) for u in (8, 16) for lr in (LAB_LR / 2, LAB_LR, 2 * LAB_LR)]     # steer-search's points
STEER_REGIME = ["--updates-per-batch", "8", "--lr", f"{LAB_LR:g}"]     # steer-search's one point (RESULTS.md)
LAMBDA_MIN = ("1", "0.8", "0.7", "0.6", "0.5", "0.3", "0.1")             # steer-dose: 1 is the pipeline control


def _regime(cells):
    return {name: args + REGIME for name, args in cells.items()}


SUCCESSORS = ("gspo", "gspo_token", "cispo", "cispo_trl", "sapo", "erc_dapo", "erc_gppo", "clip_b", "clip_v")
SETTINGS = {
    "default": {**{algo: ["--algo", algo] for algo in config.ALGOS if algo not in ("quadrant",) + SUCCESSORS},
                "grpo-drop": ["--algo", "grpo"] + DROP},
    "clip-regime": _regime({
        "grpo": ["--algo", "grpo"], "grpo-drop": ["--algo", "grpo"] + DROP, "dapo": ["--algo", "dapo"],
        "grpo-extreme": ["--algo", "grpo"] + EXTREME, "steer-extreme-paper": ["--algo", "steer"] + EXTREME,
        "steer-extreme-exact": ["--algo", "steer", "--first-order-form", "exact"] + EXTREME,
        "archer": ["--algo", "archer"], "archer-no-kl": ["--algo", "archer", "--kl-knowledge", "0"],
        "archer-one-clip": ["--algo", "archer", "--clip-reasoning", "0.2"],
        "aspo": ["--algo", "aspo"], "ce-gppo": ["--algo", "ce_gppo"]}),
    "successors": _regime({         # gspo_token and cispo_trl left out: GSPO's gradient, CISPO at another cap
        "grpo": ["--algo", "grpo"], "dapo": ["--algo", "dapo"], "gppo": ["--algo", "gppo"],
        "gspo": ["--algo", "gspo"], "cispo": ["--algo", "cispo"], "sapo": ["--algo", "sapo"],
        "erc-dapo": ["--algo", "erc_dapo"], "erc-gppo": ["--algo", "erc_gppo"], "clip-b": ["--algo", "clip_b"],
        "clip-v": ["--algo", "clip_v"], "clip-v-paper": ["--algo", "clip_v", "--first-order-form", "paper"]}),
    "opefo-onpolicy": {
        "grpo": ["--algo", "grpo"], "grpo-onpolicy": ["--algo", "grpo", "--updates-per-batch", "1"] + OPEFO_LR,
        "opefo": ["--algo", "opefo"] + OPEFO_LR, "opefo-exact": ["--algo", "opefo", "--first-order-form", "exact"]
        + OPEFO_LR},
    "steer-search": {f"{name}-u{u}-lr{lr:g}": ["--algo", "grpo", "--updates-per-batch", str(u), "--lr", f"{lr:g}"]
                     + extra for u, lr in SEARCH for name, extra in (("grpo", []), ("grpo-extreme", EXTREME))},
    "steer-regime": {name: args + STEER_REGIME for name, args in (       # the point steer-search found
        ("grpo", ["--algo", "grpo"]), ("grpo-extreme", ["--algo", "grpo"] + EXTREME),
        ("steer-extreme-paper", ["--algo", "steer"] + EXTREME),
        ("steer-extreme-exact", ["--algo", "steer", "--first-order-form", "exact"] + EXTREME))},
    "steer-seeds": {"grpo": ["--algo", "grpo"], "steer": ["--algo", "steer"]},    # the default's, 10 seeds
    "steer-dose": {f"steer-{lm}": ["--algo", "steer", "--lambda-min", lm] for lm in LAMBDA_MIN},
    "quadrant": {"grpo": ["--algo", "grpo"],
                 **{f"{q}-x{x}": ["--algo", "quadrant", f"--scale-{q.replace('_', '-')}", x]
                    for q in losses.QUADRANTS for x in ("2", "0.5")}},
    "archer-leverage": _regime({
        "grpo-drop": ["--algo", "grpo"] + DROP, "archer": ["--algo", "archer"],
        "archer-no-kl": ["--algo", "archer", "--kl-knowledge", "0"],
        "archer-one-clip": ["--algo", "archer", "--clip-reasoning", "0.2"],
        "archer-kl-0.01": ["--algo", "archer", "--kl-knowledge", "0.01"],
        "archer-kl-0.1": ["--algo", "archer", "--kl-knowledge", "0.1"],
        "archer-clip-knowledge-0.1": ["--algo", "archer", "--clip-knowledge", "0.1"],
        "forking": ["--algo", "forking"]}),
    "dapo-generation": {"dapo": ["--algo", "dapo"], "grpo-long": ["--algo", "grpo", "--steps", "220"]},
}
def read_rows(run_dir):
    """The metrics rows of a run (a partial trailing line, from a run killed mid-write, is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def is_finished(run_dir):
    """True when the run's last metrics row is its final step (the step count from its config.json)."""
    rows = read_rows(run_dir)
    cfg_path = Path(run_dir) / "config.json"
    return bool(rows) and cfg_path.exists() and rows[-1]["step"] == json.loads(cfg_path.read_text())["steps"]


def run_cell(run_dir, args, threads):
    """Run (or resume) one cell on `threads` CPU threads; returns (run_dir, return code). Output goes to
    <run_dir>.log beside it."""
    run_dir = Path(run_dir)
    if is_finished(run_dir):
        return run_dir, 0
    if (run_dir / "checkpoints" / "latest").exists():
        cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)            # started but never checkpointed: start again
        cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(run_dir), "--threads", str(threads),
               "--measure-entropy-change"] + args
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return run_dir, code


# ------------------------------------------------------------------------------------------- figures
def window_mean(rows, key, first, last):
    """Mean of `key` over the training rows with first <= step <= last (rows without it ignored)."""
    vals = [r[key] for r in rows if first <= r["step"] <= last and r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def window(steps):
    """Steps per start / end window of a run of `steps` steps: 10, fewer for runs under 20 steps (the two
    windows never overlap)."""
    return max(1, min(10, steps // 2))


def run_figures(rows):
    """The figures of one finished run: start and end entropy (all tokens, forks, elsewhere; the mean over the
    first and the last window(steps) steps), the final held-out evaluation of each set, and the estimator
    correlations averaged over the steps."""
    steps = max(r["step"] for r in rows)
    w = window(steps)
    final = next(r for r in reversed(rows) if any(k.startswith("eval") for k in r))
    out = {}
    for key in ("entropy", "entropy/fork", "entropy/other"):
        out[f"{key} start"] = window_mean(rows, key, 1, w)
        out[f"{key} end"] = window_mean(rows, key, steps - w + 1, steps)
    out["reward end"] = window_mean(rows, "reward", steps - w + 1, steps)
    start_eval = rows[0]
    for k, v in final.items():
        if k.startswith("eval") and not k.endswith(("/n", "/skipped_gold")):
            out[k] = v
            out[f"{k} start"] = start_eval.get(k)
    for k in {k for r in rows for k in r if k.startswith("dH/") or (k.startswith("flow/") and k.endswith("_exact"))
              or k in CLIP_COLUMNS or k in LEVERAGE_COLUMNS}:
        out[k] = window_mean(rows, k, 1, steps)
    return out


def summarise(results):
    """{cell: {figure: (mean, ci)}} over the seeds of each cell, after a "start model" row: the held-out
    figures of step 0 (the warm start, the same for every cell)."""
    out = {}
    first = next((runs for runs in results.values() if runs), None)
    if first:
        out["start model"] = {k[:-len(" start")]: mean_ci([run[k] for run in first if k in run])
                              for k in first[0] if k.startswith("eval") and k.endswith(" start")}
    out.update({name: {k: mean_ci([run[k] for run in runs if k in run]) for k in runs[0]}
                for name, runs in results.items() if runs})
    return out


def _fmt(mc, spec=".3f"):
    m, ci = mc
    if math.isnan(m):
        return "-"
    return f"{m:{spec}}" if math.isnan(ci) else f"{m:{spec}} ± {ci:{spec}}"


TABLE_COLUMNS = ("entropy start", "entropy end", "entropy/fork start", "entropy/fork end", "entropy/other end",
                 "eval/avg@64", "eval/pass@64", "eval/distinct", "eval_unique/avg@64", "eval_unique/pass@64")


def table(summary, columns=TABLE_COLUMNS, spec=".3f"):
    """Markdown table: one row per cell (those with a value in `columns`), mean ± 95% CI over seeds, each
    number formatted by `spec`."""
    cols = [c for c in columns if any(c in s for s in summary.values())]
    lines = ["| run | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, s in summary.items():
        if any(c in s for c in cols):
            lines.append(f"| {name} | " + " | ".join(_fmt(s.get(c, (float("nan"),) * 2), spec) for c in cols) + " |")
    return "\n".join(lines)


CLIP_COLUMNS = ("loss/clip_frac_low", "loss/clip_frac_high", "loss/approx_kl")
LEVERAGE_COLUMNS = ("loss/grpo_weight_changed", "loss/grpo_weight_l1", "loss/weight_mean", "loss/weight_p05",
                    "loss/lambda_star", "loss/cov_frac", "loss/forking_frac", "loss/reasoning_frac", "loss/kl",
                    "loss/kl_knowledge", "groups_sampled")
FLOW_COLUMNS = tuple(f"flow/{q}_exact" for q in losses.QUADRANTS + ("zero_adv", "total"))
ESTIMATOR_COLUMNS = tuple(f"dH/{stat}_{form}{sub}" for sub in ("", "_uncertain") for form in losses.FIRST_ORDER_FORMS
                          for stat in ("pearson", "spearman", "sign_agree"))


SUB_TABLES = (     # (heading, columns, number format): written below the main table when a run measured them
    ("Estimator accuracy (--measure-entropy-change), per step over the tokens that carry gradient, mean over steps; "
     "*_uncertain: only tokens with pi_a < 0.99", ESTIMATOR_COLUMNS, ".3f"),
    ("How often the clip binds: the fraction of the batch's tokens past a clip bound on the side the clip acts "
     "(A < 0 and r < 1 - eps_low; A > 0 and r > 1 + eps_high), and the approximate KL(pi_old || pi) = mean of "
     "(r - 1) - log r over the tokens (losses._ppo_metrics); the mean over the optimizer steps of each RL step, "
     "then over the RL steps", CLIP_COLUMNS, ".2e"),
    ("Leverage: whether each mechanism acts here, mean over the optimizer steps and RL steps. grpo_weight_changed "
     "/ grpo_weight_l1: the share of tokens whose weight w = -dLoss/dlogp differs from GRPO's at the same point by "
     "over 5%, and sum |w - w_GRPO| / sum |w_GRPO| (losses.grpo_weight_change); STEER's weight mean and 5th "
     "percentile, OPEFO's lambda*, Clip-Cov's and forking's shares of tokens, Archer's share of reasoning tokens "
     "and its mean KL on knowledge tokens, groups sampled per RL step (DAPO's refills)", LEVERAGE_COLUMNS, ".3g"),
    ("Exact first-order entropy flow per quadrant (losses.entropy_flow_quadrants: sum over the step's tokens of "
     "-w [pi_a (log pi_a + H) - S2], per unit step size), mean over steps", FLOW_COLUMNS, ".3f"),
)
def seeds_note(n_seeds):
    """The warning above the table when fewer than 3 seeds were run ("" from 3 on)."""
    if n_seeds == 1:
        return "1 seed: no confidence intervals and no paired tests; use 5 or more seeds to decide a claim"
    if n_seeds == 2:
        return (f"2 seeds: the 95% intervals use t = {t_ppf(0.975, 1):.1f} and are wide; use 5 or more seeds to "
                "decide a claim")
    return ""


def seed_values(results):
    """{cell: {figure: {seed: value}}} from {cell: [run figures, seed 0, 1, ...]} (the claims' input)."""
    return {cell: {k: {s: run.get(k) for s, run in enumerate(runs)} for k in dict.fromkeys(k for r in runs for k in r)}
            for cell, runs in results.items()}


def report(summary, n_seeds, steps, setting="default", results=None, longer=None):
    """The text of table.md: the few-seeds note (seeds_note), the windows of "start" and "end", the main
    table (mean ± 95% CI over seeds), the SUB_TABLES that were measured, then each claim decided in this
    setting (claims.report: paired differences against its control, Holm-adjusted, the detectable
    difference and the leverage). longer: {cell: steps} of cells that ran another number of steps."""
    note, w = seeds_note(n_seeds), window(steps)
    others = "".join(f"; {cell}: {n} steps, its own windows and final evaluation" for cell, n in (longer or {}).items())
    text = (f"**{note}**\n\n" if note else "") + (
        f"{n_seeds} seeds, {steps} steps; start / end: mean over steps 1-{w} / {steps - w + 1}-{steps}; eval: "
        f"the held-out sets at step {steps}{others}\n\n") + table(summary)
    for heading, columns, spec in SUB_TABLES:
        if any(c in s for s in summary.values() for c in columns):
            text += f"\n\n{heading}:\n\n" + table(summary, columns, spec)
    decided = claims.claims_for(setting) if results and n_seeds > 1 else []
    for claim in decided:
        text += "\n\n" + claims.report(claim, seed_values(results))
    return text + "\n"


def _numbers(rows, key):
    """{step: value} of `key` over the rows that hold a number for it (null, from a NaN, is skipped)."""
    return {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}


def _mean_and_spread(ax, per_seed, smooth=None, **kw):
    """Plot the mean over the seeds of {step: value} dicts (at the steps every seed has), optionally as a
    trailing moving average of `smooth` steps per seed, and shade min..max over the seeds around it (when
    there are 2 or more). Returns the mean's line."""
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    curves = [[d[s] for s in steps] for d in per_seed]
    if smooth:
        curves = [plots.moving_average(c, smooth) for c in curves]
    line, = ax.plot(steps, [sum(v) / len(v) for v in zip(*curves)], **kw)
    if len(curves) > 1:
        ax.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def curves_figure(results_rows):
    """The figure of curves.png from {cell: [metrics rows of each seed]}: entropy (5-step moving average),
    held-out avg@k, pass@k (largest k) and distinct over steps; each cell's line is the mean over its seeds,
    and the shaded band around it runs from the lowest to the highest seed (min..max, not a confidence
    interval; none with one seed). The title gives the number of seeds."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for name, runs in results_rows.items():
        if not runs:
            continue
        line = _mean_and_spread(axes[0], [_numbers(rows, "entropy") for rows in runs], smooth=5, label=name)
        evals = [r for r in runs[0] if "eval/n" in r]
        if not evals:
            continue
        keys = [next(k for k in evals[0] if k.startswith("eval/avg@")),
                max((k for k in evals[0] if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1])),
                "eval/distinct"]
        for ax, key in zip(axes[1:], keys):
            _mean_and_spread(ax, [_numbers(rows, key) for rows in runs], marker="o", color=line.get_color())
            ax.set(title=f"held-out {key[5:]}", xlabel="step")
    axes[0].set(title="entropy (nats/token, 5-step mean)", xlabel="step")
    counts = sorted({len(runs) for runs in results_rows.values() if runs})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle("1 seed per cell (no spread to shade)" if counts == [1] else
                 f"mean over {n} seeds per cell; shaded: min..max over the seeds")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(8, len(results_rows)))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def strip_figure(results, metrics):
    """Each seed's value per cell (a strip plot), one panel per primary metric: a dot per seed (spread
    sideways by seed number, so seed s sits at the same offset in every cell), a bar at the mean."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    cells = list(results)
    for ax, metric in zip(axes[0], metrics):
        for x, cell in enumerate(cells):
            runs = results[cell]
            points = [(s, run[metric]) for s, run in enumerate(runs) if run.get(metric) is not None]
            offsets = [x + 0.3 * (s / max(1, len(runs) - 1) - 0.5) for s, _ in points]
            ax.scatter(offsets, [v for _, v in points], s=12, color=f"C{x % 10}")
            if points:
                ax.hlines(sum(v for _, v in points) / len(points), x - 0.25, x + 0.25, color="k", linewidth=1)
        ax.set_xticks(range(len(cells)), cells, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    fig.suptitle("each seed's value per cell (dots; the same seed at the same offset), mean (bar)")
    fig.tight_layout()
    return fig


def primary_metrics(setting):
    """The primary metrics of the claims decided in `setting`, in order; the collapse and accuracy figures
    where none is declared."""
    found = [t.metric for c in claims.claims_for(setting) for t in c.tests]
    return list(dict.fromkeys(found or ["entropy end", "entropy/fork end", "eval/avg@64", "eval/pass@64"]))


def plot(results_rows, path):
    """Write curves.png (curves_figure)."""
    fig = curves_figure(results_rows)
    fig.savefig(path, dpi=100)
    plots.pyplot().close(fig)


def decide_claims(setting, results):
    """{claim key: {"verdict", "tests": [row dicts]}} of the claims decided in `setting`, on {cell: [run
    figures, seed 0, 1, ...]} (claims.decide)."""
    decided = {}
    for claim in claims.claims_for(setting):
        rows, verdict = claims.decide(claim, seed_values(results))
        decided[claim.key] = {"verdict": verdict, "tests": [claims.row_dict(r) for r in rows]}
    return decided


def print_ledger(out, toy_json=None, full=False):
    """claims.ledger over the settings' results.json under `out` and the toy's JSON, each source named with
    its seeds and warm start (lines). The claims are decided anew from the stored per-seed figures, so the
    ledger follows claims.py as it is now."""
    decided, sources = {}, []
    for setting in SETTINGS:
        path = out / setting / "results.json"
        if path.exists():
            data = json.loads(path.read_text())
            decided[setting] = decide_claims(setting, data["runs"])
            warm = (data.get("warm_start") or {}).get("weights", "?")
            seeds = len(next(iter(data["runs"].values())))
            sources.append(f"{setting}: {seeds} seeds, warm start {warm} ({path})")
    if toy_json:
        data = json.loads(Path(toy_json).read_text())
        decided["toy"] = {c.key: {"verdict": verdict, "tests": [claims.row_dict(r) for r in rows]}
                          for c, rows, verdict in toy_bandit.toy_claims(data["runs"])}
        seeds = len({r["seed"] for r in data["runs"]})
        sources.append(f"toy: {seeds} seeds ({toy_json})")
    if not decided:
        raise SystemExit(f"--ledger: no SETTING/results.json under {out} and no --toy-json")
    return ["Sources: " + "; ".join(sources)] + claims.ledger(decided, full)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="default", help="which comparison (default: default)")
    p.add_argument("--algos", nargs="+", help="cells to run (default: every cell of the setting)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds: 0 .. N-1 (default 5), as toy_bandit.py")
    p.add_argument("--steps", type=int, help="RL steps of every run (default: the lab's 100)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default 2)")
    p.add_argument("--out", default="runs/compare", help="root of the run directories (default runs/compare)")
    p.add_argument("--ledger", action="store_true", help="print the verdict tables by paper from every "
                   "SETTING/results.json under --out (and --toy-json), run nothing")
    p.add_argument("--toy-json", metavar="FILE", help="with --ledger: toy_bandit.py --json output to include")
    p.add_argument("--full", action="store_true", help="with --ledger: one row per comparison, not per claim")
    p.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. '--steps 200' "
                   "(they are part of the runs: use a new --out for a new value)")
    args = p.parse_args(argv)
    if args.ledger:
        print("\n".join(print_ledger(Path(args.out), args.toy_json, args.full)))
        return
    cells = SETTINGS[args.setting]
    names = args.algos or list(cells)
    unknown = [n for n in names if n not in cells]
    if unknown:
        raise SystemExit(f"--algos: {unknown} not in setting {args.setting!r}; choose from {list(cells)}")
    for name in ("jobs", "seeds", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    root = Path(args.out) / args.setting
    root.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.train_flags) + (["--steps", str(args.steps)] if args.steps else [])
    seeds = range(args.seeds)
    todo = [(root / f"{n}-seed{s}", cells[n] + extra + ["--seed", str(s)]) for n in names for s in seeds]
    first = config.resolve(config.build_parser().parse_args(todo[0][1]), log=lambda m: None)
    start = tiny_lab.warm_start(first["tiny_sft_steps"], first["cache_dir"])      # once, before the parallel jobs
    warm = tiny_lab.fingerprint(start) if start else None
    from tqdm import tqdm
    failed = []
    threads = 1 if args.jobs > 1 else max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc=args.setting) as bar:
        for run_dir, code in pool.map(lambda t: run_cell(t[0], t[1], threads), todo):
            if code != 0:
                failed.append(run_dir)
            bar.update()
    if failed:
        raise SystemExit(f"{len(failed)} runs failed; see their logs: " + ", ".join(f"{d}.log" for d in failed))
    rows = {n: [read_rows(root / f"{n}-seed{s}") for s in seeds] for n in names}
    results = {n: [run_figures(r) for r in runs] for n, runs in rows.items()}
    summary = summarise(results)
    steps = {n: max(r["step"] for r in runs[0]) for n, runs in rows.items()}
    longer = {n: k for n, k in steps.items() if k != steps[names[0]]}
    text = report(summary, args.seeds, steps[names[0]], args.setting, results, longer)
    written = [root / "table.md", root / "results.json", root / "curves.png", root / "strips.png"]
    written[0].write_text(text)
    decided = decide_claims(args.setting, results) if args.seeds > 1 else {}
    written[1].write_text(json.dumps(json_safe({"warm_start": warm, "seeds": args.seeds, "summary": summary,
                                                "runs": results, "claims": decided}), indent=1))
    print(text)
    plot(rows, written[2])
    fig = strip_figure(results, primary_metrics(args.setting))
    fig.savefig(written[3], dpi=100)
    plots.pyplot().close(fig)
    for path in written:
        print(f"wrote {path}")

if __name__ == "__main__":
    main()
