"""The toy bench (issue 17 item 4): every model on fixed test inputs, per schedule, step count, sampling seed and
training seed; spreads over training seeds and a computed "difference exceeds the spread" marker.

A `Split` is one set of sampling seeds (test or validation: disjoint noise seeds) with, per seed, balanced labels,
their conditioning, noise, real videos and the guided teacher's 50-step reference from the same noise. A model is
scored by `score(split, fn, ks)`: fn(noise, cond, ks) -> samples at the grid indices ks (solver.student_schedule).
"""
import os

import torch

from storage import checkpoint
import sampling
import solver
from teacher import Teacher
from toy import data as toy_data
from toy import metrics as tm


# videos per model call when sampling for the bench: ~1.4x faster on a CPU than one 384-video batch (the activations
# of 32 videos stay in cache; measured 1.33 vs 1.91 s for 4 student steps on 1 thread), and the same samples bit for
# bit here (each video's computation does not depend on its batch); the one chunk size everywhere, whatever the machine
CHUNK = 32


def chunked(fn, noise, cond, *args, n=CHUNK):
    """fn(noise, cond, *args) over chunks of `n` videos (cond: {name: [batch, ...]}), joined along the batch."""
    return torch.cat([fn(noise[i:i + n], {k: v[i:i + n] for k, v in cond.items()}, *args)
                      for i in range(0, len(noise), n)])


def eval_batch(seed, n, spec):
    """Evaluation inputs of one sampling seed: balanced labels, their conditioning and velocity, noise."""
    g = torch.Generator().manual_seed(1_000_003 + seed)
    labels = (torch.arange(n) + torch.randint(0, toy_data.NUM_CLASSES, (1,), generator=g)) % toy_data.NUM_CLASSES
    noise = torch.randn(n, *spec.latent_shape, generator=g)
    return labels, toy_data.cond_for_labels(labels, spec), toy_data.velocity_of(labels), noise


class Split:
    """Sampling seeds of one split, their inputs, real videos (features cached) and the 50-step teacher reference."""

    def __init__(self, seeds, n, spec, clf, teacher, refs=None):
        """refs: the 50-step references per seed when already sampled (teacher_sample of the same seed, n, guidance)."""
        self.clf, self.items = clf, []
        for i, s in enumerate(seeds):
            labels, cond, vel, noise = eval_batch(s, n, spec)
            real = toy_data.make_batch(n, 2_000_003 + s, spec)["latents"]
            ref = refs[i] if refs is not None else reference(teacher, noise, cond)
            self.items.append({"labels": labels, "cond": cond, "vel": vel, "noise": noise, "real": real,
                               "real_feats": tm.classifier_features(clf, real)[0], "ref": ref})

    def reference_metrics(self):
        """The 50-step teacher's own metrics per sampling seed (no trajectory distance: it is the reference)."""
        return [tm.evaluate(it["ref"], it["labels"], it["vel"], it["real"], self.clf, real_feats=it["real_feats"])
                for it in self.items]


@torch.no_grad()
def reference(teacher, noise, cond):
    """The guided teacher's 50-step samples from `noise`, clamped to the data range: the bench's reference."""
    return chunked(lambda x, c: teacher.sample(x, c, progress=False), noise, cond).clamp(-1, 1)


def teacher_sample(ckpt, guidance, data_dir, seed, n, spec):
    """reference() on eval_batch(seed, n) of the teacher at `ckpt` with CFG `guidance` (a worker process's job)."""
    _, cond, _, noise = eval_batch(seed, n, spec)
    return reference(load_teacher(ckpt, guidance, data_dir), noise, cond)


@torch.no_grad()
def score(split, fn, ks, keep=None):
    """[metrics per sampling seed] of fn at grid indices ks; keep(i, x) sees each seed's samples."""
    out = []
    for i, it in enumerate(split.items):
        x = fn(it["noise"], it["cond"], ks).clamp(-1, 1)
        out.append(tm.evaluate(x, it["labels"], it["vel"], it["real"], split.clf, it["ref"], it["real_feats"]))
        if keep is not None:
            keep(i, x)
    return out


