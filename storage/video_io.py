"""Real video in and out: read and resize clips, the backbones' VAEs and text encoders (loaded from a
local copy of the model's hub repo), and latents -> MP4/GIF. Used by `python data.py encode` and sample.py.

The heavy packages (diffusers, transformers, imageio-ffmpeg, ...) are imported inside the functions that
need them, so the library imports without them: `pip install -r requirements-video.txt`.
"""
import importlib
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

INSTALL = "pip install -r requirements-video.txt"

# model name (model.py preset names) -> backbone family; the family fixes VAE class and text encoders (every Wan
# model: AutoencoderKLWan, whose config tells the Wan2.1 VAE from Wan2.2's, and umT5; Wan2.1-I2V also reads the CLIP
# vision model WEIGHTS/image_encoder + WEIGHTS/image_processor: storage/image_io.py)
MODELS = {"cogvideox-2b": "cogvideox", "cogvideox-5b": "cogvideox", "hunyuan-video": "hunyuan",
          "wan2.1-t2v-1.3b": "wan", "wan2.1-t2v-14b": "wan", "wan2.1-i2v-14b-480p": "wan", "wan2.1-i2v-14b-720p": "wan",
          "wan2.2-t2v-a14b": "wan", "wan2.2-i2v-a14b": "wan", "wan2.2-ti2v-5b": "wan",
          "tiny-cogvideox": "cogvideox", "tiny-cogvideox-rope": "cogvideox", "tiny-hunyuan": "hunyuan", "tiny-wan": "wan",
          "tiny-wan-i2v": "wan", "tiny-wan2.2-i2v": "wan", "tiny-wan2.2-ti2v": "wan"}
# default clip size per family: CogVideoX is trained on 49 frames 480x720 (13 latent frames);
# HunyuanVideo on many sizes, 33 frames 544x960 is the one the benchmarks in DESIGN.md use;
# Wan2.1: 81 frames 480x832 (21 x 60 x 104 latents), the authors' Wan distillation size
DEFAULT_SIZE = {"cogvideox": (49, 480, 720), "hunyuan": (33, 544, 960), "wan": (81, 480, 832)}
# ... and per model where the release differs (the Wan-AI model cards): 720p models 81 x 720 x 1280 (21 x 90 x 160);
# TI2V-5B 121 x 704 x 1280 (its 4x16x16 VAE: 31 x 44 x 80 latents)
MODEL_SIZE = {"wan2.1-i2v-14b-720p": (81, 720, 1280), "wan2.2-t2v-a14b": (81, 720, 1280),
              "wan2.2-i2v-a14b": (81, 720, 1280), "wan2.2-ti2v-5b": (121, 704, 1280)}
# the frame rate a release was trained at (pass it as --fps to resample; the clips are read at their own rate
# otherwise): CogVideoX 8, Wan 16, Wan2.2-TI2V-5B 24
FPS = {"cogvideox": 8, "wan": 16, "wan2.2-ti2v-5b": 24}
VAE_CLASS = {"cogvideox": "AutoencoderKLCogVideoX", "hunyuan": "AutoencoderKLHunyuanVideo", "wan": "AutoencoderKLWan"}
PATCH = 2  # the transformers patchify latents 2x2, so pixel sizes must be multiples of 2 * VAE ratio

T5_LEN = 226    # CogVideoX: T5 tokens, padded to exactly this length, no mask
LLAMA_LEN = 256  # HunyuanVideo: Llama tokens after the template prefix is cropped, with mask
UMT5_LEN = 512  # Wan: umT5 states of the real tokens, zero-padded to 512, no mask (WanPipeline)
CLIP_LEN = 77
LLAMA_SKIP = 2  # HunyuanVideo takes the Llama hidden state 2 layers before the last: hidden_states[-3]
HUNYUAN_CROP = 95  # the template prefix length in tokens of the real (LLaVA-Llama-3) tokenizer, per diffusers
# HunyuanVideo's prompt template (the text its transformer was trained with); the tokens before "{}"
# are encoded for context and then cropped away
HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")


