"""report.md of a toy run (toy/run.py), its figures drawn by toy/figures.py; everything read from its summary dict."""
import math
import os
import shutil

import numpy as np

from tools import plot  # tools/plot.py (toy/run.py puts the repo root on sys.path)
from toy import bench
from toy.figures import fig5, fig10, fig_curves, fig_train, sample_gif

# metric key -> (column title, direction: -1 lower is better, +1 higher, 0 closer to 1 is better)
METRICS = {
    "traj_mse": ("traj. MSE", -1), "fd": ("FD", -1), "cond_acc": ("class acc.", 1),
    "motion_err": ("motion err. (px)", -1), "hf_ratio": ("HF ratio", 0),
}
TEACHER = "teacher (no distillation)"
DCM = "DCM (OD+PE+TC+GF)"
HEADLINE = [  # (row title, model, schedule key)
    ("teacher, 50 steps", "teacher (50 steps)", "50 steps"),
    ("teacher on VCM's schedule (uniform)", TEACHER, "VCM schedule"),
    ("VCM", "VCM", "own schedule"),
    ("teacher on PCM's schedule", TEACHER, "PCM (4 phases) schedule"),
    ("PCM (4 phases)", "PCM (4 phases)", "own schedule"),
    ("teacher on DCM's schedule (even points)", TEACHER, "DCM schedule"),
    ("DCM, even points", DCM, "even points"),
    ("teacher on DCM's schedule (proportional points)", TEACHER, "DCM, proportional points schedule"),
    ("DCM, proportional points", DCM, "proportional points"),
]
COMPARE = [  # (a, b, steps_a, steps_b, what): rows as (model, schedule)
    (("VCM", "own schedule"), (DCM, "even points"), None, None, "DCM vs VCM"),
    (("PCM (4 phases)", "own schedule"), (DCM, "even points"), None, None, "DCM vs PCM"),
    (("PCM (4 phases)", "own schedule"), ("VCM", "own schedule"), None, None, "VCM vs PCM"),
    ((DCM, "even points"), (DCM, "proportional points"), None, None, "DCM: proportional vs even points"),
    ((TEACHER, "VCM schedule"), ("VCM", "own schedule"), None, None, "VCM vs the teacher on its schedule"),
    ((TEACHER, "PCM (4 phases) schedule"), ("PCM (4 phases)", "own schedule"), None, None,
     "PCM vs the teacher on its schedule"),
    ((TEACHER, "DCM schedule"), (DCM, "even points"), None, None, "DCM vs the teacher on its schedule"),
    (("VCM", "own schedule"), (DCM, "even points"), 4, 2, "DCM at 2 steps vs VCM at 4 (the paper's limitation)"),
]
ABLATION = [("VCM", "VCM", "(1)"), ("OD", "OD", "(2)"), ("OD+PE", "OD+PE", "(3)"), ("OD+PE+TC", "OD+PE+TC", "(4)"),
            ("OD+PE+GF", "OD+PE+GF", "(5)"), (DCM, DCM, "(6)"),
            ("DCM, LoRA semantic expert (train.py --semantic-lora)", "DCM, LoRA semantic expert", "(7)"),
            ("DCM, the training videos as the GAN's real (--gan-real data)", "DCM, data as GAN real", "(8)"),
            ("DCM, the teacher's solution as the GAN's real (--gan-real teacher)", "DCM, teacher as GAN real", "(9)")]
ABL_COMPARE = [("VCM", "OD", "optimisation decoupling (1)->(2)"), ("OD", "OD+PE", "LoRA detail expert (2)->(3)"),
               ("OD+PE", "OD+PE+TC", "TC loss (3)->(4)"), ("OD+PE+GF", DCM, "TC loss (5)->(6)"),
               ("OD+PE", "OD+PE+GF", "GAN + FM (3)->(5)"), ("OD+PE+TC", DCM, "GAN + FM (4)->(6)"),
               (DCM, "DCM, LoRA semantic expert", "LoRA semantic expert (6)->(7)"),
               ("OD+PE+TC", "DCM, data as GAN real", "GAN + FM, data as real (4)->(8)"),
               ("OD+PE+TC", "DCM, teacher as GAN real", "GAN + FM, teacher as real (4)->(9)"),
               (DCM, "DCM, data as GAN real", "GAN real: target -> data (6)->(8)"),
               (DCM, "DCM, teacher as GAN real", "GAN real: target -> teacher (6)->(9)")]


