"""Training for the teacher, the VCM/PCM baselines and both DCM experts (DESIGN sec. 1), 1 CPU to torchrun.

    python train.py --config tiny-cogvideox --stage teacher --data DIR --out out/teacher
    python train.py --stage semantic --teacher out/teacher/step_0010000 --data DIR --out out/sem
    python train.py --stage detail --teacher T --init out/sem/step_0001500 --data DIR --out out/det
    torchrun --nproc_per_node=8 train.py ... [--fsdp] [--dtype bf16] [--grad-ckpt] [--sp 4]

Stages (k = index on the teacher's N-step grid, kappa = the DCM cut):
  teacher   diffusion training (losses.diffusion_time, diffusion_loss): flow: logit-normal sigma, target
            v = eps - x0; vpred: t ~ U{0..999} on CogVideoX's DDIM alphas, target v = alpha*eps - sigma*x0.
            CFG models (CogVideoX, Wan, flow models without a guidance input) train on the dataset's uncond
            conditioning with probability --cond-drop.
  vcm       one student, one phase k in 0..N-1 -> clean end;  pcm: --phases P even phases.
  semantic  k in kappa+1..N-1 -> x_kappa, + temporal coherence (--w-tc).
  detail    DualExpert on the semantic expert (--init): LoRA + copied layers, k in 0..kappa -> clean
            end, + GAN / feature matching on teacher features; --detail-full = ablation "OD" (a fully
            fine-tuned separate copy instead of LoRA).
One GPU (--semantic-lora R, both DCM stages): the semantic expert is LoRA + copied layers over the teacher's frozen
weights, and the teacher is that same tree with the adapters off (experts.SemanticLoRA): no second copy. Frozen
weights are held in the compute dtype (--dtype bf16: bf16), fp32 masters only for what trains.
Per-sample noise, k and drops (latents.draws): a global batch trains the same however it is split over ranks.
"""
import signal

if __name__ == "__main__":  # Ctrl-C while torch loads ends the process quietly, as SIGTERM does: nothing to save yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # storage/preempt.py takes both signals over once the run is set up

import argparse
import contextlib
import json
import os
import random
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import lora
import losses
import model as models
import solver
from scale import fsdp, parallel, plan
from student import (build_student, detail_on_teacher, load, model_config, settle_defaults, shares_teacher,
                     stage_teacher, teacher_path)
from storage import checkpoint, latents, preempt, resume
from teacher import embedded_guidance, uses_cfg
from tools import checks, monitor

# --- run settings: defaults of the command-line flags (dicts where the stages differ)
STAGES = ("teacher", "vcm", "pcm", "semantic", "detail")
max_steps = {"teacher": 10000, "vcm": 1500, "pcm": 1500, "semantic": 1500, "detail": 1000}
lr = {"teacher": 1e-4, "vcm": 1e-6, "pcm": 1e-6, "semantic": 1e-6, "detail": 5e-6}  # constant (authors)
w_tc = {"semantic": 1.0}                # temporal coherence; 0 in the other stages
w_gan, w_fm = {"detail": 0.5}, {"detail": 0.1}  # DESIGN: L_cd + 0.1 * (5 L_G + 1 L_fm)
batch_size, grad_accum = 1, 1           # per process; global batch = batch x accum x world
weight_decay, grad_clip = 1e-3, 1.0     # AdamW (0.9, 0.999)
d_lr, d_betas, d_weight_decay = 1e-5, (0.0, 0.999), 1e-3
grid_steps, shift, phases = 50, None, 4  # shift None: the authors' 17 (Wan2.2 releases: theirs; student.settle_defaults)
kappa = None                            # authors at N = 50: 37 (34 for Wan); two-expert teachers: at their boundary
guidance = None                         # 6: CFG scale (CogVideoX) / embedded guidance -> 6016 (HunyuanVideo); Wan2.2: theirs
cond_drop, target_ema, loss = 0.1, 0.0, "huber"
lora_rank, disc_hidden = 128, 1024
seed, probe_every, save_every = 0, 50, 500
dist_timeout = 60.0                     # minutes: a 13B semantic save moves ~205 GB through rank 0 (--dry-run)


class TrainError(checks.InputError):
    """A run that cannot start (flags, files); the command line prints it as one line, exit 2."""


