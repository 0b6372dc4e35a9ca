"""Figures, sample GIFs and report.md of a toy run (toy/run.py); everything read from its summary dict."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import plot  # noqa: E402 - the repo's plot.py (toy/run.py puts the repo root on sys.path)

# metric key -> (column title, direction: -1 lower is better, +1 higher, 0 closer to 1 is better)
METRICS = {
    "traj_mse": ("traj. MSE", -1), "traj_l1": ("traj. L1", -1), "fd": ("FD", -1),
    "cond_acc": ("cond. acc.", 1), "motion_err": ("motion err. (px)", -1), "hf_ratio": ("HF ratio", 0),
}
COMPARISONS = [  # (from, to, what the paper's Table 3 attributes the change to)
    ("VCM", "OD", "optimisation decoupling, rows (1)->(2)"),
    ("OD", "OD+PE", "parameter-efficient detail expert, (2)->(3)"),
    ("OD+PE", "OD+PE+TC", "temporal coherence loss, (3)->(4)"),
    ("OD+PE+GF", "DCM (OD+PE+TC+GF)", "temporal coherence loss, (5)->(6)"),
    ("OD+PE", "OD+PE+GF", "GAN + feature matching, (3)->(5)"),
    ("OD+PE+TC", "DCM (OD+PE+TC+GF)", "GAN + feature matching, (4)->(6)"),
    ("PCM (4 phases)", "DCM (OD+PE+TC+GF)", "DCM vs PCM"),
    ("teacher (no distillation)", "DCM (OD+PE+TC+GF)", "DCM vs the undistilled teacher at the same steps"),
]


def fig10(path, l1, kappa, N, frac):
    """Paper Fig. 10: L1 between adjacent steps' x0 predictions along the teacher trajectory, and kappa."""
    k = [N - 2 - i for i in range(len(l1))]  # change between grid indices k+1 and k
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(k, l1, "o-", ms=3)
    ax.axvline(kappa, color="C3", ls="--", label=f"kappa = {kappa}")
    ax.axhline(frac * max(l1), color="gray", ls=":", label=f"{frac:g} x peak")
    ax.invert_xaxis()
    ax.set_xlabel("grid index k (noisy -> clean)")
    ax.set_ylabel("mean |x0(k) - x0(k+1)|")
    ax.set_title("teacher: change of the x0 prediction per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fig5(path, groups, tensors):
    """Paper Fig. 5: relative parameter difference between the semantic and the (full) detail expert."""
    names = sorted(groups, key=lambda g: -groups[g]["rel_diff"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    axes[0].barh(names, [groups[g]["rel_diff"] for g in names], color=[f"C{i}" for i in range(len(names))])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("||dtheta|| / ||theta|| per group")
    weights = [t for t in tensors if t["name"].endswith("weight")]
    for i, g in enumerate(names):
        xs = [j for j, t in enumerate(weights) if t["group"] == g]
        axes[1].bar(xs, [weights[j]["rel_diff"] for j in xs], color=f"C{i}", label=g)
    axes[1].set_xlabel("weight tensor (model order)")
    axes[1].set_ylabel("relative difference")
    axes[1].legend(fontsize=7)
    fig.suptitle("semantic expert vs separately trained detail expert (row OD)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def to_uint8(x):
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def sample_gif(path, samples, scale=3, label_w=140):
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


def fmt(agg, key):
    if key not in agg:
        return "–"
    m, s = agg[key]["mean"], agg[key]["std"]
    digits = 4 if abs(m) < 0.1 else 3 if abs(m) < 10 else 1
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(results, params, steps, names):
    head = "| model | stored params | " + " | ".join(t for t, _ in METRICS.values()) + " |"
    rows = [head, "|" + "---|" * (2 + len(METRICS))]
    for n in names:
        if steps not in results.get(n, {}):
            continue
        agg = results[n][steps]["agg"]
        rows.append(f"| {n} | {params.get(n, 0):,} | " + " | ".join(fmt(agg, k) for k in METRICS) + " |")
    return "\n".join(rows)


def compare(results, steps):
    """One row per comparison: each metric's change and whether it beats the seeds' spread."""
    rows = ["| change | what it tests | " + " | ".join(t for t, _ in METRICS.values()) + " |",
            "|" + "---|" * (2 + len(METRICS))]
    for a, b, what in COMPARISONS:
        if steps not in results.get(a, {}) or steps not in results.get(b, {}):
            continue
        ra, rb = results[a][steps]["agg"], results[b][steps]["agg"]
        cells = []
        for key, (_, sign) in METRICS.items():
            if key not in ra or key not in rb:
                cells.append("–")
                continue
            ma, mb = ra[key]["mean"], rb[key]["mean"]
            noise = math.hypot(ra[key]["std"], rb[key]["std"])
            gain = (ma - mb) * -sign if sign else abs(math.log(max(ma, 1e-9))) - abs(math.log(max(mb, 1e-9)))
            if gain == 0:
                cells.append("same")
                continue
            sure = abs(mb - ma) > noise and noise > 0
            cells.append(f"{'better' if gain > 0 else 'worse'}{'' if sure else ' (within spread)'}")
        rows.append(f"| {a} -> {b} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def best(results, steps, names):
    """One line per metric: the best model at `steps` steps (HF ratio: closest to 1)."""
    lines = [f"Best at {steps} steps:"]
    for key, (title, sign) in METRICS.items():
        cands = [(n, results[n][steps]["agg"][key]["mean"]) for n in names
                 if steps in results.get(n, {}) and key in results[n][steps]["agg"]]
        if not cands:
            continue
        score = (lambda m: -sign * m) if sign else (lambda m: abs(math.log(max(m, 1e-9))))
        n, m = min(cands, key=lambda c: score(c[1]))
        lines.append(f"- {title}: {n} ({m:.4g})")
    return "\n".join(lines)


def ablation(results, params, models, steps):
    rows = ["| row | OD | PE | TC | GF | stored params | " + " | ".join(t for t, _ in METRICS.values()) + " |",
            "|" + "---|" * (6 + len(METRICS))]
    i = 0
    for name, (_, flags) in models.items():
        if flags is None or steps not in results.get(name, {}):
            continue
        i += 1
        marks = " | ".join("✓" if f else "" for f in flags)
        agg = results[name][steps]["agg"]
        cells = " | ".join(fmt(agg, k) for k in METRICS)
        rows.append(f"| ({i}) {name} | {marks} | {params.get(name, 0):,} | {cells} |")
    return "\n".join(rows)


def write(out, s, models, gif, run_dirs):
    """All figures and report.md into out/; run_dirs: {name: train.py run folder} (vcm's probes are Fig. 2)."""
    S, N = s["settings"], len(s["grid_sigma"]) - 1
    fig10(os.path.join(out, "fig10_x0_change.png"), s["fig10_l1"], s["kappa"], N, S["kappa_frac"])
    probes = plot.read_run(run_dirs["vcm"])["probes"]
    if probes:  # paper Fig. 2, drawn by plot.py as for any run
        plot.probe_curves(os.path.join(out, "fig2_probes.png"), [{"probes": probes}], ["VCM"])
    curves = {k: run_dirs[k] for k in ("vcm", "pcm", "sem_tc", "dcm")}
    plot.loss_curves(os.path.join(out, "train_losses.png"), [plot.read_run(d) for d in curves.values()], list(curves))
    fig5(os.path.join(out, "fig5_expert_difference.png"), s["fig5_groups"], s["fig5_tensors"])
    sample_gif(os.path.join(out, "samples_4step.gif"), gif)
    res, params = s["results"], s["param_counts"]
    names = ["teacher (50 steps)", "teacher (no distillation)"] + list(models)
    kap, sig = s["kappa"], s["grid_sigma"]
    L = []
    L.append(f"# DCM toy study{' (QUICK smoke run: tiny budgets, the numbers mean nothing)' if s['quick'] else ''}\n")
    mach = s["machine"]
    L.append(f"Wall time {s['wall_s']:.0f} s on {mach['cpus']} CPUs ({mach['torch_threads']} torch threads), "
             f"{mach['platform']}, torch {mach['torch']}. Seed {s['seed']}.\n")
    L.append("Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["phases_s"].items()) + ".\n")
    sp = s["spec"]
    L.append(f"Data: {sp['frames']} frames of {sp['size']}x{sp['size']} RGB, one textured shape "
             f"(3 shapes x 2 colours x 4 directions = 24 classes) moving {sp['speed']} px/frame; "
             f"{S['n_data']} training videos. Teacher: "
             f"toy/config.json (HunyuanVideo-style flow model), steps/lr {S['teacher']}, batch {S['batch']}. "
             f"Grid: N = {N}, shift {S['shift']}. Students: {S['single_steps']} steps (VCM, PCM) or "
             f"{S['sem_steps']} semantic + {S['det_steps']} detail steps; lr {S['lr_full']} (full) / {S['lr_lora']} "
             f"(LoRA rank {S['lora_rank']}). Evaluation: {S['eval_seeds']} sampling seeds x {S['eval_n']} videos, "
             "mean ± std over seeds (one training run per model: the spread is the sampling noise, "
             "not training variance).\n")
    L.append("## Fig. 10: where the teacher decides the content, and kappa\n")
    L.append("![fig10](fig10_x0_change.png)\n")
    L.append("Rule (`toy/run.py: choose_kappa`): from the noisy end past the peak, the first step whose x0 change "
             f"falls below {S['kappa_frac']} x the peak -> kappa = {kap} "
             f"(sigma {sig[kap + 1]:.3f}; {s['kappa_rule']}). Semantic expert: grid indices {kap + 1}..{N - 1}, "
             f"detail expert: 0..{kap}.\n")
    first, last = s["fig10_l1"][: len(s["fig10_l1"]) // 3], s["fig10_l1"][-(len(s["fig10_l1"]) // 3):]
    L.append(f"Mean adjacent-step x0 change: first third of the trajectory {np.mean(first):.4f}, "
             f"last third {np.mean(last):.4f}.\n")
    if probes:
        h = probes[-1]
        L.append("## Fig. 2: one student on the whole trajectory (VCM), high- vs low-noise probes\n")
        L.append(f"![fig2](fig2_probes.png)\n\nLast probe (step {h['step']}): loss high {h['high_loss']:.4g} vs low "
                 f"{h['low_loss']:.4g}; gradient norm high {h['high_grad_norm']:.4g} vs low {h['low_grad_norm']:.4g}. "
                 f"Mean over all probes: loss high {np.mean([r['high_loss'] for r in probes]):.4g} / low "
                 f"{np.mean([r['low_loss'] for r in probes]):.4g}, grad norm high "
                 f"{np.mean([r['high_grad_norm'] for r in probes]):.4g} / low "
                 f"{np.mean([r['low_grad_norm'] for r in probes]):.4g}.\n")
    L.append("## Training curves (plot.py)\n")
    L.append("![losses](train_losses.png)\n\nEvery loss term of the VCM, PCM, semantic (+TC) and DCM detail runs, "
             f"drawn by `python plot.py {' '.join(os.path.relpath(d, out) for d in curves.values())}` (which also "
             "draws the probes and the learning-rate / gradient-norm curves).\n")
    val = os.path.join(run_dirs["dcm"], "samples")
    steps = sorted(os.listdir(val)) if os.path.isdir(val) else []
    if steps:
        L.append("## Validation samples while DCM's detail expert trains (train.py --sample-every)\n")
        L.append("The same noise and 6 prompts at every validation, 4 sampling steps: at the start (the semantic "
                 "expert + a zero LoRA) and after the last step. Every run folder holds these grids at 2, 4 and 8 "
                 "steps (`runs/*/samples/`).\n")
        for st in (steps[0], steps[-1]):
            rel = os.path.relpath(os.path.join(val, st, "grid_4step.gif"), out)
            L.append(f"{st}: ![{st}]({rel})\n")
    L.append("## Fig. 5: which layers differ between two separately trained experts (row OD)\n")
    L.append("![fig5](fig5_expert_difference.png)\n")
    L.append("| layer group | parameters | relative difference |\n|---|---|---|")
    for g, v in sorted(s["fig5_groups"].items(), key=lambda kv: -kv[1]["rel_diff"]):
        L.append(f"| {g} | {v['numel']:,} | {v['rel_diff']:.4g} |")
    L.append("\nThe detail expert of row OD starts from the semantic expert and is fine-tuned on the detail "
             "sub-trajectory, so this is what detail training changes.\n")
    steps_main = 4 if 4 in S["eval_steps"] else S["eval_steps"][0]
    L.append(f"## Ablation (paper Table 3), {steps_main} sampling steps\n")
    L.append(ablation(res, params, models, steps_main) + "\n")
    L.append(f"## All models, {steps_main} steps (teacher 50 steps for reference)\n")
    with_ref = {**res, "teacher (50 steps)": {steps_main: res["teacher (50 steps)"][N]}}
    L.append(table(with_ref, params, steps_main, names) + "\n")
    L.append(best(res, steps_main, names[1:]) + "\n")
    L.append("What changed, metric by metric (better/worse; '(within spread)' = the difference is smaller than the "
             "seeds' combined std):\n")
    L.append(compare(res, steps_main) + "\n")
    if s["kappa_sweep"]:
        ks = sorted(s["kappa_sweep"] + [kap])
        names_k = [f"DCM, kappa = {k}" if k != kap else "DCM (OD+PE+TC+GF)" for k in ks]
        L.append(f"## kappa sweep (paper Fig. 10 right): the DCM recipe retrained at each cut, {steps_main} steps\n")
        sweep = table(res, params, steps_main, names_k)
        L.append(sweep.replace("DCM (OD+PE+TC+GF)", f"DCM, kappa = {kap} (chosen)") + "\n")
    for st in S["eval_steps"]:
        if st != steps_main:
            L.append(f"## {st} sampling steps\n")
            L.append(table(res, params, st, names[1:]) + "\n")
    L.append("## Samples: the teacher vs every model at 4 steps, same noise and prompts\n")
    L.append("![samples](samples_4step.gif)\n")
    L.append("## The metrics\n")
    L.append(METRIC_DOC)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L) + "\n")


METRIC_DOC = """\
- **traj. MSE / L1**: distance between a model's sample and the teacher's 50-step sample from the same noise and
  prompt. Consistency distillation promises exactly this (reproduce the teacher's ODE endpoint).
- **FD**: Frechet distance between Gaussians fitted to the features of a small 3D-conv classifier (trained once on
  the synthetic data, cached in the run folder) of the samples and of real videos: the toy's FVD.
- **cond. acc.**: how often that classifier recognises the class (shape, colour, direction) the sample was
  conditioned on (chance 1/24): the toy's text alignment.
- **motion err.**: mean distance in pixels between the shape's per-frame centroid displacement and the class's
  known constant velocity (0 on real data, 1 for a frozen video): temporal consistency of the motion.
- **HF ratio**: fraction of spatial spectral energy above 0.25 cycles/pixel in samples divided by that of real
  videos: ~1 keeps the data's detail (the 2-pixel checker texture, sharp edges), < 1 blurry, > 1 noisy.
"""
