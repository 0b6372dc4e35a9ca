"""The toy study (issue 7): the whole DCM method on a CPU in minutes, with the paper's analysis and ablation.

    python toy/run.py [--quick] [--out DIR (default out/toy)] [--seed N] [--threads T] [--reuse] [--teacher CKPT]

1. synthetic moving-shape videos (toy/data.py) and the bench classifier (toy/metrics.py);
2. a tiny HunyuanVideo-style flow teacher (toy/config.json) trained with train.py;
3. the paper's Fig. 10: L1 between adjacent teacher steps' x0 predictions -> kappa (`choose_kappa`);
4. distillation with train.py: VCM (1 phase), PCM (4 phases), and the ablation rows of the paper's
   Table 3: (1) VCM, (2) OD = two separate full experts, (3) +PE = LoRA detail expert on the frozen
   semantic one, (4) +TC, (5) +GF, (6) +TC+GF = DCM; and DCM retrained at two other kappas;
5. Fig. 2 (VCM probes: high- vs low-noise loss and gradient norm), Fig. 5 (parameter difference
   between the two separately trained experts, per layer group);
6. every model at 2, 4 and 8 steps on the toy bench over several sampling seeds;
7. DIR/report.md + DIR/metrics.json + PNG figures + GIFs (toy/report.py).
Full: <= 10 min on 2 CPU cores; --quick (smoke test, tiny budgets, meaningless numbers): <= 60 s.
--reuse goes on in an existing DIR: finished training runs are kept (they must have the same settings).
--teacher CKPT skips the teacher's training (a train.py step folder of a toy teacher on this toy's data).
"""
import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# `python toy/run.py` puts toy/ first on sys.path, where toy/data.py would shadow the repo's data.py
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import checkpoint  # noqa: E402
from lora import TARGETS  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from teacher import Teacher, adjacent_x0_l1  # noqa: E402
from toy import data as toy_data  # noqa: E402
from toy import metrics as tm  # noqa: E402
from toy import report  # noqa: E402

CONFIG = os.path.join(HERE, "config.json")


@dataclass(frozen=True)
class Settings:
    """Budgets of one toy run (FULL / QUICK below)."""
    n_data: int = 8192            # training videos on disk
    clf_steps: int = 300          # bench classifier
    # (steps, lr) stages of the teacher, each at constant lr from the previous one's weights (a step decay)
    teacher: tuple = ((3000, 2e-3), (500, 2e-4))
    batch: int = 32               # teacher batch
    shift: float = 3.0            # flow grid shift (HunyuanVideo: 17 for 720p latents; the toy is 16x16)
    grid_steps: int = 50
    kappa_frac: float = 0.25      # Fig. 10 rule, see choose_kappa
    student_batch: int = 16
    single_steps: int = 300       # VCM / PCM: as many student iterations as both DCM stages together
    sem_steps: int = 150
    det_steps: int = 150
    lr_full: float = 3e-5         # full fine-tunes (VCM, PCM, semantic, OD detail)
    lr_lora: float = 1.5e-4       # LoRA detail expert (paper: detail lr = 5x semantic lr)
    target_ema: float = 0.95      # EMA target network (paper eq. 4); 0 = stop-grad student (authors' code)
    lora_rank: int = 8
    disc_hidden: int = 64
    probe_every: int = 10
    sample_every: int = 50        # validation samples of the DCM detail run (train.py --sample-every)
    kappa_sweep: tuple = (-20, -10)  # offsets from the chosen kappa: DCM retrained at each (paper Fig. 10 right)
    eval_seeds: int = 3
    eval_n: int = 96
    eval_steps: tuple = (2, 4, 8)
    fig10_n: int = 64
    gif_n: int = 4


FULL = Settings()
QUICK = Settings(n_data=256, clf_steps=60, teacher=((60, 1e-3), (20, 2e-4)), batch=8, student_batch=8,
                 single_steps=6, sem_steps=3, det_steps=3, probe_every=2, sample_every=3, kappa_sweep=(), eval_seeds=2,
                 eval_n=24, eval_steps=(4,), fig10_n=8, gif_n=3)
