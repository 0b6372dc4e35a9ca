"""`python data.py encode | encode-prompts | synthetic`: the command that fills a dataset folder (the format and its
reader: storage/latents.py). `encode` encodes a folder of videos + captions (VAE and text encoders:
storage/video_io.py), `encode-prompts` writes a conditioning file for sample.py from prompts, `synthetic` random
latents and conditioning for a preset (no weights needed).

`python data.py synthetic` / `encode` refuse a folder that already holds a dataset unless --overwrite (which
removes its files first); `encode` goes on with its own unfinished encoding when the settings are the same.
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

from storage import image_io
from storage.latents import (DataError, atomic_save_file, atomic_write_json, check_fits, clear_for_new, save_cond,
                             shard_name, text_width, write_manifest, write_shard)
from tools import checks

# Filling a dataset from real videos: `python data.py encode ...` and `python data.py encode-prompts ...`.
# The VAE/text-encoder work lives in storage/video_io.py (optional packages: pip install -r requirements-video.txt).

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_captions(path, names):
    """One caption per video: a .json object {file name: caption}, or text with one caption per line in
    the order of the sorted video file names."""
    if not os.path.isfile(path):
        raise DataError(f"captions file {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise DataError(f"{path}: must be a JSON object {{video file name: caption}}")
        missing = [n for n in names if n not in table]
        if missing:
            raise DataError(f"{path}: no caption for {len(missing)} of the videos, e.g. {missing[:3]}")
        return [table[n] for n in names]
    with open(path) as f:
        lines = f.read().rstrip("\n").split("\n")
    if len(lines) != len(names):
        raise DataError(f"{path} has {len(lines)} captions (one per line) for {len(names)} videos; they are "
                        f"matched by line to the sorted file names ({names[0]} ... {names[-1]})")
    return lines


def shard_info(dir, index):
    """(num samples, metadata) of a finished shard, without loading its tensors."""
    from safetensors import safe_open
    with safe_open(os.path.join(dir, shard_name(index)), "pt") as f:
        return f.get_slice("latents").get_shape()[0], f.metadata() or {}


def _device_dtype(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def encode_dataset(videos, captions, model, weights, out, frames=None, height=None, width=None, shard_size=32,
                   stride=1, fps=None, posterior="sample", seed=0, device=None, dtype=None,
                   save_dtype="float32", tiling=False, progress=True, overwrite=False, image_cond=False):
    """Encode a folder of videos + captions into a dataset folder (format above); resumable (same settings); a
    folder holding another dataset is refused unless `overwrite` (which removes its files first); image-to-video
    models (TI2V with `image_cond`) also get the image keys of each clip's first frame (storage/image_io.py); -> manifest."""
    from tqdm import tqdm

    import model as models
    from storage import video_io
    video_io.model_family(model)  # an unknown --model fails here
    image_mode = image_io.mode(model, models.PRESETS[model], image_cond)
    if not os.path.isdir(videos):
        raise DataError(f"videos folder {videos} does not exist")
    names = sorted(n for n in os.listdir(videos) if n.lower().endswith(VIDEO_EXTS))
    if not names:
        raise DataError(f"{videos} holds no videos ({', '.join(VIDEO_EXTS)})")
    caps = read_captions(captions, names)
    if shard_size < 1 or stride < 1 or posterior not in ("sample", "mode"):
        raise DataError(f"shard_size ({shard_size}) and stride ({stride}) must be >= 1, posterior "
                        f"({posterior!r}) 'sample' or 'mode'")
    cfg = video_io.vae_config(model, weights)
    if image_mode:  # the VAE and the image encoder fit the model, before anything loads
        image_io.check(model, models.PRESETS[model], weights, cfg, image_mode)
    frames, height, width = video_io.clip_size(model, cfg, frames, height, width)
    shape = video_io.latent_shape(cfg, frames, height, width)
    settings = dict(model=model, frames=frames, height=height, width=width, stride=stride, fps=fps,
                    posterior=posterior, seed=seed, shard_size=shard_size, save_dtype=save_dtype, videos=names,
                    **({"image_cond": image_mode} if image_mode else {}))
    settings_path = os.path.join(out, "encode.json")
    if os.path.isfile(settings_path) and not overwrite:  # resuming: finished shards are only valid for the same inputs
        old = checks.read_json(settings_path, "encode settings")
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            raise DataError(f"{out} was encoded with other settings ({', '.join(diff)} differ); "
                            "pass --overwrite to encode it again from scratch, or use a new --out folder")
    else:  # a new encoding, never mixed with another dataset's files
        clear_for_new(out, overwrite)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(settings, settings_path)

    n_shards = -(-len(names) // shard_size)
    todo = [s for s in range(n_shards) if not os.path.isfile(os.path.join(out, shard_name(s)))]
    uncond_path = os.path.join(out, "uncond.safetensors")
    device, dtype = _device_dtype(device, dtype)
    sdtype = DTYPES[save_dtype]
    cast = lambda d: {k: v.to(sdtype) if v.is_floating_point() else v for k, v in d.items()}  # noqa: E731
    if todo or not os.path.isfile(uncond_path):
        text_encoder = video_io.TextEncoder(model, weights, device, dtype)
        uncond = {k: v.cpu() for k, v in cast(text_encoder([""])).items()}
        atomic_save_file(uncond, uncond_path)
    else:
        uncond = load_file(uncond_path)
    vae = video_io.load_vae(model, weights, device, dtype, tiling) if todo else None
    images = todo and image_mode and image_io.ImageEncoder(model, models.PRESETS[model], weights, vae, image_mode,
                                                           frames, height, width, device, dtype)

    bar = tqdm(total=sum(min(shard_size, len(names) - s * shard_size) for s in todo), unit="video",
               disable=not progress, desc=f"encoding {len(todo)}/{n_shards} shards")
    for s in todo:
        latents, kept, skipped, conds = [], [], [], []
        for i in range(s * shard_size, min((s + 1) * shard_size, len(names))):
            bar.update()
            try:
                clip = video_io.read_clip(os.path.join(videos, names[i]), frames, height, width, stride, fps)
            except video_io.VideoError as e:
                skipped.append({"video": names[i], "reason": str(e)})
                bar.write(f"skipping {e}")  # the reason names the file
                continue
            g = torch.Generator(device).manual_seed(seed + i)  # per video: a resumed run draws the same noise
            z = video_io.encode_latents(vae, clip[None], posterior, g)[0].cpu()  # [C, F, H, W]
            if list(z.shape) != shape:
                raise DataError(f"{names[i]}: VAE gave latents {list(z.shape)}, expected {shape}")
            latents.append(z)
            kept.append(i)
            if images:  # the clip's own first frame, after its resize and crop
                conds.append(images(clip[None, :, 0]))
        if kept:
            tensors = {"latents": torch.stack(latents), **text_encoder([caps[i] for i in kept])}
            tensors |= {k: torch.cat([c[k] for c in conds]) for k in (conds[0] if conds else ())}
        else:  # every video failed: an empty shard still records that they were tried
            tensors = {"latents": torch.zeros(0, *shape), **{k: v[:0] for k, v in uncond.items()}}
            tensors |= {k: torch.zeros(0, *s) for k, s in (images.shapes.items() if images else ())}
        meta = {"videos": json.dumps([names[i] for i in kept]), "skipped": json.dumps(skipped)}
        write_shard(out, s, {k: v.cpu() for k, v in cast(tensors).items()}, metadata=meta)
    bar.close()

    shards, skipped = [], []
    for s in range(n_shards):
        num, meta = shard_info(out, s)
        shards.append({"file": shard_name(s), "num": num})
        skipped += json.loads(meta.get("skipped", "[]"))
    scale = video_io.latent_scale(cfg)  # Wan: per-channel mean/std recorded next to the factor 1
    manifest = write_manifest(out, model=model, latent_shape=shape, vae_scaling_factor=scale.pop("vae_scaling_factor"),
                              shards=shards, uncond=uncond, extra={**scale, "skipped": skipped, "encode": settings,
                                                                   **({"image_cond": image_mode} if image_mode else {})})
    print(f"{out}: {manifest['num_samples']} videos in {n_shards} shards, {len(skipped)} skipped"
          + "".join(f"\n  skipped {x['reason']}" for x in skipped))
    return manifest


def encode_prompts(prompts, model, weights, out, device=None, dtype=None):
    """A conditioning file for sample.py from a text file with one prompt per line (an empty line = uncond)."""
    from storage import video_io
    if not os.path.isfile(prompts):
        raise DataError(f"prompts file {prompts} does not exist")
    with open(prompts) as f:
        lines = f.read().rstrip("\n").split("\n")
    cond = video_io.TextEncoder(model, weights, *_device_dtype(device, dtype))(lines)
    save_cond({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in cond.items()}, out)
    print(f"{out}: {len(lines)} prompts, " + ", ".join(f"{k} {list(v.shape)}" for k, v in cond.items()))
    return cond


def synthetic_dataset(model, out, num=8, frames=2, height=4, width=4, text_len=8, seed=0, overwrite=False,
                      image_cond=False):
    """A dataset of random latents and conditioning for `model` (a preset): no VAE or text encoder needed, for
    trying the commands on the tiny presets. HunyuanVideo-style models get pooled vectors and a text mask,
    image-to-video models (TI2V with `image_cond`) image keys (image_io.synthetic).
    A folder already holding a dataset is refused unless `overwrite` (its files are removed first)."""
    import model as models
    if model not in models.PRESETS:
        raise DataError(f"--model {model!r} is not a preset; known: {', '.join(models.PRESETS)}")
    cfg, g = models.PRESETS[model], torch.Generator().manual_seed(seed)
    if min(num, frames, height, width, text_len) < 1:
        raise DataError("--num, --frames, --height, --width and --text-len must be >= 1")
    shape, image_mode = [image_io.latent_channels(cfg), frames, height, width], image_io.mode(model, cfg, image_cond)
    check_fits(cfg, latent_shape=shape, where=f"--frames {frames} --height {height} --width {width}")
    checks.memory(4 * num * (np.prod(shape) + text_len * text_width(cfg)), f"{num} synthetic samples (--num)")
    t = {"latents": torch.randn(num, *shape, generator=g), "text": torch.randn(num, text_len, text_width(cfg), generator=g)}
    t |= image_io.synthetic(cfg, t["latents"], image_mode, g)
    un = {"text": torch.zeros(1, text_len, text_width(cfg))}
    if pooled := getattr(cfg, "pooled_projection_dim", None):
        real = (torch.arange(text_len) < max(1, text_len // 2)).long()  # right-padded prompts
        t |= {"pooled": torch.randn(num, pooled, generator=g), "text_mask": real.repeat(num, 1)}
        un |= {"pooled": torch.zeros(1, pooled), "text_mask": (torch.arange(text_len) < 1).long()[None]}
    clear_for_new(out, overwrite)
    write_shard(out, 0, t)
    manifest = write_manifest(out, model=model, latent_shape=shape, vae_scaling_factor=1.0,
                              shards=[{"file": shard_name(0), "num": num}], uncond=un,
                              extra={"synthetic": True, **({"image_cond": image_mode} if image_mode else {})})
    print(f"{out}: {num} synthetic samples for {model}, latents {shape}, text [{text_len}, {text_width(cfg)}]"
          + "".join(f", {k} {list(t[k].shape[1:])}" for k in image_io.KEYS if k in t))
    return manifest


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="data.py", description="Encode real videos/prompts for DCM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="videos + captions -> latent dataset folder")
    e.add_argument("--videos", required=True, help="folder of video files (sorted by name)")
    e.add_argument("--captions", required=True, help=".txt one caption per line (sorted video order) or .json")
    e.add_argument("--out", required=True, help="dataset folder (an unfinished one, same settings: resumes)")
    e.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default: the model's, storage/video_io.py)")
    e.add_argument("--height", type=int, help="default: 480 CogVideoX / Wan, 544 HunyuanVideo, 720 Wan 720p")
    e.add_argument("--width", type=int, help="default: 720 CogVideoX, 960 HunyuanVideo, 832 Wan, 1280 Wan 720p")
    e.add_argument("--shard-size", type=int, default=32)
    e.add_argument("--stride", type=int, default=1, help="take every stride-th frame")
    e.add_argument("--fps", type=float, help="resample videos to this frame rate first (the releases': CogVideoX 8, "
                   "Wan 16, Wan2.2-TI2V-5B 24)")
    e.add_argument("--posterior", choices=["sample", "mode"], default="sample",
                   help="latent_dist.sample() (seeded per video) or its mean")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--save-dtype", choices=sorted(DTYPES), default="float32")
    e.add_argument("--tiling", action="store_true", help="tiled VAE encode (less memory, seams)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (its files are removed first; default: refuse)")
    q = sub.add_parser("encode-prompts", help="prompts file -> conditioning file for sample.py")
    q.add_argument("--prompts", required=True, help="text file, one prompt per line")
    q.add_argument("--out", required=True, help="FILE.safetensors")
    y = sub.add_parser("synthetic", help="random latents + conditioning for a preset (no weights needed)")
    y.add_argument("--model", required=True, help="a preset, e.g. tiny-hunyuan, tiny-cogvideox")
    y.add_argument("--out", required=True, help="dataset folder")
    y.add_argument("--num", type=int, default=8, help="number of samples")
    for k, v in (("frames", 2), ("height", 4), ("width", 4), ("text-len", 8), ("seed", 0)):
        y.add_argument(f"--{k}", type=int, default=v, help=f"default {v}" + (" (latent size)" * (k in "frames height width")))
    y.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (its files are removed first; default: refuse)")
    for a in (e, y):
        a.add_argument("--image-cond", action="store_true", help="TI2V-5B: store the first frame's image condition "
                       "(image-to-video models always store theirs)")
    for a in (e, q):
        a.add_argument("--model", required=True, help="a preset: cogvideox-2b, hunyuan-video, wan2.1-t2v-1.3b, "
                       "wan2.1-i2v-14b-480p, wan2.2-ti2v-5b, ... (storage/video_io.py: MODELS)")
        a.add_argument("--weights", required=True, help="local hub-layout folder: vae/, text_encoder/, tokenizer/...")
        a.add_argument("--device", help="default: cuda if available")
        a.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on cuda, else fp32)")
    args = p.parse_args(argv)

    def run(_):
        if args.cmd == "synthetic":
            return synthetic_dataset(args.model, args.out, args.num, args.frames, args.height, args.width,
                                     args.text_len, args.seed, args.overwrite, args.image_cond)
        if args.cmd == "encode":
            return encode_dataset(args.videos, args.captions, args.model, args.weights, args.out, args.frames,
                                  args.height, args.width, args.shard_size, args.stride, args.fps, args.posterior,
                                  args.seed, args.device, args.dtype, args.save_dtype, args.tiling,
                                  overwrite=args.overwrite, image_cond=args.image_cond)
        return encode_prompts(args.prompts, args.model, args.weights, args.out, args.device, args.dtype)
    return checks.cli(run)  # bad input: one line, exit 2


if __name__ == "__main__":
    main()
