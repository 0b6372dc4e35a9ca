"""The conditioning of a sample run (sample.py, eval.py): prompts encoded with a pipeline folder's text encoder(s)
before the transformer loads, an image-to-video model's image condition from `--image` (storage/image_io.py, as
WanImageToVideoPipeline builds it), or the `--cond` / `--uncond` files of storage/latents.py's format.
"""
import os
import sys

import torch

import model as models
import sampling
from storage import checkpoint, image_io, latents
from teacher import uses_cfg
from tools import checks


def prompt_args(args):
    """The prompts of --prompt / --prompts ([] without them), checked with the flags they go with or exclude; sets
    --weights (default: --ckpt when it is a pipeline folder), --decode (default: --weights) and --num (one each)."""
    from storage import video_io
    image_args(args)
    prompts = list(args.prompt or [])
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise sampling.SampleError(f"--prompts {args.prompts} does not exist")
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
        if not prompts:
            raise sampling.SampleError(f"--prompts {args.prompts} holds no prompt")
    if not prompts:
        for flag in ("negative_prompt", "weights"):
            if getattr(args, flag) is not None:
                raise sampling.SampleError(f"--{flag.replace('_', '-')} goes with --prompt / --prompts")
        return []
    for flag in ("cond", "uncond", "latents"):
        if getattr(args, flag):
            raise sampling.SampleError(f"--prompt and --{flag} exclude each other: the prompts are encoded here")
    if args.num not in (1, len(prompts)):
        raise sampling.SampleError(f"--num {args.num}: with --prompt the videos are one per prompt ({len(prompts)})")
    if args.negative_prompt is not None and not args.teacher:
        raise sampling.SampleError("--negative-prompt: only --teacher samples with CFG; a student has no unconditional branch")
    args.ckpt = args.ckpt and checkpoint.hub_path(args.ckpt, "--ckpt")  # an org/name hub id: its local snapshot
    weights = args.weights and checkpoint.hub_path(args.weights, "--weights")
    weights = weights or (args.ckpt if args.ckpt and os.path.isdir(os.path.join(args.ckpt, "text_encoder")) else None)
    if weights is None:
        raise sampling.SampleError(f"--prompt needs the text encoder: --weights PIPELINE_FOLDER (text_encoder/, tokenizer/, "
                          f"vae/; --ckpt {args.ckpt} holds none)")
    try:
        video_io.weights_path(weights, "text_encoder"), video_io.weights_path(weights, "tokenizer")
    except FileNotFoundError as e:
        raise sampling.SampleError(f"--weights: {e}") from None
    args.weights, args.num = weights, len(prompts)
    args.decode = args.decode or (weights if os.path.isdir(os.path.join(weights, "vae")) else None)
    return prompts


def image_args(args):
    """--image PATH, checked before anything loads: an image-to-video model (or TI2V), a pipeline folder with vae/
    (--weights, else --ckpt when it is one; sets --weights)."""
    if not getattr(args, "image", None):
        return
    if not os.path.isfile(args.image):
        raise sampling.SampleError(f"--image {args.image} does not exist")
    if args.latents or args.cond:
        raise sampling.SampleError("--image goes with --prompt / --uncond or the run's conditioning, not --cond / --latents")
    cfg, run = sampling.checkpoint_config(args.ckpt, "--ckpt")
    if image_name(cfg) is None:
        raise sampling.SampleError(f"--image: {args.ckpt} is a text-to-video model ({type(cfg).__name__}, in_channels "
                          f"{cfg.in_channels}); image-to-video needs an I2V or TI2V model")
    weights = args.weights and checkpoint.hub_path(args.weights, "--weights")
    args.weights = weights or (args.ckpt if os.path.isdir(os.path.join(args.ckpt, "vae")) else None)
    if args.weights is None or not os.path.isdir(os.path.join(args.weights, "vae")):
        raise sampling.SampleError(f"--image needs the model's VAE: --weights PIPELINE_FOLDER with vae/ (and image_encoder/ for "
                          f"Wan2.1-I2V); {args.weights or args.ckpt} holds none")
    from storage import video_io
    (_, h, w), _ = sampling.latent_choice({"cfg": cfg, "run": run}, args.frames, args.height, args.width)
    with checks.naming(f"--weights {args.weights}"):
        rs = video_io.vae_ratios(video_io.vae_config(image_name(cfg), args.weights))[1]
    with checks.naming(f"--image {args.image}"):
        image_io.read_image(args.image, h * rs, w * rs)  # the video's pixel size, checked before anything loads


def image_name(cfg):
    """The preset name (video_io's) of an image-to-video model's config (TI2V: a first-frame one), else None."""
    i2v = cfg.in_channels > (getattr(cfg, "out_channels", None) or cfg.in_channels)
    first = next((n for n in image_io.FIRST_FRAME if models.PRESETS[n] == cfg), None)
    return first or (sampling.model_name(cfg) if i2v else None)


