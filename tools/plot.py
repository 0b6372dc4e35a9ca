"""Curves of one or several train.py runs into PNGs: compare two runs with one command.

    python tools/plot.py out/sem                            # -> out/sem/plots/
    python tools/plot.py runs/dcm runs/pcm --out cmp/       # one line per run in every panel

Reads each RUN's log.jsonl and probes.jsonl (train.py writes both) and draws
  losses.png  every logged loss term (the total, cd, tc, gan_g, fm, d, diffusion), one panel each;
  probes.png  the fixed high- and low-noise probe batches' consistency loss and gradient norm (paper Fig. 2);
  optim.png   learning rate, gradient norms (student, discriminator), seconds per step, peak GPU memory.
Raw values are drawn faint, an exponential moving average (--smooth, as TensorBoard's slider) on top.
"""
import argparse
import json
import os
import sys

if __name__ == "__main__":  # `python tools/plot.py` puts tools/ on sys.path, not the repo root of the library
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import checks  # noqa: E402

LOSSES = ("loss", "cd", "tc", "gan_g", "fm", "d", "diffusion")  # train.py's terms, in this order
# (key, panel title, y-axis label)
OPTIM = (("lr", "learning rate", "lr"), ("grad_norm", "grad norm (student, before clipping)", "L2 norm"),
         ("d_grad_norm", "grad norm (discriminator)", "L2 norm"), ("time", "seconds per step", "s"),
         ("peak_gib", "peak GPU memory", "GiB"))
NOT_LOSSES = {"step", "epoch", "lr", "time", "peak_gib", "grad_norm", "d_grad_norm"}
STYLES = ("-", "--", "-.", ":")
SIGNALS = ("gn_", "d_acc_")  # train.py's per-term gradient norms and D accuracies: not losses


class PlotError(ValueError):
    """A run folder without logs; the command line prints it as one line."""


def read_jsonl(path):
    """Rows of a .jsonl file ([] if it does not exist); a half-written last line (a run still going) is skipped."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def read_run(folder):
    """{"log": rows, "probes": rows} of a train.py run folder."""
    if not os.path.isdir(folder):
        raise PlotError(f"run folder {folder} does not exist")
    run = {"log": read_jsonl(os.path.join(folder, "log.jsonl")), "probes": read_jsonl(os.path.join(folder, "probes.jsonl"))}
    if not run["log"] and not run["probes"]:
        raise PlotError(f"{folder} holds no log.jsonl or probes.jsonl (is it a train.py --out folder?)")
    return run


def labels(folders):
    """Short unique names: the folder names, or their last two parts where names repeat."""
    base = [os.path.basename(os.path.normpath(f)) for f in folders]
    if len(set(base)) == len(base):
        return base
    return [os.path.join(*os.path.normpath(os.path.abspath(f)).split(os.sep)[-2:]) for f in folders]


def ema(values, smooth):
    """TensorBoard-style debiased exponential moving average (smooth 0 = raw)."""
    out, m, w = [], 0.0, 0.0
    for v in values:
        m, w = smooth * m + (1 - smooth) * v, smooth * w + (1 - smooth)
        out.append(m / w)
    return out


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot.py needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _steps(ax):
    """The x axis of training steps: labelled, integer ticks (a 3-step run has no step 1.5)."""
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path, dpi=90):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _curve(ax, rows, key, smooth, color, label, ls="-"):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return False
    xs, ys = zip(*pts)
    if smooth and len(xs) > 2:
        ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8, ls=ls)
        ys = ema(ys, smooth)
    ax.plot(xs, ys, color=color, lw=1.4, ls=ls, label=label)
    return True


def _panels(plt, path, runs, names, keys, smooth, title, log_keys=()):
    """One panel per (key, title, y label) present in any run, one colour per run; -> the path or None when nothing
    to draw. One run: its name in the figure's title (there is no legend)."""
    keys = [kt for kt in keys if any(isinstance(r.get(kt[0]), (int, float)) for run in runs for r in run["log"])]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (k, t, ylabel) in zip(axes.flat, keys):
        for i, (run, name) in enumerate(zip(runs, names)):  # a line style per run too: equal curves stay visible
            _curve(ax, run["log"], k, smooth, f"C{i}", name, STYLES[i % len(STYLES)])
        positive = all(r[k] > 0 for run in runs for r in run["log"] if isinstance(r.get(k), (int, float)))
        if k in log_keys and positive:
            ax.set_yscale("log")
        ax.set_title(t, fontsize=10)
        ax.set_ylabel(ylabel)
        _steps(ax)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title if len(runs) > 1 else f"{title}: {names[0]}", fontsize=11)
    return _save(fig, path)


def loss_curves(path, runs, names, smooth=0.6):
    """Every loss term any run logged, one panel each (log scale)."""
    plt = _plt()
    seen = {k for run in runs for r in run["log"] for k in r if k not in NOT_LOSSES and not k.startswith(SIGNALS)}
    keys = [k for k in LOSSES if k in seen] + sorted(seen - set(LOSSES))
    return _panels(plt, path, runs, names, [(k, f"{k} loss" if k != "loss" else "total loss", "loss") for k in keys],
                   smooth, "training losses", log_keys=keys)


def optim_curves(path, runs, names, smooth=0.6):
    """Learning rate, gradient norms, step time and peak memory."""
    return _panels(_plt(), path, runs, names, OPTIM, smooth, "optimisation", log_keys=("grad_norm", "d_grad_norm"))


def probe_curves(path, runs, names, smooth=0.0):
    """Paper Fig. 2: consistency loss and gradient norm on the fixed high- (red) and low-noise (blue) probes."""
    plt = _plt()
    if not any(run["probes"] for run in runs):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title, ylabel in zip(axes, ("loss", "grad_norm"), ("consistency loss", "gradient norm"),
                                      ("loss (log scale)", "L2 norm (log scale)")):
        for i, (run, name) in enumerate(zip(runs, names)):
            for side, color in (("high", "C3"), ("low", "C0")):
                label = f"{side} noise" + (f" ({name})" if len(runs) > 1 else "")
                _curve(ax, run["probes"], f"{side}_{key}", smooth, color, label, STYLES[i % len(STYLES)])
        ax.set_yscale("log")
        _steps(ax)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("fixed probe batches: high- vs low-noise part of the trajectory (paper Fig. 2)", fontsize=10)
    return _save(fig, path)


def plot_runs(folders, out, smooth=0.6):
    """All figures of the runs into out/ -> the PNG paths written."""
    runs, names = [read_run(f) for f in folders], labels(folders)
    os.makedirs(out, exist_ok=True)
    paths = [loss_curves(os.path.join(out, "losses.png"), runs, names, smooth),
             probe_curves(os.path.join(out, "probes.png"), runs, names),
             optim_curves(os.path.join(out, "optim.png"), runs, names, smooth)]
    return [p for p in paths if p]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --out folders")
    p.add_argument("--out", help="folder for the PNGs (default: RUN/plots for one run, plots/ for several)")
    p.add_argument("--smooth", type=float, default=0.6, help="EMA weight 0..1 of the smoothed line (0 = raw only)")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        raise PlotError(f"--smooth {args.smooth} must lie in [0, 1)")
    out = args.out or (os.path.join(args.runs[0], "plots") if len(args.runs) == 1 else "plots")
    paths = plot_runs(args.runs, out, args.smooth)
    print("".join(f"{path}\n" for path in paths), end="")
    return paths


def cli(argv=None):
    """main() as a command line: bad input is one `error:` line and exit 2 (tools/checks.cli)."""
    return checks.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
