"""Wan2.1 text-to-video (1.3B, 14B) = diffusers `WanTransformer3DModel`.

Video tokens only in self-attention (3D RoPE, RMSNorm across heads on q/k), cross-attention to the
umT5 text (no mask: the padded text is attended to, as diffusers does), GELU-tanh FFN; AdaLN from a
per-block `scale_shift_table` [1, 6, D] plus the shared `condition_embedder.time_proj`; output head
= top-level `scale_shift_table` [1, 2, D] (chunks (shift, scale)) + parameter-free `norm_out` +
`proj_out`; output = flow velocity at t = 1000*sigma. The norms and the modulation run in fp32 as in
diffusers. Parameter names equal diffusers' state-dict keys (DESIGN.md section 6; diffusers has one
layout for the output modulation, the top-level `scale_shift_table`, since Wan was added in 0.33).
"""

from dataclasses import dataclass

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
        i2v = {k: v for k, v in (("image_dim", self.image_dim), ("added_kv_proj_dim", self.added_kv_proj_dim),
                                 ("pos_embed_seq_len", self.pos_embed_seq_len)) if v is not None}
        if i2v:
            raise ValueError(f"WanConfig: image conditioning {sorted(i2v)} (I2V) is not supported, only text-to-video")
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

    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a no-op dropout
        # torch's fused RMSNorm in the input dtype, as diffusers (one kernel; layers.RMSNorm upcasts in several)
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)

    def forward(self, x, ctx=None, rope=None, sp=None):
        ctx = x if ctx is None else ctx
        q, k = _heads(self.norm_q(self.to_q(x)), self.heads), _heads(self.norm_k(self.to_k(ctx)), self.heads)
        v = _heads(self.to_v(ctx), self.heads)  # [B, heads, L, d] each
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.to_out[0](attention(q, k, v, sp=sp).transpose(1, 2).flatten(2))  # [B, L, heads*d] -> [B, L, D]


class WanBlock(nn.Module):
    """Self-attention (gated AdaLN) -> cross-attention to the text (ungated) -> FFN (gated AdaLN)."""

    def __init__(self, cfg):
        super().__init__()
        dim, self.eps = cfg.num_attention_heads * cfg.attention_head_dim, cfg.eps
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        if cfg.cross_attn_norm:
            self.norm2 = nn.LayerNorm(dim, cfg.eps)  # weights only: applied in fp32 by _ln
        self.ffn = FeedForward(dim, cfg.ffn_dim, "gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, c, e, rope, sp=None):  # x video [B, L, D], c text [B, Lt, D], e = time_proj output [B, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + e.float()).chunk(6, dim=1)  # [B, 1, D]
        n = (_ln(x, self.eps) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(n, rope=rope, sp=sp) * gate).type_as(x)
        n = _ln(x, self.eps, self.norm2).type_as(x) if hasattr(self, "norm2") else x
        x = x + self.attn2(n, c)
        n = (_ln(x, self.eps) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(n).float() * c_gate).type_as(x)


class WanConditionEmbedder(nn.Module):
    """t -> temb [B, D] (time_proj(SiLU(temb)) [B, 6D] modulates the blocks); umT5 text -> [B, Lt, D]."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.time_embedder = TimestepMLP(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TimestepMLP(cfg.text_dim, dim)  # PixArt text projection: linear_1, GELU-tanh, linear_2

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

    def time_embed(self, t, **cond):
        """temb [B, D] (the output head's conditioning; the blocks' time_proj of it is recomputed in forward)."""
        reject_cond(cond, allowed=("text",))
        check_t(t)
        return self.condition_embedder.time(t)

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
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D] each
        out = self.proj_out((_ln(h, self.config.eps) * (1 + scale) + shift).type_as(h))  # [B, L, pt*ph*pw*C], order (pt, ph, pw, C)
        out = out.reshape(B, f, hh, ww, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, pt, hh, ph, ww, pw]
        return out.reshape(B, -1, f * pt, hh * ph, ww * pw)

    def _check(self, x, t, text, cond):
        cfg = self.config
        reject_cond(cond)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, F, H, W], got {tuple(x.shape)}")
        B, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent F, H, W = {f}, {h}, {w} must be divisible by the patch sizes {cfg.patch_size}")
        if not torch.is_tensor(t) or tuple(t.shape) != (B,):
            raise ValueError(f"t must be a tensor [B={B}] (1000*sigma), got {tuple(t.shape) if torch.is_tensor(t) else t!r}")
        if text is None or text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_dim:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"text must be [B={B}, L, text_dim={cfg.text_dim}] (umT5 states), got {got}")

    def forward(self, x, t, text=None, taps=None, **cond):
        """Flow velocity [B, C, F, H, W]; with `taps` also a list of video tokens [B, L, D] after those blocks."""
        self._check(x, t, text, cond)
        cfg, (_, _, f, hgt, wid) = self.config, x.shape
        pt, ph, pw = cfg.patch_size
        tap_set, feats = check_taps(taps, cfg.num_layers), []
        rope = self._rope((f // pt, hgt // ph, wid // pw), x.device)
        h = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B, D, f, h, w] -> [B, L, D]
        temb = self.condition_embedder.time(t).type_as(text)  # diffusers casts temb to the text's dtype before time_proj and the head
        e = self.condition_embedder.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # [B, 6D] -> [B, 6, D]
        c = self.condition_embedder.text(text)  # [B, Lt, D]
        h, sp = sp_shard(h)  # sequence parallel: this rank's video tokens (else unchanged); text stays whole
        rope = tuple(sp_rows(r, sp) for r in rope)
        for i, block in enumerate(self.blocks):
            h = run_block(self, block, h, c, e, rope, sp)
            if i in tap_set:
                feats.append(sp_gather(h, sp))
        v = self.head(sp_gather(h, sp), temb, (f, hgt, wid))
        return v if taps is None else (v, feats)


ARCHITECTURE = ("WanTransformer3DModel", WanConfig, WanTransformer)  # registered by model.py
PRESETS = {
    "wan2.1-t2v-1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(),
    "tiny-wan": WanConfig(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64,
                          num_layers=2),
}
