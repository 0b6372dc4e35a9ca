"""CogVideoX 1.0 (2B: 3D sin-cos positions, 5B: 3D RoPE) = diffusers `CogVideoXTransformer3DModel`.

Sequence [text, video]; one LayerNorm shared by both streams with separate AdaLN-zero modulation;
output = v-prediction. Parameter names equal diffusers' state-dict keys (DESIGN.md section 2).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.layers import (
    timestep_embedding, TimestepMLP, attention, apply_rope, FeedForward, reject_cond, check_taps, check_t, run_block,
    ACTIVATIONS, cached_table,
)
from backbones.layers import sp_gather, sp_rows, sp_shard


@dataclass
class CogVideoXConfig:
    """Fields = diffusers CogVideoXTransformer3DModel config.json keys (defaults = the 2B release)."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    def __post_init__(self):
        unsupported = {  # CogVideoX 1.5 / I2V options: other layers than the 1.0 text-to-video models
            "patch_size_t": self.patch_size_t is not None,
            "ofs_embed_dim": bool(self.ofs_embed_dim),
            "use_learned_positional_embeddings": self.use_learned_positional_embeddings,
            "dropout": self.dropout != 0.0,
            "timestep_activation_fn": self.timestep_activation_fn != "silu",
            "out_channels": self.out_channels is None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"CogVideoXConfig: unsupported settings {bad} (only CogVideoX 1.0 text-to-video)")
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"CogVideoXConfig: activation_fn {self.activation_fn!r} not in {sorted(ACTIVATIONS)}")
        d, dim = self.attention_head_dim, self.num_attention_heads * self.attention_head_dim
        if self.use_rotary_positional_embeddings and d % 16:
            raise ValueError(f"CogVideoXConfig: 3D RoPE needs attention_head_dim % 16 == 0, got {d}")
        if not self.use_rotary_positional_embeddings and dim % 16:
            raise ValueError(f"CogVideoXConfig: 3D sin-cos table needs inner dim % 16 == 0, got {dim}")


