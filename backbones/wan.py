"""Wan2.1 / Wan2.2 transformers (T2V 1.3B / 14B, I2V 14B, A14B experts, TI2V-5B) = diffusers `WanTransformer3DModel`.

Video tokens only in self-attention (3D RoPE, RMSNorm across heads on q/k), cross-attention to the
umT5 text (no mask: the padded text is attended to, as diffusers does), GELU-tanh FFN; AdaLN from a
per-block `scale_shift_table` [1, 6, D] plus the shared `condition_embedder.time_proj`; output head
= top-level `scale_shift_table` [1, 2, D] (chunks (shift, scale)) + parameter-free `norm_out` +
`proj_out`; output = flow velocity at t = 1000*sigma. The norms and the modulation run in fp32 as in
diffusers. Parameter names equal diffusers' state-dict keys (DESIGN.md section 6; diffusers has one
layout for the output modulation, the top-level `scale_shift_table`, since Wan was added in 0.33).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.layers import (
    timestep_embedding, TimestepMLP, attention, apply_rope, FeedForward, reject_cond, check_taps, check_t, run_block,
    sp_gather, sp_rows, sp_shard, cached_table,
)


@dataclass
class WanConfig:
    """Fields = diffusers WanTransformer3DModel config.json keys (defaults = the 14B release)."""

    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.pos_embed_seq_len is not None:
            raise ValueError("WanConfig: pos_embed_seq_len (first-last-frame FLF2V) is not supported")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("WanConfig: image_dim and added_kv_proj_dim go together (Wan2.1-I2V's image embeds)")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"WanConfig: qk_norm={self.qk_norm!r} is not supported (only 'rms_norm_across_heads')")
        if len(self.patch_size) != 3 or self.attention_head_dim % 2:
            raise ValueError(f"WanConfig: patch_size {self.patch_size} must have 3 entries and attention_head_dim "
                             f"{self.attention_head_dim} be even (RoPE pairs)")


def _ln(x, eps, norm=None):
    """diffusers' FP32LayerNorm on x in fp32 (affine from `norm` if given); result fp32."""
    w, b = (None, None) if norm is None else (norm.weight.float(), norm.bias.float())
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)


def _heads(x, n):
    """[B, L, n*d] -> [B, n, L, d]."""
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


class WanAttention(nn.Module):
    """Self- (attn1, RoPE) or cross- (attn2, keys/values from the text) attention; q/k RMS-normed across heads."""

    def __init__(self, dim, heads, eps, added_kv_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a no-op dropout
        # torch's fused RMSNorm in the input dtype, as diffusers (one kernel; layers.RMSNorm upcasts in several)
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        if added_kv_dim is not None:  # Wan2.1-I2V cross-attention: keys/values of the image embeds too
            self.add_k_proj, self.add_v_proj = nn.Linear(added_kv_dim, dim), nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x, ctx=None, rope=None, sp=None, img=None):
        ctx = x if ctx is None else ctx
        q, k = _heads(self.norm_q(self.to_q(x)), self.heads), _heads(self.norm_k(self.to_k(ctx)), self.heads)
        v = _heads(self.to_v(ctx), self.heads)  # [B, heads, L, d] each
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, sp=sp)  # [B, heads, L, d]
        if img is not None:  # a second softmax over the image tokens, added (diffusers' I2V attention)
            ki, vi = _heads(self.norm_added_k(self.add_k_proj(img)), self.heads), _heads(self.add_v_proj(img), self.heads)
            out = out + attention(q, ki, vi)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # [B, L, heads*d] -> [B, L, D]