class VideoError(ValueError):
    """One input video that cannot be used (unreadable, too short); the encoder reports and skips it."""


def require(module, package=None):
    """Import an optional package or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{package or module} is not installed; it is needed for real videos, VAEs and "
                          f"text encoders: {INSTALL}") from e


def model_family(model):
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    return MODELS[model]


def native_fps(model):
    """The frame rate the model was trained at (FPS), None where not recorded."""
    return FPS.get(model) or FPS.get(model_family(model))


def weights_path(weights, sub):
    """WEIGHTS/sub of a local hub-layout model folder, with a clear error when it is not there."""
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"weights folder {weights!r} does not exist (expected a local copy of the "
                                f"model's hub repo: vae/, text_encoder/, tokenizer/, ...)")
    path = os.path.join(weights, sub)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: {weights} must have the hub layout (vae/, text_encoder/, "
                                f"tokenizer/, for HunyuanVideo text_encoder_2/, tokenizer_2/, for Wan2.1-I2V "
                                f"image_encoder/, image_processor/)")
    return path


def vae_config(model, weights):
    """vae/config.json, checked to be the VAE class of the model's family."""
    path = os.path.join(weights_path(weights, "vae"), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (a diffusers VAE folder has config.json + weights)")
    with open(path) as f:
        cfg = json.load(f)
    want = VAE_CLASS[model_family(model)]
    if cfg.get("_class_name") != want:
        raise ValueError(f"{path}: _class_name {cfg.get('_class_name')!r}, but {model} needs {want}")
    if cfg.get("shift_factor"):
        raise ValueError(f"{path}: shift_factor {cfg['shift_factor']} is not supported (latents are only scaled)")
    return cfg


def vae_ratios(cfg):
    """(temporal, spatial) compression of a VAE config (CogVideoX's spatial ratio is implied by its depth;
    Wan's by its depth, its temporal down-sampling flags and its pixel patch: 4x / 8x for Wan2.1's, 4x / 16x for
    Wan2.2's, whose `patch_size` 2 folds 2x2 pixels into channels first)."""
    if "temperal_downsample" in cfg:  # AutoencoderKLWan (diffusers' spelling)
        spatial = 2 ** (len(cfg["dim_mult"]) - 1) * (cfg.get("patch_size") or 1)
        return 2 ** sum(map(bool, cfg["temperal_downsample"])), spatial
    spatial = cfg.get("spatial_compression_ratio") or 2 ** (len(cfg["block_out_channels"]) - 1)
    return int(cfg.get("temporal_compression_ratio", 4)), int(spatial)


def latent_scale(cfg):
    """How a VAE config's latents become the backbone's: {"vae_scaling_factor"} (multiply), or for Wan also
    the per-channel {"vae_latents_mean", "vae_latents_std"} (subtract, divide; then the factor is 1)."""
    if cfg.get("latents_mean") is not None:
        return {"vae_scaling_factor": 1.0, "vae_latents_mean": list(cfg["latents_mean"]),
                "vae_latents_std": list(cfg["latents_std"])}
    return {"vae_scaling_factor": cfg["scaling_factor"]}


def _mean_inv_std(vae):
    """Wan: (latents_mean, 1 / latents_std) [1, C, 1, 1, 1] float32 of the VAE config; None for other VAEs."""
    c = vae.config
    if c.get("latents_mean") is None:
        return None
    view = (1, -1, 1, 1, 1)
    return torch.tensor(c["latents_mean"]).view(view), 1.0 / torch.tensor(c["latents_std"]).view(view)


def clip_size(model, cfg, frames=None, height=None, width=None):
    """Pixel clip size (defaults per model or family) checked against the VAE: frames 4k+1, sides multiples of twice
    the VAE's spatial ratio (the transformer's 2x2 patches)."""
    d_frames, d_height, d_width = MODEL_SIZE.get(model) or DEFAULT_SIZE[model_family(model)]
    frames, height, width = frames or d_frames, height or d_height, width or d_width
    rt, rs = vae_ratios(cfg)
    if frames < 1 or (frames - 1) % rt:
        k = (frames - 1) // rt
        raise ValueError(f"frames={frames}: the VAE needs {rt}k+1 frames, e.g. {rt * k + 1} or {rt * (k + 1) + 1}")
    if height % (rs * PATCH) or width % (rs * PATCH) or height <= 0 or width <= 0:
        raise ValueError(f"{height}x{width}: height and width must be positive multiples of {rs * PATCH} "
                         f"(VAE {rs}x times the transformer's {PATCH}x{PATCH} patches)")
    return frames, height, width


def latent_shape(cfg, frames, height, width):
    """[C, F, H, W] of the latents of one clip."""
    rt, rs = vae_ratios(cfg)
    return [int(cfg.get("latent_channels") or cfg["z_dim"]), (frames - 1) // rt + 1, height // rs, width // rs]


# ---------------------------------------------------------------------------------------------- reading

def read_frames(path, frames, stride=1, fps=None):
    """The first `frames` frames (every `stride`-th, after resampling to `fps` if given) -> uint8 [F, H, W, 3]."""
    ffmpeg = require("imageio_ffmpeg", "imageio-ffmpeg")
    if not os.path.isfile(path):
        raise VideoError(f"{os.path.basename(path)}: no such file ({path})")
    gen = ffmpeg.read_frames(path, output_params=["-vf", f"fps={fps}"] if fps else None)
    out = []
    try:
        meta = next(gen)
        w, h = meta["size"]
        for i, buf in enumerate(gen):
            if i % stride == 0:
                out.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3))  # bytes -> [H, W, 3]
            if len(out) == frames:
                break
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
        why = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        raise VideoError(f"{os.path.basename(path)}: cannot be decoded ({why[-1]})") from e
    finally:
        gen.close()  # stops ffmpeg without reading the rest of a long file
    if len(out) < frames:
        raise VideoError(f"{os.path.basename(path)}: too short: {len(out)} usable frames (stride {stride}"
                         f"{f', {fps} fps' if fps else ''}), needs {frames}")
    return torch.from_numpy(np.stack(out))  # [F, H, W, 3]


