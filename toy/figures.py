"""The figures and the sample GIF of a toy run (toy/report.py writes them into report.md)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tools.plot import ema  # noqa: E402


def savefig(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig10(path, l1, kappa, N, q, checks):
    """Paper Fig. 10: L1 between adjacent steps' x0 predictions along the teacher trajectory, and kappa."""
    k = [N - 2 - i for i in range(len(l1))]  # change between grid indices k+1 and k
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(k, l1, "o-", ms=3, label="teacher")
    for name, c in checks.items():
        axes[0].plot(k, c["l1"], "-", lw=1, alpha=0.7, label=name)
    cum = np.cumsum(l1) / np.sum(l1)
    axes[1].plot(k, cum, "o-", ms=3)
    axes[1].axhline(q, color="gray", ls=":", label=f"q = {q:g}")
    for ax in axes:
        ax.axvline(kappa, color="C3", ls="--", label=f"kappa = {kappa}")
        ax.invert_xaxis()
        ax.set_xlabel("grid index k (noisy -> clean)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean |x0(k) - x0(k+1)|")
    axes[1].set_ylabel("cumulative share of the change")
    fig.suptitle("teacher: change of the x0 prediction per step")
    savefig(fig, path)


def fig5(path, groups, tensors):
    """Paper Fig. 5: relative parameter difference between the semantic and the (full) detail expert."""
    names = sorted(groups, key=lambda g: -groups[g]["rel_diff"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    axes[0].barh(names, [groups[g]["rel_diff"] for g in names], color=[f"C{i}" for i in range(len(names))])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("||dtheta|| / ||theta|| per group")
    axes[0].set_ylabel("layer group")
    weights = [t for t in tensors if t["name"].endswith("weight")]
    for i, g in enumerate(names):
        xs = [j for j, t in enumerate(weights) if t["group"] == g]
        axes[1].bar(xs, [weights[j]["rel_diff"] for j in xs], color=f"C{i}", label=g)
    axes[1].set_xlabel("weight tensor (model order)")
    axes[1].set_ylabel("relative difference")
    axes[1].legend(fontsize=7)
    fig.suptitle("semantic expert vs separately trained detail expert (row OD)")
    savefig(fig, path)


def fig_curves(path, curves, dcm_curve, titles):
    """Validation metrics at 4 steps along the runs: the target candidates (VCM) and DCM's detail stage."""
    keys = ("traj_mse", "fd", "cond_acc")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key in zip(axes, keys):
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-", ms=3, label=f"VCM, {name}")
        if dcm_curve:
            ax.plot([r["step"] for r in dcm_curve], [r[key] for r in dcm_curve], "s--", ms=3,
                    label="DCM detail stage (step of its own run)")
        ax.set_title(titles[key])
        ax.set_ylabel(titles[key])
        steps_axis(ax)
    axes[0].legend(fontsize=7)
    fig.suptitle("validation split, 4 sampling steps, along the runs")
    savefig(fig, path)


STYLES = ("-", "--", "-.", ":")  # one per run: curves that coincide (every D at hinge 2.000) stay visible as a pattern
MARKERS = ("o", "s", "^", "v", "D", "P")


def steps_axis(ax, label="training step"):
    """An x axis of training steps: its label and integer ticks (a quick run has 3 steps, not 1.25 or 2.5)."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _line(ax, xs, ys, i, label, term=0, smooth=0.0, under=0):
    """Run i's curve: its colour, line style and markers; `under` = how many curves of the panel come after it: each
    is drawn wider, with larger markers, than those on top, so a curve that coincides with a later one still shows
    around it. With many points (smooth > 0) the raw values are faint under an EMA."""
    every = max(1, len(xs) // 6)  # markers of different runs at different steps where there are enough steps
    style = dict(color=f"C{i}", ls=STYLES[(i + term) % len(STYLES)], marker=MARKERS[i % len(MARKERS)],
                 markevery=(i % every, every), ms=4 + 1.5 * min(under, 3), lw=1.2 + 0.8 * min(under, 3), alpha=0.8)
    if smooth and len(xs) > 20:
        ax.plot(xs, ys, color=f"C{i}", lw=0.6, alpha=0.2)
        ys = ema(ys, smooth)
    ax.plot(xs, ys, label=label, **style)


def fig_train(path, logs):
    """Per run: the discriminator's hinge loss and accuracy on real and on fake tokens (EMA over steps, raw faint),
    and each generator term's gradient norm at the student's output over CD's (probe steps). A panel no run has data
    for is left out (a quick run logs no probe step), so every panel drawn shows its curves."""
    panels = [("discriminator hinge loss (2 = constant output)", "hinge loss", "d", None),
              ("discriminator accuracy, real side", "fraction of tokens called real", "d_acc_real", None),
              ("discriminator accuracy, fake side", "fraction of tokens called fake", "d_acc_fake", None),
              ("grad norm at the student's output / CD's", "ratio (log)", None, ("tc", "gan_g", "fm"))]
    curves = []  # per panel: [(xs, ys, run index, label, term index, smooth)]
    for title, ylabel, key, terms in panels:
        got = []
        for i, (name, rows) in enumerate(logs.items()):
            if key:
                pts = [(r["step"], r[key]) for r in rows if key in r]
                got += [(*zip(*pts), i, name, 0, 0.8)] if pts else []
            for j, term in enumerate(terms or ()):
                pts = [(r["step"], r[f"gn_{term}"] / r["gn_cd"]) for r in rows if r.get("gn_cd") and f"gn_{term}" in r]
                got += [(*zip(*pts), i, f"{name}: {term}/cd", j, 0.0)] if pts else []
        curves.append(got)
    drawn = [(p, c) for p, c in zip(panels, curves) if c]
    fig, axes = plt.subplots(1, len(drawn), figsize=(3.9 * len(drawn), 3.4), squeeze=False)
    for ax, ((title, ylabel, key, _), got) in zip(axes[0], drawn):
        for j, (xs, ys, i, label, term, smooth) in enumerate(got):
            _line(ax, xs, ys, i, label, term, smooth, under=len(got) - 1 - j)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        steps_axis(ax)
        if key is None:
            ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2 if len(got) > 5 else 1)
    savefig(fig, path)


def to_uint8(x):
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def sample_gif(path, samples, scale=3, label_w=230):
    """Rows = models, columns = samples from the same noise and prompts; the GIF runs through the frames."""
    names = list(samples)
    vids = {n: [to_uint8(v) for v in samples[n]] for n in names}
    F, H, W, _ = vids[names[0]][0].shape
    cols = len(vids[names[0]])
    cell = H * scale + 2
    frames = []
    for f in range(F):
        img = Image.new("RGB", (label_w + cols * cell, len(names) * cell), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for r, n in enumerate(names):
            draw.text((4, r * cell + cell // 2 - 6), n, fill=(0, 0, 0))
            for c, v in enumerate(vids[n]):
                tile = Image.fromarray(v[f]).resize((W * scale, H * scale), Image.NEAREST)
                img.paste(tile, (label_w + c * cell, r * cell))
        frames.append(img)
    # one palette for all frames keeps the file small and the colours steady between frames
    palette = Image.fromarray(np.concatenate([np.asarray(im) for im in frames])).quantize(64, Image.MEDIANCUT)
    frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0, optimize=True)
