"""Loss parity against the seed-to-seed spread: train_step.py runs of the same variants at several ``run.seed``s.

A final-loss difference between FP8 and BF16 means something only next to how far two BF16 runs that differ
in nothing but the seed (initialisation and data order) end apart. This reads the output folders of
``benchmarks/train_step.py`` (one per seed, each with the baseline and the FP8 variant), prints per seed the
final losses (mean over the last ``--last-n`` logged steps) and the FP8 - baseline difference, the baseline's own
spread over the seeds, and plots every loss curve (smoothed) with the relative differences:

    python3 benchmarks/train_step.py --out /tmp/par1337 --config configs/fp8-v3-layers.yaml --steps 300 \\
        --log-every 1 --last-n 50 --baseline kernels --variants kernels fp8-blockwise+kernels+per-expert \\
        --set train.eval_batches=32 run.seed=1337          # and again with run.seed=2 into /tmp/par2
    python3 benchmarks/parity_seeds.py /tmp/par1337 /tmp/par2 --baseline kernels \\
        --variant fp8-blockwise+kernels+per-expert --out parity.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import read_metrics, step_losses  # noqa: E402
from train_step import TOL, final_loss  # noqa: E402


def _info(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: does not exist (give benchmarks/train_step.py output folders)")
    meta = sorted(folder.glob("train_step_*.json"))
    if not meta:
        raise FileNotFoundError(f"{folder}: no train_step_*.json (not a benchmarks/train_step.py output folder)")
    return json.loads(meta[-1].read_text())


def load_run(folder: Path, variant: str) -> tuple[str, dict[int, float], float | None]:
    """(seed, {step: loss}, final val loss) of ``variant`` in one train_step.py output folder.

    Raises FileNotFoundError when the folder has no train_step_*.json or no metrics for the variant."""
    info = _info(folder)
    seed = next((s.split("=", 1)[1] for s in info["args"].get("set", []) if s.startswith("run.seed=")), "default")
    runs = sorted(folder.glob(f"runs_*/{variant.replace('+', '_')}/metrics.jsonl"))
    if not runs:
        raise FileNotFoundError(f"{folder}: no metrics.jsonl for variant {variant}")
    recs = read_metrics(runs[-1])
    vals = [r["val/loss"] for r in recs if "val/loss" in r]
    return seed, step_losses(recs), (vals[-1] if vals else None)


def compare(folders: list[Path], baseline: str, variant: str, last_n: int) -> dict:
    """Per seed: final losses (last ``last_n`` shared logged steps) of baseline and variant, their relative
    difference, val losses; and the baseline's spread over seeds ((max - min) / mean of its final losses)."""
    rows = []
    for f in folders:
        seed, base, base_val = load_run(f, baseline)
        _, var, var_val = load_run(f, variant)
        cmp = final_loss(var, base, last_n=last_n)
        val_rel = (var_val - base_val) / base_val if base_val and var_val is not None else None
        rows.append({"seed": seed, "base": cmp["ref_loss"], "var": cmp["loss"], "rel": cmp["rel_vs_ref"],
                     "base_val": base_val, "var_val": var_val, "val_rel": val_rel, "curves": (base, var)})

    def spread(vals):
        vals = [v for v in vals if v is not None]
        return (max(vals) - min(vals)) / (sum(vals) / len(vals)) if len(vals) > 1 else None

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    return {"rows": rows, "baseline_spread": spread([r["base"] for r in rows]),
            "baseline_val_spread": spread([r["base_val"] for r in rows]),
            "mean_rel": mean([r["rel"] for r in rows]), "mean_val_rel": mean([r["val_rel"] for r in rows]),
            "ci_rel": ci95([r["rel"] for r in rows]), "ci_val_rel": ci95([r["val_rel"] for r in rows])}


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(vals) -> float | None:
    """Half-width of the 95% confidence interval of the mean of ``vals`` (Student's t; None values skipped):
    t(0.975, n - 1) * sample standard deviation / sqrt(n). None for fewer than two values."""
    vals = [v for v in vals if v is not None]
    n = len(vals)
    if n < 2:
        return None
    m = sum(vals) / n
    sd = (sum((v - m) ** 2 for v in vals) / (n - 1)) ** 0.5
    return (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / n ** 0.5


def _smooth(losses: dict[int, float], alpha: float) -> tuple[list[int], list[float]]:
    steps, out, m = sorted(losses), [], None
    for s in steps:
        m = losses[s] if m is None else alpha * losses[s] + (1 - alpha) * m
        out.append(m)
    return steps, out


def plot(res: dict, baseline: str, variant: str, path: Path, title: str, alpha: float = 0.1) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(2, 1))
    n = len(res["rows"])
    colour = (lambda i: f"C{i}") if n <= 10 else plt.get_cmap("tab20")   # noqa: E731
    for i, r in enumerate(res["rows"]):
        base, var = r["curves"]
        sb, yb = _smooth(base, alpha)
        sv, yv = _smooth(var, alpha)
        ax1.plot(sb, yb, color=colour(i), label=f"{baseline}, seed {r['seed']}")
        ax1.plot(sv, yv, color=colour(i), ls="--", label=f"{variant}, seed {r['seed']}")
        common = [k for k, s in enumerate(sv) if s in set(sb)]
        ref = dict(zip(sb, yb))
        ax2.plot([sv[k] for k in common], [100 * (yv[k] / ref[sv[k]] - 1) for k in common], color=colour(i),
                 label=f"seed {r['seed']}")
    ax1.set_ylabel(f"training loss (EMA, alpha {alpha})")
    if n <= 3:
        ax1.legend(fontsize=8)
    else:   # one entry per line style; the seeds' colours are keyed in the lower panel's legend
        ax1.legend(handles=[plt.Line2D([], [], color="k", label=baseline),
                            plt.Line2D([], [], color="k", ls="--", label=variant)], fontsize=8)
    ax1.set_title(title, fontsize=9)
    ax2.axhline(0, color="k", lw=0.5)
    for b in (TOL["fp8_rel"] * 100, -TOL["fp8_rel"] * 100):   # the parity bound
        ax2.axhline(b, color="r", lw=0.5, ls=":")
    ax2.set_ylabel(f"{variant} vs {baseline} (%)", fontsize=8)
    ax2.set_xlabel("step")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n <= 8 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(res: dict, baseline: str, variant: str, last_n: int) -> str:
    def f(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)
    lines = [f"| seed | {baseline} final (last {last_n}) | {variant} final | difference | {baseline} val | "
             f"{variant} val | val difference |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {f(r['base'])} | {f(r['var'])} | {f(r['rel'], '{:+.3%}')} | "
                     f"{f(r['base_val'])} | {f(r['var_val'])} | {f(r['val_rel'], '{:+.3%}')} |")
    lines += ["", f"{baseline} spread over the seeds: {f(res['baseline_spread'], '{:.3%}')} (final), "
              f"{f(res['baseline_val_spread'], '{:.3%}')} (val); mean difference {variant} - {baseline} over "
              f"{len(res['rows'])} seeds (95% confidence interval): {f(res['mean_rel'], '{:+.3%}')} "
              f"+- {f(res['ci_rel'], '{:.3%}')} (final), {f(res['mean_val_rel'], '{:+.3%}')} "
              f"+- {f(res['ci_val_rel'], '{:.3%}')} (val)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="benchmarks/train_step.py output folders, one per seed")
    p.add_argument("--baseline", default="kernels")
    p.add_argument("--variant", default="fp8-blockwise+kernels+per-expert")
    p.add_argument("--last-n", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="PNG of the curves (default: none)")
    a = p.parse_args(argv)
    try:
        res = compare(a.folders, a.baseline, a.variant, a.last_n)
    except FileNotFoundError as e:
        print(f"parity_seeds: {e}", file=sys.stderr)
        return 2
    print(table(res, a.baseline, a.variant, a.last_n))
    if a.out:
        info = _info(a.folders[0])
        title = (f"{info['args'].get('config')}, {info['args'].get('steps')} steps, {info.get('device')}, "
                 f"seeds {', '.join(r['seed'] for r in res['rows'])}")
        print(f"wrote {plot(res, a.baseline, a.variant, a.out, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
