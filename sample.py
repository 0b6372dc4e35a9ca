"""Few-step generation with students, the teacher's N-step reference, video files out (the command line of sampling.py).

    python sample.py --ckpt out/detail                   # newest complete step of a train.py run
    python sample.py --ckpt out/detail/step_0001000 --steps 4 --num 4 --cond prompts.safetensors
    python sample.py --ckpt sem/transformer --detail det.safetensors     # semantic backbone + adapter
    python sample.py --ckpt out/teacher --teacher --steps 50             # the teacher, with guidance
    torchrun --nproc_per_node=4 sample.py -- --ckpt out/detail --sp 4  # sequence parallel: 4 GPUs, one sample set
    python sample.py --latents samples/latents.safetensors --decode WEIGHTS   # decode an earlier run
    python sample.py --ckpt DCM_HY --cond prompts.safetensors --decode DCM_HY    # the authors' released student
    python sample.py --ckpt out/detail --timesteps 1000,992,982,949,905,810      # a custom schedule
    python sample.py --ckpt runs/wdet --weights Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" --prompt "..."

--timesteps / --sigmas replace the schedule (flow: t = 1000 sigma, any points; CogVideoX: integer timesteps); the
output metadata lists the expert of each point. Without --cond: the run's dataset's unconditional conditioning if
found, else zeros (released models need --cond from `python data.py encode-prompts`), with a warning. Noise comes
from one seeded CPU generator for all --num samples: a sample's noise depends on the seed and its index, not on the
batch size. Weights, adapter and conditioning are checked for NaN/inf and --out for writability before sampling.
"""
import argparse
import contextlib
import json
import os
import sys

import torch
from tqdm.auto import tqdm

import conditioning
import sampling
import solver
from sampling import SampleError
from scale import parallel
from storage import checkpoint, latents
from teacher import uses_cfg
from tools import checks


def decode(x, meta, args, names=None):
    """Videos of latents: pixel-space ones directly (GIF + MP4), else through the VAE (--decode), else say how; names:
    one file name (no extension) per sample, e.g. its prompt's."""
    from storage import video_io
    if meta.get("pixel_space"):
        paths = []
        for i, v in enumerate(tqdm(x, desc="videos", unit="sample", leave=False)):  # [3, F, H, W] in [-1, 1]
            for ext in (".gif", ".mp4"):
                try:
                    stem = names[i] if names else f"sample_{i:03d}"
                    paths.append(video_io.write_video(v, os.path.join(args.out, stem + ext), args.fps))
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
    out = [os.path.join(args.out, f"{n}.mp4") for n in names] if names else os.path.join(args.out, "sample.mp4")
    return video_io.decode_to_video(x, meta["model"], args.decode, out, args.fps, device=args.device)


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
    a("--cond", help="conditioning file (latents.load_cond), batch 1 or --num")
    a("--prompt", action="append", help="text to sample (repeatable; one video per prompt, named after it): encoded "
      "with the text encoder of --weights, which is freed before the transformer loads")
    a("--prompts", help="text file, one prompt per line (as --prompt)")
    a("--negative-prompt", help="--teacher with CFG and --prompt: the unconditional branch's text (default: '')")
    a("--weights", help="--prompt: the pipeline folder with text_encoder/, tokenizer/ (and vae/: also the default "
      "--decode); default: --ckpt itself when it is one (e.g. the authors' DCM_HY/)")
    a("--image", help="image-to-video models: the first frame (PNG/JPG at the video's size; VAE from --weights)")
    a("--uncond", help="--teacher with CFG (CogVideoX, Wan, flow models without guidance_embeds): the empty prompt's conditioning (default: the run's dataset's)")
    a("--frames", type=int, help="latent frames (default: the run's data, else the model config)")
    a("--height", type=int, help="latent height")
    a("--width", type=int, help="latent width")
    a("--guidance", type=float, help="CFG scale / embedded guidance (default: the run's, else 6.0)")
    a("--dtype", choices=sorted(sampling.DTYPES), help="default bf16 on cuda, fp32 on cpu")
    a("--device", default="auto", help="auto | cpu | cuda[:i]")
    a("--out", help="output folder (default samples/; with --latents: the latents' folder)")
    a("--decode", help="real models: local hub-layout folder with vae/: decode the latents to MP4")
    a("--sp", type=int, default=1, help="sequence parallel degree N: torchrun N processes sample one set together")
    a("--fps", type=int, default=8)
    a("--no-merge", action="store_true", help="dual expert: keep the detail LoRA unmerged (default: merged once)")
    a("--exact", action="store_true", help="the authors' HunyuanVideo student: our exact loop (guidance 6016 as "
      "trained, grid t) instead of their inference's (guidance 6000, t and latents in the model's dtype)")
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
    sampling.parse_schedule(args)  # --timesteps / --sigmas -> lists of numbers, checked
    args.points = solver.parse_points(args.points)
    if (explicit := not isinstance(args.points, str)) and (args.teacher or args.timesteps or args.sigmas or args.steps):
        raise SampleError("--points with grid indices sets the steps: not with --teacher, --timesteps, --sigmas or --steps")
    args.steps = len(args.points) if explicit else args.steps
    args.prompt_list = conditioning.prompt_args(args)
    args.out = checks.out_dir(args.out or (os.path.dirname(os.path.abspath(args.latents)) if args.latents else "samples"))
    args.device = str(checks.device(args.device))
    checkpoint.verify_checksums = args.verify != "none"
    args.dtype = sampling.DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    return args