def fmt(agg, key, bold=False):
    if key not in agg:
        return "–"
    m, s = agg[key]["mean"], agg[key]["std"]
    digits = 4 if abs(m) < 0.1 else 3 if abs(m) < 10 else 0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def cell(res, model, sched, steps):
    """The result row of (model, schedule) at `steps` steps, or None."""
    by = res.get(model, {}).get(sched, {})
    return by.get(steps, by.get(str(steps)))


def spread_note(row):
    n = next(iter(row["agg"].values()))["n"]
    return f"{n} {'train' if row['over'] == 'training seeds' else 'sampl.'}"


def headline(res, steps, N):
    head = "| model | spread over | " + " | ".join(t for t, _ in METRICS.values()) + " |"
    rows = [head, "|" + "---|" * (2 + len(METRICS))]
    for title, model, sched in HEADLINE:
        row = cell(res, model, sched, N if model == "teacher (50 steps)" else steps)
        if row is not None:
            rows.append(f"| {title} | {spread_note(row)} | " + " | ".join(fmt(row["agg"], k) for k in METRICS) + " |")
    return "\n".join(rows)


def verdict(a, b, key, sign):
    """'better'/'worse' of b against a, and '*' where the difference exceeds the spread (bench.exceeds)."""
    ma, mb = a[key]["mean"], b[key]["mean"]
    gain = (mb - ma) * sign if sign else abs(math.log(max(ma, 1e-9))) - abs(math.log(max(mb, 1e-9)))
    if gain == 0:
        return "same"
    return ("better" if gain > 0 else "worse") + (" *" if bench.exceeds(a, b, key) else "")