def resize_center_crop(video, height, width):
    """uint8 [F, H, W, 3] -> float [3, F, height, width] in [-1, 1]: scale to cover the box, crop the centre."""
    x = video.permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, H, W]
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(-1, 1)
    return x.permute(1, 0, 2, 3).contiguous()  # [3, F, height, width]


def read_clip(path, frames, height, width, stride=1, fps=None):
    """A video file -> the model-ready clip float [3, F, height, width] in [-1, 1]."""
    return resize_center_crop(read_frames(path, frames, stride, fps), height, width)


# ------------------------------------------------------------------------------------------------- VAE

def load_vae(model, weights, device="cpu", dtype=torch.float32, tiling=False):
    """The model's VAE from WEIGHTS/vae (eval, frozen); tiling trades exactness at tile seams for memory."""
    diffusers = require("diffusers")
    vae_config(model, weights)
    cls = getattr(diffusers, VAE_CLASS[model_family(model)])
    vae = cls.from_pretrained(weights_path(weights, "vae"), torch_dtype=dtype, local_files_only=True)
    vae = vae.to(device).eval().requires_grad_(False)
    if tiling:
        vae.enable_tiling()
    return vae


@torch.no_grad()
def encode_latents(vae, video, posterior="sample", generator=None):
    """Pixels [B, 3, F, H, W] in [-1, 1] -> VAE latents times scaling_factor, or for Wan (z - mean) / std per
    channel (what the backbone consumes)."""
    dist = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
    if posterior == "sample":
        z = dist.sample(generator)
    elif posterior == "mode":
        z = dist.mode()
    else:
        raise ValueError(f"posterior={posterior!r}: expected 'sample' or 'mode'")
    if (norm := _mean_inv_std(vae)) is not None:
        return (z.float() - norm[0].to(z.device)) * norm[1].to(z.device)  # as the authors' normalize_dit_input
    return z.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents):
    """Backbone latents [B, C, F, H, W] -> pixels float [B, 3, 4(F-1)+1, rH, rW] in [-1, 1] (r: the VAE's spatial
    ratio), a clip at a time."""
    norm = _mean_inv_std(vae)
    if norm is None:
        unscale = lambda z: z / vae.config.scaling_factor  # noqa: E731
    else:  # WanPipeline: latents / (1 / std) + mean
        unscale = lambda z: z.float() / norm[1].to(z.device) + norm[0].to(z.device)  # noqa: E731
    out = [vae.decode(unscale(z[None]).to(vae.device, vae.dtype)).sample.float().cpu() for z in latents]
    return torch.cat(out).clamp(-1, 1)


