"""Sampling with a trained student or the teacher: the library behind sample.py, eval.py, tools/monitor.py, toy/.

    model, info = load_student("out/detail")            # any checkpoint path (storage/checkpoint.resolve)
    t, alpha, sigma, ks, _ = points(info, steps=4)      # the student's schedule (paper supp. 6)
    x = student_sample(model, noise, cond, info["grid"], info["boundaries"], 4)

Students (paper supp. 6): steps split evenly between the phases (points: or by phase length, or grid indices),
uniform inside each (solver.student_schedule), one model call and Euler/DDIM jump per point, the last to the clean end;
no CFG, HunyuanVideo's embedded guidance still passed (the teacher's value: teacher.embedded_guidance).
The dual expert routes t <= boundary_t to its detail path (experts.DualExpert); two separately trained experts
(ablation OD) are `Routed`; single students (vcm, pcm, semantic-only) use the run's phases. The authors' released
students (storage/released.py) sample with the authors' schedules and routing (DESIGN sec. 7).
"""
import os
import sys

import torch

import experts
import model as models
import solver
from backbones import wan
from storage import checkpoint, latents, released, resume
from teacher import Teacher, with_image_frame, embedded_guidance
from tools import checks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RELEASED = ("cogvideox-2b", "cogvideox-5b", "hunyuan-video", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p",
            "wan2.1-i2v-14b-720p", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")  # (wan2.2-t2v-a14b: wan2.1-t2v-14b's config)
HUNYUAN_LATENT = (9, 68, 120)  # HunyuanVideo's 33 x 544 x 960 clips through its 4x8x8 VAE (its config has no size)
WAN_LATENT = (21, 60, 104)  # Wan2.1's 81 x 480 x 832 clips through its 4x8x8 VAE (the authors' distillation size)
TI2V_LATENT = (31, 44, 80)  # Wan2.2-TI2V-5B's 121 x 704 x 1280 clips through its 4x16x16 VAE


class SampleError(checks.InputError):
    """Bad input to sampling; the command lines print it as one `error:` line."""


def make_grid(cfg, kind, run, n=None, shift=None):
    """The teacher grid the run distilled on (its config.json), else the architecture's default (N=50, shift 17)."""
    n = n or run.get("grid_steps", 50)
    grid = solver.flow_grid(n, shift or run.get("shift", 17.0)) if kind == "flow" else solver.grid_for(cfg, n)
    stored = run.get("grid")
    if stored and stored["N"] == n and shift is None and not torch.equal(grid.t, torch.tensor(stored["t"], dtype=torch.float64)):
        raise SampleError("the grid stored in the checkpoint's config.json differs from the one rebuilt from its settings")
    return grid


class Routed(torch.nn.Module):
    """Two separately held experts (ablation OD; a detail adapter on a two-expert teacher's low-noise expert):
    t <= boundary_t -> detail, else semantic; one expert per batch."""

    def __init__(self, semantic, detail, boundary_t):
        super().__init__()
        self.semantic, self.detail, self.boundary_t, self.config = semantic, detail, float(boundary_t), semantic.config

    def forward(self, x, t, **cond):
        m = t <= torch.tensor(self.boundary_t, dtype=t.dtype, device=t.device)
        if bool(m.any()) != bool(m.all()):
            raise ValueError("Routed experts need all t of a batch on one side of boundary_t")
        return (self.detail if bool(m[0]) else self.semantic)(x, t, **cond)

    def merge_lora(self, merged=True):
        """A dual detail expert's LoRA merged (experts.DualExpert.merge_lora); a plain one as it is."""
        if hasattr(self.detail, "merge_lora"):
            self.detail.merge_lora(merged)
        return self


def _released(src, detail, teacher, steps, dtype, device, exact=False):
    """The authors' single-file layout: their routing and schedule; for HunyuanVideo their inference loop too
    (authors_sample) unless `exact`."""
    if detail or teacher or steps:
        raise SampleError(f"{src.weights}: the authors' student holds its detail expert and samples their schedule; "
                          "change it with --timesteps / --sigmas, not --detail / --teacher / --steps")
    m, r = released.load_released(src, dtype, device)
    m.eval().requires_grad_(False)
    if r["arch"] == "HunyuanVideo" and not exact:
        print("the authors' inference rules (their inference_hy.py + DCM pipeline; --exact for ours): embedded "
              "guidance 6000.0, the timestep and latents in the model's dtype after the first step")
    return m, {"mode": "released", "cfg": m.config, "run": {}, "grid": solver.flow_grid(), "boundaries": [],
               "boundary_t": m.boundary_t, "folder": r["folder"], "pixel_space": False, "schedule": r["schedule"],
               "threshold": r["threshold"], "authors_loop": r["arch"] == "HunyuanVideo" and not exact}


def load_student(path, device="cpu", dtype=torch.float32, detail=None, teacher=False, steps=None, shift=None,
                 what="checkpoint", ema=False, exact=False):
    """(model, info); info: mode (teacher|dual|od|vcm|pcm|semantic|released), cfg, run, grid, boundaries, boundary_t, ...
    what: how errors name the path (the flag it came from, e.g. "--ckpt"); ema: a step folder's EMA target weights
    (ema.safetensors) in place of the online ones (the toy evaluates with them); exact: an authors' HunyuanVideo
    student samples with our exact loop instead of theirs (authors_sample)."""
    src = checkpoint.resolve(path, what)  # the one resolver: what the path is, verified once
    if src.kind == "authors":
        return _released(src, detail, teacher, steps, dtype, device, exact)
    moe = checkpoint.two_experts(src.folder) if src.kind == "transformer" else None  # a Wan2.2-A14B folder
    release = wan.PIPELINES.get(wan.release_of(checkpoint.read_config(src.weights), moe and moe.boundary_ratio),
                                {}) if src.kind == "transformer" else {}
    run = src.run or {k.replace("steps", "grid_steps"): v for k, v in release.items() if k != "boundary_ratio"}
    stage = run.get("stage")
    if teacher or stage == "teacher":
        mode = "teacher"
    elif detail or stage == "detail":
        mode = "od" if not detail and run.get("detail_full") else "dual"
    elif stage in ("vcm", "pcm", "semantic"):
        mode = stage
    else:
        raise SampleError(f"{path} is a plain backbone: pass --teacher (N-step sampling with guidance) or --detail ADAPTER")
    ema_sd = resume.read_state(src.folder)["ema"] if ema else None
    m = load_backbone(src, dtype, device, merge=mode != "teacher", ema_sd=ema_sd if stage == "semantic" else None)
    if moe is not None and mode == "teacher":  # both experts, switched at the boundary
        info_moe = {"model_2": load_backbone(checkpoint.resolve(moe.low, what), dtype, device),
                    "boundary_t_teacher": 1000 * moe.boundary_ratio}
    teaching = mode == "teacher"  # students keep the grid they were distilled on: --steps/--shift are the teacher's
    grid = make_grid(m.config, m.prediction, run, steps if teaching else None, shift if teaching else None)
    boundaries, bt = [] if mode == "teacher" else run.get("boundaries"), None
    if mode == "dual":
        file = detail or src.detail  # a LoRA detail-stage step names its adapter (resolve)
        if not os.path.isfile(file):
            raise SampleError(f"detail adapter {file} does not exist")
        with checks.naming(f"detail adapter {file}"):
            m = checks.finite_model(experts.DualExpert.from_detail(m, file, semantic_merged=bool(src.semantic)), file)
        bt, kappa = m.boundary_t, experts.DualExpert.read_detail_meta(file).get("kappa")
        if run.get("detail_base"):  # over a two-expert teacher's low-noise expert: the semantic expert is the --init
            if not run.get("init") or not os.path.exists(run["init"]):
                raise SampleError(f"{src.folder}: a detail adapter on the teacher's low-noise expert; its semantic "
                                  f"expert (--init {run.get('init')!r}) is missing")
            m = Routed(load_backbone(checkpoint.resolve(run["init"], "the run's semantic expert"), dtype, device), m, bt)
        t32, bt32 = grid.t.float(), torch.tensor(bt).float()
        if kappa is None:  # an adapter saved without kappa: its boundary_t must be a grid point
            kappa = int(hits[0]) - 1 if len(hits := (t32 == bt32).nonzero()) else -1
        if not 0 <= kappa <= grid.N - 2 or t32[kappa + 1] != bt32:
            raise SampleError(f"{file}: boundary_t {bt} is not the grid's t at kappa {kappa} ({grid.kind} grid, N={grid.N})")
        boundaries = [kappa]
    elif mode == "od":
        if not run.get("init") or not os.path.exists(run["init"]):
            raise SampleError(f"{src.folder}: ablation-OD detail expert, its semantic expert (--init {run.get('init')!r}) "
                              "is missing")
        bt = solver.boundary_t(grid, run["kappa"])
        semantic = checkpoint.resolve(run["init"], "the OD run's semantic expert").weights
        m = Routed(checkpoint.load_transformer(semantic, dtype=dtype, device=device), m, bt)
    elif mode == "semantic":
        print("warning: a semantic-expert checkpoint (no detail adapter): it runs the detail-phase steps too", file=sys.stderr)
    if ema_sd is not None and not (src.semantic and stage == "semantic"):  # (that one is merged above)
        target = m.detail if mode == "od" else m
        if src.semantic:  # the EMA of the detail adapter alone: the rest stays as loaded
            ema_sd = target.state_dict() | ema_sd
        target.load_state_dict(ema_sd)
    m.eval().requires_grad_(False)
    pixel = bool(run.get("pixel_space")) or (run.get("data_manifest") or {}).get("model") == "toy" \
        or (m.config.out_channels or m.config.in_channels) == 3
    return m, {"mode": mode, "cfg": m.config, "run": run, "grid": grid, "boundaries": boundaries, "boundary_t": bt,
               "folder": src.folder, "pixel_space": pixel, **(info_moe if moe is not None and mode == "teacher" else {})}


def load_backbone(src, dtype, device, merge=True, ema_sd=None):
    """A resolved checkpoint's transformer; a --semantic-lora step's base + its adapter merged once (merge), with the
    adapter's EMA (ema_sd, losses.SwappedEMA) when given."""
    with checks.naming(src.weights):
        m = checks.finite_model(checkpoint.load_transformer(src.weights, dtype=dtype, device=device), src.weights)
    if src.semantic and merge:
        with checks.naming(f"semantic adapter {src.semantic}"):
            sem = experts.SemanticLoRA.from_file(m, src.semantic)
            if ema_sd is not None:
                sem.load_state_dict(sem.state_dict() | ema_sd)
            m = checks.finite_model(sem.merge_into_base(), src.semantic)
    return m


def points(info, steps=None, sched_points="even", sigmas=None, timesteps=None):
    """(t, alpha, sigma, grid indices or None, the custom schedule or None) of a sample run: a custom schedule (--sigmas / --timesteps, or the
    authors' for their students), else the teacher's whole grid or the student's few-step schedule."""
    grid, cfg = info["grid"], info["cfg"]
    custom = {k: v for k, v in (("sigmas", sigmas), ("timesteps", timesteps)) if v}
    custom = custom or dict([info["schedule"]] if info.get("schedule") else [])
    if custom:  # flow: t = 1000 sigma, any points; CogVideoX: integer timesteps of its 1000-step schedule
        fine = grid if grid.kind == "flow" else solver.grid_for(cfg, solver.T_TRAIN)
        try:
            return (*solver.custom_points(fine, **custom), None, custom)
        except ValueError as e:
            raise SampleError(f"--{next(iter(custom))}: {e}") from None
    ks = (list(range(grid.N - 1, -1, -1)) if info["mode"] == "teacher"
          else solver.student_schedule(grid, info["boundaries"], steps or 4, sched_points))
    return (*solver.sample_points(grid, ks), ks, None)


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


AUTHORS_GUIDANCE = 6.0 * 1000.0  # their inference_hy.py: guidance_scale 6.0 x 1000 in the (fp32) transformer's dtype


@torch.no_grad()
def authors_sample(model, x, cond, t, sigma, guidance=AUTHORS_GUIDANCE, callback=None):
    """The authors' HunyuanVideo DCM inference loop, as their code runs it (Vchitect/DCM
    fastvideo/models/hunyuan_hf/pipeline_hunyuan.py `dcm()`, lines 949-990, and fastvideo/distill/solver.py
    `InferencePCMFMScheduler.step`, lines 238-254): embedded guidance 6000.0, not the 6016 they train with; the
    timestep cast to the latents' dtype; Euler through their `denoised` / `derivative` form in fp32, the new latents
    cast to the model output's dtype. So a bf16 model sees bf16 latents and t = 992, 980, 912 after the first step
    (981.8 -> 980, 912.4 -> 912); in fp32 only the guidance differs from our loop. Returns float32 latents."""
    dtype = next(model.parameters()).dtype
    cond, lat = _cast(cond, dtype), x.float()
    g = torch.full((x.shape[0],), guidance, device=x.device)  # float32: the embedding computes from it
    sig = sigma.float().to(x.device)  # their scheduler's sigmas_: float32
    for i in range(len(t) - 1):
        tt = torch.full((x.shape[0],), float(t[i]), dtype=torch.float32, device=x.device).to(lat.dtype)
        out = model(lat.to(dtype), tt.float(), guidance=g, **cond)
        sample = lat.float()
        denoised = sample - out * sig[i]
        lat = (sample + (sample - denoised) / sig[i] * (sig[i + 1] - sig[i])).to(out.dtype)
        if callback is not None:
            callback(i, lat, denoised)
    return lat.float()


@torch.no_grad()
def student_sample(model, x, cond, grid, boundaries, steps, guidance=6.0, callback=None, points="even"):
    """Few-step student sample from noise x (paper supp. 6; points: solver.student_schedule's); float32 latents."""
    t, alpha, sigma = solver.sample_points(grid, solver.student_schedule(grid, boundaries, steps, points))
    return solver.sample(model_fn(model, cond, guidance), x.float(), t, alpha, sigma, grid.kind, callback, progress=False)


@torch.no_grad()
def teacher_sample(model, x, cond, grid, guidance=6.0, uncond=None, callback=None, model_2=None, boundary_t=None,
                   guidance_2=None):
    """The teacher's N-step sample with its guidance (Teacher.sample; model_2: a two-expert teacher's low-noise
    expert below boundary_t, guided by guidance_2); float32 latents."""
    return Teacher(model, grid, guidance, uncond, model_2=model_2, boundary_t=boundary_t, guidance_scale_2=guidance_2
                   ).sample(x.float(), cond, progress=False, callback=callback)


@torch.no_grad()
def generate(model, info, noise, cond, pts, guidance=6.0, uncond=None, batch_size=None, device="cpu", progress=True,
             guidance_2=None):
    """(latents [n, C, F, H, W] float32 on the cpu, seconds of each step summed over the batches) from noise: the
    student's jumps on pts = (t, alpha, sigma) (points()), or the teacher's N-step guided solve; batch_size at a time."""
    import time

    from tqdm.auto import tqdm
    (t, alpha, sigma), n, bs = pts, len(noise), batch_size or len(noise)
    secs, outs, clock = [0.0] * (len(t) - 1), [], [time.perf_counter()]
    bar = tqdm(total=len(secs) * -(-n // bs), desc="steps", unit="step", disable=not progress)

    def timer(i, x_next, x0):  # seconds of step i, summed over the batches
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        secs[i] += time.perf_counter() - clock[-1]
        clock.append(time.perf_counter())
        bar.update()
    for b0 in range(0, n, bs):
        x, c = noise[b0:b0 + bs].to(device), {k: v[b0:b0 + bs].to(device) for k, v in cond.items()}
        clock.append(time.perf_counter())
        if info["mode"] == "teacher":
            g2 = info["run"].get("guidance_2", guidance) if guidance_2 is None else guidance_2  # (a release's)
            outs.append(teacher_sample(model, x, c, info["grid"], guidance, uncond, timer, info.get("model_2"),
                                       info.get("boundary_t_teacher"), g2).cpu())
        elif info.get("authors_loop"):
            outs.append(authors_sample(model, x, c, t, sigma, callback=timer).cpu())
        else:
            outs.append(with_image_frame(solver.sample(model_fn(model, c, guidance), x.float(), t, alpha, sigma,
                                                       info["grid"].kind, timer, progress=False), c).cpu())
    bar.close()
    return torch.cat(outs), secs


def model_name(cfg):
    """The released preset this config equals, else a video_io model name of its family (it picks the VAE)."""
    name = next((n for n in RELEASED if models.PRESETS.get(n) == cfg), None)
    family = type(cfg).__name__
    return name or ("hunyuan-video" if "Hunyuan" in family else "wan2.1-t2v-1.3b" if "Wan" in family else "cogvideox-2b")


def checkpoint_config(path, what="checkpoint"):
    """(model config, train.py run config or {}) of any checkpoint path, without loading its weights."""
    src = checkpoint.resolve(path, what)
    with checks.naming(src.weights):
        cfg = released.read_config(src.weights)[0] if src.kind == "authors" else checkpoint.read_config(src.weights)
    return cfg, src.run or {}


def parse_schedule(args):
    """--timesteps / --sigmas "a,b,c" -> lists of floats, checked as solver.custom_points checks a schedule."""
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


def latent_choice(info, frames=None, height=None, width=None):
    """((F, H, W), where it came from): the arguments, else the run's dataset manifest, else the model's full size."""
    cfg, run = info["cfg"], info["run"]
    if shape := (run.get("data_manifest") or {}).get("latent_shape"):
        default, source = shape[1:], "the run's dataset manifest" + (f" ({run['data']})" if run.get("data") else "")
    else:  # no dataset recorded (the authors' students, a transformer folder): a full-size clip, slow on a CPU
        if hasattr(cfg, "sample_frames"):
            default = ((cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1, cfg.sample_height, cfg.sample_width)
        else:
            default = (TI2V_LATENT if cfg.in_channels == 48 else WAN_LATENT) if isinstance(cfg, models.WanConfig) \
                else HUNYUAN_LATENT
        source = "the model's full-size default (no dataset recorded; pass --frames/--height/--width)"
    given = [f"--{n}" for n, a in zip(("frames", "height", "width"), (frames, height, width)) if a is not None]
    if given:
        source = "/".join(given) + ("" if len(given) == 3 else f", the rest from {source}")
    return tuple(a if a is not None else d for a, d in zip((frames, height, width), default)), source


def latent_size(info, frames=None, height=None, width=None):
    """(F, H, W) of the latents (latent_choice), checked against the patch; prints the size and where it came from."""
    cfg = info["cfg"]
    (f, h, w), source = latent_choice(info, frames, height, width)
    latents.check_fits(cfg, latent_shape=(cfg.out_channels or cfg.in_channels, f, h, w),
                       where=f"latent size --frames {f} --height {h} --width {w}")
    print(f"latent [{cfg.out_channels or cfg.in_channels}, {f}, {h}, {w}] from {source}")
    return f, h, w


def read_latents(path):
    """(latents [n, C, F, H, W], metadata) of a latents.safetensors written by sample.py."""
    import json

    from safetensors import safe_open
    if not os.path.isfile(path):
        raise SampleError(f"latents file {path} does not exist")
    with safe_open(path, framework="pt") as f:
        if "latents" not in f.keys():
            raise SampleError(f"{path} holds no 'latents' tensor (keys: {sorted(f.keys())})")
        return f.get_tensor("latents"), {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