def student_fn(model, info, grid, guidance):
    """fn(noise, cond, ks) of a distilled student: one model call and jump per point, no CFG (sample.py's sampler)."""
    def one(noise, cond, ks):
        return solver.sample(sampling.model_fn(model, cond, guidance), noise.float(), *solver.sample_points(grid, ks),
                             grid.kind, progress=False)
    return lambda noise, cond, ks: chunked(one, noise, cond, ks)


def teacher_fn(teacher: Teacher):
    """fn(noise, cond, ks) of the undistilled teacher at the same points, with its guidance (CFG: 2 calls a point)."""
    def one(noise, cond, ks):
        return solver.sample(lambda x, tt: teacher.guided(x, tt, cond), noise.float(),
                             *solver.sample_points(teacher.grid, ks), teacher.grid.kind, progress=False)
    return lambda noise, cond, ks: chunked(one, noise, cond, ks)


def seed_mean(per_sampling_seed):
    """One training seed's metrics: the mean over its sampling seeds."""
    return {k: v["mean"] for k, v in tm.aggregate(per_sampling_seed).items()}


def combine(per_train_seed):
    """{metric: {mean, std, n}} over training seeds (each already a mean over sampling seeds)."""
    return tm.aggregate(per_train_seed)


def exceeds(a, b, key):
    """The "difference exceeds the spread" marker: |mean_a - mean_b| > std_a + std_b (spreads over training seeds,
    or over sampling seeds for a single run); False when either has no spread to compare with."""
    if key not in a or key not in b:
        return False
    sa, sb = a[key]["std"], b[key]["std"]
    return (sa > 0 or sb > 0) and abs(a[key]["mean"] - b[key]["mean"]) > sa + sb


TEACHER = "teacher (no distillation)"


def load_model(ckpt, ema=False):
    """(model, info) of a train.py step folder; ema: the EMA target's weights (ema.safetensors) instead of the online."""
    return sampling.load_student(ckpt, ema=ema)


def curve(run_out, split, grid, guidance, steps, ema=False):
    """Validation metrics (mean over the split's seeds) of every checkpoint of a run at `steps` student steps."""
    rows = []
    for name in checkpoint.step_folders(run_out):
        model, info = load_model(os.path.join(run_out, name), ema)
        ks = solver.student_schedule(grid, info["boundaries"], steps)
        m = seed_mean(score(split, student_fn(model, info, grid, guidance), ks))
        rows.append(m | {"step": int(name.split("_")[-1])})
    return rows


def agg_over(per_seed):
    """{"per_seed": [...], "agg": {metric: mean, std, n}} of one run's metrics over sampling seeds."""
    return {"per_seed": per_seed, "agg": tm.aggregate(per_seed), "over": "sampling seeds"}