def decode_to_video(latents, model_name, weights, out_path, fps=8, device=None, dtype=None):
    """Decode latents [B, C, F, H, W] with the model's VAE (tiled) and write each clip as an MP4/GIF.

    `weights` is the hub-layout folder or an already loaded VAE; out_path: one path per clip, or one path (with B > 1
    the files are its stem + `_{i}`). Returns the written paths."""
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, C, F, H, W], got {tuple(latents.shape)}")
    if isinstance(weights, torch.nn.Module):
        vae = weights
    else:
        device = torch.device(device or latents.device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        vae = load_vae(model_name, weights, device, dtype, tiling=True)
    stem, ext = os.path.splitext(out_path) if isinstance(out_path, str) else (None, None)
    paths = []
    for i in range(len(latents)):
        path = out_path[i] if stem is None else out_path if len(latents) == 1 else f"{stem}_{i}{ext}"
        write_video(decode_latents(vae, latents[i:i + 1])[0], path, fps)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- writing

def to_uint8(frames):
    """uint8 [F, H, W, 3], or float [C, F, H, W] in [-1, 1] with C = 1 or 3 -> uint8 numpy [F, H, W, 3]."""
    x = torch.as_tensor(frames).detach().cpu()
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [F, H, W, 3], got {tuple(x.shape)}")
        return x.numpy()
    if not x.is_floating_point() or x.dim() != 4 or x.shape[0] not in (1, 3):
        raise ValueError(f"float frames must be [C, F, H, W] with C = 1 or 3, got {x.dtype} {tuple(x.shape)}")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(3, *x.shape[1:]).permute(1, 2, 3, 0).contiguous().numpy()  # [C, F, H, W] -> [F, H, W, 3]


def write_video(frames, path, fps=8):
    """Write frames (see `to_uint8`) as .mp4 (H.264, yuv420p, crf 18) or .gif, chosen by path's extension."""
    x = to_uint8(frames)
    n, h, w, _ = x.shape
    ext = os.path.splitext(path)[1].lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".mp4":
        if h % 2 or w % 2:
            raise ValueError(f"{path}: H.264 (yuv420p) needs even sizes, frames are {h}x{w}; write a .gif instead")
        ffmpeg = require("imageio_ffmpeg", "imageio-ffmpeg")
        writer = ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
                                     macro_block_size=1, output_params=["-crf", "18"], ffmpeg_log_level="error")
        writer.send(None)
        for frame in x:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    elif ext == ".gif":
        Image = require("PIL.Image", "pillow")
        imgs = [Image.fromarray(frame) for frame in x]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=round(1000 / fps), loop=0)
    else:
        raise ValueError(f"{path}: unsupported video extension {ext!r} (use .mp4 or .gif)")
    return path


# --------------------------------------------------------------------------------------- text encoders