def parse_args(argv):
    p = monitor.add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    a = p.add_argument
    a("--config", help=f"model preset ({', '.join(models.PRESETS)}) or config.json (diffusers or a run's); "
                       "default: the teacher's")
    a("--stage", required=True, choices=STAGES, help="what to train (no default: a wrong guess trains the wrong model)")
    a("--data", help="dataset folder (format: storage/latents.py)")
    a("--out", help="run folder (default out/<stage>)")
    a("--teacher", help="the model to distil: a transformer or step folder (not for --stage teacher)")
    a("--init", help="weights to start from: detail needs the semantic expert; others default to the teacher, "
                     "stage teacher to a fresh model")
    a("--max-steps", type=int, help=f"default per stage {max_steps}")
    a("--batch-size", type=int, default=batch_size, help="micro-batch per process")
    a("--grad-accum", type=int, default=grad_accum)
    a("--lr", type=float, help=f"default per stage {lr}")
    a("--weight-decay", type=float, default=weight_decay)
    a("--d-lr", type=float, default=d_lr, help="discriminator lr (AdamW, constant)")
    a("--d-betas", type=float, nargs=2, default=d_betas, metavar=("B1", "B2"), help="discriminator AdamW betas")
    a("--kappa", type=int, default=kappa, help="DCM boundary grid index (default 37 at N=50, Wan 34)")
    a("--phases", type=int, default=phases, help="pcm: number of evenly spaced phases")
    a("--seed", type=int, default=seed)
    a("--resume", action="store_true", help="go on from the newest complete checkpoint in --out")
    a("--resume-anyway", action="store_true", help="--resume even if --data/--teacher/batch/seed/loss weights changed")
    a("--keep-last", type=int, default=0, help="keep only the newest K checkpoints (0 = all)")
    a("--verify", default="sha256", choices=("sha256", "none"), help="check step folders against their checksums")
    a("--target-ema", type=float, default=target_ema, help="0 = stop-grad student (authors), >0 = EMA decay")
    a("--w-tc", type=float, help=f"temporal coherence weight (default {w_tc}, else 0)")
    a("--w-gan", type=float, help=f"generator hinge weight (default {w_gan}, else 0)")
    a("--w-fm", type=float, help=f"feature matching weight (default {w_fm}, else 0)")
    a("--loss", default=loss, choices=("huber", "l2"), help="consistency loss: pseudo-Huber c=1e-3 or L2")
    a("--detail-full", action="store_true", help="detail: full fine-tuned copy instead of LoRA (ablation OD)")
    a("--lora-rank", type=int, default=lora_rank, help="detail LoRA rank (alpha = 2 x rank)")
    a("--lora-targets", default="authors", choices=lora.LORA_TARGETS, help="the authors' PEFT set or ours (all)")
    a("--lora-alpha", type=float, help="alpha of the LoRA this stage trains (default 2 x its rank)")
    a("--semantic-lora", type=int, default=0, metavar="R", help="semantic expert as rank-R LoRA + copies over the "
      "frozen teacher, which it shares (one GPU); 0 = full fine-tune. Give it to the detail stage on such a run too")
    a("--disc-hidden", type=int, default=disc_hidden, help="discriminator width (multiple of 32)")
    a("--gan-real", default="target", choices=("target", "data", "teacher"), help="detail: the GAN's real side: the "
      "target (paper eq. 9), the training latents, or the teacher's own solution from the same x_k (k+1 teacher steps)")
    a("--gan-first", action="store_true", help="detail: the GAN/FM gradient at the student's output first, from a "
      "no-grad student pass, so the teacher's graph and the student's never coexist (+1 student forward; one GPU)")
    a("--cond-drop", type=float, default=cond_drop, help="teacher stage, CFG models: uncond probability")
    a("--guidance", type=float, default=guidance, help="teacher guidance scale (default 6; Wan2.2: the release's)")
    a("--guidance-2", type=float, help="a two-expert teacher's low-noise expert's CFG scale (default: the release's)")
    a("--grid-steps", type=int, default=grid_steps, help="N, the teacher's grid")
    a("--shift", type=float, default=shift, help="flow grid shift (default 17; Wan2.2: the release's)")
    a("--probe-every", type=int, default=probe_every, help="high/low-noise probe interval (0 = off)")
    a("--save-every", type=int, default=save_every)
    a("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast with fp32 master weights")
    a("--fsdp", action="store_true", help="FSDP2: shard student and teacher per block")
    a("--hsdp", type=int, default=1, metavar="R", help="--fsdp as HSDP: R replicas, each sharded over world/R ranks")
    a("--sp", type=int, default=1, help="sequence parallel degree N (torchrun; world = DP x N; N divides the heads)")
    a("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    a("--compile", action="store_true", help="torch.compile the student")
    a("--dry-run", action="store_true", help="print sizes and memory per GPU, then exit")
    a("--world-size", type=int, help="dry-run: plan for this many GPUs (default WORLD_SIZE or 1)")
    a("--frames", type=int, help="dry-run: latent frames (with --height/--width; default: --data's, else the model's)")
    a("--height", type=int, help="dry-run: latent height")
    a("--width", type=int, help="dry-run: latent width")
    a("--gpu-mem", type=float, default=80.0, help="dry-run: GiB per GPU to fit in")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--dist-timeout", type=float, default=dist_timeout, help="minutes a collective may wait for the slowest rank "
      "(torch's default is 10: less than rank 0 takes to gather, write and checksum a 13B semantic checkpoint)")
    args = p.parse_args(argv)
    for x in p._actions:  # parsed again without defaults: only the flags the command line names remain
        x.default = argparse.SUPPRESS
    given = set(vars(p.parse_args(argv)))
    for name, table in (("max_steps", max_steps), ("lr", lr), ("w_tc", w_tc), ("w_gan", w_gan), ("w_fm", w_fm)):
        if getattr(args, name) is None:
            setattr(args, name, table.get(args.stage, 0.0))
    args.out = args.out or os.path.join("out", args.stage)
    for k in ("teacher", "init") if not args.dry_run else ():  # an org/name hub id: its local snapshot, recorded as such
        setattr(args, k, getattr(args, k) and checkpoint.hub_path(getattr(args, k), f"--{k}"))
    checks.train_args(args, given)  # flags and their combinations, named in one line each
    fsdp.check_hsdp(args, args.world_size or int(os.environ.get("WORLD_SIZE", 1)))
    if args.kappa is not None and not 0 <= args.kappa <= args.grid_steps - 2:
        raise TrainError(f"--kappa {args.kappa} must lie in 0..N-2 = 0..{args.grid_steps - 2}")
    return args