def _sincos(pos, dim):
    """1D sin-cos table [len(pos), dim] in float64: sin half then cos half."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.double()[:, None] * omega[None, :]  # [n, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=-1)


@cached_table()
def cogvideox_sincos_table(cfg, grid, device, dtype):
    """2B fixed 3D positional table [F*h*w, D] for a token grid (F, h, w): D/4 time, 3D/8 w, 3D/8 h."""
    n_f, n_h, n_w = grid
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    ds, dt = 3 * dim // 4, dim // 4
    # positions are fp32 divisions like the reference; every table entry is a float64 sinusoid
    ar = lambda n, s: torch.arange(n, dtype=torch.float32, device=device) / s
    tab_t = _sincos(ar(n_f, cfg.temporal_interpolation_scale), dt).to(dtype)  # [F, D/4]
    tab_w = _sincos(ar(n_w, cfg.spatial_interpolation_scale), ds // 2).to(dtype)  # [w, 3D/8]
    tab_h = _sincos(ar(n_h, cfg.spatial_interpolation_scale), ds // 2).to(dtype)  # [h, 3D/8]
    table = torch.cat([  # [F, h, w, D], token order (f, h, w)
        tab_t[:, None, None].expand(n_f, n_h, n_w, dt),
        tab_w[None, None, :].expand(n_f, n_h, n_w, ds // 2),
        tab_h[None, :, None].expand(n_f, n_h, n_w, ds // 2),
    ], dim=-1)
    return table.flatten(0, 2)  # [F*h*w, D]


def _crop_region(n_h, n_w, base_h, base_w):
    """Box of the base grid that a (n_h, n_w) grid is resized into, aspect kept, centred (diffusers pipeline)."""
    if n_h / n_w > base_h / base_w:
        rh, rw = base_h, round(base_h / n_h * n_w)
    else:
        rh, rw = round(base_w / n_w * n_h), base_w
    top, left = round((base_h - rh) / 2), round((base_w - rw) / 2)
    return (top, left), (top + rh, left + rw)


@cached_table()
def cogvideox_rope(cfg, grid, n_text, device):
    """5B 3D RoPE cos/sin [n_text + F*h*w, d] fp32; text rows are the identity rotation.

    Head dim split t d/4, h 3d/8, w 3d/8 (t16/h24/w24 at d=64), theta 1e4. Spatial positions follow
    the diffusers pipeline: the grid is spread over its aspect-kept crop of the training base grid."""
    n_f, n_h, n_w = grid
    d = cfg.attention_head_dim
    dt, dh = d // 4, d // 8 * 3
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    (top, left), (bottom, right) = _crop_region(n_h, n_w, base_h, base_w)
    f64 = dict(dtype=torch.float64, device=device)
    space = lambda a, b, n: torch.linspace(a, b * (n - 1) / n, n, **f64)
    freqs = lambda pos, dim: pos[:, None] / 10000.0 ** (torch.arange(0, dim, 2, **f64) / dim)
    ang_t = freqs(torch.arange(n_f, **f64), dt)  # [F, dt/2]
    ang_h = freqs(space(top, bottom, n_h), dh)  # [h, dh/2]
    ang_w = freqs(space(left, right, n_w), dh)  # [w, dh/2]
    ang = torch.cat([  # [F, h, w, d/2]
        ang_t[:, None, None].expand(n_f, n_h, n_w, dt // 2),
        ang_h[None, :, None].expand(n_f, n_h, n_w, dh // 2),
        ang_w[None, None, :].expand(n_f, n_h, n_w, dh // 2),
    ], dim=-1).flatten(0, 2)
    ang = torch.cat([ang.new_zeros(n_text, d // 2), ang]).repeat_interleave(2, dim=-1)  # [L, d], pairs adjacent
    return ang.cos().float(), ang.sin().float()


class CogVideoXAttention(nn.Module):
    """Joint self-attention over [text, video] with per-head LayerNorm on q and k."""

    def __init__(self, dim, heads, head_dim, bias):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(self, h, rope=None, sp=None):
        q, k, v = (lin(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, L, d]
                   for lin in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q).to(v.dtype), self.norm_k(k).to(v.dtype)  # fp32 under autocast: back to v's dtype
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.to_out[0](attention(q, k, v, sp=sp).transpose(1, 2).flatten(2))  # [B, L, heads*d] -> [B, L, D]


class AdaNormZero(nn.Module):
    """LayerNorm shared by both streams; `linear(SiLU(temb))` gives shift/scale/gate per stream."""

    def __init__(self, cond_dim, dim, eps, affine):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x, c, temb):
        mod = self.linear(F.silu(temb))[:, None]  # [B, 1, 6D]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.chunk(6, dim=-1)  # [B, 1, D] each
        # .to(x.dtype): under autocast LayerNorm returns fp32, and the modulation would run in fp32 too
        nx, nc = self.norm(x).to(x.dtype), self.norm(c).to(c.dtype)
        return nx * (1 + scale) + shift, nc * (1 + c_scale) + c_shift, gate, c_gate


class CogVideoXBlock(nn.Module):
    """AdaLN-zero transformer block; text and video share weights but not modulation."""

    def __init__(self, cfg):
        super().__init__()
        d, heads = cfg.attention_head_dim, cfg.num_attention_heads
        dim, affine = d * heads, cfg.norm_elementwise_affine
        self.norm1 = AdaNormZero(cfg.time_embed_dim, dim, cfg.norm_eps, affine)
        self.attn1 = CogVideoXAttention(dim, heads, d, cfg.attention_bias)
        self.norm2 = AdaNormZero(cfg.time_embed_dim, dim, cfg.norm_eps, affine)
        self.ff = FeedForward(dim, 4 * dim, cfg.activation_fn)

    def forward(self, x, c, temb, rope=None, sp=None):  # x video [B, Lv, D] (under SP this rank's), c text [B, Lt, D]
        n_text = c.shape[1]
        nx, nc, gate, c_gate = self.norm1(x, c, temb)
        a = self.attn1(torch.cat([nc, nx], dim=1), rope, sp)  # [B, Lt+Lv, D]
        x, c = x + gate * a[:, n_text:], c + c_gate * a[:, :n_text]
        nx, nc, gate, c_gate = self.norm2(x, c, temb)
        f = self.ff(torch.cat([nc, nx], dim=1))  # [B, Lt+Lv, D]
        return x + gate * f[:, n_text:], c + c_gate * f[:, :n_text]


class CogVideoXTransformer(nn.Module):
    """CogVideoX 1.0 denoiser: v-prediction from latents [B, C, F, H, W], t in 0..999 and T5 text."""

    prediction = "vpred"

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        dim, p = cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size
        self.patch_embed = nn.ModuleDict(dict(
            proj=nn.Conv2d(cfg.in_channels, dim, p, stride=p, bias=cfg.patch_bias),
            text_proj=nn.Linear(cfg.text_embed_dim, dim),
        ))
        self.time_embedding = TimestepMLP(dim, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.norm_out = nn.ModuleDict(dict(
            linear=nn.Linear(cfg.time_embed_dim, 2 * dim),
            norm=nn.LayerNorm(dim, cfg.norm_eps, cfg.norm_elementwise_affine),
        ))
        self.proj_out = nn.Linear(dim, p * p * cfg.out_channels)
        self.gradient_checkpointing = False

    def default_taps(self):
        """Blocks 0, 2, 4, ... (the authors' `index % 2 == 0` GAN features, as for HunyuanVideo)."""
        return list(range(0, self.config.num_layers, 2))

    def time_embed(self, t, **cond):
        """AdaLN conditioning vector temb [B, time_embed_dim] from t [B] (text is not part of it)."""
        reject_cond(cond, allowed=("text",))
        check_t(t)
        w = self.time_embedding.linear_1.weight
        t = t.to(w.device, non_blocking=w.device.type != "cpu")  # t may come from the host (a dual expert routes on it)
        emb = timestep_embedding(t, w.shape[1], self.config.flip_sin_to_cos, self.config.freq_shift)
        return self.time_embedding(emb.to(w.dtype))

    def head(self, h, temb, grid):
        """Video tokens h [B, F*h*w, D] -> output [B, C_out, F, H, W] (norm_final, AdaLN, proj_out)."""
        (n_f, H, W), p, B = grid, self.config.patch_size, h.shape[0]
        shift, scale = self.norm_out.linear(F.silu(temb))[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        h = self.norm_out.norm(self.norm_final(h)) * (1 + scale) + shift
        h = self.proj_out(h).view(B, n_f, H // p, W // p, -1, p, p)  # [B, F, h, w, C, ph, pw]
        h = h.permute(0, 4, 1, 2, 5, 3, 6)  # [B, C, F, h, ph, w, pw]
        return h.reshape(B, -1, n_f, H, W)  # [B, C, F, H, W]

    def forward(self, x, t, text=None, taps=None, **cond):
        cfg, p = self.config, self.config.patch_size
        B, C, n_f, H, W = self._check(x, t, text, cond)
        temb = self.time_embed(t)
        grid = (n_f, H // p, W // p)
        h = self.patch_embed.proj(x.transpose(1, 2).reshape(B * n_f, C, H, W))  # [B*F, D, h, w]
        h = h.view(B, n_f, h.shape[1], -1).transpose(2, 3).flatten(1, 2)  # [B, F*h*w, D]
        c = self.patch_embed.text_proj(text)  # [B, Lt, D]
        rope = None
        if cfg.use_rotary_positional_embeddings:
            rope = cogvideox_rope(cfg, grid, c.shape[1], x.device)
        else:
            h = h + cogvideox_sincos_table(cfg, grid, x.device, h.dtype)
        h, sp = sp_shard(h, video_at=c.shape[1])  # sequence parallel: this rank's video tokens (else unchanged)
        rope = None if rope is None else tuple(sp_rows(r, sp) for r in rope)
        tap_set, feats = check_taps(taps, cfg.num_layers), []
        for i, block in enumerate(self.transformer_blocks):
            h, c = run_block(self, block, h, c, temb, rope, sp)
            if i in tap_set:
                feats.append(sp_gather(h, sp))
        out = self.head(sp_gather(h, sp), temb, (n_f, H, W))
        return out if taps is None else (out, feats)

    def _check(self, x, t, text, cond):
        cfg = self.config
        reject_cond(cond)
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        B, C, n_f, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"x has {C} channels, the model expects in_channels={cfg.in_channels}")
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"latent H, W = {H}, {W} must be divisible by patch_size={cfg.patch_size}")
        if not torch.is_tensor(t) or tuple(t.shape) != (B,):
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape [B]=[{B}], got {got}")
        if text is None:
            raise ValueError("text (T5 hidden states [B, L, D_text]) is required for CogVideoX")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"text must be [B={B}, L, text_embed_dim={cfg.text_embed_dim}], got {tuple(text.shape)}")
        return B, C, n_f, H, W


ARCHITECTURE = ("CogVideoXTransformer3DModel", CogVideoXConfig, CogVideoXTransformer)  # registered by model.py
_TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
             text_embed_dim=32, num_layers=2, sample_width=8, sample_height=6, sample_frames=9,
             max_text_seq_length=8)  # latent sample size 3 x 6 x 8
PRESETS = {
    "cogvideox-2b": CogVideoXConfig(),  # released in fp16
    "cogvideox-5b": CogVideoXConfig(num_attention_heads=48, num_layers=42,  # released in bf16
                                    use_rotary_positional_embeddings=True),
    "tiny-cogvideox": CogVideoXConfig(**_TINY),
    "tiny-cogvideox-rope": CogVideoXConfig(**_TINY, use_rotary_positional_embeddings=True),
}
