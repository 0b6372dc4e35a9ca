"""Watching a run while it trains: validation samples every N steps and TensorBoard (train.py's monitor flags).

    python train.py ... --sample-every 100 [--sample-steps 2,4,8] [--sample-cond FILE] [--sample-num K]
                        [--sample-decode WEIGHTS] [--tensorboard]

Validation: K fixed prompts (--sample-cond, else K evenly spaced training samples' conditioning) from fixed
noise (its own CPU generator), sampled with the current student by sample.py's own few-step sampler
(`sampling.student_sample`; the dual expert in the detail stage; the teacher stage: `sampling.teacher_sample` with
guidance at each step count as N) at step 0, every N steps and the last step, into OUT/samples/step_XXXXXXX/:
`latents_{s}step.safetensors` (sample.py's latents format: `sample.py --latents FILE --decode WEIGHTS` decodes
it later), the toy's pixels as a GIF + MP4 grid per step count, real latents through the VAE with
--sample-decode (rank 0). It does not perturb training: no global RNG draw, no_grad, every module's train/eval
flag restored, requires_grad untouched, EMA / discriminator / optimizer untouched (tested: weights
and RNG states bit-identical with and without it). Under FSDP (and sequence parallelism) every rank runs the
forward, which all-gathers weights; under DDP rank 0 alone samples the unwrapped module (its forward has no
collectives) and the other ranks wait at the next gradient all-reduce, so the process group's timeout must
cover sampling + decoding.
TensorBoard (optional package, imported only with --tensorboard): OUT/tb/ mirrors every row of log.jsonl
(every loss term, lr, grad norms, step time, peak memory) and probes.jsonl, and shows each validation grid
as an animated GIF (written here with Pillow, so moviepy is not needed).
"""
import argparse
import atexit
import io
import json
import os
import sys

import torch

import sampling
import solver
from storage import checkpoint, latents
from student import detail_on_teacher

STEPS, NUM = (2, 4, 8), 4  # the authors' and FastVideo's validation step counts; prompts per validation


def step_counts(text):
    """'2,4,8' -> (2, 4, 8) for argparse."""
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--sample-steps {text!r}: expected comma-separated step counts >= 1, e.g. 2,4,8")
    return steps


def add_args(p):
    """train.py's monitor flags, in their own --help group; returns p."""
    g = p.add_argument_group("watching the run (monitor.py)")
    a = g.add_argument
    a("--sample-every", type=int, default=0, help="validation samples at step 0, every N steps and the last (0 = off)")
    a("--sample-steps", type=step_counts, help="step counts (default 2,4,8; stage teacher: the teacher's N)")
    a("--sample-cond", help="conditioning file (data.py encode-prompts); default: K training samples' conditioning")
    a("--sample-num", type=int, help=f"K prompts (default {NUM}, or the --sample-cond file's batch)")
    a("--sample-decode", help="hub-layout WEIGHTS with vae/: decode the samples to MP4 on rank 0")
    a("--tensorboard", action="store_true", help="TensorBoard event files in OUT/tb (pip install tensorboard)")
    return p