# model name -> (training run that holds it, paper Table 3 flags OD, PE, TC, GF)
MODELS = {
    "VCM": ("vcm", (0, 0, 0, 0)),
    "PCM (4 phases)": ("pcm", None),
    "OD": ("od", (1, 0, 0, 0)),
    "OD+PE": ("pe", (1, 1, 0, 0)),
    "OD+PE+TC": ("pe_tc", (1, 1, 1, 0)),
    "OD+PE+GF": ("pe_gf", (1, 1, 0, 1)),
    "DCM (OD+PE+TC+GF)": ("dcm", (1, 1, 1, 1)),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, <= 60 s")
    p.add_argument("--out", help="run folder (default out/toy, --quick: out/toy-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and evaluation")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--reuse", action="store_true", help="keep finished training runs already in --out")
    p.add_argument("--teacher", help="a trained toy teacher (train.py step folder) instead of training one")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(ROOT, "out", "toy-quick" if args.quick else "toy")
    return args


class Clock:
    """Wall time per phase of the run, for the report."""

    def __init__(self):
        self.start, self.phases = time.time(), {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.time()
        print(f"[toy] {name} ...", flush=True)
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.time() - t0
        print(f"[toy] {name}: {time.time() - t0:.1f} s", flush=True)

    def total(self):
        return time.time() - self.start


class Tee:
    """A stream writing to several (stderr: train.py's progress bar on the console and in the run's log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def train_run(out, name, argv):
    """train.main(argv) into out/runs/name, its output in out/logs/name.log and its progress bar also on the
    console -> summary."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(Tee(log, sys.stderr)):
        summary = train.main(argv + ["--out", os.path.join(out, "runs", name)])
    return summary


def choose_kappa(l1, frac, N, min_semantic=4, min_detail=4):
    """kappa from the Fig. 10 curve: the first grid index, going from the noisy end past the peak, where the
    adjacent-step x0 change falls below `frac` of its peak (the paper reads 37 off this curve by eye).

    l1[i] is the change between sampling steps i and i+1, i.e. between grid indices N-1-i and N-2-i; it is
    attributed to the cleaner index N-2-i. kappa is clamped so both phases keep at least `min_semantic` /
    `min_detail` grid points (8-step sampling gives each expert 4).
    """
    l1 = [float(v) for v in l1]
    peak_i = max(range(len(l1)), key=l1.__getitem__)
    below = [i for i in range(peak_i, len(l1)) if l1[i] < frac * l1[peak_i]]
    i = below[0] if below else len(l1) - 1
    kappa = N - 2 - i
    info = {"peak_step": peak_i, "cross_step": i, "raw_kappa": kappa}
    return max(min_detail - 1, min(kappa, N - 1 - min_semantic)), info


def eval_batch(seed, n, spec):
    """Evaluation inputs of one sampling seed: balanced labels, their conditioning and velocity, noise."""
    g = torch.Generator().manual_seed(1_000_003 + seed)
    labels = (torch.arange(n) + torch.randint(0, toy_data.NUM_CLASSES, (1,), generator=g)) % toy_data.NUM_CLASSES
    noise = torch.randn(n, *spec.latent_shape, generator=g)
    return labels, toy_data.cond_for_labels(labels, spec), toy_data.velocity_of(labels), noise


def param_groups(name):
    """Fig. 5 group of a HunyuanVideo parameter name: the DualExpert's layer kinds (lora.TARGETS)."""
    spec = TARGETS["HunyuanVideo"]
    kinds = (("timestep embeddings + out head", "copy"), ("attention linears", "lora"), ("AdaLN modulation", "adaln"))
    for group, key in kinds:
        for pat in spec[key]:
            if re.match(re.escape(pat).replace(r"\*", r"[^.]+") + r"\.", name):
                return group
    return "other (MLPs, patch/text embed, norms)"


def expert_difference(sem_dir, det_dir):
    """Per group and per tensor: ||theta_det - theta_sem|| / ||theta_sem|| between two full experts (Fig. 5)."""
    a = checkpoint.load_transformer(sem_dir).state_dict()
    b = checkpoint.load_transformer(det_dir).state_dict()
    groups, tensors = {}, []
    for k, va in a.items():
        d2, n2 = (b[k] - va).double().square().sum().item(), va.double().square().sum().item()
        g = groups.setdefault(param_groups(k), {"diff2": 0.0, "norm2": 0.0, "numel": 0})
        g["diff2"] += d2
        g["norm2"] += n2
        g["numel"] += va.numel()
        tensors.append({"name": k, "group": param_groups(k), "rel_diff": (d2 / max(n2, 1e-30)) ** 0.5})
    for g in groups.values():
        g["rel_diff"] = (g["diff2"] / max(g["norm2"], 1e-30)) ** 0.5
    return groups, tensors


def main(argv=None):
    """The whole toy study (module docstring); returns the summary also written to DIR/metrics.json."""
    args = parse_args(argv)
    S = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    out, spec = args.out, toy_data.ToySpec()
    if os.path.isdir(os.path.join(out, "runs")) and not args.reuse:
        raise SystemExit(f"error: {out} already holds a toy run; pass --reuse to go on in it or a new --out")
    os.makedirs(out, exist_ok=True)
    clock = Clock()
    torch.manual_seed(args.seed)

    # 1. data and the bench classifier
    with clock("data + classifier"):
        data_dir = os.path.join(out, "data")
        if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            toy_data.write_dataset(data_dir, S.n_data, args.seed, spec)
        clf = tm.load_or_train_classifier(os.path.join(out, "classifier.pt"), spec, steps=S.clf_steps, seed=args.seed)

    common = ["--data", data_dir, "--shift", str(S.shift), "--grid-steps", str(S.grid_steps),
              "--seed", str(args.seed), "--save-every", "0"] + (["--resume"] if args.reuse else [])

    # 2. the teacher: constant-lr stages, each initialised from the previous one (a step-wise lr decay)
    with clock("teacher"):
        prev, teacher_ckpt = [], args.teacher
        for i, (steps, lr) in enumerate(S.teacher if not teacher_ckpt else ()):
            res = train_run(out, f"teacher_{i}", common + prev + [
                "--config", CONFIG, "--stage", "teacher", "--max-steps", str(steps), "--batch-size", str(S.batch),
                "--lr", str(lr), "--probe-every", "0"])
            prev, teacher_ckpt = ["--teacher", res["checkpoint"]], res["checkpoint"]
        tmodel, tinfo = sample.load_student(teacher_ckpt)
        if tinfo["mode"] != "teacher" or tinfo["run"].get("data_manifest", {}).get("toy_spec") != asdict(spec):
            raise SystemExit(f"error: {teacher_ckpt} is not a toy teacher trained on this toy's data ({asdict(spec)})")
        grid = tinfo["grid"]

    # 3. Fig. 10: adjacent-step x0 change along the teacher's 50-step trajectory -> kappa
    with clock("fig10 + kappa"):
        labels, cond, _, noise = eval_batch(10_000 + args.seed, S.fig10_n, spec)
        guidance = float(tinfo["run"].get("guidance", 6.0))
        _, _, x0s = Teacher(tmodel, grid, guidance).sample(noise, cond, return_intermediates=True, progress=False)
        l1 = adjacent_x0_l1(x0s).tolist()
        kappa, kinfo = choose_kappa(l1, S.kappa_frac, grid.N)
        print(f"[toy] kappa = {kappa} ({kinfo})", flush=True)

    # 4. distillation runs
    dist = common + ["--teacher", teacher_ckpt, "--lora-rank", str(S.lora_rank), "--disc-hidden", str(S.disc_hidden),
                     "--target-ema", str(S.target_ema), "--batch-size", str(S.student_batch)]
    full = lambda steps: ["--max-steps", str(steps), "--lr", str(S.lr_full)]  # noqa: E731
    # the committed report was made with the wider target set (text-stream q/k/v/out, refiner time embedding copy)
    lora = ["--max-steps", str(S.det_steps), "--lr", str(S.lr_lora), "--lora-targets", "all"]
    no_gf, no_tc, no_probe = ["--w-gan", "0", "--w-fm", "0"], ["--w-tc", "0"], ["--probe-every", "0"]
    watch = ["--sample-every", str(S.sample_every), "--sample-num", "6"]  # validation grids of the DCM run (report)
    runs = {}
    plan = [
        ("vcm", ["--stage", "vcm", "--probe-every", str(S.probe_every)] + full(S.single_steps)),
        ("pcm", ["--stage", "pcm", "--phases", "4"] + no_probe + full(S.single_steps)),
        ("sem", ["--stage", "semantic"] + no_probe + no_tc + full(S.sem_steps)),
        ("sem_tc", ["--stage", "semantic"] + no_probe + full(S.sem_steps)),
        ("od", ["--stage", "detail", "--detail-full", "--init", "@sem"] + no_probe + no_gf + full(S.det_steps)),
        ("pe", ["--stage", "detail", "--init", "@sem"] + no_probe + no_gf + lora),
        ("pe_tc", ["--stage", "detail", "--init", "@sem_tc"] + no_probe + no_gf + lora),
        ("pe_gf", ["--stage", "detail", "--init", "@sem"] + no_probe + lora),
        ("dcm", ["--stage", "detail", "--init", "@sem_tc"] + no_probe + lora + watch),
    ]
    plan = [(name, kappa, extra) for name, extra in plan]
    # the paper's Fig. 10 (right): the full DCM recipe at other cuts
    sweep = sorted({max(3, min(kappa + d, grid.N - 5)) for d in S.kappa_sweep} - {kappa})
    for k in sweep:
        plan += [(f"sem_tc_k{k}", k, ["--stage", "semantic"] + no_probe + full(S.sem_steps)),
                 (f"dcm_k{k}", k, ["--stage", "detail", "--init", f"@sem_tc_k{k}"] + no_probe + lora)]
    for name, k, extra in plan:
        extra = [runs[a[1:]]["checkpoint"] if a.startswith("@") else a for a in extra]
        with clock(f"distil {name}"):
            runs[name] = train_run(out, name, dist + ["--kappa", str(k)] + extra)

    # 5. Fig. 5: the two separately trained experts of row OD, per layer group
    with clock("fig5"):
        groups, tensors = expert_difference(os.path.join(runs["sem"]["checkpoint"], "transformer"),
                                            os.path.join(runs["od"]["checkpoint"], "transformer"))

    # 6. evaluation on the toy bench
    with clock("evaluate"):
        models = {"teacher (no distillation)": (tmodel, tinfo)}
        for label, (run, _) in MODELS.items():
            models[label] = sample.load_student(runs[run]["checkpoint"])
        for k in sweep:
            models[f"DCM, kappa = {k}"] = sample.load_student(runs[f"dcm_k{k}"]["checkpoint"])
        results, gif = evaluate(models, tmodel, grid, guidance, S, spec, clf, args.seed)

    # 7. report
    with clock("report"):
        summary = {
            "settings": asdict(S), "quick": args.quick, "seed": args.seed, "spec": asdict(spec), "kappa": kappa,
            "kappa_sweep": sweep,
            "kappa_rule": kinfo | {"frac": S.kappa_frac}, "fig10_l1": l1,
            "grid_sigma": grid.sigma.tolist(), "fig5_groups": groups, "fig5_tensors": tensors,
            "param_counts": param_counts(models), "results": results,
            "train": {name: {"steps": r["step"], "final": r["losses"]} for name, r in runs.items()},
            "machine": machine(), "phases_s": clock.phases,
        }
        summary["wall_s"] = clock.total()
        report.write(out, summary, MODELS, gif, {name: r["out"] for name, r in runs.items()})
    summary["wall_s"] = clock.total()
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[toy] done in {summary['wall_s']:.1f} s: {os.path.join(out, 'report.md')}", flush=True)
    return summary


@torch.no_grad()
def evaluate(models, tmodel, grid, guidance, S, spec, clf, seed):
    """{model: {steps: {"per_seed": [...], "agg": {...}}}} and the GIF samples (first seed, 4 steps)."""
    results, gif = {name: {} for name in models}, {}
    for s in range(S.eval_seeds):
        labels, cond, vel, noise = eval_batch(seed + s, S.eval_n, spec)
        real = toy_data.make_batch(S.eval_n, 2_000_003 + seed + s, spec)["latents"]
        real_feats, _ = tm.classifier_features(clf, real)
        ref = sample.teacher_sample(tmodel, noise, cond, grid, guidance).clamp(-1, 1)
        m = tm.evaluate(ref, labels, vel, real, clf, real_feats=real_feats)
        results.setdefault("teacher (50 steps)", {}).setdefault(grid.N, []).append(m)
        if s == 0:
            gif["teacher (50 steps)"] = ref[:S.gif_n]
        for name, (model, info) in models.items():
            bounds = [] if info["mode"] == "teacher" else info["boundaries"]
            for steps in S.eval_steps:
                x = sample.student_sample(model, noise, cond, grid, bounds, steps, guidance).clamp(-1, 1)
                results[name].setdefault(steps, []).append(tm.evaluate(x, labels, vel, real, clf, ref, real_feats))
                if s == 0 and steps == 4:
                    gif[name] = x[:S.gif_n]
    results = {name: {st: {"per_seed": v, "agg": tm.aggregate(v)} for st, v in r.items()}
               for name, r in results.items()}
    return results, gif


def param_counts(models):
    """Parameters stored per model (the dual expert stores the semantic weights once)."""
    out = {name: sum(p.numel() for p in model.parameters()) for name, (model, _) in models.items()}
    out["teacher (50 steps)"] = out["teacher (no distillation)"]
    return out


def machine():
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()}


if __name__ == "__main__":
    main()