def _wan_clean(text):
    """WanPipeline's prompt cleaning: ftfy (if installed), HTML unescaped twice, whitespace collapsed."""
    import html
    import re
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class TextEncoder:
    """The model's text encoder(s) from WEIGHTS; `enc(prompts)` -> cond dict as the diffusers pipelines build it.

    CogVideoX: T5 last hidden state of exactly 226 tokens (padded, truncated, no mask) -> {"text"}.
    HunyuanVideo: Llama hidden_states[-3] of the templated prompt, the template prefix cropped, 256 tokens
    + mask, and the CLIP-L pooled output of 77 tokens -> {"text", "text_mask", "pooled"}.
    Wan: umT5 last hidden state of the cleaned prompt, its real tokens kept and zeros after them, 512
    tokens, no mask -> {"text"}."""

    def __init__(self, model, weights, device="cpu", dtype=torch.float32, batch_size=8):
        tf = require("transformers")
        self.family, self.device, self.dtype, self.batch_size = model_family(model), device, dtype, batch_size

        def load(cls, sub):
            m = getattr(tf, cls).from_pretrained(weights_path(weights, sub), dtype=dtype, local_files_only=True)
            return m.to(device).eval().requires_grad_(False)

        def tokenizer(sub):
            return tf.AutoTokenizer.from_pretrained(weights_path(weights, sub), local_files_only=True)

        self.tokenizer = tokenizer("tokenizer")
        if self.family == "cogvideox":
            self.encoder = load("T5EncoderModel", "text_encoder")
        elif self.family == "wan":
            self.encoder = load("UMT5EncoderModel", "text_encoder")
        else:
            self.encoder = load("LlamaModel", "text_encoder")
            self.tokenizer_2, self.encoder_2 = tokenizer("tokenizer_2"), load("CLIPTextModel", "text_encoder_2")
            # the prefix is cropped by token count; checked per batch to be a token boundary
            self.prefix_ids = self.tokenizer(HUNYUAN_TEMPLATE.split("{}")[0]).input_ids
            self.crop_start = len(self.prefix_ids)
            if model == "hunyuan-video" and self.crop_start != HUNYUAN_CROP:
                warnings.warn(f"{weights}/tokenizer: the prompt template prefix is {self.crop_start} tokens, the "
                              f"reference pipeline crops {HUNYUAN_CROP}: is this HunyuanVideo's tokenizer?")

    @torch.no_grad()
    def __call__(self, prompts):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        if not prompts:
            raise ValueError("no prompts to encode")
        parts = [self._encode(list(prompts[i:i + self.batch_size])) for i in range(0, len(prompts), self.batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _tokens(self, tokenizer, prompts, length, name):
        tok = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        for p, ids in zip(prompts, tokenizer(prompts).input_ids):
            if len(ids) > length:
                warnings.warn(f"prompt longer than {name}'s token limit, truncated: {p[-80:]!r}")
        return tok

    def _encode(self, prompts):
        if self.family == "cogvideox":
            ids = self._tokens(self.tokenizer, prompts, T5_LEN, "T5 (226)").input_ids
            return {"text": self.encoder(ids.to(self.device)).last_hidden_state}  # [B, 226, D]
        if self.family == "wan":
            tok = self._tokens(self.tokenizer, [_wan_clean(p) for p in prompts], UMT5_LEN, "umT5 (512)")
            mask = tok.attention_mask.to(self.device)
            hidden = self.encoder(tok.input_ids.to(self.device), mask).last_hidden_state  # [B, 512, D]
            return {"text": hidden * mask[..., None].to(hidden.dtype)}  # states after the real tokens -> 0
        c = self.crop_start
        tok = self._tokens(self.tokenizer, [HUNYUAN_TEMPLATE.format(p) for p in prompts], c + LLAMA_LEN,
                           "Llama (256)")
        if not (tok.input_ids[:, :c] == torch.tensor(self.prefix_ids)).all():
            raise ValueError("the HunyuanVideo template prefix does not tokenize to the same tokens inside the "
                             "prompt, so it cannot be cropped by token count with this tokenizer")
        mask = tok.attention_mask.to(self.device)
        hidden = self.encoder(input_ids=tok.input_ids.to(self.device), attention_mask=mask,
                              output_hidden_states=True).hidden_states[-(LLAMA_SKIP + 1)]
        ids2 = self._tokens(self.tokenizer_2, prompts, CLIP_LEN, "CLIP (77)").input_ids
        pooled = self.encoder_2(ids2.to(self.device)).pooler_output  # [B, D_clip]
        return {"text": hidden[:, c:], "text_mask": mask[:, c:], "pooled": pooled}  # [B, 256, D], [B, 256]
