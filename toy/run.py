"""The toy study (issues 7, 17): the whole DCM method on a CPU, designed so the bench can tell the methods apart.

    python toy/run.py [--quick] [--out DIR (default out/toy)] [--seed N] [--threads T] [--reuse] [--teacher CKPT]

1. synthetic moving-shape videos (toy/data.py) and the bench classifier (toy/metrics.py);
2. a tiny HunyuanVideo-style flow teacher (toy/config.json, no guidance input) trained with condition dropout;
   its CFG scale chosen on the validation split (`choose_guidance`), its 50-step and 1/2/4-step quality measured;
3. the paper's Fig. 10 (adjacent-step x0 change) -> kappa by a cumulative rule (`choose_kappa`), checked on a
   second noise batch and on the teacher before its lr decay;
4. settings chosen on the validation split (other noise seeds than the test's): the target (EMA decay, lr) of
   the students from VCM runs with checkpoints along the run (`choose_target`), online vs EMA weights, and the TC
   weight that makes its gradient at the student's output comparable to CD's (a short calibration run);
5. distillation with train.py, several training seeds: VCM, PCM (4 phases), the paper's Table 3 rows (OD, +PE,
   +TC, +GF, DCM) and DCM retrained at other kappas; Fig. 2 (VCM probes), Fig. 5 (OD's two experts);
6. the test split: every model at 1, 2, 4 steps, the undistilled teacher on each student's schedule, DCM with
   both per-expert point rules (even / proportional); spreads over training seeds (toy/bench.py);
7. DIR/report.md + metrics.json + PNG figures + a GIF (toy/report.py).
Full: <= 15 min on 2 idle CPU cores; --quick (smoke test, tiny budgets, meaningless numbers): <= 60 s.
--reuse goes on in an existing DIR: finished training runs are kept (they must have the same settings).
The teacher is given, as in the paper: the full run distils the committed toy/teacher/ (its recipe, wall time and
loss in toy/teacher/provenance.json); --train-teacher trains it from scratch first (Settings.teacher, ~27 min on 2
cores), --teacher CKPT takes another (a train.py step folder of a toy teacher on this toy's data); --quick always
trains its own tiny one.
"""
import argparse
import contextlib
import json
import os
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

# OpenMP threads that spin while they wait make a run 10-30x slower when other processes hold the cores (measured:
# 2 threads on 2 shared cores, 3.3 s per teacher step instead of 0.1 s); passive waiting costs nothing when idle
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from storage import checkpoint  # noqa: E402
import data  # noqa: E402
from lora import TARGETS  # noqa: E402
from tools import checks, plot  # noqa: E402
import sampling  # noqa: E402
import solver  # noqa: E402
from teacher import Teacher, adjacent_x0_l1  # noqa: E402
from toy import bench  # noqa: E402
from toy import data as toy_data  # noqa: E402
from toy import jobs  # noqa: E402
from toy import metrics as tm  # noqa: E402
from toy import probes  # noqa: E402
from toy import report  # noqa: E402

CONFIG = os.path.join(HERE, "config.json")
TEACHER_DIR = os.path.join(HERE, "teacher")  # final/ and before_decay/ (train.py step folders), provenance.json


@dataclass(frozen=True)
class Settings:
    """Budgets and candidate settings of one toy run (FULL / QUICK below)."""
    n_data: int = 8192            # training videos on disk
    clf_steps: int = 300          # bench classifier
    # (steps, lr) stages of the teacher, each at constant lr from the previous one's weights with a fresh AdamW (the
    # committed toy/teacher/ was trained so: 4500 + 7500 steps at 2e-3, then the decay); the last is the lr decay
    teacher: tuple = ((4500, 2e-3), (7500, 2e-3), (1500, 2e-4))
    batch: int = 32               # teacher batch
    cond_drop: float = 0.1        # teacher: unconditional training fraction (CFG)
    guidance_grid: tuple = (1.0, 1.5, 2.5)  # CFG scales tried on the validation split
    shift: float = 3.0            # flow grid shift (HunyuanVideo: 17 for 720p latents; the toy is 16x16)
    grid_steps: int = 50
    kappa_q: float = 0.5          # Fig. 10 rule: the semantic phase holds this fraction of the total x0 change
    student_batch: int = 16
    single_steps: int = 250       # VCM / PCM: as many student iterations as both DCM stages together
    sem_steps: int = 125
    det_steps: int = 125
    lora_x: float = 5.0           # LoRA detail expert lr = 5 x the full lr (paper)
    targets: tuple = ((0.95, 3e-5), (0.99, 1e-4))  # (target EMA decay, full lr) candidates, chosen with VCM
    d_lr: float = 1e-3            # discriminator lr (authors 1e-5: on the toy it learns nothing at that lr)
    d_control_steps: int = 150    # toy/probes.py: a fresh discriminator on DCM's features, target vs data as real
    tc_calib_steps: int = 20      # calibration run of the TC weight
    lora_rank: int = 8
    disc_hidden: int = 64
    probe_every: int = 10
    sample_every: int = 50        # validation samples of the DCM detail run, seed 0 (train.py --sample-every)
    curve_points: int = 5         # checkpoints evaluated along the selection / DCM runs
    train_seeds: int = 3          # headline rows (VCM, PCM, DCM)
    ablation_seeds: int = 3       # the other Table 3 rows
    kappa_sweep: tuple = (20, 30)  # DCM retrained at these cuts too (paper Fig. 10 right)
    sweep_seeds: int = 3          # training seeds of each cut of the sweep
    val_n: int = 128
    eval_seeds: int = 2
    eval_n: int = 384
    eval_steps: tuple = (1, 2, 4)
    fig10_n: int = 32
    gif_n: int = 4


