"""The image condition of image-to-video models, as diffusers' WanImageToVideoPipeline builds it from an image
(for a dataset: the clip's own first frame, after the clip's resize and crop). Used by `python data.py encode`.

Per-sample keys, next to "latents" [C, F, H, W] (C = the VAE's channels = the model's out_channels):

  image_latents  image-to-video models (in_channels > out_channels: Wan2.1-I2V, Wan2.2-I2V-A14B): the pipeline's
                 `condition` [rt + C, F, H, W] = rt first-frame mask channels (rt = the VAE's temporal ratio, 4;
                 1 on latent frame 0, 0 after it), then the VAE's mode ("argmax") of the image followed by
                 4(F-1) zero frames, normalised as the latents ((z - mean) / std); Wan: [20, 21, 60, 104].
                 TI2V-5B with --image-cond (the pipeline's `expand_timesteps`): the normalised VAE mode of the
                 image alone [C, 1, H, W] ([48, 1, 44, 80] at 121 x 704 x 1280), the clean first latent frame.
  image_embeds   Wan2.1-I2V (config `image_dim`): the pipeline's `encode_image`, the CLIP vision model's
                 hidden_states[-2] of the image through WEIGHTS/image_processor [257, 1280].

The unconditional branch of CFG sees the same image (the pipeline changes only the text), so the uncond file holds
no image keys. The condition is the VAE's mode even when the latents are `--posterior sample`, as the pipeline.
"""
import json
import os

import numpy as np
import torch

KEYS = ("image_latents", "image_embeds")
FIRST_FRAME = ("wan2.2-ti2v-5b", "tiny-wan2.2-ti2v")  # image condition = one clean first latent frame (opt in)


def latent_channels(cfg):
    """Channels of a model's latents: its out_channels (an I2V model takes more: the image condition), else in."""
    return getattr(cfg, "out_channels", None) or cfg.in_channels


def mode(model, cfg, image_cond=False):
    """The image condition a preset's data holds: 'concat' (an I2V model: always), 'first_frame' (TI2V with
    `image_cond`) or None; `image_cond` for a model that takes no image -> ValueError."""
    if cfg.in_channels > latent_channels(cfg):
        return "concat"
    if image_cond and model not in FIRST_FRAME:
        raise ValueError(f"--image-cond: {model} takes no image condition (image-to-video models always store it; "
                         f"it is an option for {', '.join(FIRST_FRAME)})")
    return "first_frame" if image_cond else None


def shapes(cfg, latent_shape, n_image=257):
    """{key: per-sample shape} of the image keys a model's data holds next to latents [C, F, H, W] (an I2V model's
    condition, else TI2V's first frame); n_image: the CLIP tokens (ViT-H/14 at 224: 257)."""
    C, f, h, w = latent_shape
    out = {"image_latents": [cfg.in_channels - C, f, h, w] if cfg.in_channels > C else [C, 1, h, w]}
    if getattr(cfg, "image_dim", None):
        out["image_embeds"] = [n_image, cfg.image_dim]
    return out


def problems(cfg, cond, latent_shape=None, need=False):
    """The image keys of batch-first tensors `cond` against a model config and latents [C, F, H, W] (else
    cond["latents"]): a list of mismatches; `need` (a dataset): an I2V model's keys must be there."""
    il, ie = cond.get("image_latents"), cond.get("image_embeds")
    if latent_shape is None and cond.get("latents") is not None:
        latent_shape = list(cond["latents"].shape[1:])
    i2v, dim, bad = cfg.in_channels > latent_channels(cfg), getattr(cfg, "image_dim", None), []
    missing = [k for k, v in (("image_latents", il if i2v else 0), ("image_embeds", ie if dim else 0)) if v is None]
    if need and missing:
        bad.append(f"no {' or '.join(missing)}: this image-to-video model needs the image condition (python data.py "
                   "encode stores it for an image-to-video --model)")
    if il is not None and not hasattr(cfg, "image_dim"):  # only Wan takes an image
        bad.append(f"image_latents {list(il.shape)}: the model takes no image condition")
    elif il is not None and latent_shape is not None:
        want = shapes(cfg, [latent_channels(cfg), *latent_shape[1:]])["image_latents"]
        if il.dim() != 5 or list(il.shape[1:]) != want:
            bad.append(f"image_latents are {list(il.shape)}, the model takes [B, {', '.join(map(str, want))}] "
                       f"with latents {list(latent_shape)}")
    if ie is not None and (not dim or ie.dim() != 3 or ie.shape[-1] != dim):
        bad.append(f"image_embeds are {list(ie.shape)}, the model takes "
                   + (f"[B, L, {dim}]" if dim else "none (no image_dim)"))
    return bad


def synthetic(cfg, latents, image_mode, g):
    """Random image keys for synthetic latents [n, C, F, H, W]: the mask as the pipeline's, latent frame 0 of the
    condition = the latents' (as the Wan VAE gives it: causal, the first frame encoded alone), the rest random."""
    if image_mode is None:
        return {}
    n, C = latents.shape[:2]
    want = shapes(cfg, list(latents.shape[1:]))
    if image_mode == "first_frame":
        out = {"image_latents": latents[:, :, :1].clone()}
    else:
        il = torch.randn(n, *want["image_latents"], generator=g)
        rt = il.shape[1] - C  # mask channels
        il[:, :rt] = 0.0
        il[:, :rt, 0] = 1.0
        il[:, rt:, 0] = latents[:, :, 0]
        out = {"image_latents": il}
    if "image_embeds" in want:
        out["image_embeds"] = torch.randn(n, *want["image_embeds"], generator=g)
    return out