@torch.no_grad()
def evaluate(models, teach, test, grid, guidance, S, kappa, headline, sweep=()):
    """results[label][schedule][steps] = {"per_train_seed", "agg", "over"}, and the GIF's samples (test seed 0).

    Headline models at every S.eval_steps, the others at 2 and 4 steps (1 step runs only their semantic expert);
    DCM with both point rules; the undistilled teacher on every student's schedule, the sweep's cuts included. Each
    training seed's metrics are the mean over the sampling seeds; rows with one training run (the undistilled
    teacher, the kappa sweep) take their spread over the sampling seeds instead."""
    results, gif, cache = {}, {}, {}
    few = [st for st in S.eval_steps if st > 1]
    schedules = {"VCM": ([], "even", S.eval_steps),
                 "PCM (4 phases)": ([(grid.N * j + 2) // 4 - 1 for j in (3, 2, 1)], "even", S.eval_steps),
                 "DCM": ([kappa], "even", S.eval_steps), "DCM, proportional points": ([kappa], "proportional", few)}
    schedules |= {f"DCM, kappa = {k}": ([k], "even", few) for k in sweep}

    def keep(label, steps):
        return lambda i, x: gif.__setitem__(f"{label}, {steps} steps", x[:S.gif_n]) if i == 0 and steps in (2, 4) \
            and label in ("VCM", "PCM (4 phases)", "DCM (OD+PE+TC+GF)", TEACHER + ", VCM schedule") else None
    for sched, (bounds, points, steps_list) in schedules.items():
        for steps in steps_list:
            ks = tuple(solver.student_schedule(grid, bounds, steps, points))
            if ks not in cache:
                cache[ks] = score(test, teacher_fn(teach), list(ks), keep(f"{TEACHER}, {sched} schedule", steps))
            results.setdefault(TEACHER, {}).setdefault(f"{sched} schedule", {})[steps] = agg_over(cache[ks]) | {"ks": ks}
    for label, members in models.items():
        dual = label.startswith("DCM") or label.startswith("OD")
        # proportional points where a table shows them: DCM's headline rows and the kappa sweep's
        both = label.startswith("DCM") and (label in headline or label.startswith("DCM, kappa"))
        for points in ("even", "proportional") if both else ("even",):
            for steps in S.eval_steps if label in headline else few:
                per_train = []
                for i, (model, info) in enumerate(members):
                    ks = solver.student_schedule(grid, info["boundaries"], steps, points)
                    if (id(model), tuple(ks)) not in cache:  # both point rules agree at 1-2 steps
                        cache[id(model), tuple(ks)] = score(test, student_fn(model, info, grid, guidance), ks,
                                                            keep(label, steps) if i == 0 and points == "even" else None)
                    per_train.append(cache[id(model), tuple(ks)])
                sched = f"{points} points" if dual else "own schedule"
                if len(members) > 1:
                    row = {"per_train_seed": per_train, "agg": combine([seed_mean(p) for p in per_train]),
                           "over": "training seeds", "ks": ks}
                else:
                    row = agg_over(per_train[0]) | {"ks": ks}
                results.setdefault(label, {}).setdefault(sched, {})[steps] = row
    gif = {"teacher, 50 steps": test.items[0]["ref"][:S.gif_n]} | gif
    return results, gif


def evaluate_seed(seed, members, use_ema, teacher_ckpt, guidance, clf_path, data_dir, spec, S, kappa, headline, sweep):
    """bench.evaluate on one test sampling seed, everything loaded from files (a worker process's job, toy/jobs.py):
    members {label: [checkpoint]}; -> (results with the 50-step teacher's own row, GIF samples)."""
    teach = load_teacher(teacher_ckpt, guidance, data_dir)
    clf = tm.load_or_train_classifier(clf_path, spec)
    test = Split([seed], S.eval_n, spec, clf, teach)
    models = {label: [load_model(c, use_ema) for c in ckpts] for label, ckpts in members.items()}
    results, gif = evaluate(models, teach, test, teach.grid, guidance, S, kappa, headline, sweep)
    results["teacher (50 steps)"] = {"50 steps": {teach.grid.N: agg_over(test.reference_metrics())}}
    return results, gif


def load_teacher(ckpt, guidance, data_dir):
    """The guided toy teacher of a step folder, its unconditional input from the dataset (a worker's own copy)."""
    from storage import latents
    tmodel, tinfo = sampling.load_student(ckpt)
    return Teacher(tmodel, tinfo["grid"], guidance, latents.LatentDataset(data_dir).uncond)


def merge_seeds(parts):
    """evaluate_seed's (results, gif) of several sampling seeds -> the same structure over all of them: per training
    seed the per-sampling-seed lists joined, spreads recomputed; the GIF of the first seed."""
    def walk(rows):
        first = rows[0]
        if "agg" not in first:
            return {k: walk([r[k] for r in rows]) for k in first}
        out = {k: v for k, v in first.items() if k not in ("per_seed", "per_train_seed", "agg")}
        if "per_train_seed" in first:
            out["per_train_seed"] = [sum((r["per_train_seed"][j] for r in rows), [])
                                     for j in range(len(first["per_train_seed"]))]
            return out | {"agg": combine([seed_mean(p) for p in out["per_train_seed"]])}
        out["per_seed"] = sum((r["per_seed"] for r in rows), [])
        return out | {"agg": tm.aggregate(out["per_seed"])}
    return walk([r for r, _ in parts]), parts[0][1]