def image_cond(args, info, n):
    """The image keys of --image for n samples (storage/image_io: WanImageToVideoPipeline's condition and, for
    Wan2.1-I2V, CLIP embeds) at the sample's latent size; the image must have the video's pixel size."""
    from storage import video_io
    cfg, name = info["cfg"], image_name(info["cfg"])
    f, h, w = sampling.latent_size(info, args.frames, args.height, args.width)
    with checks.naming(f"--weights {args.weights}"):
        vae = video_io.load_vae(name, args.weights, args.device)
        rt, rs = video_io.vae_ratios(vae.config)
        mode = image_io.mode(name, cfg, image_cond=True)
        enc = image_io.ImageEncoder(name, cfg, args.weights, vae, mode, (f - 1) * rt + 1, h * rs, w * rs, args.device)
    with checks.naming(f"--image {args.image}"):
        keys = enc(image_io.read_image(args.image, h * rs, w * rs)[None].to(args.device))
    print(f"image {args.image}: " + ", ".join(f"{k} {list(v.shape[1:])}" for k, v in keys.items()))
    return {k: v.expand(n, *v.shape[1:]) for k, v in keys.items()}


def encode_for(args, prompts):
    """sample.py's prompts (and a CFG --teacher's negative prompt, after them) encoded with --weights before anything
    else loads, checked against the checkpoint's model config."""
    cfg, run = sampling.checkpoint_config(args.ckpt, "--ckpt")
    guidance = args.guidance if args.guidance is not None else run.get("guidance", 6.0)
    cfg_teacher = args.teacher and guidance != 1 and (uses_cfg(models.build_transformer(cfg, device="meta"))
                                                      or not getattr(cfg, "guidance_embeds", False))
    texts = prompts + ([args.negative_prompt or ""] if cfg_teacher else [])
    print(f"encoding {len(prompts)} prompt(s){' + the negative prompt' if cfg_teacher else ''} with {args.weights}")
    with checks.naming(f"--weights {args.weights}"):
        encoded = encode_prompts(sampling.model_name(cfg), args.weights, texts, args.device, args.dtype)
    latents.check_fits(cfg, encoded, where=f"the prompts encoded with {args.weights}")
    return encoded


def encode_prompts(name, weights, prompts, device="cpu", dtype=torch.float32):
    """{key: [len(prompts), ...] float32 on the cpu}: the prompts through the text encoder(s) of the pipeline folder
    `weights` (storage/video_io.TextEncoder, as data.py encode-prompts), which are freed before this returns: on a
    24 GB card the encoder (umT5-XXL, Llama) is the memory peak, so it runs before the transformer is loaded."""
    from storage import video_io
    enc = video_io.TextEncoder(name, weights, device, dtype)
    cond = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in enc(list(prompts)).items()}
    del enc
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return cond


def prompt_file_names(prompts):
    """A file name (no extension) for each prompt's video: its text, path separators and control characters out, at
    most 150 characters (as the authors' scripts cut it), made unique with -1, -2, ..."""
    taken, out = set(), []
    for prompt in prompts:
        stem = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in prompt).strip().rstrip(".")[:150]
        name, i = stem or "prompt", 1
        while name in taken:
            name, i = f"{stem or 'prompt'}-{i}", i + 1
        taken.add(name)
        out.append(name)
    return out


def cond_and_uncond(args, info, encoded, n_prompts, cfg_teacher):
    """(cond, uncond or None) of a sample run: the encoded prompts (and negative prompt after them), else --cond /
    --uncond files (get_cond)."""
    image = image_cond(args, info, args.num) if getattr(args, "image", None) else {}  # the same in both CFG branches
    if not image and (cfg := info["cfg"]).in_channels > (getattr(cfg, "out_channels", None) or cfg.in_channels):
        raise sampling.SampleError(f"{info['folder']} is an image-to-video model: give --image FIRST_FRAME (with --weights)")
    if encoded is not None:
        return ({k: v[:n_prompts] for k, v in encoded.items()} | image,
                {k: v[n_prompts:] for k, v in encoded.items()} if cfg_teacher else None)
    cond = get_cond(args.cond, info, args.num) | image
    return cond, get_cond(args.uncond, info, 1, "uncond") if cfg_teacher else None


def get_cond(path, info, n, what="cond"):
    """Conditioning for n samples: a latents.load_cond file (batch 1 or n), else the dataset's uncond or zeros."""
    cfg, run, pooled = info["cfg"], info["run"], getattr(info["cfg"], "pooled_projection_dim", None)
    if not path and run.get("data") and os.path.isfile(os.path.join(run["data"], "uncond.safetensors")):
        path = os.path.join(run["data"], "uncond.safetensors")
        print(f"warning: no --{what}: using the unconditional conditioning of the run's dataset ({path})", file=sys.stderr)
    elif not path and any(models.PRESETS.get(r) == cfg for r in sampling.RELEASED):
        raise sampling.SampleError(f"--{what} FILE is required for {sampling.model_name(cfg)} (make one: python data.py encode-prompts "
                          "--model NAME --weights WEIGHTS --prompts prompts.txt --out FILE)")
    elif not path:
        print(f"warning: no --{what}: sampling with all-zero conditioning", file=sys.stderr)
    if path:
        cond = latents.load_cond(path)
    else:  # text tokens: CogVideoX's fixed T5 length, HunyuanVideo's 256 Llama tokens, Wan's 512 umT5 tokens
        n_text = getattr(cfg, "max_text_seq_length", 512 if isinstance(cfg, models.WanConfig) else 256)
        cond = {"text": torch.zeros(1, n_text, latents.text_width(cfg))}
        cond.update({"pooled": torch.zeros(1, pooled)} if pooled else {})
    latents.check_fits(cfg, cond, where=path or "all-zero conditioning")
    checks.finite(cond, f"--{what} {path}")
    if (b := cond["text"].shape[0]) not in (1, n):
        raise sampling.SampleError(f"{path}: conditioning batch {b} must be 1 or --num {n}")
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