def comparisons(res, pairs, steps_list):
    rows = ["| b vs a | steps | " + " | ".join(t for t, _ in METRICS.values()) + " |", "|" + "---|" * (2 + len(METRICS))]
    for a, b, sa, sb, what in pairs:
        for st in steps_list if sa is None else [None]:
            ra, rb = cell(res, *a, sa or st), cell(res, *b, sb or st)
            if ra is None or rb is None:
                continue
            cells = [verdict(ra["agg"], rb["agg"], k, sign) if k in ra["agg"] and k in rb["agg"] else "–"
                     for k, (_, sign) in METRICS.items()]
            rows.append(f"| {what} | {st if sa is None else f'{sb} vs {sa}'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ablation(res, params, steps):
    rows = ["| row | spread over | stored params | " + " | ".join(t for t, _ in METRICS.values()) + " |",
            "|" + "---|" * (3 + len(METRICS))]
    for title, model, num in ABLATION:
        sched = "own schedule" if model == "VCM" else "even points"
        row = cell(res, model, sched, steps)
        if row is not None:
            rows.append(f"| {num} {title} | {spread_note(row)} | {params.get(model, 0):,} | "
                        + " | ".join(fmt(row["agg"], k) for k in METRICS) + " |")
    return "\n".join(rows)


def ablation_compare(res, steps_list):
    pairs = []
    for a, b, what in ABL_COMPARE:
        sa = "own schedule" if a == "VCM" else "even points"
        pairs.append(((a, sa), (b, "even points"), None, None, what))
    return comparisons(res, pairs, steps_list)


def sweep_table(res, kappas, chosen, steps_list):
    """DCM retrained at each cut, and the undistilled teacher on the same points (the schedule's own effect)."""
    rows = ["| kappa | model | points | steps | " + " | ".join(t for t, _ in METRICS.values()) + " |",
            "|" + "---|" * (4 + len(METRICS))]
    for k in sorted(kappas + [chosen]):
        model = DCM if k == chosen else f"DCM, kappa = {k}"
        for pts in ("even points", "proportional points"):
            tsched = ("DCM schedule" if pts.startswith("even") else "DCM, proportional points schedule") \
                if k == chosen else f"DCM, kappa = {k} schedule" if pts.startswith("even") else None
            for st in steps_list:
                for who, row in (("teacher", cell(res, TEACHER, tsched, st) if tsched else None),
                                 ("DCM", cell(res, model, pts, st))):
                    if row is not None:
                        rows.append(f"| {k}{' (chosen)' if k == chosen else ''} | {who} | {pts.split()[0]} | {st} | "
                                    + " | ".join(fmt(row["agg"], m) for m in METRICS) + " |")
    return "\n".join(rows)


def teacher_source(s):
    """Where this run's teacher came from: the committed toy/teacher/ (its provenance) or trained in the run."""
    pv = s.get("teacher_provenance")
    if not pv:
        return "Trained in this run (its time is in the phases above)."
    return (f"The committed toy/teacher/ (as in the paper the teacher is given; not in this run's wall time): trained "
            f"by `{pv['command']}` in {sum(pv['wall_s']):.0f} s on {pv['machine']}, final diffusion loss "
            f"{pv['final_loss']:.4f}.")


def not_run(s):
    """What of the complete study (`--all-rows`) this run left out (the full run's budget; docs/toy.md), a sentence."""
    cut = s.get("not_run")
    return f" Not in this run (docs/toy.md gives what they showed; `--all-rows` runs them): {'; '.join(cut)}." if cut \
        else ""


def write(out, s, models, gif, run_dirs):
    """All figures and report.md into out/; run_dirs: {run name: train.py run folder}."""
    S, N = s["settings"], len(s["grid_sigma"]) - 1
    res, params, kap, sig = s["results"], s["param_counts"], s["kappa"], s["grid_sigma"]
    fig10(os.path.join(out, "fig10_x0_change.png"), s["fig10_l1"], kap, N, S["kappa_q"], s["kappa_checks"])
    probes = plot.read_run(run_dirs["vcm_s0"])["probes"]
    if probes:  # paper Fig. 2, drawn by tools/plot.py as for any run
        plot.probe_curves(os.path.join(out, "fig2_probes.png"), [{"probes": probes}], ["VCM"])
    curves = {k: run_dirs[f"{k}_s0"] for k in ("vcm", "pcm", "sem_tc", "dcm")}
    plot.loss_curves(os.path.join(out, "train_losses.png"), [plot.read_run(d) for d in curves.values()], list(curves))
    fig5(os.path.join(out, "fig5_expert_difference.png"), s["fig5_groups"], s["fig5_tensors"])
    fig_curves(os.path.join(out, "curves_validation.png"), s["target_curves"], s["dcm_curve"],
               {k: t for k, (t, _) in METRICS.items()})
    logs = {n: plot.read_jsonl(os.path.join(run_dirs[n], "log.jsonl"))  # the TC run, then every GAN real side
            for n in ("sem_tc_s0", "pe_gf_s0", "dcm_s0", "dcm_data_s0", "dcm_teach_s0") if n in run_dirs}
    fig_train(os.path.join(out, "train_signals.png"), logs)
    sample_gif(os.path.join(out, "samples.gif"), gif)
    steps_list = S["eval_steps"]
    mach, L = s["machine"], []
    L.append(f"# DCM toy study{' (QUICK smoke run: tiny budgets, the numbers mean nothing)' if s['quick'] else ''}\n")
    load = mach.get("loadavg_at_end")
    w, wt = s.get("workers", (1, mach["torch_threads"]))
    L.append(f"Wall time {s['wall_s']:.0f} s on {mach['cpus']} CPUs ({mach['torch_threads']} torch threads; training "
             f"runs {w} side by side, {wt} thread(s) each), {mach['platform']}, torch {mach['torch']}; load average at "
             f"the end {'/'.join(f'{v:.1f}' for v in load) if load else '?'} (1/5/15 min). Seed {s['seed']}.\n")
    L.append("Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["phases_s"].items()) + ".\n")
    if s.get("run_s"):
        L.append(f"Training runs (s each; {w} at a time): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in s["run_s"].items()) + ".\n")
    sp = s["spec"]
    L.append("## Design\n")
    L.append(f"- Data: {sp['frames']} frames of {sp['size']}x{sp['size']} RGB, one textured shape (3 shapes x 2 colours "
             f"x 4 directions = 24 classes) moving {sp['speed']} px/frame; {S['n_data']} training videos.\n"
             f"- Teacher: toy/config.json (HunyuanVideo-style flow model, no guidance input), steps/lr {S['teacher']}, "
             f"batch {S['batch']}, condition dropout {S['cond_drop']} -> classifier-free guidance. Grid N = {N}, "
             f"shift {S['shift']}. {teacher_source(s)}\n"
             f"- Students: {S['single_steps']} steps (VCM, PCM) or {S['sem_steps']} semantic + {S['det_steps']} "
             f"detail steps, batch {S['student_batch']}; target (EMA decay, lr) chosen on validation: "
             f"{s['target']}; LoRA rank {S['lora_rank']} at {S['lora_x']:g}x the lr; discriminator lr {S['d_lr']}; "
             f"TC weight {s['w_tc']} (calibrated, below).\n"
             f"- Splits: settings are chosen on a validation split ({S['val_n']} videos, noise seed 500 + seed); "
             f"the test split has {S['eval_seeds']} sampling seeds x {S['eval_n']} videos (other noise; the same 24 "
             f"classes, there are no others). Headline rows (VCM, PCM, DCM): {S['train_seeds']} training seeds; other "
             f"Table 3 rows: {S['ablation_seeds']}; each cut of the kappa sweep: {S.get('sweep_seeds', 1)}; the "
             f"undistilled teacher: 1 run.{not_run(s)}\n"
             "- Cells: mean ± std over training seeds (each seed's value is the mean over the sampling seeds); rows "
             "with one run give the std over sampling seeds ('spread over' column). A '*' in the comparison tables "
             "marks a difference larger than the sum of the two rows' spreads (`toy/bench.py: exceeds`).\n")

    L.append("## The teacher\n")
    L.append("CFG scale on the validation split (50 steps; rule `choose_guidance`: the best class accuracy among "
             "the scales whose FD is within 2x the lowest):\n")
    L.append("| CFG scale | class acc. | shape / colour / direction acc. | FD | motion err. | HF ratio |\n"
             "|---|---|---|---|---|---|")
    for g, r in s["guidance_rows"].items():
        L.append(f"| {g}{' (chosen)' if float(g) == float(s['guidance']) else ''} | {r['cond_acc']:.3f} | "
                 f"{r['shape_acc']:.2f} / {r['colour_acc']:.2f} / {r['dir_acc']:.2f} | "
                 f"{r['fd']:.0f} | {r['motion_err']:.3f} | {r['hf_ratio']:.3f} |")
    t50 = cell(res, "teacher (50 steps)", "50 steps", N)["agg"]
    gap = {st: cell(res, TEACHER, "VCM schedule", st) for st in steps_list}
    L.append(f"\nOn the test split the teacher at 50 steps scores class accuracy {fmt(t50, 'cond_acc')} (shape "
             f"{fmt(t50, 'shape_acc')}, colour {fmt(t50, 'colour_acc')}, direction {fmt(t50, 'dir_acc')}), FD "
             f"{fmt(t50, 'fd')}; the same teacher with CFG on a uniform schedule: " + "; ".join(
                 f"{st} steps: accuracy {fmt(g['agg'], 'cond_acc')}, FD {fmt(g['agg'], 'fd')}, traj. MSE "
                 f"{fmt(g['agg'], 'traj_mse')}" for st, g in gap.items() if g) + ". That gap is what distillation "
             "has to close.\n")

    L.append("## Fig. 10 and kappa\n")
    L.append("![fig10](fig10_x0_change.png)\n")
    ch = "; ".join(f"{k}: kappa {v['kappa']}" for k, v in s["kappa_checks"].items())
    L.append(f"Rule (`toy/run.py: choose_kappa`): the semantic phase holds the share q = {S['kappa_q']} of the teacher's "
             f"total adjacent-step x0 change along its 50-step trajectory -> kappa = {kap} (sigma {sig[kap + 1]:.3f}); "
             f"semantic expert: grid indices {kap + 1}..{N - 1}, detail expert: 0..{kap}. The same rule on {ch}.\n")

    L.append("## Settings chosen on the validation split\n")
    L.append("![curves](curves_validation.png)\n")
    tc = s["target_curves"]
    L.append("Target candidates (VCM, checkpoints along the run, 4 sampling steps, validation split; rule: lowest "
             "trajectory MSE at the end of the run):\n" if len(tc) > 1 else "The students' target (VCM, checkpoints "
             "along the run, 4 sampling steps, validation split): the one the complete study (`--all-rows`) chose on "
             "this split, not searched again here (docs/toy.md):\n")
    L.append("| candidate | " + " | ".join(f"step {r['step']}" for r in next(iter(tc.values()))) + " |")
    L.append("|---|" + "---|" * len(next(iter(tc.values()))))
    for name, rows in tc.items():
        L.append(f"| {name} (traj. MSE / FD / acc.) | " + " | ".join(
            f"{r['traj_mse']:.4f} / {r['fd']:.0f} / {r['cond_acc']:.2f}" for r in rows) + " |")
    e = s["ema_weights_val"]
    L.append(f"\nChosen: EMA {s['target']['ema']}, lr {s['target']['lr']:g}. The EMA target's own weights (saved in "
             f"every checkpoint's ema.safetensors) at the end of that run: traj. MSE {e['traj_mse']:.4f}, FD "
             f"{e['fd']:.0f}, acc. {e['cond_acc']:.3f} -> the study samples the "
             f"{'EMA' if s['use_ema_weights'] else 'online'} weights.\n")
    L.append(f"TC weight: in a {S['tc_calib_steps']}-step calibration run at w_tc = 1 the TC term's gradient norm at the "
             f"student's output is **{s['tc_ratio_at_w1']:.3g} x** CD's (median over probe steps), so w_tc = "
             f"{s['w_tc']} (1 / ratio). Measured in the runs themselves (median of gn_term / gn_cd over probe steps):\n")
    L.append("| run | " + " | ".join(f"{t}/cd" for t in ("tc", "gan_g", "fm")) + " |\n|---|---|---|---|")
    for n, r in s["grad_ratios"].items():
        if r:
            L.append(f"| {n} | " + " | ".join(f"{r[t]:.3g}" if r.get(t) is not None else "–"
                                             for t in ("tc", "gan_g", "fm")) + " |")
    L.append("\n![signals](train_signals.png)\n")
    d_logs = {n: plot.read_jsonl(os.path.join(run_dirs[n], "log.jsonl"))  # every GAN real side, seed 0
              for n in ("pe_gf_s0", "dcm_s0", "dcm_data_s0", "dcm_teach_s0") if n in run_dirs}
    for n, rows in d_logs.items():
        d = [r for r in rows if "d" in r]
        if d:
            last = d[-max(1, len(d) // 5):]
            L.append(f"- {n}: discriminator hinge loss {d[0]['d']:.3f} at the start, mean {np.mean([r['d'] for r in last]):.3f} "
                     f"over the last fifth of the run; accuracy real {np.mean([r['d_acc_real'] for r in last]):.2f} / "
                     f"fake {np.mean([r['d_acc_fake'] for r in last]):.2f} there.")
    if dc := s.get("d_control"):
        L.append(f"- Control (`toy/probes.py`): a fresh discriminator trained {S['d_control_steps']} steps at lr "
                 f"{S['d_lr']} on the frozen DCM detail expert's (seed 0) GAN features, mean over the last fifth: "
                 + "; ".join(f"{side}: hinge {r['d_loss']:.3f} (start {r['start']:.3f}), accuracy real "
                             f"{r['acc_real']:.2f} / fake {r['acc_fake']:.2f}" for side, r in dc.items())
                 + ". \"Target as real\" is the method's GAN (real = x_tgt, the stop-grad student after one teacher "
                 "step); \"data as real\" puts the training videos there.")
    L.append("")

    L.append("## Headline: every method at 1, 2 and 4 steps, with the undistilled teacher on the same schedule\n")
    for st in steps_list:
        L.append(f"### {st} step{'s' if st > 1 else ''}\n")
        L.append(headline(res, st, N) + "\n")
    L.append("What changed, metric by metric (better/worse of the second against the first; '*' = the difference "
             "exceeds the sum of the two spreads):\n")
    L.append(comparisons(res, COMPARE, steps_list) + "\n")

    L.append("## Ablation (paper Table 3)\n")
    for st in [x for x in (2, 4) if x in steps_list]:
        L.append(f"### {st} steps\n")
        L.append(ablation(res, params, st) + "\n")
    L.append(ablation_compare(res, steps_list) + "\n")
    tp, teacher_n = s.get("trained_params", {}), params.get(TEACHER, 0)
    if {"lsem_tc_s0", "dcm_lsem_s0", "sem_tc_s0", "dcm_s0"} <= set(tp):
        L.append(f"Row (7) is row (6) with the semantic expert as rank-{S['lora_rank']} LoRA + trainable copies of the "
                 "timestep layers over the teacher's frozen weights (`train.py --semantic-lora`), which are also the "
                 f"teacher: its semantic stage trains {tp['lsem_tc_s0']['trainable']:,} parameters and stores "
                 f"{tp['lsem_tc_s0']['params']:,} with the teacher, row (6)'s trains {tp['sem_tc_s0']['trainable']:,} "
                 f"and stores {tp['sem_tc_s0']['params'] + teacher_n:,}; the detail stages train "
                 f"{tp['dcm_lsem_s0']['trainable']:,} and {tp['dcm_s0']['trainable']:,}. The LoRA lr is "
                 f"{S['lora_x']:g}x the full one, as for the detail expert.\n")
    if s["sweep"]:
        few = [x for x in (2, 4) if x in steps_list]
        L.append(f"## kappa sweep (paper Fig. 10 right): the DCM recipe retrained at each cut, "
                 f"{S.get('sweep_seeds', 1)} training seed(s)\n")
        L.append(sweep_table(res, s["sweep"], kap, few) + "\n")
        L.append(comparisons(res, [p for k in s["sweep"] for p in (
            ((DCM, "even points"), (f"DCM, kappa = {k}", "even points"), None, None, f"DCM: kappa {k} vs {kap}"),
            (("VCM", "own schedule"), (f"DCM, kappa = {k}", "even points"), None, None, f"DCM at kappa {k} vs VCM"),
            (("PCM (4 phases)", "own schedule"), (f"DCM, kappa = {k}", "even points"), None, None,
             f"DCM at kappa {k} vs PCM"),
            (("VCM", "own schedule"), (f"DCM, kappa = {k}", "even points"), 4, 2,
             f"DCM at kappa {k}, 2 steps vs VCM at 4"))], few) + "\n")
    if probes:
        h = probes[-1]
        L.append("## Fig. 2: one student on the whole trajectory (VCM), high- vs low-noise probes\n")
        L.append(f"![fig2](fig2_probes.png)\n\nMean over all probes: loss high "
                 f"{np.mean([r['high_loss'] for r in probes]):.4g} / low {np.mean([r['low_loss'] for r in probes]):.4g}, "
                 f"grad norm high {np.mean([r['high_grad_norm'] for r in probes]):.4g} / low "
                 f"{np.mean([r['low_grad_norm'] for r in probes]):.4g} (last probe, step {h['step']}: loss "
                 f"{h['high_loss']:.4g} / {h['low_loss']:.4g}).\n")
    L.append("## Training curves (tools/plot.py)\n")
    L.append("![losses](train_losses.png)\n\nEvery loss term of the VCM, PCM, semantic (+TC) and DCM detail runs of "
             f"training seed 0, drawn by `python tools/plot.py {' '.join(os.path.relpath(d, out) for d in curves.values())}` "
             "(which also draws the probes and the learning-rate / gradient-norm curves).\n")
    val = os.path.join(run_dirs["dcm_s0"], "samples")
    vsteps = sorted(os.listdir(val)) if os.path.isdir(val) else []
    if vsteps:
        L.append("## Validation samples while DCM's detail expert trains (train.py --sample-every)\n")
        L.append("The same noise and 6 prompts at every validation, 4 sampling steps: at the start (the semantic "
                 "expert + a zero LoRA) and after the last step; the run folder holds the grids at 2, 4 and 8 steps "
                 "(`runs/dcm_s0/samples/`).\n")
        for st in (vsteps[0], vsteps[-1]):  # copied next to the report, which is kept without the run folders
            shutil.copy(os.path.join(val, st, "grid_4step.gif"), os.path.join(out, f"validation_{st}_4step.gif"))
            L.append(f"{st}: ![{st}](validation_{st}_4step.gif)\n")
    L.append("## Fig. 5: which layers differ between two separately trained experts (row OD, seed 0)\n")
    L.append("![fig5](fig5_expert_difference.png)\n")
    L.append("| layer group | parameters | relative difference |\n|---|---|---|")
    for g, v in sorted(s["fig5_groups"].items(), key=lambda kv: -kv[1]["rel_diff"]):
        L.append(f"| {g} | {v['numel']:,} | {v['rel_diff']:.4g} |")
    L.append("\n## Samples (test split, first sampling seed, same noise and classes in every row)\n")
    L.append("![samples](samples.gif)\n")
    L.append("## The metrics\n")
    L.append(METRIC_DOC)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L) + "\n")


METRIC_DOC = """\
- **traj. MSE**: distance between a model's sample and the guided teacher's 50-step sample from the same noise and
  class. Consistency distillation promises exactly this (reproduce the teacher's ODE endpoint).
- **FD**: Frechet distance between Gaussians fitted to the features of a small 3D-conv classifier (trained once on
  the synthetic data, cached in the run folder) of the samples and of real videos: the toy's FVD.
- **class acc.**: how often that classifier recognises the class (shape, colour, direction) the sample was
  conditioned on (chance 1/24; 1.000 on real videos): the toy's text alignment.
- **motion err.**: mean distance in pixels between the shape's per-frame centroid displacement and the class's
  known constant velocity (0 on real data, 1 for a frozen video): temporal consistency of the motion.
- **HF ratio**: fraction of spatial spectral energy above 0.25 cycles/pixel in samples divided by that of real
  videos: ~1 keeps the data's detail (the 2-pixel checker texture, sharp edges), < 1 blurry, > 1 noisy.
"""