def tile(videos, cols=None, gap=1):
    """Videos [K, 3, F, H, W] in [-1, 1] -> one grid video [3, F, H', W'], white gaps, sides rounded up to even
    (H.264's yuv420p needs them)."""
    K, C, F, H, W = videos.shape
    cols = cols or K
    rows = -(-K // cols)
    even = lambda n: n + n % 2  # noqa: E731
    out = torch.ones(C, F, even(rows * (H + gap) - gap), even(cols * (W + gap) - gap))
    for i, v in enumerate(videos.float().clamp(-1, 1)):
        r, c = divmod(i, cols)
        out[:, :, r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = v
    return out


def gif_bytes(video, fps=8, scale=1):
    """[3, F, H, W] in [-1, 1] -> an animated GIF (bytes), each side `scale` x larger (nearest)."""
    from PIL import Image

    from storage import video_io
    frames = [Image.fromarray(f) for f in video_io.to_uint8(video)]
    frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def preview(latents):
    """Latents [K, C, F, H, W] -> a viewable [K, 3, F, H, W] in [-1, 1]: the first 3 channels, each sample scaled
    to its own range (a look at layout and motion, not colours; the pixels need the VAE)."""
    x = latents[:, :3].float()
    x = x.repeat(1, 3 // x.shape[1], 1, 1, 1) if x.shape[1] in (1, 3) else x[:, :1].repeat(1, 3, 1, 1, 1)
    lo, hi = x.amin((1, 2, 3, 4), keepdim=True), x.amax((1, 2, 3, 4), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


class _AsTeacher:
    """The model being trained, seen by sampling.teacher_sample's Teacher, which would otherwise set it to eval and
    requires_grad False: FSDP2 fixes at its first forward (our step-0 validation) which parameters it trains."""

    def __init__(self, model):
        self.model, self.prediction, self.config = model, model.prediction, model.config

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class Monitor:
    """Validation sampling and TensorBoard of one run; `mon(step, model)` between steps (returns step)."""

    def __init__(self, args, cfg, grid, boundaries, ds, rank, device):
        self.args, self.cfg, self.grid, self.boundaries, self.rank, self.device = args, cfg, grid, boundaries, rank, device
        self.out, self.every, self.first, self.tb, self.vae = args.out, args.sample_every, None, None, None
        self.teacher = args.stage == "teacher"
        if self.every < 0 or (args.sample_num is not None and args.sample_num < 1):
            raise ValueError(f"--sample-every {self.every} must be >= 0 and --sample-num {args.sample_num} >= 1")
        if self.every and detail_on_teacher(args):  # its semantic expert (the --init) is not loaded while training
            raise ValueError("--sample-every on a two-expert teacher's detail stage: the model training is the "
                             "low-noise expert + adapter alone, so its samples would run the high-noise steps on the "
                             "low-noise expert; sample the saved steps with sample.py (both experts) instead")
        if self.every:
            self._setup_sampling(ds)
        if args.tensorboard and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # a flag error: train.py prints it as one line
                raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
            self.writer_cls = SummaryWriter
            self.tb = True
        self.offsets = {}

    def _setup_sampling(self, ds):
        """Checks every flag and builds the fixed noise and conditioning now, before any model is loaded."""
        args, cfg = self.args, self.cfg
        self.steps = args.sample_steps or ((self.grid.N,) if self.teacher else STEPS)
        for s in () if self.teacher else self.steps:
            try:
                solver.student_schedule(self.grid, self.boundaries, s)
            except ValueError as e:
                raise ValueError(f"--sample-steps {s}: {e}") from None
        if args.sample_cond:
            cond = latents.load_cond(args.sample_cond)
            latents.check_fits(cfg, cond, where=args.sample_cond)
            b, K = cond["text"].shape[0], args.sample_num or cond["text"].shape[0]
            if b not in (1, K):
                raise ValueError(f"{args.sample_cond}: conditioning batch {b} must be 1 or --sample-num {K}")
            cond = {k: v.expand(K, *v.shape[1:]) for k, v in cond.items()}
        else:  # K training samples spread over the dataset, so the K prompts differ
            K = min(args.sample_num or NUM, len(ds))
            self.index = torch.linspace(0, len(ds) - 1, K).round().long()
            cond = {k: ds.tensors[k][self.index] for k in latents.check_fits(cfg, ds.tensors, where=ds.dir)}
        self.K, self.cond, self.uncond = K, cond, {k: v for k, v in ds.uncond.items()}
        shape = ds.manifest["latent_shape"]
        self.noise = torch.randn(K, *shape, generator=torch.Generator().manual_seed(args.seed + 7_000_003))
        self.real = ds.tensors["latents"][self.index] if not args.sample_cond else None
        self.pixel = ds.manifest.get("model") == "toy" or (cfg.out_channels or cfg.in_channels) == 3
        self.model_name = sampling.model_name(cfg)
        if args.sample_decode and not self.pixel:
            from storage import video_io
            video_io.vae_config(self.model_name, args.sample_decode)  # a bad folder fails now, not at step N
        # FSDP and Ulysses sequence parallelism (parallel.py) run collectives inside the forward: every rank samples
        self.collective = bool(args.fsdp or (getattr(args, "sp", 1) or 1) > 1)

    def __call__(self, step, model):
        """Between steps (after `step` updates): mirror new log rows to TensorBoard, validate when due."""
        if self.first is None:
            self.first = step
            if self.tb:  # a resumed run drops the events its previous life wrote after the checkpoint's step
                self.tb = self.writer_cls(os.path.join(self.out, "tb"), purge_step=step + 1 if step else None,
                                          flush_secs=30)
                atexit.register(self.tb.close)  # a run stopped by an error still leaves its events on disk
        if self.tb:
            self._mirror(step)
        due = step == self.args.max_steps or step % self.every == 0 if self.every else False
        if due and (step == 0 or step > self.first):  # a resumed run's first step was sampled before
            self.validate(step, model)
        if step >= self.args.max_steps and self.tb:
            self.tb.close()
        return step

    def _mirror(self, step):
        """New rows of log.jsonl (train/...) and probes.jsonl (probe/...) with step > the first one -> scalars."""
        for name, group in (("log.jsonl", "train"), ("probes.jsonl", "probe")):
            path = os.path.join(self.out, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                f.seek(self.offsets.get(name, 0))
                lines = f.read().split(b"\n")[:-1]  # a line still being written has no newline yet
            self.offsets[name] = self.offsets.get(name, 0) + sum(len(s) + 1 for s in lines)
            for row in map(json.loads, filter(None, lines)):
                if row["step"] <= self.first:
                    continue
                for k, v in row.items():
                    if k not in ("step", "epoch") and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{group}/{'step_time_s' if k == 'time' else k}", v, row["step"])

    @torch.no_grad()
    def validate(self, step, model):
        """Sample every step count from the fixed noise; rank 0 writes OUT/samples/step_XXXXXXX. -> {steps: latents}."""
        if not self.collective and self.rank != 0:
            return None
        modes = [(m, m.training) for m in model.modules()]
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.dtype == "bf16")
        guidance, bs = self.args.guidance, max(self.args.batch_size, 1)
        model.eval()
        lat = {}
        try:
            with autocast:
                for s in self.steps:
                    parts = []
                    for b0 in range(0, self.K, bs):  # the training micro-batch fits, so does a sampling one
                        x = self.noise[b0:b0 + bs].to(self.device)
                        c = {k: v[b0:b0 + bs].to(self.device) for k, v in self.cond.items()}
                        if self.teacher:  # the N-step guided sampler at N = s
                            g = sampling.make_grid(self.cfg, self.grid.kind, {"shift": self.args.shift}, s)
                            un = {k: v.to(self.device) for k, v in self.uncond.items()}
                            parts.append(sampling.teacher_sample(_AsTeacher(model), x, c, g, guidance, un).cpu())
                        else:
                            parts.append(sampling.student_sample(model, x, c, self.grid, self.boundaries, s, guidance).cpu())
                    lat[s] = torch.cat(parts)
        finally:
            model.train()  # DualExpert.train also sets its grafted copies; then every flag as it was
            for m, t in modes:
                m.training = t
        if self.rank == 0:
            self._write(step, lat)
        return lat

    def _write(self, step, lat):
        folder = os.path.join(self.out, "samples", f"step_{step:07d}")
        videos = {}
        with checkpoint.atomic_dir(folder) as tmp:
            for s, x in lat.items():
                ks = list(range(self.grid.N - 1, -1, -1)) if self.teacher else \
                    solver.student_schedule(self.grid, self.boundaries, s)
                meta = {"step": step, "seed": self.args.seed + 7_000_003, "steps": s, "grid_indices": ks,
                        "model": self.model_name, "pixel_space": self.pixel, "stage": self.args.stage}
                latents.atomic_save_file({"latents": x}, os.path.join(tmp, f"latents_{s}step.safetensors"),
                                         metadata={k: json.dumps(v) for k, v in meta.items()})
                videos[s] = self._pixels(x, tmp, s)
            if self.pixel and self.real is not None:  # the training clips of the K prompts, once per run
                videos["data"], self.real = self._pixels(self.real, tmp, "data"), None
        print(f"validation samples -> {folder}", file=sys.stderr)
        for s, v in videos.items():
            if self.tb and v is not None:
                self._tb_video(f"samples/{s}{'step' if s != 'data' else ''}", v, step)
        if self.tb:
            self.tb.flush()

    def _pixels(self, x, tmp, s):
        """The toy's grid GIF + MP4, or the VAE's MP4s (--sample-decode), -> a grid video for TensorBoard."""
        from storage import video_io
        name = f"{s}step" if s != "data" else "data"
        if self.pixel:
            grid = tile(x)
            for ext in (".gif", ".mp4"):
                try:
                    video_io.write_video(grid, os.path.join(tmp, f"grid_{name}{ext}"))
                except (ImportError, ValueError) as e:
                    print(f"note: no grid_{name}{ext}: {e}", file=sys.stderr)
            return grid
        if not self.args.sample_decode:
            return tile(preview(x)) if self.tb else None
        if self.vae is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.vae = video_io.load_vae(self.model_name, self.args.sample_decode, self.device, dtype, tiling=True)
        pixels = torch.cat([video_io.decode_latents(self.vae, x[i:i + 1]) for i in range(len(x))])
        for i, v in enumerate(pixels):
            video_io.write_video(v, os.path.join(tmp, f"sample_{name}_{i}.mp4"))
        small = torch.nn.functional.interpolate(pixels.flatten(0, 1), scale_factor=min(1.0, 128 / pixels.shape[-2]))
        return tile(small.unflatten(0, pixels.shape[:2]))  # [K*3, F, h, w] -> [K, 3, F, h, w]: TB stays small

    def _tb_video(self, tag, video, step):
        """An animated GIF into the image dashboard (what add_video writes, without moviepy)."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        scale = max(1, 128 // video.shape[-2])
        img = Summary.Image(height=video.shape[-2] * scale, width=video.shape[-1] * scale, colorspace=3,
                            encoded_image_string=gif_bytes(video, scale=scale))
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