@torch.no_grad()
def condition(vae, image, frames, image_mode):
    """Image float [B, 3, H, W] in [-1, 1] -> the pipeline's `condition` (module docstring) for clips of `frames`
    frames: WanImageToVideoPipeline.prepare_latents, batch by batch."""
    from storage import video_io
    x = image[:, :, None]  # [B, 3, 1, H, W]
    if image_mode == "concat":
        x = torch.cat([x, x.new_zeros(x.shape[0], 3, frames - 1, *x.shape[-2:])], dim=2)
    z = video_io.encode_latents(vae, x, "mode")  # (mode - mean) / std, as the latents
    if image_mode != "concat":
        return z
    rt = video_io.vae_ratios(vae.config)[0]
    mask = torch.zeros(z.shape[0], rt, *z.shape[2:], device=z.device, dtype=z.dtype)
    mask[:, :, 0] = 1  # the pipeline's mask: 1 on the image's (first) pixel frame, its rt copies = latent frame 0
    return torch.cat([mask, z], dim=1)


def to_pil(image):
    """Image float [3, H, W] in [-1, 1] -> a PIL RGB image (uint8, as an image file holds it)."""
    from PIL import Image

    from storage import video_io
    return Image.fromarray(video_io.to_uint8(image[:, None])[0])


def read_image(path, height, width, fit=False):
    """An image file -> float [3, height, width] in [-1, 1]; of another size: scaled to cover and centre-cropped as
    the clips if `fit`, else ValueError."""
    from storage import video_io
    Image = video_io.require("PIL.Image", "pillow")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise ValueError(f"image {path} cannot be read ({e})") from None
    if img.size != (width, height) and not fit:
        raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]} (width x height), the video {width}x{height}: "
                         "resize or crop it to the video's size")
    x = torch.from_numpy(np.asarray(img).copy())[None]  # [1, h, w, 3] uint8
    return video_io.resize_center_crop(x, height, width)[:, 0]


def check(model, cfg, weights, vae_config, image_mode):
    """Before anything loads: the VAE's channels against the model's image condition, and for Wan2.1-I2V the CLIP
    image encoder (its hidden size = the model's image_dim) and processor in WEIGHTS; ValueError / FileNotFoundError."""
    from storage import video_io
    C, rt = int(vae_config.get("latent_channels") or vae_config["z_dim"]), video_io.vae_ratios(vae_config)[0]
    want = cfg.in_channels - latent_channels(cfg) if image_mode == "concat" else cfg.in_channels
    if (rt + C if image_mode == "concat" else C) != want:
        raise ValueError(f"{weights}/vae gives {C} latent channels (temporal ratio {rt}): {model}'s image condition "
                         f"has {want} channels; is --weights the {model} pipeline folder?")
    if getattr(cfg, "image_dim", None):
        path = os.path.join(video_io.weights_path(weights, "image_encoder"), "config.json")
        video_io.weights_path(weights, "image_processor")
        try:
            with open(path) as f:
                c = json.load(f)
            hidden = c.get("hidden_size") or c.get("vision_config", {}).get("hidden_size")
        except (OSError, ValueError, AttributeError):
            hidden = None
        if hidden != cfg.image_dim:
            raise ValueError(f"{path}: hidden_size {hidden}, {model} takes CLIP image states of {cfg.image_dim}")


class ImageEncoder:
    """The image keys of a model's data from images float [B, 3, height, width] in [-1, 1] (module docstring), with
    the model's VAE (already loaded) and, for Wan2.1-I2V, the CLIP vision model + processor from WEIGHTS."""

    def __init__(self, model, cfg, weights, vae, image_mode, frames, height, width, device="cpu", dtype=torch.float32):
        from storage import video_io
        check(model, cfg, weights, vae.config, image_mode)
        self.vae, self.mode, self.frames, self.size, self.device = vae, image_mode, frames, (height, width), device
        self.clip = None
        if getattr(cfg, "image_dim", None):
            tf = video_io.require("transformers")
            self.processor = tf.CLIPImageProcessor.from_pretrained(video_io.weights_path(weights, "image_processor"),
                                                                   local_files_only=True)
            self.clip = tf.CLIPVisionModel.from_pretrained(video_io.weights_path(weights, "image_encoder"), dtype=dtype,
                                                           local_files_only=True).to(device).eval().requires_grad_(False)
            c = self.clip.config
            self.n_image = (c.image_size // c.patch_size) ** 2 + 1
        C = int(vae.config.get("latent_channels") or vae.config["z_dim"])
        shape = video_io.latent_shape(vae.config, frames, height, width)
        self.shapes = shapes(cfg, [C, *shape[1:]], getattr(self, "n_image", 257))  # per sample (empty shards)

    @torch.no_grad()
    def __call__(self, image):
        if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != self.size:
            raise ValueError(f"the image is {list(image.shape)}, the clip's frames are [B, 3, {self.size[0]}, "
                             f"{self.size[1]}]: the image must have the video's size")
        out = {"image_latents": condition(self.vae, image, self.frames, self.mode).float().cpu()}
        if self.clip is not None:  # the pipeline's encode_image: the processor on the image, hidden_states[-2]
            px = self.processor(images=[to_pil(x) for x in image.float().cpu()], return_tensors="pt").pixel_values
            out["image_embeds"] = self.clip(pixel_values=px.to(self.device), output_hidden_states=True
                                            ).hidden_states[-2].float().cpu()
        return out
