"""Few-step generation with the trained students, the teacher's N-step reference, and video files out.

    python sample.py --ckpt out/detail                   # newest complete step of a train.py run
    python sample.py --ckpt out/detail/step_0001000 --steps 4 --num 4 --cond prompts.safetensors
    python sample.py --ckpt sem/transformer --detail det.safetensors     # semantic backbone + adapter
    python sample.py --ckpt out/teacher --teacher --steps 50             # the teacher, with guidance
    torchrun --nproc_per_node=4 sample.py -- --ckpt out/detail --sp 4  # sequence parallel: 4 GPUs, one sample set
    python sample.py --latents samples/latents.safetensors --decode WEIGHTS   # decode an earlier run
    python sample.py --ckpt DCM_HY --cond prompts.safetensors --decode DCM_HY    # the authors' released student
    python sample.py --ckpt out/detail --timesteps 1000,992,982,949,905,810      # a custom schedule

Students (paper supp. 6): steps split evenly between the phases (--points: or by phase length, or grid indices),
uniform inside each (solver.student_schedule), one model call and Euler/DDIM jump per point, the last to the clean end;
no CFG, HunyuanVideo's embedded guidance still passed (the teacher's value: teacher.embedded_guidance).
The dual expert routes t <= boundary_t to its detail path, its LoRA merged into the detail path's own copies of
the attention linears once per run (--no-merge: the unmerged low-rank pairs); single students (vcm, pcm,
semantic-only) use the run's phases. --timesteps / --sigmas replace the schedule (flow: t = 1000 sigma, any points;
CogVideoX: integer timesteps); the output metadata lists the expert of each point.
The authors' released students (released.py: `DCM_HY/`, `DCM_WAN/` or their transformer/) sample with the
authors' schedules and routing: HunyuanVideo sigmas 1, 0.992, 0.9818, 0.9124 with int(t) <= 981 on the
detail expert; Wan timesteps 1000, 992, 982, 949, 905, 810 with int(t) <= 978; per sample here.
Without --cond: the run's dataset's unconditional conditioning if found, else zeros (non-released
models only; the released ones need --cond from `python data.py encode-prompts`), with a warning.
Noise comes from one seeded CPU generator for all --num samples: bitwise reproducible on a fixed
device and --batch-size, and a sample's noise depends on the seed and its index, not on the batch size
(its latents do by float rounding only: differently batched matmuls, measured in README "Sampling").
Weights, adapter and conditioning are checked for NaN/inf and --out for writability before sampling.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

import checkpoint
import checks
import data
import experts
import model as models
import parallel
import released
import solver
from teacher import Teacher, embedded_guidance, uses_cfg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RELEASED = ("cogvideox-2b", "cogvideox-5b", "hunyuan-video", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
HUNYUAN_LATENT = (9, 68, 120)  # HunyuanVideo's 33 x 544 x 960 clips through its 4x8x8 VAE (its config has no size)
WAN_LATENT = (21, 60, 104)  # Wan2.1's 81 x 480 x 832 clips through its 4x8x8 VAE (the authors' distillation size)


class SampleError(ValueError):
    """Bad input to sample.py; the command line prints it as one line."""


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def resolve(path):
    """(folder, backbone path, run config or None): a step folder, a run's newest complete step, or a backbone."""
    if not os.path.exists(path):
        raise SampleError(f"checkpoint {path} does not exist")
    if os.path.isfile(path):  # an original-format file (checkpoint.ORIGINAL_FORMATS)
        return path, path, None
    steps = checkpoint.step_folders(path)
    if steps and not os.path.isdir(os.path.join(path, "transformer")):
        if (step := checkpoint.latest_step(path)) is None:
            raise SampleError(f"{path}: none of its {len(steps)} step_* checkpoints is complete (the newest, {steps[-1]}, "
                              f"lacks {', '.join(checkpoint.step_missing(os.path.join(path, steps[-1])))})")
        return resolve(step)
    run = _read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else None
    if checkpoint.STEP.fullmatch(os.path.basename(os.path.normpath(path))) or (run and "stage" in run):
        if missing := checkpoint.step_missing(path):
            raise SampleError(f"damaged or incomplete checkpoint {path}: {', '.join(missing)}")
        return path, os.path.join(path, "transformer"), run
    try:
        checkpoint.transformer_folder(path)
    except ValueError:
        raise SampleError(f"{path} is not a checkpoint: no step_* folders, train.py config.json or transformer "
                          "config.json") from None
    return path, path, None