def main(argv=None):
    """One run; returns {"step", "losses", "out", "checkpoint"} (dry run: the sizes)."""
    args = parse_args(argv)
    checkpoint.verify_checksums = args.verify != "none"
    cfg = model_config(args)
    kind = models.build_transformer(cfg, device="meta").prediction
    grid = settle_defaults(args, cfg, kind)  # --shift, --guidance(-2), --kappa left open: per model
    resume.check_sources(args, cfg)
    if args.dry_run:
        return plan.dry_run(args, cfg, lambda: build_student(args, cfg, grid, device="meta"))
    # torchrun sets RANK/WORLD_SIZE; --fsdp in a plain process runs a 1-process group
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev, _ = str(checks.device(args.device)), checks.out_dir(args.out)
    if dev == "cuda":
        dev = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(dev)
    device = torch.device(dev)
    parallel.check(args.sp, cfg, world)
    with preempt.Preemption(argv) as pre, parallel.distributed(device, args.sp, args.fsdp, args.dist_timeout) as (
            dp, dp_rank):
        return train(args, cfg, kind, grid, world, rank, device, dp, dp_rank, pre)  # an SP group: the same samples


def train(args, cfg, kind, grid, world, rank, device, dp=1, dp_rank=0, pre=None):
    distributed, out, B, accum = dist.is_initialized(), args.out, args.batch_size, args.grad_accum
    N, kap = grid.N, args.kappa
    log0 = print if rank == 0 else (lambda *a, **k: None)
    # FSDP: no autocast weight cache, it would hold a bf16 copy of every unsharded weight through the forward
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16",  # noqa: E731
                                      cache_enabled=not args.fsdp)
    boundaries = {"teacher": [], "vcm": [], "semantic": [kap], "detail": [kap],
                  "pcm": [(N * j + args.phases // 2) // args.phases - 1 for j in range(args.phases - 1, 0, -1)]}[args.stage]
    k_lo, k_hi = {"semantic": (kap + 1, N - 1), "detail": (0, kap)}.get(args.stage, (0, N - 1))
    lora, gan = args.stage == "detail" and not args.detail_full, args.stage == "detail" and bool(args.w_gan or args.w_fm)

    # --- data: the DistributedSampler's seeded order, resumable at a micro-batch position
    ds = latents.LatentDataset(args.data)
    cond_keys = latents.check_fits(cfg, ds.tensors, ds.manifest["latent_shape"], ds.uncond, where=ds.dir)
    if args.w_tc and rank == 0 and (n_f := ds.manifest["latent_shape"][1]) <= losses.TC_STRIDE:
        print(f"warning: TC loss is 0: {n_f} latent frames, its frame stride is {losses.TC_STRIDE} (--w-tc {args.w_tc} "
              f"does nothing on {ds.dir})", file=sys.stderr)
    if len(ds) // dp < B:
        raise latents.DataError(f"{ds.dir}: {len(ds)} samples are fewer than batch {B} x data parallel {dp}")
    sampler = torch.utils.data.DistributedSampler(ds, dp, dp_rank, shuffle=True, seed=args.seed, drop_last=True)
    uncond = {k: v.to(device) for k, v in ds.uncond.items()}
    mon = monitor.Monitor(args, cfg, grid, boundaries, ds, rank, device)  # checks its flags before models load

    # --- a new run, or going on from the newest intact checkpoint of the same run (resume.same_run)
    paths = {k: os.path.abspath(getattr(args, k)) for k in ("data", "teacher", "init") if getattr(args, k)}
    paths["data_digest"] = ds.digest  # a resume compares the data by content, not by path
    if detail_on_teacher(args):  # the adapter's base: a two-expert teacher's low-noise expert
        paths["detail_base"] = os.path.abspath(teacher_path(args))
    ckpt, state = resume.open_run(out, args.resume, vars(args) | paths | {"boundaries": boundaries},
                                      args.resume_anyway, rank == 0)
    checkpoint.verify_checksums &= rank == 0  # rank 0 verified what the run reads; no sha256 storm from every rank

    # --- models: the same init seed on every rank; --fsdp: meta build, each rank reads its own shards (scale/fsdp.py)
    torch.manual_seed(args.seed)
    tdtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.fsdp:  # FSDP2 per block + root, the EMA and the frozen teacher sharded too
        mesh = fsdp.device_mesh(args, world, device)  # --hsdp R: R replicas of a world/R-rank FSDP group
        student, ema, tmodel = fsdp.start_up(args, ckpt, state, mesh, device, tdtype,
                                             lambda c, d: build_student(args, cfg, grid, c, d), load)
    else:
        student = build_student(args, cfg, grid, ckpt, device).to(device)
        ema = None if not args.target_ema or args.stage == "teacher" else losses.SwappedEMA(student) if shares_teacher(
            args) else deepcopy(student).requires_grad_(False)  # SwappedEMA: a copy of the adapters, the base is shared
        tmodel = (None if args.stage == "teacher" else student.base_view() if shares_teacher(args)
                  else load(teacher_path(args), tdtype, device))
        if ema is not None and state:
            ema.load_state_dict(state["ema"])
    print(f"rank {rank}: peak host memory at start-up {fsdp.host_peak_gib():.2f} GiB (ru_maxrss)", flush=True)
    student.train()
    disc = losses.Discriminator.for_model(student, args.disc_hidden).to(device) if gan else None
    teacher = stage_teacher(args, grid, tmodel, uncond, device, tdtype)  # CFG: uses_cfg models, flow without guidance
    frozen = [m for m in teacher.experts() if isinstance(m, torch.nn.Module)] if teacher else []  # (not a BaseView)
    for m in [student] + frozen + ([disc] if disc is not None else []) if args.grad_ckpt else []:
        m.gradient_checkpointing = True
    if args.compile:
        student.compile()

    # --- distributed: DDP (FSDP2: sharded at start-up)
    student_mod = student
    if distributed and not args.fsdp:
        student_mod = torch.nn.parallel.DistributedDataParallel(student)  # no device_ids: host t stays on the host
    for p in disc.parameters() if disc is not None and distributed else ():
        dist.broadcast(p.data, 0)
    params = [p for p in student.parameters() if p.requires_grad]
    fused = all(p.is_cuda and p.is_floating_point() for p in params) or None  # fused AdamW on CUDA, else the default
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=fused)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=args.d_lr, betas=tuple(args.d_betas), weight_decay=d_weight_decay,
                              fused=fused) if disc else None
    if state:
        resume.load_optimizer(student, opt, state["opt"], broadcast=args.fsdp)  # FSDP: rank 0 reads, then sends
        for m, key in ((disc, "disc"), (d_opt, "d_opt")) if disc else ():
            m.load_state_dict(state[key])
    n_total, n_train = sum(p.numel() for p in student.parameters()), sum(p.numel() for p in params)

    # --- run config: printed, saved with the run and in every checkpoint
    run_config = {**vars(args), **paths, "model_config": models.config_to_dict(cfg), "prediction": kind,
                  "boundaries": boundaries, "k_range": [k_lo, k_hi], "world_size": world,
                  "global_batch": B * accum * dp, "params": n_total, "trainable": n_train,
                  "grid": {"kind": grid.kind, "N": N, "t": grid.t.tolist(), "sigma": grid.sigma.tolist()},
                  "data_manifest": {k: v for k, v in ds.manifest.items() if k != "shards"}}
    log0(checks.run_summary(run_config | {"device": str(device)}, os.path.join(out, "config.json")))
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        latents.atomic_write_json(run_config, os.path.join(out, "config.json"))

    # --- one micro-batch's loss terms
    vgrid = solver.grid_for(cfg, solver.T_TRAIN) if kind == "vpred" else None  # every DDIM training timestep
    weights = {"diffusion": 1.0, "cd": 1.0, "tc": args.w_tc, "gan_g": args.w_gan, "fm": args.w_fm, "output": 1.0}
    C, n_f, H, W = ds.manifest["latent_shape"]
    tok_grid = tuple(n // p for n, p in zip((n_f, H, W), latents.patch_of(cfg)))

    def make_cond(batch, drop=None):
        cond = {k: batch[k].to(device) for k in cond_keys}
        if drop is not None:  # teacher stage, CFG models: the unconditional branch learns too
            cond = {k: torch.where(losses.col(drop, v).bool(), uncond[k].to(v.dtype), v) if k in uncond else v
                    for k, v in cond.items()}  # (the image condition stays: CFG drops the text only)
        scond = dict(cond)
        if getattr(cfg, "guidance_embeds", False):  # embedded guidance is an input of every call
            scond["guidance"] = torch.full((len(batch["text"]),), embedded_guidance(args.guidance), device=device)
        return cond, scond

    def loss_terms(x0, eps, u, n, cond, scond, k=None, out_gn=None):
        """Generator terms {name: loss} and the discriminator's (fake, real) features; k given = a probe; a dict
        out_gn gets each term's gradient norm at the student's output (losses.output_grad_norms)."""
        if args.stage == "teacher":
            t, a, s = grid.at(k) if k is not None else losses.diffusion_time(u[:, 0], kind, vgrid)
            return {"diffusion": losses.diffusion_loss(student_mod, x0, eps, t, a, s, kind, scond)}, None
        kk = solver.k_between(u[:, 0], k_lo, k_hi) if k is None else k  # host indices (u on the CPU): no sync in the step
        step_ = lambda s_mod, x_tgt=None: losses.consistency_step(  # noqa: E731
            s_mod, student if ema is None else ema, teacher, grid, boundaries, x0, eps, kk, cond, scond, args.loss, x_tgt)
        gan_now, feats, g_out = k is None and gan, None, None

        def real(x_tgt):  # the GAN's real side (--gan-real): the paper's target, the data, or the teacher's solution
            if args.gan_real == "teacher":
                return losses.teacher_endpoint(teacher, x0, eps, kk, cond, grid, top=k_hi)  # same calls on every rank
            return x0 if args.gan_real == "data" else x_tgt
        if gan_now and args.gan_first:  # the GAN/FM gradient at the output first: the teacher's graph is gone before
            with torch.no_grad():  # the student's forward with grad (the same xhat, recomputed)
                _, xhat, x_tgt, k_end = step_(student)
            xhat.requires_grad_(True)
            gan_g, fm, feats = losses.adversarial_terms(teacher.model, disc, real(x_tgt), xhat, n, k_end,
                                                        solver.k_between(u[:, 1], 0, kap), grid, scond, tok_grid)
            losses.output_grad_norms(xhat, {"gan_g": gan_g, "fm": fm}, weights, into=out_gn)
            g_out = torch.autograd.grad(weights["gan_g"] * gan_g + weights["fm"] * fm, xhat)[0]
        l_cd, xhat, x_tgt, k_end = step_(student_mod, None if g_out is None else x_tgt)
        terms = {"cd": l_cd}
        if k is None and args.w_tc:
            terms["tc"] = losses.temporal_coherence_loss(*losses.generated(cond, xhat, x_tgt))  # (TI2V: not frame 0)
        if g_out is not None:  # logged as computed; their gradient enters through `output` (value 0, gradient g_out)
            terms |= {"gan_g": gan_g.detach(), "fm": fm.detach(), "output": (xhat * g_out).sum() - (xhat * g_out).sum().detach()}
        elif gan_now:
            k_adv = solver.k_between(u[:, 1], 0, kap)  # re-noise into the detail sub-trajectory (host indices)
            terms["gan_g"], terms["fm"], feats = losses.adversarial_terms(teacher.model, disc, real(x_tgt), xhat, n,
                                                                          k_end, k_adv, grid, scond, tok_grid)
        losses.output_grad_norms(xhat, {k: v for k, v in terms.items() if v.requires_grad and k != "output"}, weights,
                                 into=out_gn)  # a dict on probe steps: how hard each term pulls
        return terms, feats

    # --- fixed probe batches, high / low noise (paper Fig. 2): data, noise and k drawn once
    g = torch.Generator().manual_seed(args.seed + 4242)
    pidx, probes = torch.randperm(len(ds), generator=g)[:B], []
    pbatch = {k: v[pidx] for k, v in ds.tensors.items()}
    for name, lo, hi in (("high", max(k_lo, kap + 1), k_hi), ("low", k_lo, min(k_hi, kap))):
        if lo <= hi and args.probe_every > 0:
            k = torch.randint(lo, hi + 1, (B,), generator=g)
            probes.append((name, k, torch.randn(B, C, n_f, H, W, generator=g)))

    def run_probes(step):
        """Loss and gradient norm on each probe batch, to probes.jsonl; the gradients are dropped (no update)."""
        row = {"step": step}
        for name, k, eps in probes:
            with autocast():
                (l,) = loss_terms(pbatch["latents"].float().to(device), eps.to(device), None, None,
                                  *make_cond(pbatch), k=k)[0].values()
            l.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            opt.zero_grad(set_to_none=True)
            row |= {f"{name}_loss": l.item(), f"{name}_grad_norm": float(getattr(gn, "full_tensor", lambda: gn)())}
        if rank == 0:
            with open(os.path.join(out, "probes.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    # --- state to go on from; logs cut back to the checkpoint's step
    step, epoch, pos = (state["step"], state["epoch"], state["pos"]) if state else (0, 0, 0)
    random.seed(args.seed + dp_rank)  # by data-parallel rank: the SP peers of a sample draw alike (e.g. dropout)
    np.random.seed(args.seed + dp_rank)
    torch.manual_seed(args.seed + dp_rank)
    if state and state["world_size"] == world:
        resume.set_rng_state(state["rng"][rank])
    elif state and state.get("dp", state["world_size"]) != dp:  # another SP degree alone keeps the data order
        log0(f"data parallel size {dp} != the checkpoint's: the data order continues, not exactly")
    row = resume.trim_logs(out, step) if rank == 0 else {}  # logs cut back to the checkpoint's step

    # --- training loop
    stream = latents.batches(ds, sampler, B, epoch, pos)
    nan_at = int(os.environ.get("DCM_TRAIN_NAN_AT_STEP", -1))  # test hook: poison the loss of this step
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc=args.stage, mininterval=2)
    pre = pre or preempt.Preemption([])
    pre.arm()  # a signal from here on: finish the step, save, stop (storage/preempt.py)
    t_start, step0 = time.time(), step
    while mon(step, student) < args.max_steps:  # validation samples / TensorBoard between steps (tools/monitor.py)
        # per-term gradient norms at the output on probe steps; not under FSDP, whose resharded teacher the GAN terms'
        # extra backward would need gathered again
        t0, sums = time.time(), {}
        out_gn = {} if probes and (step + 1) % args.probe_every == 0 and not args.fsdp else None
        for micro in range(accum):
            batch, epoch, pos = next(stream)
            x0 = batch["latents"].float().to(device)
            eps, u, n = latents.draws(batch["index"], step, args.seed, x0.shape[1:], gan, device)
            cfg_model = uses_cfg(student) or not getattr(cfg, "guidance_embeds", False)  # + flow w/o guidance input
            drop = (u[:, 2] < args.cond_drop) if args.stage == "teacher" and cfg_model else None
            last = micro == accum - 1  # FSDP2 reduce-scatters every micro-step (as torchtitan): skipping the sync would
            # keep every rank's unsharded fp32 gradients of the whole model between micro-steps (13B: +52 GB per GPU)
            with student_mod.no_sync() if distributed and not args.fsdp and not last else contextlib.nullcontext():
                with autocast():
                    terms, feats = loss_terms(x0, eps, u, n, *make_cond(batch, drop), out_gn=out_gn)
                    total = sum(weights[k] * v for k, v in terms.items())
                if step + 1 == nan_at:
                    total = total * float("nan")
                (total / accum).backward()
            if feats is not None:  # discriminator micro-step on the same features, 1:1 with the generator
                with autocast():
                    terms["d"], terms["d_acc_real"], terms["d_acc_fake"] = losses.discriminator_stats(disc, feats, tok_grid)
                (terms["d"] / accum).backward()
            for k, v in (terms | {"loss": total}).items():
                if k != "output":  # --gan-first's gradient carrier: value 0
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
        flag = torch.full((1,), pre.pending(), device=device)  # a fill kernel: no host-to-device copy, no sync
        vals = torch.cat([torch.stack([sums[k] for k in sorted(sums)]), flag])
        if distributed:  # + the stop flag: a signal on any rank stops every rank after this same step
            dist.all_reduce(vals)
            vals /= world
        gn = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # below: the step's one host sync (the NaN check)
        norms = [getattr(gn, "full_tensor", lambda: gn)()]
        if disc is not None:
            if distributed:  # D is replicated, not wrapped: its gradients averaged by hand, in one all-reduce
                parallel.all_reduce_mean([p.grad for p in disc.parameters()])
            norms.append(torch.nn.utils.clip_grad_norm_(disc.parameters(), grad_clip))
        *row, stop = torch.cat([vals[:-1], torch.stack(norms), vals[-1:]]).tolist()
        row = dict(zip(sorted(sums) + ["grad_norm", "d_grad_norm"], row))
        bad = [k for k, v in row.items() if not np.isfinite(v)]
        if bad:  # stop before the update: the last checkpoint stays the last good state
            good, _ = checkpoint.latest_step(out, checkpoint.RESUMABLE, quiet=True), bar.close()
            raise checks.RunFailed(f"non-finite {', '.join(bad)} at step {step + 1}; stopped before the update, "
                             f"last good checkpoint: {good or 'none'}")
        for o in [opt] + ([d_opt] if d_opt else []):
            o.step()
            o.zero_grad(set_to_none=True)
        if ema is not None:
            losses.ema_update(ema, student, args.target_ema)
        step += 1
        row |= (out_gn or {}) | {"step": step, "lr": args.lr, "epoch": epoch, "time": time.time() - t0}
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)  # the bar redraws at its own pace
        if rank == 0:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if probes and step % args.probe_every == 0:
            run_probes(step)
        stop = stop > 0 and step < args.max_steps
        if stop or step == args.max_steps or (args.save_every > 0 and step % args.save_every == 0):
            rest = {"epoch": epoch, "pos": pos, "world_size": world, "dp": dp, "disc": disc and disc.state_dict(),
                    "d_opt": d_opt and d_opt.state_dict()}
            resume.save_step(out, step, student, opt, rest, run_config, ema, sharded=args.fsdp,
                                 build=lambda: build_student(args, cfg, grid, device="meta"),
                                 meta={"kappa": kap} if lora or args.semantic_lora else None)
            if rank == 0:
                checkpoint.keep_last(out, args.keep_last)
        if stop:
            bar.close()
            raise preempt.Interrupted(pre.signum, rank == 0 and f"interrupted at step {step}: saved "
                                      f"{checkpoint.step_dir(out, step)}; resume with: {pre.resume_command()}" or "")
    bar.close()
    how = f"--teacher --steps {N}" if args.stage == "teacher" else "--steps 4"
    log0(f"done: step {step} of {args.max_steps} ({step - step0} trained in {time.time() - t_start:.0f} s); model: "
         f"{checkpoint.step_dir(out, step)}\n  sample it: python sample.py --ckpt {out} {how} --out "
         f"{os.path.join(out, 'samples')}")
    return {"step": step, "losses": row, "out": out, "checkpoint": checkpoint.step_dir(out, step)}


def cli(argv=None):
    """main() as a command line: one line and exit 2 for bad input, 1 for a failed run, 130/143 for a signal."""
    return checks.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