class WanBlock(nn.Module):
    """Self-attention (gated AdaLN) -> cross-attention to the text (ungated) -> FFN (gated AdaLN)."""

    def __init__(self, cfg):
        super().__init__()
        dim, self.eps = cfg.num_attention_heads * cfg.attention_head_dim, cfg.eps
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        if cfg.cross_attn_norm:
            self.norm2 = nn.LayerNorm(dim, cfg.eps)  # weights only: applied in fp32 by _ln
        self.ffn = FeedForward(dim, cfg.ffn_dim, "gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, c, e, rope, sp=None, img=None):
        """x video [B, L, D], c text [B, Lt, D], e = time_proj output [B, 6, D] or per token [B, L, 6, D] (TI2V),
        img = embedded image tokens [B, Li, D] or None."""
        if e.ndim == 3:
            mods = (self.scale_shift_table + e.float()).chunk(6, dim=1)  # [B, 1, D] each
        else:  # [B, L, 6, D] -> [B, L, D] each
            mods = (m.squeeze(2) for m in (self.scale_shift_table[:, None] + e.float()).chunk(6, dim=2))
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        n = (_ln(x, self.eps) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(n, rope=rope, sp=sp) * gate).type_as(x)
        n = _ln(x, self.eps, self.norm2).type_as(x) if hasattr(self, "norm2") else x
        x = x + self.attn2(n, c, img=img)
        n = (_ln(x, self.eps) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(n).float() * c_gate).type_as(x)


class WanImageEmbedder(nn.Module):
    """CLIP image states [B, Li, image_dim] -> [B, Li, D]: fp32 LayerNorm, GELU MLP, fp32 LayerNorm (diffusers names)."""

    def __init__(self, image_dim, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(image_dim), nn.LayerNorm(dim)  # eps 1e-5 (diffusers' FP32LayerNorm)
        self.ff = FeedForward(image_dim, image_dim, "gelu", dim_out=dim)

    def forward(self, img):
        n1, n2 = self.norm1, self.norm2
        h = self.ff(_ln(img, n1.eps, n1).type_as(img))
        return _ln(h, n2.eps, n2).type_as(h)


class WanConditionEmbedder(nn.Module):
    """t -> temb [B, D] (time_proj(SiLU(temb)) [B, 6D] modulates the blocks); umT5 text -> [B, Lt, D]; image
    embeds -> [B, Li, D] (I2V)."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.time_embedder = TimestepMLP(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TimestepMLP(cfg.text_dim, dim)  # PixArt text projection: linear_1, GELU-tanh, linear_2
        if cfg.image_dim is not None:
            self.image_embedder = WanImageEmbedder(cfg.image_dim, dim)

    def time(self, t):
        """temb [B, D] from fp32 sinusoids of t [B] (cos first, shift 0; t on the host or the device)."""
        w = self.time_embedder.linear_1.weight
        t = t.to(w.device, non_blocking=w.device.type != "cpu")  # t may come from the host (a dual expert routes on it)
        return self.time_embedder(timestep_embedding(t, w.shape[1]).to(w.dtype))

    def text(self, text):
        te = self.text_embedder
        return te.linear_2(F.gelu(te.linear_1(text), approximate="tanh"))


class WanTransformer(nn.Module):
    """Wan2.1 T2V denoiser: flow velocity v = eps - x0 from latents [B, C, F, H, W], t = 1000*sigma, umT5 text."""

    prediction = "flow"
    guidance = "cfg"  # the teacher guides with classifier-free guidance (no guidance embedding)

    def __init__(self, cfg):
        super().__init__()
        self.config, dim = cfg, cfg.num_attention_heads * cfg.attention_head_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = WanConditionEmbedder(cfg, dim)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.Module()  # parameter-free LayerNorm; a module so the detail expert can copy it by name
        self.proj_out = nn.Linear(dim, self.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False

    def default_taps(self):
        """Blocks 0, 2, 4, ... (the authors' `index % 2 == 0` GAN features: 15 of Wan-1.3B's 30 blocks)."""
        return list(range(0, self.config.num_layers, 2))

    def time_embed(self, t, image_latents=None, grid=None, **cond):
        """temb [B, D], or per token [B, L, D] for a first-frame (TI2V) image condition (then `grid`, the latents'
        (F, H, W), gives the tokens): the output head's conditioning."""
        reject_cond(cond, allowed=("text", "image_embeds"))
        check_t(t)
        temb = self.condition_embedder.time(t)
        if image_latents is None or self._image_mode(image_latents) != "first_frame":
            return temb
        if grid is None:
            raise ValueError("time_embed with a first-frame image condition needs grid = the latents' (F, H, W)")
        return self._per_token(temb, self.condition_embedder.time(torch.zeros_like(t)), (0, 0, *grid))

    def _image_mode(self, image_latents):
        """'concat' (an I2V model's 20-channel condition) or 'first_frame' (TI2V: one clean latent frame)."""
        cfg = self.config
        if cfg.in_channels > self.out_channels:
            return "concat"
        return "first_frame" if image_latents.shape[1] == cfg.in_channels and image_latents.shape[2] == 1 else None

    def _per_token(self, at_t, at_0, x_shape):
        """[B, ...] values at t and at 0 -> per token [B, L, ...]: 0's on the first latent frame's tokens (the
        pipeline's `expand_timesteps` mask)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = x_shape[2] // pt, x_shape[3] // ph, x_shape[4] // pw
        first = (torch.arange(f * h * w, device=at_t.device) < h * w).view(1, -1, *[1] * (at_t.ndim - 1))  # [1, L, 1..]
        return torch.where(first, at_0.unsqueeze(1), at_t.unsqueeze(1))  # [B, L, ...]

    @cached_table()
    def _rope(self, grid, device):
        """cos, sin [f*h*w, head_dim] fp32: head dim split t d-2*(2(d//6)) / h 2(d//6) / w 2(d//6), theta 1e4."""
        d = self.config.attention_head_dim
        dh = 2 * (d // 6)
        angles = []
        for n, dim in zip(grid, (d - 2 * dh, dh, dh)):
            freqs = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
            angles.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), freqs))  # [n, dim/2]
        f, h, w = grid
        ang = torch.cat([  # [f, h, w, d/2], tokens in (f, h, w) order
            angles[0][:, None, None].expand(f, h, w, -1),
            angles[1][None, :, None].expand(f, h, w, -1),
            angles[2][None, None, :].expand(f, h, w, -1),
        ], dim=-1).flatten(0, 2).repeat_interleave(2, dim=-1)  # [L, d], one angle per adjacent pair
        return ang.cos().float(), ang.sin().float()

    def head(self, h, temb, grid):
        """Video tokens h [B, L, D] -> [B, C_out, F, H, W]: (shift, scale) from scale_shift_table + temb, norm_out, proj_out."""
        cfg, B = self.config, h.shape[0]
        pt, ph, pw = cfg.patch_size
        f, hh, ww = grid[0] // pt, grid[1] // ph, grid[2] // pw
        if h.ndim != 3 or h.shape[1] != f * hh * ww:
            raise ValueError(f"head: expected [B, {f * hh * ww}, D] video tokens for latent grid {tuple(grid)}, got {tuple(h.shape)}")
        if temb.ndim == 2:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D] each
        else:  # per token [B, L, D]: [B, L, 2, D] -> [B, L, D] each
            shift, scale = (m.squeeze(2) for m in (self.scale_shift_table[:, None] + temb.unsqueeze(2)).chunk(2, dim=2))
        out = self.proj_out((_ln(h, self.config.eps) * (1 + scale) + shift).type_as(h))  # [B, L, pt*ph*pw*C], order (pt, ph, pw, C)
        out = out.reshape(B, f, hh, ww, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, pt, hh, ph, ww, pw]
        return out.reshape(B, -1, f * pt, hh * ph, ww * pw)

    def _check(self, x, t, text, image_latents, image_embeds, cond):
        cfg = self.config
        reject_cond(cond)
        i2v = cfg.in_channels > self.out_channels
        if i2v and image_latents is None:
            raise ValueError(f"this image-to-video model needs image_latents [B, {cfg.in_channels - self.out_channels}, "
                             "F, H, W] (the image condition)")
        C = self.out_channels if i2v else cfg.in_channels
        if x.ndim != 5 or x.shape[1] != C:
            raise ValueError(f"x must be [B, {C}, F, H, W], got {tuple(x.shape)}")
        B, _, f, h, w = x.shape
        if image_latents is not None and (image_latents.ndim != 5 or image_latents.shape[0] != B or image_latents.shape[3:] != x.shape[3:] or (
                self._image_mode(image_latents) != "first_frame" and image_latents.shape[2:] != x.shape[2:])
                or self._image_mode(image_latents) is None or (i2v and image_latents.shape[1] + C != cfg.in_channels)):
            want = (f"[B, {cfg.in_channels - self.out_channels}, {f}, {h}, {w}]" if i2v else
                    f"[B, {cfg.in_channels}, 1, {h}, {w}] (the encoded first frame)")
            raise ValueError(f"image_latents must be {want}, got {tuple(image_latents.shape)}")
        if (image_embeds is None) != (cfg.image_dim is None) or (image_embeds is not None and (
                image_embeds.ndim != 3 or image_embeds.shape[0] != B or image_embeds.shape[2] != cfg.image_dim)):
            want = "none (no image_dim)" if cfg.image_dim is None else f"[B={B}, Li, {cfg.image_dim}] (CLIP states)"
            raise ValueError(f"image_embeds must be {want}, got {None if image_embeds is None else tuple(image_embeds.shape)}")
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent F, H, W = {f}, {h}, {w} must be divisible by the patch sizes {cfg.patch_size}")
        if not torch.is_tensor(t) or tuple(t.shape) != (B,):
            raise ValueError(f"t must be a tensor [B={B}] (1000*sigma), got {tuple(t.shape) if torch.is_tensor(t) else t!r}")
        if text is None or text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_dim:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"text must be [B={B}, L, text_dim={cfg.text_dim}] (umT5 states), got {got}")

    def forward(self, x, t, text=None, taps=None, image_latents=None, image_embeds=None, **cond):
        """Flow velocity [B, C, F, H, W]; with `taps` also a list of video tokens [B, L, D] after those blocks.
        image_latents / image_embeds: the image condition (module docstring); with a first-frame condition the
        output's first frame is the model's at t = 0 on the clean frame (the pipeline discards it)."""
        self._check(x, t, text, image_latents, image_embeds, cond)
        mode = None if image_latents is None else self._image_mode(image_latents)
        if mode == "concat":
            x = torch.cat([x, image_latents.to(x.dtype)], dim=1)  # [B, out + in - out, F, H, W], the pipeline's order
        elif mode == "first_frame":
            x = torch.cat([image_latents.to(x.dtype), x[:, :, 1:]], dim=2)  # the clean frame replaces frame 0
        cfg, (_, _, f, hgt, wid) = self.config, x.shape
        pt, ph, pw = cfg.patch_size
        tap_set, feats = check_taps(taps, cfg.num_layers), []
        rope = self._rope((f // pt, hgt // ph, wid // pw), x.device)
        h = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B, D, f, h, w] -> [B, L, D]
        emb = self.condition_embedder
        temb = emb.time(t).type_as(text)  # diffusers casts temb to the text's dtype before time_proj and the head
        e = emb.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # [B, 6D] -> [B, 6, D]
        if mode == "first_frame":  # per token: the clean frame's tokens at t = 0
            temb0 = emb.time(torch.zeros_like(t)).type_as(text)
            e0 = emb.time_proj(F.silu(temb0)).unflatten(1, (6, -1))
            temb, e = self._per_token(temb, temb0, x.shape), self._per_token(e, e0, x.shape)  # [B, L, D], [B, L, 6, D]
        c = emb.text(text)  # [B, Lt, D]
        img = None if image_embeds is None else emb.image_embedder(image_embeds.to(c.dtype))  # [B, Li, D]
        h, sp = sp_shard(h)  # sequence parallel: this rank's video tokens (else unchanged); text stays whole
        rope = tuple(sp_rows(r, sp) for r in rope)
        if e.ndim == 4 and sp is not None:  # per-token modulation: this rank's rows, as h
            e = sp_shard(e.flatten(2))[0].unflatten(2, (6, -1))  # [B, L, 6D] -> [B, L_local, 6, D]
        for i, block in enumerate(self.blocks):
            h = run_block(self, block, h, c, e, rope, sp, img)
            if i in tap_set:
                feats.append(sp_gather(h, sp))
        v = self.head(sp_gather(h, sp), temb, (f, hgt, wid))
        return v if taps is None else (v, feats)


ARCHITECTURE = ("WanTransformer3DModel", WanConfig, WanTransformer)  # registered by model.py
_14B = WanConfig()
PRESETS = {  # configs: the Wan-AI repositories' transformer config.json (diffusers layout); DESIGN.md section 12
    "wan2.1-t2v-1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": _14B,
    "wan2.1-i2v-14b-480p": WanConfig(in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "wan2.1-i2v-14b-720p": WanConfig(in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "wan2.2-t2v-a14b": _14B,  # each of its two experts (transformer/, transformer_2/)
    "wan2.2-i2v-a14b": WanConfig(in_channels=36),  # each expert; image condition by channels only
    "wan2.2-ti2v-5b": WanConfig(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
    "tiny-wan": WanConfig(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64,
                          num_layers=2),
}
PRESETS["tiny-wan-i2v"] = replace(PRESETS["tiny-wan"], in_channels=36, image_dim=24, added_kv_proj_dim=32)
PRESETS["tiny-wan2.2-i2v"] = replace(PRESETS["tiny-wan"], in_channels=36)
PRESETS["tiny-wan2.2-ti2v"] = replace(PRESETS["tiny-wan"], in_channels=48, out_channels=48)

# pipeline settings of each release (model_index.json and the Wan-AI generation defaults): steps, shift, CFG per
# expert, the experts' boundary (t >= boundary_ratio * 1000 -> the high-noise `transformer`), expand_timesteps
PIPELINES = {
    "wan2.2-t2v-a14b": dict(steps=40, shift=12.0, guidance=4.0, guidance_2=3.0, boundary_ratio=0.875),
    "wan2.2-i2v-a14b": dict(steps=40, shift=5.0, guidance=3.5, guidance_2=3.5, boundary_ratio=0.9),
    "wan2.2-ti2v-5b": dict(steps=50, shift=5.0, guidance=5.0, expand_timesteps=True),
}


def release_of(cfg, boundary_ratio=None):
    """The PIPELINES key of a Wan2.2 release (a two-expert teacher's boundary_ratio, or TI2V-5B's 48 channels);
    None for Wan2.1 and other models, which keep the authors' settings."""
    if not isinstance(cfg, WanConfig):
        return None
    if boundary_ratio is not None:
        return "wan2.2-i2v-a14b" if cfg.in_channels > (cfg.out_channels or cfg.in_channels) else "wan2.2-t2v-a14b"
    return "wan2.2-ti2v-5b" if cfg.in_channels == 48 and cfg.out_channels in (None, 48) else None