def make_grid(cfg, kind, run, n=None, shift=None):
    """The teacher grid the run distilled on (its config.json), else the architecture's default (N=50, shift 17)."""
    n = n or run.get("grid_steps", 50)
    grid = solver.flow_grid(n, shift or run.get("shift", 17.0)) if kind == "flow" else solver.grid_for(cfg, n)
    stored = run.get("grid")
    if stored and stored["N"] == n and shift is None and not torch.equal(grid.t, torch.tensor(stored["t"], dtype=torch.float64)):
        raise SampleError("the grid stored in the checkpoint's config.json differs from the one rebuilt from its settings")
    return grid


class Routed(torch.nn.Module):
    """Two separately trained experts (ablation OD): t <= boundary_t -> detail, else semantic; one expert per batch."""

    def __init__(self, semantic, detail, boundary_t):
        super().__init__()
        self.semantic, self.detail, self.boundary_t, self.config = semantic, detail, float(boundary_t), semantic.config

    def forward(self, x, t, **cond):
        m = t <= torch.tensor(self.boundary_t, dtype=t.dtype, device=t.device)
        if bool(m.any()) != bool(m.all()):
            raise ValueError("Routed experts need all t of a batch on one side of boundary_t")
        return (self.detail if bool(m[0]) else self.semantic)(x, t, **cond)


def load_student(path, device="cpu", dtype=torch.float32, detail=None, teacher=False, steps=None, shift=None):
    """(model, info); info: mode (teacher|dual|od|vcm|pcm|semantic), cfg, run, grid, boundaries, boundary_t, ..."""
    if rel := checks.named(released.find, path, path):  # the authors' single-file layout: their routing and schedule
        if detail or teacher or steps:
            raise SampleError(f"{rel}: the authors' student holds its detail expert and samples their schedule; "
                              "change it with --timesteps / --sigmas, not --detail / --teacher / --steps")
        m, r = released.load_released(rel, dtype, device)
        m.eval().requires_grad_(False)
        return m, {"mode": "released", "cfg": m.config, "run": {}, "grid": solver.flow_grid(), "boundaries": [],
                   "boundary_t": m.boundary_t, "folder": rel, "pixel_space": False, "schedule": r["schedule"],
                   "threshold": r["threshold"]}
    folder, weights, run = resolve(path)
    run = run or {}
    stage = run.get("stage")
    if teacher or stage == "teacher":
        mode = "teacher"
    elif detail or stage == "detail":
        mode = "od" if not detail and run.get("detail_full") else "dual"
    elif stage in ("vcm", "pcm", "semantic"):
        mode = stage
    else:
        raise SampleError(f"{path} is a plain backbone: pass --teacher (N-step sampling with guidance) or --detail ADAPTER")
    m = checks.finite_model(checks.named(checkpoint.load_transformer, weights, weights, dtype=dtype, device=device), weights)
    teaching = mode == "teacher"  # students keep the grid they were distilled on: --steps/--shift are the teacher's
    grid = make_grid(m.config, m.prediction, run, steps if teaching else None, shift if teaching else None)
    boundaries, bt = [] if mode == "teacher" else run.get("boundaries"), None
    if mode == "dual":
        file = detail or os.path.join(folder, "detail.safetensors")
        if not os.path.isfile(file):
            raise SampleError(f"detail adapter {file} does not exist")
        m = checks.finite_model(checks.named(experts.DualExpert.from_detail, f"detail adapter {file}", m, file), file)
        bt, kappa = m.boundary_t, experts.DualExpert.read_detail_meta(file).get("kappa")
        t32, bt32 = grid.t.float(), torch.tensor(bt).float()
        if kappa is None:  # an adapter saved without kappa: its boundary_t must be a grid point
            kappa = int(hits[0]) - 1 if len(hits := (t32 == bt32).nonzero()) else -1
        if not 0 <= kappa <= grid.N - 2 or t32[kappa + 1] != bt32:
            raise SampleError(f"{file}: boundary_t {bt} is not the grid's t at kappa {kappa} ({grid.kind} grid, N={grid.N})")
        boundaries = [kappa]
    elif mode == "od":
        if not run.get("init") or not os.path.exists(run["init"]):
            raise SampleError(f"{folder}: ablation-OD detail expert, its semantic expert (--init {run.get('init')!r}) is missing")
        bt = solver.boundary_t(grid, run["kappa"])
        m = Routed(checkpoint.load_transformer(resolve(run["init"])[1], dtype=dtype, device=device), m, bt)
    elif mode == "semantic":
        print("warning: a semantic-expert checkpoint (no detail adapter): it runs the detail-phase steps too", file=sys.stderr)
    m.eval().requires_grad_(False)
    pixel = bool(run.get("pixel_space")) or (run.get("data_manifest") or {}).get("model") == "toy" \
        or (m.config.out_channels or m.config.in_channels) == 3
    return m, {"mode": mode, "cfg": m.config, "run": run, "grid": grid, "boundaries": boundaries, "boundary_t": bt,
               "folder": folder, "pixel_space": pixel}