def main(argv=None):
    """Sample (or only decode) as the flags say; returns a summary dict (latents [num, C, F, H, W] float32 cpu)."""
    args = parse_args(argv)
    if args.sp > 1 and parallel.get_group() is None:  # torchrun: the SP group samples the same latents, rank 0 writes
        world, weights = int(os.environ.get("WORLD_SIZE", 1)), args.ckpt and checkpoint.resolve(args.ckpt, "--ckpt").weights
        parallel.check(args.sp, checkpoint.read_config(weights) if weights and os.path.isdir(weights) else None, world)
        if world != args.sp:
            raise SampleError(f"--sp {args.sp}: sample.py runs one sequence-parallel group, launch exactly {args.sp} processes")
        with parallel.distributed(torch.device(args.device), args.sp), open(os.devnull, "w") as null, \
                contextlib.redirect_stdout(sys.stdout if parallel.lead() else null):
            return main(argv)
    if args.latents:
        with checks.naming(f"--latents {args.latents}"):
            x, meta = sampling.read_latents(args.latents)
        return {"latents": x, "videos": decode(x, meta, args), "out": args.out}
    prompts = args.prompt_list  # encoded first, the encoder freed, then the transformer (a 24 GB card's peak)
    encoded = conditioning.encode_for(args, prompts) if prompts else None
    model, info = sampling.load_student(args.ckpt, args.device, args.dtype, args.detail, args.teacher, args.steps,
                                        args.shift, "--ckpt", exact=args.exact)
    if info["mode"] == "dual" and not args.no_merge:
        model.merge_lora()  # one GEMM per detail linear instead of three (round-off differences only)
    cfg, grid, run, teacher = info["cfg"], info["grid"], info["run"], info["mode"] == "teacher"
    guidance = args.guidance if args.guidance is not None else run.get("guidance", 6.0)
    t, alpha, sigma, ks, custom = sampling.points(info, args.steps, args.points, args.sigmas, args.timesteps)
    names, (f, h, w) = sampling.expert_names(info, t[:-1]), sampling.latent_size(info, args.frames, args.height, args.width)
    checks.sampling_memory(cfg, args.num, min(args.batch_size or args.num, args.num), (f, h, w), args.dtype, args.device)
    if info["mode"] in ("dual", "od") and len(set(names)) == 1:
        print(f"warning: --steps {len(names)} on a dual expert: only the {names[0]} expert runs "
              f"(steps are split between the experts, noisiest phase first)", file=sys.stderr)
    cfg_teacher = teacher and guidance != 1 and (uses_cfg(model) or not getattr(cfg, "guidance_embeds", False))  # + flow
    cond, uncond = conditioning.cond_and_uncond(args, info, encoded, len(prompts), cfg_teacher)
    n_steps = len(t) - 1
    meta = {"seed": args.seed, "steps": n_steps, "grid_indices": ks, "t": t.tolist(), "sigmas": sigma.tolist(),
            "schedule": custom or None, "experts": names, "mode": info["mode"], "ckpt": info["folder"],
            "detail": args.detail, "guidance": guidance, "model": sampling.model_name(cfg), "pixel_space": info["pixel_space"],
            "dtype": str(args.dtype), "device": args.device, "lora_merged": info["mode"] == "dual" and not args.no_merge,
            **({"prompts": prompts, "negative_prompt": args.negative_prompt or ""} if prompts else {})}
    if args.decode and not info["pixel_space"]:
        from storage import video_io
        video_io.vae_config(meta["model"], args.decode)  # a bad weights folder fails now, not after sampling
    routing = f", boundary_t {info['boundary_t']:.3f} (kappa {info['boundaries']})" if info["boundary_t"] else ""
    routing = f", detail expert where int(t) <= {info['threshold']} (the authors' rule)" if "threshold" in info else routing
    print(f"{info['folder']}: {info['mode']}{routing}; {grid.kind} grid N={grid.N}; {n_steps} steps; "
          f"latents {args.num} x [{(C := cfg.out_channels or cfg.in_channels)}, {f}, {h}, {w}] {args.dtype} on {args.device}")

    noise = torch.randn((args.num, C, f, h, w), generator=torch.Generator().manual_seed(args.seed))
    x, secs = sampling.generate(model, info, noise, cond, (t, alpha, sigma), guidance, uncond, args.batch_size,
                                args.device, progress=parallel.lead())
    for i, (k, name) in enumerate(zip(ks or ["-"] * n_steps, names)):
        print(f"step {i + 1}/{n_steps}: k={k} t={float(t[i]):.2f} sigma {float(sigma[i]):.4f} -> {float(sigma[i + 1]):.4f} "
              f"expert={name} {secs[i]:.3f} s")
    print(f"total {(total := sum(secs)):.3f} s, {total / n_steps:.3f} s/step ({args.num} samples)")

    if not parallel.lead():  # sequence parallel: every rank sampled the same latents, rank 0 writes them
        return {**meta, "latents": x, "path": None, "videos": [], "out": args.out}
    path = os.path.join(args.out, "latents.safetensors")
    checks.finite({"latents": x}, "the sampled latents (not written)")
    os.makedirs(args.out, exist_ok=True)
    latents.atomic_save_file({"latents": x}, path, metadata={k: json.dumps(v) for k, v in meta.items()})
    print(f"latents -> {path}")
    videos = decode(x, meta, args, conditioning.prompt_file_names(prompts) if prompts else None)
    print("".join(f"video -> {v}\n" for v in videos), end="")
    return {**meta, "latents": x, "path": path, "videos": videos, "seconds_per_step": secs, "seconds_total": total,
            "out": args.out}


def cli(argv=None):
    """main() as a command line: bad input is one `error:` line and exit 2 (tools/checks.cli)."""
    return checks.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