FULL = Settings()
QUICK = Settings(n_data=128, clf_steps=30, teacher=((20, 1e-3), (10, 2e-4)), batch=8, guidance_grid=(1.0, 3.0),
                 student_batch=8, single_steps=6, sem_steps=3, det_steps=3, tc_calib_steps=2, probe_every=2, sample_every=3,
                 curve_points=2, d_control_steps=3, train_seeds=2, ablation_seeds=1, val_n=8, eval_seeds=2, eval_n=8,
                 eval_steps=(2, 4), fig10_n=4, gif_n=3, kappa_sweep=(), sweep_seeds=1)  # the sweep: the full study only
# model name -> (training run that holds it, paper Table 3 flags OD, PE, TC, GF, headline row)
MODELS = {
    "VCM": ("vcm", (0, 0, 0, 0), True),
    "PCM (4 phases)": ("pcm", None, True),
    "OD": ("od", (1, 0, 0, 0), False),
    "OD+PE": ("pe", (1, 1, 0, 0), False),
    "OD+PE+TC": ("pe_tc", (1, 1, 1, 0), False),
    "OD+PE+GF": ("pe_gf", (1, 1, 0, 1), False),
    "DCM (OD+PE+TC+GF)": ("dcm", (1, 1, 1, 1), True),
    "DCM, LoRA semantic expert": ("dcm_lsem", (1, 1, 1, 1), False),  # train.py --semantic-lora (one GPU)
    "DCM, data as GAN real": ("dcm_data", (1, 1, 1, 1), False),  # train.py --gan-real data
    "DCM, teacher as GAN real": ("dcm_teach", (1, 1, 1, 1), False),  # train.py --gan-real teacher
}
TEACHER = "teacher (no distillation)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, <= 60 s")
    p.add_argument("--out", help="run folder (default out/toy, --quick: out/toy-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and evaluation")
    p.add_argument("--threads", type=int, help="torch CPU threads of this process (default: the cores it may use)")
    p.add_argument("--workers", type=int, help="training runs side by side, one torch thread each (default: 2 when "
                   "it may use 2 cores, else 1)")
    p.add_argument("--reuse", action="store_true", help="keep finished training runs already in --out")
    p.add_argument("--teacher", help="a trained toy teacher (train.py step folder) instead of the committed one")
    p.add_argument("--train-teacher", action="store_true", help="train the teacher from scratch (Settings.teacher)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(ROOT, "out", "toy-quick" if args.quick else "toy")
    # the cores this process may use (its CPU affinity), never a load average: a job that just ended leaves the
    # 1-minute average high for a minute, and a run sized by it left half a machine idle for 38 minutes (issue 27)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or cores
    args.workers = args.workers or (2 if cores >= 2 else 1)
    args.worker_threads = 1 if args.workers > 1 else args.threads
    for flag in ("threads", "workers"):
        if getattr(args, flag) < 1:
            raise checks.InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
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


def choose_kappa(l1, q, N, min_semantic=4, min_detail=4):
    """kappa from the Fig. 10 curve: the cut where the semantic phase (from the noisy end) holds a fraction `q`
    of the teacher's total adjacent-step x0 change. A cumulative share barely moves when the curve is re-measured
    or the teacher retrained, where a threshold crossing on the curve's tail jumps (the issue-7 rule did).

    l1[i] is the change between sampling steps i and i+1, i.e. between grid indices N-1-i and N-2-i; the semantic
    phase kappa+1..N-1 ends at x_kappa, so it holds l1[0..N-2-kappa]. kappa is clamped so both phases keep at least
    `min_semantic` / `min_detail` grid points (8-step sampling gives each expert 4).
    """
    l1 = [float(v) for v in l1]
    total, acc, i = sum(l1), 0.0, len(l1) - 1
    for j, v in enumerate(l1):
        acc += v
        if acc >= q * total:
            i = j
            break
    kappa = N - 2 - i
    info = {"q": q, "cross_step": i, "raw_kappa": kappa, "sigma": None}
    return max(min_detail - 1, min(kappa, N - 1 - min_semantic)), info


def choose_guidance(rows, fd_factor=2.0):
    """CFG scale from the validation split: the best 50-step class accuracy among the scales whose FD is within
    `fd_factor` x the sweep's lowest (guidance buys recognisability until it wrecks the sample distribution)."""
    ok = [g for g, r in rows.items() if r["fd"] <= fd_factor * min(r["fd"] for r in rows.values())]
    return max(ok, key=lambda g: (rows[g]["cond_acc"], -g))


def choose_target(curves):
    """(EMA decay, lr) candidate with the lowest validation trajectory MSE at 4 steps at the end of its run."""
    return min(curves, key=lambda c: curves[c][-1]["traj_mse"])


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


def grad_ratios(run_out):
    """Median over probe steps of each term's gradient norm at the student's output over CD's (train.py log)."""
    rows = [r for r in plot.read_jsonl(os.path.join(run_out, "log.jsonl")) if r.get("gn_cd")]
    names = sorted({k[3:] for r in rows for k in r if k.startswith("gn_") and k != "gn_cd"})
    med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
    return {n: med([r[f"gn_{n}"] / r["gn_cd"] for r in rows if f"gn_{n}" in r]) for n in names}


def main(argv=None):
    """The whole toy study (module docstring); returns the summary also written to DIR/metrics.json."""
    args = parse_args(argv)
    S = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    print(f"[toy] {args.threads} torch threads here, {args.workers} training run(s) side by side", flush=True)
    out, spec = args.out, toy_data.ToySpec()
    if os.path.isdir(os.path.join(out, "runs")) and not args.reuse:
        raise checks.InputError(f"{out} already holds a toy run; pass --reuse to go on in it or a new --out")
    if args.teacher and not os.path.isdir(args.teacher):
        raise checks.InputError(f"--teacher {args.teacher} is not a folder")
    if args.teacher and args.train_teacher:
        raise checks.InputError("--teacher CKPT and --train-teacher exclude each other")
    os.makedirs(out, exist_ok=True)
    clock, sm = Clock(), {"settings": asdict(S), "quick": args.quick, "seed": args.seed, "spec": asdict(spec)}
    torch.manual_seed(args.seed)

    # 1. data and the bench classifier
    with clock("data + classifier"):
        data_dir = os.path.join(out, "data")
        if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            toy_data.write_dataset(data_dir, S.n_data, args.seed, spec)
        clf = tm.load_or_train_classifier(os.path.join(out, "classifier.pt"), spec, steps=S.clf_steps, seed=args.seed)
        uncond = data.LatentDataset(data_dir).uncond
    common = ["--data", data_dir, "--shift", str(S.shift), "--grid-steps", str(S.grid_steps),
              "--save-every", "0"] + (["--resume"] if args.reuse else [])

    # 2. the teacher: constant-lr stages (a step decay) with condition dropout; its CFG scale on the validation split
    with clock("teacher"):
        prev, teacher_ckpt, stages = [], args.teacher, []
        train_it = args.quick or args.train_teacher
        if not train_it and not teacher_ckpt:  # the committed teacher and its checkpoint before the lr decay
            stages = [os.path.join(TEACHER_DIR, "before_decay"), os.path.join(TEACHER_DIR, "final")]
            teacher_ckpt = stages[-1]
            sm["teacher_provenance"] = json.load(open(os.path.join(TEACHER_DIR, "provenance.json")))
        for i, (steps, lr) in enumerate(S.teacher if train_it and not args.teacher else ()):
            res = jobs.train_run(out, f"teacher_{i}", common + prev + [
                "--config", CONFIG, "--stage", "teacher", "--max-steps", str(steps), "--batch-size", str(S.batch),
                "--lr", str(lr), "--probe-every", "0", "--cond-drop", str(S.cond_drop), "--seed", str(args.seed)])
            prev, teacher_ckpt = ["--init", res["checkpoint"]], res["checkpoint"]
            stages.append(teacher_ckpt)
        tmodel, tinfo = sampling.load_student(teacher_ckpt)
        if tinfo["mode"] != "teacher" or tinfo["run"].get("data_manifest", {}).get("toy_spec") != asdict(spec):
            raise checks.InputError(f"{teacher_ckpt} is not a toy teacher trained on this toy's data ({asdict(spec)})")
        grid = tinfo["grid"]
    with clock("guidance (validation)"):
        val_inputs = [bench.eval_batch(500 + args.seed, S.val_n, spec)]
        real = toy_data.make_batch(S.val_n, 3_000_017 + args.seed, spec)["latents"]
        rows = {}
        for g in S.guidance_grid:
            labels, cond, vel, noise = val_inputs[0]
            x = Teacher(tmodel, grid, g, uncond).sample(noise, cond, progress=False).clamp(-1, 1)
            rows[g] = tm.evaluate(x, labels, vel, real, clf)
        guidance = choose_guidance(rows)
        teach = Teacher(tmodel, grid, guidance, uncond)
        sm |= {"guidance": guidance, "guidance_rows": rows}
        print(f"[toy] CFG scale {guidance}: {rows[guidance]}", flush=True)
        val = bench.Split([500 + args.seed], S.val_n, spec, clf, teach)

    # 3. Fig. 10: adjacent-step x0 change along the teacher's 50-step trajectory -> kappa, and the rule's stability
    with clock("fig10 + kappa"):
        def fig10_curve(model, seed):
            _, cond, _, noise = bench.eval_batch(seed, S.fig10_n, spec)
            x0s = Teacher(model, grid, guidance, uncond).sample(noise, cond, return_intermediates=True,
                                                                  progress=False)[2]
            return adjacent_x0_l1(x0s).tolist()
        l1 = fig10_curve(tmodel, 10_000 + args.seed)
        kappa, kinfo = choose_kappa(l1, S.kappa_q, grid.N)
        others = {"second noise batch": fig10_curve(tmodel, 20_000 + args.seed)}
        if len(stages) > 1:
            others["teacher before its lr decay"] = fig10_curve(sampling.load_student(stages[-2])[0], 10_000 + args.seed)
        sm |= {"kappa": kappa, "kappa_rule": kinfo | {"sigma": float(grid.sigma[kappa + 1])}, "fig10_l1": l1,
               "kappa_checks": {k: {"l1": v, "kappa": choose_kappa(v, S.kappa_q, grid.N)[0]} for k, v in others.items()},
               "grid_sigma": grid.sigma.tolist()}
        print(f"[toy] kappa = {kappa} ({kinfo}); checks {[c['kappa'] for c in sm['kappa_checks'].values()]}", flush=True)

    dist = common + ["--teacher", teacher_ckpt, "--batch-size", str(S.student_batch), "--guidance", str(guidance)]
    runs, run_s = {}, {}

    def argv(extra, seed=0, k=kappa, probe=S.probe_every * 3, save=0):
        """A student's flags: train.py refuses a flag its stage would ignore, so each stage gets only its own."""
        stage = extra[extra.index("--stage") + 1]
        own = (["--kappa", str(k)] if stage in ("semantic", "detail") else []) + (
            ["--disc-hidden", str(S.disc_hidden), "--d-lr", str(S.d_lr)] if stage == "detail" else []) + (
            ["--lora-rank", str(S.lora_rank)] if stage == "detail" and "--detail-full" not in extra else [])
        return dist + own + ["--seed", str(args.seed + seed), "--probe-every", str(probe), "--save-every", str(save)] + extra

    def train_all(phase, todo):
        """{name: argv} training runs, side by side in args.workers processes (toy/jobs.py)."""
        pool = jobs.Runs(out, args.workers if len(todo) > 1 else 1, args.worker_threads, runs)
        for name, a in todo.items():
            pool.add(name, a)
        with clock(phase):
            runs.update(pool.wait())
        run_s.update(pool.seconds)

    # 4. settings on the validation split: target EMA / lr (VCM with checkpoints), online vs EMA weights, TC weight
    every = max(1, S.single_steps // S.curve_points)
    cand = {f"vcm_ema{ema}_lr{lr}": (ema, lr) for ema, lr in S.targets}
    train_all("target candidates", {n: argv(["--stage", "vcm", "--max-steps", str(S.single_steps), "--lr", str(lr),
                                             "--target-ema", str(ema)], probe=S.probe_every, save=every)
                                    for n, (ema, lr) in cand.items()})
    with clock("target + weights (validation)"):
        curves = {cand[n]: bench.curve(runs[n]["out"], val, grid, guidance, 4) for n in cand}
        target_ema, lr_full = choose_target(curves)
        best = runs[f"vcm_ema{target_ema}_lr{lr_full}"]
        ema_m = bench.seed_mean(bench.score(val, bench.student_fn(*bench.load_model(best["checkpoint"], True), grid, guidance),
                                            solver.student_schedule(grid, [], 4)))
        use_ema = ema_m["traj_mse"] < curves[(target_ema, lr_full)][-1]["traj_mse"]
        sm |= {"target_curves": {f"ema {e}, lr {lr:g}": c for (e, lr), c in curves.items()},
               "target": {"ema": target_ema, "lr": lr_full}, "ema_weights_val": ema_m, "use_ema_weights": use_ema}
    tgt = ["--target-ema", str(target_ema)]
    full = lambda steps: ["--max-steps", str(steps), "--lr", str(lr_full)] + tgt  # noqa: E731
    lora = ["--max-steps", str(S.det_steps), "--lr", str(S.lora_x * lr_full)] + tgt
    no_gf, no_tc = ["--w-gan", "0", "--w-fm", "0"], ["--w-tc", "0"]
    train_all("TC weight (calibration)", {"tc_calibration": argv(
        ["--stage", "semantic", "--w-tc", "1"] + full(S.tc_calib_steps), probe=max(1, S.tc_calib_steps // 10))})
    ratio_w1 = grad_ratios(runs["tc_calibration"]["out"]).get("tc") or 1.0
    w_tc = float(f"{1 / ratio_w1:.2g}")  # the weight that makes ||grad TC|| ~ ||grad CD|| at the start
    sm |= {"tc_ratio_at_w1": ratio_w1, "w_tc": w_tc}
    print(f"[toy] TC/CD gradient ratio at w_tc = 1: {ratio_w1:.4g} -> w_tc = {w_tc}", flush=True)
    tc = ["--w-tc", str(w_tc)]

    # 5. distillation over training seeds: the headline rows, the other Table 3 rows, the kappa sweep; the two-stage
    # chains first (the longest paths), a detail run after the semantic expert it names with "@"
    todo = {}
    for s in range(S.train_seeds):
        watch = [] if s else ["--sample-every", str(S.sample_every), "--sample-num", "6"]  # validation grids (report)
        todo[f"sem_tc_s{s}"] = argv(["--stage", "semantic"] + tc + full(S.sem_steps), s)
        todo[f"dcm_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_tc_s{s}"] + lora + watch, s,
                                 save=0 if s else every // 2)
    for s in range(S.ablation_seeds):
        todo[f"sem_s{s}"] = argv(["--stage", "semantic"] + no_tc + full(S.sem_steps), s)
        todo[f"od_s{s}"] = argv(["--stage", "detail", "--detail-full", "--init", f"@sem_s{s}"] + no_gf
                                + full(S.det_steps), s)
        todo[f"pe_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_s{s}"] + no_gf + lora, s)
        todo[f"pe_tc_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_tc_s{s}"] + no_gf + lora, s)
        todo[f"pe_gf_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_s{s}"] + lora, s)
        # the one-GPU DCM: the semantic expert as LoRA over the teacher's weights, at the LoRA lr of the detail expert
        lsem = ["--semantic-lora", str(S.lora_rank)]
        todo[f"lsem_tc_s{s}"] = argv(["--stage", "semantic", "--max-steps", str(S.sem_steps), "--lr",
                                      str(S.lora_x * lr_full)] + lsem + tc + tgt, s)
        todo[f"dcm_lsem_s{s}"] = argv(["--stage", "detail", "--init", f"@lsem_tc_s{s}"] + lsem + lora, s)
        for real in ("data", "teach"):  # the GAN's real side: the training videos, the teacher's own solution
            todo[f"dcm_{real}_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_tc_s{s}", "--gan-real",
                                             "teacher" if real == "teach" else real] + lora, s)
    sweep = sorted({max(3, min(k, grid.N - 5)) for k in S.kappa_sweep} - {kappa})
    for k in sweep:
        for s in range(S.sweep_seeds):
            todo[f"sem_tc_k{k}_s{s}"] = argv(["--stage", "semantic"] + tc + full(S.sem_steps), s, k=k)
            todo[f"dcm_k{k}_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_tc_k{k}_s{s}"] + lora, s, k=k)
    for s in range(S.train_seeds):
        # seed 0's VCM is the chosen candidate's run (trained on the training data; chosen on the validation split)
        if s:
            todo[f"vcm_s{s}"] = argv(["--stage", "vcm"] + full(S.single_steps), s)
        todo[f"pcm_s{s}"] = argv(["--stage", "pcm", "--phases", "4"] + full(S.single_steps), s)
    runs["vcm_s0"] = best
    train_all("distillation", todo)
    with clock("fig5 + curves"):
        groups, tensors = expert_difference(os.path.join(runs["sem_s0"]["checkpoint"], "transformer"),
                                            os.path.join(runs["od_s0"]["checkpoint"], "transformer"))
        sm |= {"fig5_groups": groups, "fig5_tensors": tensors,
               "dcm_curve": bench.curve(runs["dcm_s0"]["out"], val, grid, guidance, 4, use_ema),
               "grad_ratios": {n: grad_ratios(r["out"]) for n, r in runs.items()}}

    # the test split, one sampling seed per worker, and the discriminator control (toy/probes.py) beside them
    with clock("evaluate (test split) + discriminator control"):
        members = {label: [f"{run_}_s{s}" for s in range(S.train_seeds if head else S.ablation_seeds)]
                   for label, (run_, _, head) in MODELS.items()}
        members |= {f"DCM, kappa = {k}": [f"dcm_k{k}_s{s}" for s in range(S.sweep_seeds)] for k in sweep}
        ev = dict(members={label: [runs[n]["checkpoint"] for n in names] for label, names in members.items()},
                  use_ema=use_ema, teacher_ckpt=teacher_ckpt, guidance=guidance, data_dir=data_dir, spec=spec, S=S,
                  clf_path=os.path.join(out, "classifier.pt"), kappa=kappa, sweep=sweep,
                  headline=[m for m, (_, _, head) in MODELS.items() if head])
        control = dict(dcm_ckpt=runs["dcm_s0"]["checkpoint"], teacher_ckpt=teacher_ckpt, guidance=guidance,
                       data_dir=data_dir, kappa=kappa, steps=S.d_control_steps, batch=S.student_batch, lr=S.d_lr,
                       hidden=S.disc_hidden, seed=args.seed)
        done = jobs.parallel([(bench.evaluate_seed, ev | {"seed": args.seed + s}) for s in range(S.eval_seeds)]
                             + [(probes.discriminator_control_from, control)], args.workers, args.worker_threads)
        (results, gif), sm["d_control"] = bench.merge_seeds(done[:-1]), done[-1]
        print(f"[toy] discriminator control: {sm['d_control']}", flush=True)
        models = {label: [bench.load_model(c, use_ema) for c in ckpts[:1]] for label, ckpts in ev["members"].items()}

    # 7. report
    with clock("report"):
        sm |= {"results": results, "param_counts": param_counts(models, tmodel), "machine": jobs.machine(),
               "trained_params": {n: {k: checks.read_json(os.path.join(r["out"], "config.json"), "run config")[k]
                                      for k in ("params", "trainable")} for n, r in runs.items()},
               "train": {n: {"steps": r["step"], "final": r["losses"]} for n, r in runs.items()},
               "runs": {n: os.path.relpath(r["out"], out) for n, r in runs.items()}, "sweep": sweep,
               "phases_s": clock.phases, "run_s": run_s, "workers": [args.workers, args.worker_threads],
               "members": members, "wall_s": clock.total()}
        report.write(out, sm, MODELS, gif, {n: r["out"] for n, r in runs.items()})
    sm["wall_s"] = clock.total()
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(sm, f, indent=1, default=str)
    print(f"[toy] done in {sm['wall_s']:.1f} s: {os.path.join(out, 'report.md')}", flush=True)
    return sm


def param_counts(models, tmodel):
    """Parameters stored per model (the dual expert stores the semantic weights once)."""
    out = {label: sum(p.numel() for p in members[0][0].parameters()) for label, members in models.items()}
    out[TEACHER] = sum(p.numel() for p in tmodel.parameters())
    return out


if __name__ == "__main__":
    sys.exit(checks.cli(main))