def expert_names(info, t):
    """The expert at each model-native t: the dual expert's rule t <= boundary_t, compared in float32."""
    if info["boundary_t"] is None:
        return [info["mode"] if info["mode"] in ("teacher", "semantic") else "student"] * len(t)
    bt = torch.tensor(info["boundary_t"], dtype=torch.float32)
    return ["detail" if tt <= bt else "semantic" for tt in torch.as_tensor(t).float()]


def _cast(cond, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}


def model_fn(model, cond, guidance=6.0):
    """model_fn(x, t) for solver.sample: the model in its dtype, the teacher's embedded guidance where it takes one."""
    dtype = next(model.parameters()).dtype
    cond = _cast(cond, dtype)

    def fn(x, t):
        g = {"guidance": torch.full(t.shape, embedded_guidance(guidance), device=x.device, dtype=dtype)} \
            if getattr(model.config, "guidance_embeds", False) else {}
        return model(x.to(dtype), t, **cond, **g).float()
    return fn


@torch.no_grad()
def student_sample(model, x, cond, grid, boundaries, steps, guidance=6.0, callback=None, points="even"):
    """Few-step student sample from noise x (paper supp. 6; points: solver.student_schedule's); float32 latents."""
    t, alpha, sigma = solver.sample_points(grid, solver.student_schedule(grid, boundaries, steps, points))
    return solver.sample(model_fn(model, cond, guidance), x.float(), t, alpha, sigma, grid.kind, callback, progress=False)


@torch.no_grad()
def teacher_sample(model, x, cond, grid, guidance=6.0, uncond=None, callback=None):
    """The teacher's N-step sample with its guidance (Teacher.sample); float32 latents."""
    return Teacher(model, grid, guidance, uncond).sample(x.float(), cond, progress=False, callback=callback)


def model_name(cfg):
    """The released preset this config equals, else a video_io model name of its family (it picks the VAE)."""
    name = next((n for n in RELEASED if models.PRESETS.get(n) == cfg), None)
    family = type(cfg).__name__
    return name or ("hunyuan-video" if "Hunyuan" in family else "wan2.1-t2v-1.3b" if "Wan" in family else "cogvideox-2b")


