"""The toy study (issues 7, 17): the whole DCM method on a CPU, designed so the bench can tell the methods apart.

    python toy/run.py [--quick | --all-rows] [--out DIR (default out/toy)] [--seed N] [--threads T] [--workers W]
                      [--reuse] [--teacher CKPT | --train-teacher]

1. synthetic moving-shape videos (toy/data.py) and the bench classifier (toy/metrics.py);
2. a tiny HunyuanVideo-style flow teacher (toy/config.json, no guidance input) trained with condition dropout;
   its CFG scale chosen on the validation split (`choose_guidance`), its 50-step and 1/2/4-step quality measured;
3. the paper's Fig. 10 (adjacent-step x0 change) -> kappa by a cumulative rule (`choose_kappa`), checked on a
   second noise batch and on the teacher before its lr decay;
4. settings chosen on the validation split (other noise seeds than the test's): the target (EMA decay, lr) of
   the students from VCM runs with checkpoints along the run (`choose_target`; the full run: the choice made),
   online vs EMA weights, and the TC weight that makes its gradient at the student's output comparable to CD's (a
   short calibration run);
5. distillation with train.py, several training seeds: VCM, PCM (4 phases), DCM, the paper's other Table 3 rows
   and ours (Settings.rows) and DCM retrained at other kappas; Fig. 2 (VCM probes), Fig. 5 (OD's two experts);
6. the test split: every model at 1, 2, 4 steps, the undistilled teacher on each student's schedule, DCM with
   both per-expert point rules (even / proportional); spreads over training seeds (toy/bench.py);
7. DIR/report.md + metrics.json + PNG figures + a GIF (toy/report.py).
Full: <= 15 min on 2 CPU cores (~7.5 min on the 2-core machine of docs/toy.md), the Table 3 rows that had given
their answer dropped or on 2 training seeds (docs/toy.md says which); --all-rows: every row on 3 seeds, the
discriminator control and kappa 30 too (~16 min); --quick (smoke test, tiny budgets, meaningless numbers): <= 60 s.
--reuse goes on in an existing DIR: finished training runs are kept (they must have the same settings). Training
runs and evaluation jobs run on one torch thread each (toy/jobs.py), so --threads and --workers change the wall
time, not the tables.
The teacher is given, as in the paper: the full run distils the committed toy/teacher/ (its recipe, wall time and
loss in toy/teacher/provenance.json); --train-teacher trains it from scratch first (Settings.teacher, ~27 min on 2
cores), --teacher CKPT takes another (a train.py step folder of a toy teacher on this toy's data); --quick always
trains its own tiny one.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

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

from storage import latents  # noqa: E402
from tools import checks  # noqa: E402
import sampling  # noqa: E402
import solver  # noqa: E402
from teacher import Teacher, adjacent_x0_l1  # noqa: E402
from toy import bench  # noqa: E402
from toy import data as toy_data  # noqa: E402
from toy import jobs  # noqa: E402
from toy import metrics as tm  # noqa: E402
from toy import probes  # noqa: E402
from toy import report  # noqa: E402
from toy.rules import choose_guidance, choose_kappa, choose_target, expert_difference, grad_ratios  # noqa: E402

CONFIG = os.path.join(HERE, "config.json")
TEACHER_DIR = os.path.join(HERE, "teacher")  # final/ and before_decay/ (train.py step folders), provenance.json


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
ROWS = tuple(m for m, (_, _, head) in MODELS.items() if not head)  # the Table 3 rows besides the headline's


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
    # (target EMA decay, full lr) candidates, chosen with VCM on the validation split; one: that choice, no search
    targets: tuple = ((0.99, 1e-4),)
    d_lr: float = 1e-3            # discriminator lr (authors 1e-5: on the toy it learns nothing at that lr)
    d_control_steps: int = 0      # toy/probes.py: a fresh D on DCM's features, target vs data as real (0: not run)
    tc_calib_steps: int = 20      # calibration run of the TC weight
    lora_rank: int = 8
    disc_hidden: int = 64
    probe_every: int = 10
    sample_every: int = 50        # validation samples of the DCM detail run, seed 0 (train.py --sample-every)
    curve_points: int = 5         # checkpoints evaluated along the selection / DCM runs
    train_seeds: int = 3          # headline rows (VCM, PCM, DCM)
    # the Table 3 rows trained besides the headline's, and their training seeds: the full run keeps those whose answer
    # the budget allows (docs/toy.md: which were cut and what they had shown); OD always (Fig. 5 compares its experts)
    rows: tuple = ("OD", "OD+PE", "OD+PE+TC", "DCM, data as GAN real")
    ablation_seeds: int = 2
    kappa_sweep: tuple = (20,)    # DCM retrained at these cuts too (paper Fig. 10 right)
    sweep_seeds: int = 3          # training seeds of each cut of the sweep
    val_n: int = 128
    eval_seeds: int = 2
    eval_n: int = 384
    eval_steps: tuple = (1, 2, 4)
    fig10_n: int = 32
    gif_n: int = 4


FULL = Settings()
# the study before its cut to the 15-minute budget (issue 27): every Table 3 row on 3 training seeds, the control, kappa
# 30 and the search of the students' target
TARGETS = ((0.95, 3e-5), (0.99, 1e-4))
ALL_ROWS = replace(FULL, rows=ROWS, ablation_seeds=3, d_control_steps=150, kappa_sweep=(20, 30), targets=TARGETS)
QUICK = Settings(n_data=128, clf_steps=30, teacher=((20, 1e-3), (10, 2e-4)), batch=8, guidance_grid=(1.0, 3.0),
                 student_batch=8, single_steps=6, sem_steps=3, det_steps=3, tc_calib_steps=2, probe_every=2,
                 sample_every=3, curve_points=2, d_control_steps=3, train_seeds=2, ablation_seeds=1, val_n=8,
                 eval_seeds=2, eval_n=8, eval_steps=(2, 4), fig10_n=4, gif_n=3, sweep_seeds=1,
                 rows=ROWS, kappa_sweep=())  # every row; the full run's target (no search) and no sweep
TEACHER = "teacher (no distillation)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, <= 60 s")
    p.add_argument("--all-rows", action="store_true", help="every Table 3 row on 3 training seeds, the discriminator "
                   "control and kappa 30 too (the study before its cut to 15 minutes; ~16 min on 2 cores)")
    p.add_argument("--out", help="run folder (default out/toy, --quick: out/toy-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and evaluation")
    p.add_argument("--threads", type=int, help="torch CPU threads of this process, for what it samples itself and a "
                   "teacher it trains (default: the cores it may use); training runs and evaluation jobs use one each")
    p.add_argument("--workers", type=int, help="worker processes of one torch thread each: training runs and "
                   "evaluation jobs side by side (default: 2 when it may use 2 cores, else 1: all here, in order)")
    p.add_argument("--reuse", action="store_true", help="keep finished training runs already in --out")
    p.add_argument("--teacher", help="a trained toy teacher (train.py step folder) instead of the committed one")
    p.add_argument("--train-teacher", action="store_true", help="train the teacher from scratch (Settings.teacher)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(ROOT, "out", "toy-quick" if args.quick else "toy")
    # the cores this process may use (its CPU affinity), never a load average: a job that just ended leaves the
    # 1-minute average high for a minute, and a run sized by it left half a machine idle for 38 minutes (issue 27)
    args.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or args.cores
    args.workers = args.workers or (2 if args.cores >= 2 else 1)
    for flag in ("threads", "workers"):
        if getattr(args, flag) < 1:
            raise checks.InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.quick and args.all_rows:
        raise checks.InputError("--quick and --all-rows exclude each other")
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


def main(argv=None):
    """The whole toy study (module docstring); returns the summary also written to DIR/metrics.json."""
    args = parse_args(argv)
    S = QUICK if args.quick else ALL_ROWS if args.all_rows else FULL
    torch.set_num_threads(args.threads)
    print(f"[toy] {args.cores} core(s) this process may use -> {args.workers} training run(s) side by side, one torch "
          f"thread each; {args.threads} thread(s) here", flush=True)
    out = args.out
    if os.path.isdir(os.path.join(out, "runs")) and not args.reuse:
        raise checks.InputError(f"{out} already holds a toy run; pass --reuse to go on in it or a new --out")
    if args.teacher and not os.path.isdir(args.teacher):
        raise checks.InputError(f"--teacher {args.teacher} is not a folder")
    if args.teacher and args.train_teacher:
        raise checks.InputError("--teacher CKPT and --train-teacher exclude each other")
    os.makedirs(out, exist_ok=True)
    with jobs.Workers(args.workers) as workers:  # started once, for every phase
        return study(args, S, workers)


def study(args, S, workers):
    """main()'s study in args.out with Settings S and the worker processes `workers` (toy/jobs.py)."""
    out, spec = args.out, toy_data.ToySpec()
    clock, sm = Clock(), {"settings": asdict(S), "quick": args.quick, "seed": args.seed, "spec": asdict(spec)}
    torch.manual_seed(args.seed)

    # 1. data
    with clock("data"):
        data_dir = os.path.join(out, "data")
        if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            toy_data.write_dataset(data_dir, S.n_data, args.seed, spec)
        uncond = latents.LatentDataset(data_dir).uncond
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
    # the bench classifier (trained on one thread: toy/metrics.py) and the teacher's validation samples at each CFG
    # scale, side by side in the workers; the chosen scale's samples are the validation split's 50-step reference
    with clock("classifier + guidance (validation)"):
        val_seed, clf_path = 500 + args.seed, os.path.join(out, "classifier.pt")
        done = jobs.parallel([(tm.load_or_train_classifier, dict(path=clf_path, spec=spec, steps=S.clf_steps,
                                                                 seed=args.seed))]
                             + [(bench.teacher_sample, dict(ckpt=teacher_ckpt, guidance=g, data_dir=data_dir,
                                                            seed=val_seed, n=S.val_n, spec=spec))
                                for g in S.guidance_grid], workers)
        clf, samples = done[0], dict(zip(S.guidance_grid, done[1:]))
        labels, _, vel, _ = bench.eval_batch(val_seed, S.val_n, spec)
        real = toy_data.make_batch(S.val_n, 3_000_017 + args.seed, spec)["latents"]
        rows = {g: tm.evaluate(x, labels, vel, real, clf) for g, x in samples.items()}
        guidance = choose_guidance(rows)
        teach = Teacher(tmodel, grid, guidance, uncond)
        sm |= {"guidance": guidance, "guidance_rows": rows}
        print(f"[toy] CFG scale {guidance}: {rows[guidance]}", flush=True)
        val = bench.Split([val_seed], S.val_n, spec, clf, teach, refs=[samples[guidance]])

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
        """{name: argv} training runs, side by side in the workers (toy/jobs.py)."""
        pool = jobs.Runs(out, workers, runs)
        for name, a in todo.items():
            pool.add(name, a)
        with clock(phase):
            runs.update(pool.wait())
        run_s.update(pool.seconds)

    # 4. settings on the validation split: target EMA / lr (VCM with checkpoints), online vs EMA weights, TC weight
    every = max(1, S.single_steps // S.curve_points)
    cand = {f"vcm_ema{ema}_lr{lr}": (ema, lr) for ema, lr in S.targets}
    cand_runs = {n: argv(["--stage", "vcm", "--max-steps", str(S.single_steps), "--lr", str(lr), "--target-ema",
                          str(ema)], probe=S.probe_every, save=every) for n, (ema, lr) in cand.items()}

    def choose_settings():
        """The candidates' validation curves -> the target (EMA decay, lr); online vs that run's EMA weights."""
        with clock("target + weights (validation)"):
            curves = {cand[n]: bench.curve(runs[n]["out"], val, grid, guidance, 4) for n in cand}
            target = choose_target(curves)
            best = runs[f"vcm_ema{target[0]}_lr{target[1]}"]
            ema_fn = bench.student_fn(*bench.load_model(best["checkpoint"], True), grid, guidance)
            ema_m = bench.seed_mean(bench.score(val, ema_fn, solver.student_schedule(grid, [], 4)))
            use_ema = ema_m["traj_mse"] < curves[target][-1]["traj_mse"]
            sm.update({"target_curves": {f"ema {e}, lr {lr:g}": c for (e, lr), c in curves.items()},
                       "target": {"ema": target[0], "lr": target[1]}, "ema_weights_val": ema_m,
                       "use_ema_weights": use_ema})
        return target, best, use_ema
    if len(cand) > 1:
        train_all("target candidates", cand_runs)
        (target_ema, lr_full), best, use_ema = choose_settings()
    else:  # the choice made (the full run: docs/toy.md); its run, VCM seed 0, trains beside the others, curves after
        (target_ema, lr_full), = cand.values()
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
    todo = {} if len(cand) > 1 else dict(cand_runs)
    for s in range(S.train_seeds):
        watch = [] if s else ["--sample-every", str(S.sample_every), "--sample-num", "6"]  # validation grids (report)
        todo[f"sem_tc_s{s}"] = argv(["--stage", "semantic"] + tc + full(S.sem_steps), s)
        todo[f"dcm_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_tc_s{s}"] + lora + watch, s,
                                 save=0 if s else every // 2)
    lsem = ["--semantic-lora", str(S.lora_rank)]
    for s in range(S.ablation_seeds):
        sem = {f"sem_s{s}": argv(["--stage", "semantic"] + no_tc + full(S.sem_steps), s)}  # OD's: no TC
        row_runs = {  # Table 3 row -> its runs, in the order added (a semantic expert two rows share trains once)
            "OD": sem | {f"od_s{s}": argv(["--stage", "detail", "--detail-full", "--init", f"@sem_s{s}"] + no_gf
                                          + full(S.det_steps), s)},
            "OD+PE": sem | {f"pe_s{s}": argv(["--stage", "detail", "--init", f"@sem_s{s}"] + no_gf + lora, s)},
            "OD+PE+TC": {f"pe_tc_s{s}": argv(["--stage", "detail", "--init", f"@sem_tc_s{s}"] + no_gf + lora, s)},
            "OD+PE+GF": sem | {f"pe_gf_s{s}": argv(["--stage", "detail", "--init", f"@sem_s{s}"] + lora, s)},
            # the one-GPU DCM: the semantic expert as LoRA over the teacher's weights, at the detail expert's LoRA lr
            "DCM, LoRA semantic expert": {
                f"lsem_tc_s{s}": argv(["--stage", "semantic", "--max-steps", str(S.sem_steps), "--lr",
                                       str(S.lora_x * lr_full)] + lsem + tc + tgt, s),
                f"dcm_lsem_s{s}": argv(["--stage", "detail", "--init", f"@lsem_tc_s{s}"] + lsem + lora, s)},
            # the GAN's real side: the training videos, the teacher's own solution
            "DCM, data as GAN real": {f"dcm_data_s{s}": argv(["--stage", "detail", "--init", f"@sem_tc_s{s}",
                                                              "--gan-real", "data"] + lora, s)},
            "DCM, teacher as GAN real": {f"dcm_teach_s{s}": argv(["--stage", "detail", "--init", f"@sem_tc_s{s}",
                                                                  "--gan-real", "teacher"] + lora, s)}}
        for row in S.rows:
            todo |= row_runs[row]
    sweep = sorted({max(3, min(k, grid.N - 5)) for k in S.kappa_sweep} - {kappa})
    sm["not_run"] = ([m for m in ALL_ROWS.rows if m not in S.rows]
                     + [f"DCM at kappa {k}" for k in ALL_ROWS.kappa_sweep if k not in S.kappa_sweep]
                     + ["the discriminator control"] * (not S.d_control_steps)
                     + [f"the target candidate EMA {e}, lr {lr:g}" for e, lr in ALL_ROWS.targets
                        if (e, lr) not in S.targets])
    for k in sweep:
        for s in range(S.sweep_seeds):
            todo[f"sem_tc_k{k}_s{s}"] = argv(["--stage", "semantic"] + tc + full(S.sem_steps), s, k=k)
            todo[f"dcm_k{k}_s{s}"] = argv(["--stage", "detail", "--init", f"@sem_tc_k{k}_s{s}"] + lora, s, k=k)
    for s in range(S.train_seeds):
        # seed 0's VCM is the chosen candidate's run (trained on the training data; chosen on the validation split)
        if s:
            todo[f"vcm_s{s}"] = argv(["--stage", "vcm"] + full(S.single_steps), s)
        todo[f"pcm_s{s}"] = argv(["--stage", "pcm", "--phases", "4"] + full(S.single_steps), s)
    train_all("distillation", todo)
    if len(cand) == 1:
        _, best, use_ema = choose_settings()
    runs["vcm_s0"] = best
    with clock("fig5 + curves"):
        groups, tensors = expert_difference(os.path.join(runs["sem_s0"]["checkpoint"], "transformer"),
                                            os.path.join(runs["od_s0"]["checkpoint"], "transformer"))
        sm |= {"fig5_groups": groups, "fig5_tensors": tensors,
               "dcm_curve": bench.curve(runs["dcm_s0"]["out"], val, grid, guidance, 4, use_ema),
               "grad_ratios": {n: grad_ratios(r["out"]) for n, r in runs.items()}}

    # the test split, one sampling seed per worker, and the discriminator control (toy/probes.py) beside them
    with clock("evaluate (test split)" + (" + discriminator control" if S.d_control_steps else "")):
        members = {label: [f"{run_}_s{s}" for s in range(S.train_seeds if head else S.ablation_seeds)]
                   for label, (run_, _, head) in MODELS.items() if head or label in S.rows}
        members |= {f"DCM, kappa = {k}": [f"dcm_k{k}_s{s}" for s in range(S.sweep_seeds)] for k in sweep}
        ev = dict(members={label: [runs[n]["checkpoint"] for n in names] for label, names in members.items()},
                  use_ema=use_ema, teacher_ckpt=teacher_ckpt, guidance=guidance, data_dir=data_dir, spec=spec, S=S,
                  clf_path=os.path.join(out, "classifier.pt"), kappa=kappa, sweep=sweep,
                  headline=[m for m, (_, _, head) in MODELS.items() if head])
        control = dict(dcm_ckpt=runs["dcm_s0"]["checkpoint"], teacher_ckpt=teacher_ckpt, guidance=guidance,
                       data_dir=data_dir, kappa=kappa, steps=S.d_control_steps, batch=S.student_batch, lr=S.d_lr,
                       hidden=S.disc_hidden, seed=args.seed)
        done = jobs.parallel([(bench.evaluate_seed, ev | {"seed": args.seed + s}) for s in range(S.eval_seeds)]
                             + [(probes.discriminator_control_from, control)] * bool(S.d_control_steps),
                             workers)
        results, gif = bench.merge_seeds(done[:S.eval_seeds])
        if S.d_control_steps:
            sm["d_control"] = done[-1]
            print(f"[toy] discriminator control: {sm['d_control']}", flush=True)
        models = {label: [bench.load_model(c, use_ema) for c in ckpts[:1]] for label, ckpts in ev["members"].items()}

    # 7. report
    with clock("report"):
        sm |= {"results": results, "param_counts": param_counts(models, tmodel), "machine": jobs.machine(),
               "trained_params": {n: {k: checks.read_json(os.path.join(r["out"], "config.json"), "run config")[k]
                                      for k in ("params", "trainable")} for n, r in runs.items()},
               "train": {n: {"steps": r["step"], "final": r["losses"]} for n, r in runs.items()},
               "runs": {n: os.path.relpath(r["out"], out) for n, r in runs.items()}, "sweep": sweep,
               "phases_s": clock.phases, "run_s": run_s, "workers": [args.workers, 1],
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