def get_cond(path, info, n, what="cond"):
    """Conditioning for n samples: a data.load_cond file (batch 1 or n), else the dataset's uncond or zeros."""
    cfg, run, pooled = info["cfg"], info["run"], getattr(info["cfg"], "pooled_projection_dim", None)
    if not path and run.get("data") and os.path.isfile(os.path.join(run["data"], "uncond.safetensors")):
        path = os.path.join(run["data"], "uncond.safetensors")
        print(f"warning: no --{what}: using the unconditional conditioning of the run's dataset ({path})", file=sys.stderr)
    elif not path and any(models.PRESETS.get(r) == cfg for r in RELEASED):
        raise SampleError(f"--{what} FILE is required for {model_name(cfg)} (make one: python data.py encode-prompts "
                          "--model NAME --weights WEIGHTS --prompts prompts.txt --out FILE)")
    elif not path:
        print(f"warning: no --{what}: sampling with all-zero conditioning", file=sys.stderr)
    if path:
        cond = data.load_cond(path)
    else:  # text tokens: CogVideoX's fixed T5 length, HunyuanVideo's 256 Llama tokens, Wan's 512 umT5 tokens
        n_text = getattr(cfg, "max_text_seq_length", 512 if isinstance(cfg, models.WanConfig) else 256)
        cond = {"text": torch.zeros(1, n_text, data.text_width(cfg))}
        cond.update({"pooled": torch.zeros(1, pooled)} if pooled else {})
    data.check_fits(cfg, cond, where=path or "all-zero conditioning")
    checks.finite(cond, f"--{what} {path}")
    if (b := cond["text"].shape[0]) not in (1, n):
        raise SampleError(f"{path}: conditioning batch {b} must be 1 or --num {n}")
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def latent_size(args, info):
    """(F, H, W) of the latents: the flags, else the run's data, else the model config; checked against the patch."""
    cfg, shape = info["cfg"], (info["run"].get("data_manifest") or {}).get("latent_shape")
    if shape:
        default = shape[1:]
    elif hasattr(cfg, "sample_frames"):
        default = ((cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1, cfg.sample_height, cfg.sample_width)
    else:
        default = WAN_LATENT if isinstance(cfg, models.WanConfig) else HUNYUAN_LATENT
    f, h, w = (a if a is not None else d for a, d in zip((args.frames, args.height, args.width), default))
    data.check_fits(cfg, latent_shape=(cfg.in_channels, f, h, w),
                    where=f"latent size --frames {f} --height {h} --width {w}")
    return f, h, w


def decode(x, meta, args):
    """Videos of latents: pixel-space ones directly (GIF + MP4), else through the VAE (--decode), else say how."""
    import video_io
    if meta.get("pixel_space"):
        paths = []
        for i, v in enumerate(tqdm(x, desc="videos", unit="sample", leave=False)):  # [3, F, H, W] in [-1, 1]
            for ext in (".gif", ".mp4"):
                try:
                    paths.append(video_io.write_video(v, os.path.join(args.out, f"sample_{i:03d}{ext}"), args.fps))
                except (ImportError, ValueError) as e:
                    print(f"note: no {ext} written: {e}", file=sys.stderr)
        return paths
    if meta.get("model") not in video_io.MODELS:
        raise SampleError(f"the latents' metadata names no model to decode with ({meta.get('model')!r})")
    later = f"python sample.py --latents {os.path.join(args.out, 'latents.safetensors')} --decode WEIGHTS --out {args.out}"
    if not args.decode:
        print(f"latents only (pixels need the VAE); to decode later: {later}")
        return []
    try:
        video_io.require("diffusers"), video_io.require("imageio_ffmpeg", "imageio-ffmpeg")
    except ImportError as e:
        print(f"warning: cannot decode: {e}; then decode with: {later}", file=sys.stderr)
        return []
    return video_io.decode_to_video(x, meta["model"], args.decode, os.path.join(args.out, "sample.mp4"), args.fps,
                                    device=args.device)


def read_latents(path):
    """(latents [n, C, F, H, W], metadata) of a latents.safetensors written by sample.py."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise SampleError(f"latents file {path} does not exist")
    with safe_open(path, framework="pt") as f:
        if "latents" not in f.keys():
            raise SampleError(f"{path} holds no 'latents' tensor (keys: {sorted(f.keys())})")
        return f.get_tensor("latents"), {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", help="train.py step folder, run folder (its newest complete step) or transformer folder")
    a("--detail", help="detail adapter .safetensors for a semantic backbone --ckpt")
    a("--teacher", action="store_true", help="N-step teacher sampling with its guidance (the reference)")
    a("--latents", help="only write videos of an earlier run's latents.safetensors")
    a("--steps", type=int, help="students: default 4; --teacher: the run's N, else 50")
    a("--timesteps", help="students: custom schedule of model timesteps, e.g. 1000,992,982,949,905,810")
    a("--sigmas", help="students, flow models: custom schedule of sigmas, e.g. 1.0,0.992,0.9818,0.9124 (then 0)")
    a("--points", default="even", help="students: points per expert, even | proportional | grid indices IDX,IDX,...")
    a("--shift", type=float, help="--teacher, flow: grid shift (default the run's, else 17; HunyuanVideo's sampler: 7)")
    a("--seed", type=int, default=0)
    a("--num", type=int, default=1, help="number of samples")
    a("--batch-size", type=int, help="default --num")
    a("--cond", help="conditioning file (data.load_cond), batch 1 or --num")
    a("--uncond", help="--teacher with CFG (CogVideoX, Wan, flow models without guidance_embeds): the empty prompt's conditioning (default: the run's dataset's)")
    a("--frames", type=int, help="latent frames (default: the run's data, else the model config)")
    a("--height", type=int, help="latent height")
    a("--width", type=int, help="latent width")
    a("--guidance", type=float, help="CFG scale / embedded guidance (default: the run's, else 6.0)")
    a("--dtype", choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    a("--device", default="auto", help="auto | cpu | cuda[:i]")
    a("--out", help="output folder (default samples/; with --latents: the latents' folder)")
    a("--decode", help="real models: local hub-layout folder with vae/: decode the latents to MP4")
    a("--sp", type=int, default=1, help="sequence parallel degree N: torchrun N processes sample one set together")
    a("--fps", type=int, default=8)
    a("--no-merge", action="store_true", help="dual expert: keep the detail LoRA unmerged (default: merged once)")
    a("--verify", default="sha256", choices=("sha256", "none"), help="check step folders against their checksums")
    args = p.parse_args(argv)
    if not (args.ckpt or args.latents):
        raise SampleError("give --ckpt (a checkpoint to sample from) or --latents (latents to decode)")
    if args.teacher and args.detail:
        raise SampleError("--teacher samples a plain backbone; it takes no --detail adapter")
    if any(v is not None and v < 1 for v in (args.num, args.batch_size, args.steps, args.fps)):
        raise SampleError("--num, --batch-size, --steps and --fps must be >= 1")
    if args.timesteps and args.sigmas or (args.timesteps or args.sigmas) and (args.teacher or args.steps):
        raise SampleError("give at most one of --timesteps and --sigmas, and neither with --teacher or --steps")
    for name in ("timesteps", "sigmas"):
        if (v := getattr(args, name)) is not None:
            try:
                setattr(args, name, [float(x) for x in v.split(",")])
            except ValueError:
                raise SampleError(f"--{name} {v!r} is not a comma-separated list of numbers") from None
            try:
                solver.custom_points(solver.flow_grid(2), **{name: getattr(args, name)})
            except ValueError as e:
                raise SampleError(f"--{name}: {e}") from None
    args.points = solver.parse_points(args.points)
    if (explicit := not isinstance(args.points, str)) and (args.teacher or args.timesteps or args.sigmas or args.steps):
        raise SampleError("--points with grid indices sets the steps: not with --teacher, --timesteps, --sigmas or --steps")
    args.steps = len(args.points) if explicit else args.steps
    args.out = checks.out_dir(args.out or (os.path.dirname(os.path.abspath(args.latents)) if args.latents else "samples"))
    args.device = str(checks.device(args.device))
    checkpoint.verify_checksums = args.verify != "none"
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    return args


def main(argv=None):
    """Sample (or only decode) as the flags say; returns a summary dict (latents [num, C, F, H, W] float32 cpu)."""
    args = parse_args(argv)
    if args.sp > 1 and parallel.get_group() is None:  # torchrun: the SP group samples the same latents, rank 0 writes
        world, weights = int(os.environ.get("WORLD_SIZE", 1)), args.ckpt and resolve(args.ckpt)[1]
        parallel.check(args.sp, checkpoint.read_config(weights) if weights and os.path.isdir(weights) else None, world)
        if world != args.sp:
            raise SampleError(f"--sp {args.sp}: sample.py runs one sequence-parallel group, launch exactly {args.sp} processes")
        with parallel.distributed(torch.device(args.device), args.sp), open(os.devnull, "w") as null, \
                contextlib.redirect_stdout(sys.stdout if parallel.lead() else null):
            return main(argv)
    if args.latents:
        x, meta = checks.named(read_latents, f"--latents {args.latents}", args.latents)
        return {"latents": x, "videos": decode(x, meta, args), "out": args.out}
    model, info = load_student(args.ckpt, args.device, args.dtype, args.detail, args.teacher, args.steps, args.shift)
    if info["mode"] == "dual" and not args.no_merge:
        model.merge_lora()  # one GEMM per detail linear instead of three (round-off differences only)
    cfg, grid, run, teacher = info["cfg"], info["grid"], info["run"], info["mode"] == "teacher"
    guidance = args.guidance if args.guidance is not None else run.get("guidance", 6.0)
    custom = {k: v for k, v in (("sigmas", args.sigmas), ("timesteps", args.timesteps)) if v}
    custom = custom or dict([info["schedule"]] if info.get("schedule") else [])
    if custom:
        ks, fine = None, grid if grid.kind == "flow" else solver.grid_for(cfg, solver.T_TRAIN)
        try:
            t, alpha, sigma = solver.custom_points(fine, **custom)
        except ValueError as e:
            raise SampleError(f"--{next(iter(custom))}: {e}") from None
    else:
        ks = list(range(grid.N - 1, -1, -1)) if teacher else solver.student_schedule(grid, info["boundaries"], args.steps or 4, args.points)
        t, alpha, sigma = solver.sample_points(grid, ks)
    names, (f, h, w) = expert_names(info, t[:-1]), latent_size(args, info)
    checks.sampling_memory(cfg, args.num, min(args.batch_size or args.num, args.num), (f, h, w), args.dtype, args.device)
    if info["mode"] in ("dual", "od") and len(set(names)) == 1:
        print(f"warning: --steps {len(names)} on a dual expert: only the {names[0]} expert runs "
              f"(steps are split between the experts, noisiest phase first)", file=sys.stderr)
    cond = get_cond(args.cond, info, args.num)
    cfg_teacher = teacher and guidance != 1 and (uses_cfg(model) or not getattr(cfg, "guidance_embeds", False))  # + flow
    uncond = get_cond(args.uncond, info, 1, "uncond") if cfg_teacher else None
    n_steps = len(t) - 1
    meta = {"seed": args.seed, "steps": n_steps, "grid_indices": ks, "t": t.tolist(), "sigmas": sigma.tolist(),
            "schedule": custom or None, "experts": names, "mode": info["mode"], "ckpt": info["folder"],
            "detail": args.detail, "guidance": guidance,
            "model": model_name(cfg), "pixel_space": info["pixel_space"], "dtype": str(args.dtype), "device": args.device,
            "lora_merged": info["mode"] == "dual" and not args.no_merge}
    if args.decode and not info["pixel_space"]:
        import video_io
        video_io.vae_config(meta["model"], args.decode)  # a bad weights folder fails now, not after sampling
    routing = f", boundary_t {info['boundary_t']:.3f} (kappa {info['boundaries']})" if info["boundary_t"] else ""
    routing = f", detail expert where int(t) <= {info['threshold']} (the authors' rule)" if "threshold" in info else routing
    print(f"{info['folder']}: {info['mode']}{routing}; {grid.kind} grid N={grid.N}; {n_steps} steps; "
          f"latents {args.num} x [{cfg.in_channels}, {f}, {h}, {w}] {args.dtype} on {args.device}")

    noise = torch.randn((args.num, cfg.in_channels, f, h, w), generator=torch.Generator().manual_seed(args.seed))
    secs, outs, bs = [0.0] * n_steps, [], args.batch_size or args.num
    clock = [time.perf_counter()]
    bar = tqdm(total=n_steps * -(-args.num // bs), desc="steps", unit="step", disable=not parallel.lead())

    def timer(i, x_next, x0):  # seconds of step i, summed over the batches
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        secs[i] += time.perf_counter() - clock[-1]
        clock.append(time.perf_counter())
        bar.update()
    for b0 in range(0, args.num, bs):
        x, c = noise[b0:b0 + bs].to(args.device), {k: v[b0:b0 + bs].to(args.device) for k, v in cond.items()}
        clock.append(time.perf_counter())
        if teacher:
            outs.append(teacher_sample(model, x, c, grid, guidance, uncond, timer).cpu())
        else:
            outs.append(solver.sample(model_fn(model, c, guidance), x.float(), t, alpha, sigma, grid.kind, timer,
                                      progress=False).cpu())
    total = time.perf_counter() - clock[0]
    bar.close()
    for i, (k, name) in enumerate(zip(ks or ["-"] * n_steps, names)):
        print(f"step {i + 1}/{n_steps}: k={k} t={float(t[i]):.2f} sigma {float(sigma[i]):.4f} -> {float(sigma[i + 1]):.4f} "
              f"expert={name} {secs[i]:.3f} s")
    print(f"total {total:.3f} s, {total / n_steps:.3f} s/step ({args.num} samples)")

    if not parallel.lead():  # sequence parallel: every rank sampled the same latents, rank 0 writes them
        return {**meta, "latents": torch.cat(outs), "path": None, "videos": [], "out": args.out}
    x, path = torch.cat(outs), os.path.join(args.out, "latents.safetensors")
    checks.finite({"latents": x}, "the sampled latents (not written)")
    os.makedirs(args.out, exist_ok=True)
    data.atomic_save_file({"latents": x}, path, metadata={k: json.dumps(v) for k, v in meta.items()})
    print(f"latents -> {path}")
    videos = decode(x, meta, args)
    print("".join(f"video -> {v}\n" for v in videos), end="")
    return {**meta, "latents": x, "path": path, "videos": videos, "seconds_per_step": secs, "seconds_total": total,
            "out": args.out}


def cli(argv=None):
    """main() with known bad input turned into one line on stderr and exit status 2 (DCM_TRACEBACK=1 re-raises)."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, ImportError) as e:  # SampleError, DataError, checkpoint/model errors
        if os.environ.get("DCM_TRACEBACK"):
            raise
        print(f"error: {'; '.join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__}",
              file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(cli())
