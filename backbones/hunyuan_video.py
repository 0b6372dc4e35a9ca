"""HunyuanVideo (13B) = diffusers `HunyuanVideoTransformer3DModel`.

Sequence [video, text]; text padding masked out of attention; RoPE on video tokens only; embedded
guidance; output = flow velocity. Parameter names equal diffusers' state-dict keys (DESIGN.md section 2).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.layers import (
    timestep_embedding, TimestepMLP, attention, apply_rope, RMSNorm, FeedForward, reject_cond, check_taps, run_block,
    cached_table,
)
from backbones.layers import sp_gather, sp_rows, sp_shard


@dataclass
class HunyuanVideoConfig:
    """Fields = diffusers HunyuanVideoTransformer3DModel config.json keys (defaults = the 13B release)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple = (16, 56, 56)
    image_condition_type: str | None = None

    def __post_init__(self):
        self.rope_axes_dim = tuple(self.rope_axes_dim)
        if self.image_condition_type is not None:
            raise ValueError(f"HunyuanVideo image_condition_type={self.image_condition_type!r} (I2V) is not supported")
        if self.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideo qk_norm={self.qk_norm!r} is not supported (only 'rms_norm')")
        if sum(self.rope_axes_dim) != self.attention_head_dim or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be even and sum to attention_head_dim {self.attention_head_dim}")


def _hv_heads(x, n):
    """[B, L, n*d] -> [B, n, L, d]."""
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def _hv_ln(x):
    """Parameter-free LayerNorm (eps 1e-6) of the adaptive norms, in x's dtype (autocast would give fp32)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6).to(x.dtype)


class HunyuanAdaMod(nn.Module):
    """AdaLN modulation: `linear(SiLU(temb))` split into n chunks, each [B, 1, D]."""

    def __init__(self, dim, n):
        super().__init__()
        self.n, self.linear = n, nn.Linear(dim, n * dim)

    def forward(self, temb):
        return self.linear(F.silu(temb)).unsqueeze(1).chunk(self.n, dim=-1)


class HunyuanAttention(nn.Module):
    """Projections of one attention (diffusers names); `ctx` adds the text-stream ones (double blocks)."""

    def __init__(self, dim, heads, qk_norm=True, ctx=False, out=True):
        super().__init__()
        self.heads, d = heads, dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        if qk_norm:
            self.norm_q, self.norm_k = RMSNorm(d), RMSNorm(d)
        if ctx:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(d), RMSNorm(d)
            self.to_add_out = nn.Linear(dim, dim)
        if out:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def qkv(self, x):
        """Heads [B, heads, L, d] of q, k (RMS-normed when the block has q/k norms), v."""
        q, k, v = (_hv_heads(f(x), self.heads) for f in (self.to_q, self.to_k, self.to_v))
        return (self.norm_q(q), self.norm_k(k), v) if hasattr(self, "norm_q") else (q, k, v)

    def qkv_ctx(self, c):
        q, k, v = (_hv_heads(f(c), self.heads) for f in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        return self.norm_added_q(q), self.norm_added_k(k), v


class HunyuanRefinerBlock(nn.Module):
    """Token-refiner block: self-attention over text + SiLU MLP, gated by the refiner's temb."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HunyuanAttention(dim, heads, qk_norm=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), "linear-silu")
        self.norm_out = HunyuanAdaMod(dim, 2)

    def forward(self, c, temb, mask):
        gate_attn, gate_ff = self.norm_out(temb)
        o = attention(*self.attn.qkv(self.norm1(c)), mask).transpose(1, 2).flatten(2)  # [B, Lt, D]
        c = c + self.attn.to_out[0](o) * gate_attn
        return c + self.ff(self.norm2(c)) * gate_ff


class HunyuanDoubleBlock(nn.Module):
    """Double-stream block: separate weights for video and text, one joint attention [video, text]."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm1_context = HunyuanAdaMod(dim, 6), HunyuanAdaMod(dim, 6)
        self.attn = HunyuanAttention(dim, heads, ctx=True)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), "gelu-approximate")
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio), "gelu-approximate")

    def forward(self, x, c, temb, mask, cos, sin, sp=None):
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        qx, kx, vx = self.attn.qkv(_hv_ln(x) * (1 + scale) + shift)
        qc, kc, vc = self.attn.qkv_ctx(_hv_ln(c) * (1 + c_scale) + c_shift)
        q, k, v = (torch.cat(p, dim=2) for p in ((qx, qc), (kx, kc), (vx, vc)))  # [B, h, Lv+Lt, d]
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, sp).transpose(1, 2).flatten(2)  # [B, Lv+Lt, D]
        n = x.shape[1]
        x = x + self.attn.to_out[0](o[:, :n]) * gate
        c = c + self.attn.to_add_out(o[:, n:]) * c_gate
        x = x + self.ff(_hv_ln(x) * (1 + scale2) + shift2) * gate2
        c = c + self.ff_context(_hv_ln(c) * (1 + c_scale2) + c_shift2) * c_gate2
        return x, c


class HunyuanSingleBlock(nn.Module):
    """Single-stream block on the joint sequence h [B, Lv+Lt, D]: parallel attention + MLP, one out-proj."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm = HunyuanAdaMod(dim, 3)
        self.attn = HunyuanAttention(dim, heads, out=False)
        self.proj_mlp = nn.Linear(dim, int(dim * mlp_ratio))
        self.proj_out = nn.Linear(dim + int(dim * mlp_ratio), dim)

    def forward(self, h, temb, mask, cos, sin, sp=None):
        shift, scale, gate = self.norm(temb)
        n = _hv_ln(h) * (1 + scale) + shift
        q, k, v = self.attn.qkv(n)
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, sp).transpose(1, 2).flatten(2)  # [B, L, D]
        mlp = F.gelu(self.proj_mlp(n), approximate="tanh")
        return h + gate * self.proj_out(torch.cat([o, mlp], dim=-1))


class HunyuanVideoTransformer(nn.Module):
    """HunyuanVideo denoiser: flow velocity v = eps - x0 from latents, t = 1000*sigma, LLM text + CLIP pooled."""

    prediction = "flow"

    def __init__(self, cfg):
        super().__init__()
        self.config, heads, D = cfg, cfg.num_attention_heads, cfg.num_attention_heads * cfg.attention_head_dim
        pt, p, self.out_channels = cfg.patch_size_t, cfg.patch_size, cfg.out_channels or cfg.in_channels
        self.x_embedder = nn.ModuleDict(dict(proj=nn.Conv3d(cfg.in_channels, D, (pt, p, p), stride=(pt, p, p))))
        self.context_embedder = nn.ModuleDict(dict(  # the refiner's MLP ratio is 4 whatever mlp_ratio says (as diffusers)
            time_text_embed=nn.ModuleDict(dict(timestep_embedder=TimestepMLP(256, D), text_embedder=TimestepMLP(cfg.text_embed_dim, D))),
            proj_in=nn.Linear(cfg.text_embed_dim, D),
            token_refiner=nn.ModuleDict(dict(refiner_blocks=nn.ModuleList(HunyuanRefinerBlock(D, heads) for _ in range(cfg.num_refiner_layers))))))
        embed = dict(timestep_embedder=TimestepMLP(256, D), text_embedder=TimestepMLP(cfg.pooled_projection_dim, D))
        if cfg.guidance_embeds:
            embed["guidance_embedder"] = TimestepMLP(256, D)
        self.time_text_embed = nn.ModuleDict(embed)
        self.transformer_blocks = nn.ModuleList(HunyuanDoubleBlock(D, heads, cfg.mlp_ratio) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(HunyuanSingleBlock(D, heads, cfg.mlp_ratio) for _ in range(cfg.num_single_layers))
        self.norm_out = HunyuanAdaMod(D, 2)
        self.proj_out = nn.Linear(D, pt * p * p * self.out_channels)
        self.gradient_checkpointing = False

    def default_taps(self):
        """Single-stream blocks 0, 2, 4, ... (the authors' `index % 2 == 0` GAN features), global indices."""
        return [self.config.num_layers + j for j in range(0, self.config.num_single_layers, 2)]

    @staticmethod
    def _sinus(mlp, t):
        """Timestep/guidance MLP on 256 fp32 sinusoids (cos first, shift 0) of t [B] (t on the host or the device)."""
        w = mlp.linear_1.weight
        return mlp(timestep_embedding(t.to(w.device, non_blocking=w.device.type != "cpu"), 256).to(w.dtype))

    def time_embed(self, t, pooled=None, guidance=None, **cond):
        """AdaLN conditioning temb [B, D] = MLP(t) + MLP(guidance) + MLP(pooled CLIP text)."""
        reject_cond(cond, allowed=("text", "text_mask"))
        if pooled is None or (self.config.guidance_embeds and guidance is None):
            raise ValueError("time_embed needs pooled" + (" and guidance" if self.config.guidance_embeds else ""))
        e = self.time_text_embed
        temb = self._sinus(e.timestep_embedder, t)
        if self.config.guidance_embeds:
            temb = temb + self._sinus(e.guidance_embedder, guidance)
        return temb + e.text_embedder(pooled)

    def _refine(self, text, text_mask, t):
        """Token refiner: text [B, Lt, text_dim] -> [B, Lt, D], conditioned on t and the mean valid token."""
        ce = self.context_embedder
        if text_mask is None:
            mean = text.mean(dim=1)
        else:
            m = text_mask.float().unsqueeze(-1)  # [B, Lt, 1]
            mean = ((text * m).sum(dim=1) / m.sum(dim=1)).to(text.dtype)
        temb = self._sinus(ce.time_text_embed.timestep_embedder, t) + ce.time_text_embed.text_embedder(mean)
        # keys-only mask: padded query rows differ from diffusers' (they see key 0 only) but are never read
        mask = None if text_mask is None else text_mask.bool()[:, None, None, :]  # [B, 1, 1, Lt]
        c = ce.proj_in(text)
        for block in ce.token_refiner.refiner_blocks:
            c = run_block(self, block, c, temb, mask)
        return c

    @cached_table()
    def _rope(self, grid, n_text, device):
        """cos, sin [Lv+Lt, head_dim] fp32 for integer (f, h, w) token positions; identity rows for text."""
        cfg, angles = self.config, []
        pos = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in grid), indexing="ij")
        for axis, dim in enumerate(cfg.rope_axes_dim):
            freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
            angles.append(torch.outer(pos[axis].reshape(-1), freqs))  # [Lv, dim/2], tokens in (f, h, w) order
        angle = torch.cat(angles, dim=1).repeat_interleave(2, dim=1)  # [Lv, head_dim], one angle per pair
        pad = (n_text, angle.shape[1])
        return torch.cat([angle.cos(), angle.new_ones(pad)]), torch.cat([angle.sin(), angle.new_zeros(pad)])

    def head(self, h, temb, grid):
        """Video tokens h [B, Lv, D] -> [B, C_out, F, H, W]: norm_out (chunks (scale, shift)), proj_out, unpatchify."""
        cfg, B = self.config, h.shape[0]
        pt, p = cfg.patch_size_t, cfg.patch_size
        f, hh, ww = grid[0] // pt, grid[1] // p, grid[2] // p
        if h.ndim != 3 or h.shape[1] != f * hh * ww:
            raise ValueError(f"head: expected [B, {f * hh * ww}, D] video tokens for latent grid {tuple(grid)}, got {tuple(h.shape)}")
        scale, shift = self.norm_out(temb)
        out = self.proj_out(_hv_ln(h) * (1 + scale) + shift)  # [B, Lv, C*pt*p*p], channel order (c, pt, p, p)
        out = out.reshape(B, f, hh, ww, self.out_channels, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, f, pt, hh, p, ww, p]
        return out.reshape(B, self.out_channels, f * pt, hh * p, ww * p)

    def _check(self, x, t, text, text_mask, pooled, guidance):
        cfg, shape = self.config, lambda a: None if a is None else tuple(a.shape)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, F, H, W], got {tuple(x.shape)}")
        B, _, f, h, w = x.shape
        if f % cfg.patch_size_t or h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent F, H, W = {f}, {h}, {w} must be divisible by the patch sizes ({cfg.patch_size_t}, {cfg.patch_size}, {cfg.patch_size})")
        if not torch.is_tensor(t) or t.shape != (B,):
            raise ValueError(f"t must be a tensor [B={B}] (1000*sigma), got {shape(t) if torch.is_tensor(t) else t!r}")
        if text is None or text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"text must be [B={B}, L, {cfg.text_embed_dim}], got {shape(text)}")
        if pooled is None or pooled.shape != (B, cfg.pooled_projection_dim):
            raise ValueError(f"pooled must be [B={B}, {cfg.pooled_projection_dim}], got {shape(pooled)}")
        if cfg.guidance_embeds and (guidance is None or guidance.shape != (B,)):
            raise ValueError(f"guidance must be [B={B}] (1000*scale) for this model, got {shape(guidance)}")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("guidance given but this model has no guidance embedding (guidance_embeds=False)")
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(f"text_mask must be [B, L] = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
            valid = text_mask.bool()  # the original model (and diffusers, masking by count) assume right padding
            n = valid.sum(dim=1, keepdim=True)
            return ((torch.arange(valid.shape[1], device=n.device) < n) == valid).all() & (n > 0).all()  # read in forward

    def forward(self, x, t, text=None, text_mask=None, pooled=None, guidance=None, taps=None):
        """Flow velocity [B, C, F, H, W]; with `taps` also a list of video tokens [B, Lv, D] after those blocks."""
        ok = self._check(x, t, text, text_mask, pooled, guidance)
        cfg, (B, _, f, hgt, wid) = self.config, x.shape
        tap_set, feats = check_taps(taps, cfg.num_layers + cfg.num_single_layers), []
        if text_mask is not None:  # drop padding columns of all samples (exact); no mask left lets SDPA use flash
            # the forward's one host read (data-dependent shapes): the mask's check and its shared padding together
            lo, hi, ok = torch.stack([*torch.aminmax(text_mask.sum(dim=1)), ok.long()]).tolist()
            if not ok:
                raise ValueError("text_mask must be 1 on a non-empty prefix of the tokens and 0 after (right padding)")
            text, text_mask = text[:, :hi], (text_mask[:, :hi] if lo < hi else None)
        temb = self.time_embed(t, pooled=pooled, guidance=guidance)
        c = self._refine(text, text_mask, t)
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # [B, D, f, h, w] -> [B, Lv, D]
        h, sp = sp_shard(h)  # sequence parallel: this rank's video tokens (else unchanged)
        n_vid = h.shape[1]
        mask = None  # [B, 1, 1, Lv+Lt] keys: all video tokens + the valid text tokens
        if text_mask is not None:
            mask = torch.cat([text_mask.new_ones(B, n_vid), text_mask], dim=1).bool()[:, None, None, :]
        cos, sin = self._rope((f // cfg.patch_size_t, hgt // cfg.patch_size, wid // cfg.patch_size), c.shape[1], x.device)
        cos, sin = sp_rows(cos, sp), sp_rows(sin, sp)
        for i, block in enumerate(self.transformer_blocks):
            h, c = run_block(self, block, h, c, temb, mask, cos, sin, sp)
            if i in tap_set:
                feats.append(sp_gather(h, sp))
        h = torch.cat([h, c], dim=1)  # [B, Lv+Lt, D]: the single-stream stack runs on the joint sequence
        for i, block in enumerate(self.single_transformer_blocks, start=cfg.num_layers):
            h = run_block(self, block, h, temb, mask, cos, sin, sp)
            if i in tap_set:
                feats.append(sp_gather(h[:, :n_vid], sp))
        v = self.head(sp_gather(h[:, :n_vid], sp), temb, (f, hgt, wid))
        return v if taps is None else (v, feats)


# Tencent original checkpoint (`mp_rank_00_model_states.pt`, key `module`) -> our/diffusers names.
# Per key stem (key without .weight/.bias); "{}" = q, k, v rows of a fused qkv; "" = single-block
# linear1 rows [q, k, v, mlp]. The final adaLN rows are (shift, scale), ours (scale, shift).
_TENCENT_TOP = {
    "img_in.proj": "x_embedder.proj", "txt_in.input_embedder": "context_embedder.proj_in",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1", "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1", "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_TENCENT_BLOCKS = {  # original block list -> (our block list, {original stem inside a block: ours})
    "txt_in.individual_token_refiner.blocks": ("context_embedder.token_refiner.refiner_blocks", {
        "norm1": "norm1", "norm2": "norm2", "self_attn_qkv": "attn.to_{}", "self_attn_proj": "attn.to_out.0",
        "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"}),
    "double_blocks": ("transformer_blocks", {
        "img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
        "img_attn_qkv": "attn.to_{}", "txt_attn_qkv": "attn.add_{}_proj",
        "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k",
        "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k",
        "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out",
        "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2", "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"}),
    "single_blocks": ("single_transformer_blocks", {
        "linear1": "", "linear2": "proj_out", "q_norm": "attn.norm_q", "k_norm": "attn.norm_k", "modulation.linear": "norm.linear"}),
}


def tencent_hunyuan_config(sd):
    """HunyuanVideoConfig read off the shapes of a Tencent state dict (RoPE axes as the 13B release)."""
    w = sd["img_in.proj.weight"]  # [D, C_in, pt, p, p]
    D, head_dim = w.shape[0], sd["double_blocks.0.img_attn_q_norm.weight"].shape[0]
    if head_dim != 128:
        raise ValueError(f"Tencent checkpoint with head dim {head_dim}: RoPE axes unknown (the release has 128); pass a config")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    return HunyuanVideoConfig(
        in_channels=w.shape[1], out_channels=sd["final_layer.linear.weight"].shape[0] // w[0, 0].numel(),
        num_attention_heads=D // head_dim, attention_head_dim=head_dim, num_layers=count("double_blocks."),
        num_single_layers=count("single_blocks."), num_refiner_layers=count("txt_in.individual_token_refiner.blocks."),
        mlp_ratio=sd["double_blocks.0.img_mlp.fc1.weight"].shape[0] / D, patch_size=w.shape[3], patch_size_t=w.shape[2],
        guidance_embeds="guidance_in.mlp.0.weight" in sd, text_embed_dim=sd["txt_in.input_embedder.weight"].shape[1],
        pooled_projection_dim=sd["vector_in.in_layer.weight"].shape[1])


def convert_tencent_hunyuan(sd, config=None):
    """Tencent `mp_rank_00_model_states.pt` state dict (or the dict holding it under `module`) -> (config, our state dict)."""
    sd = sd.get("module", sd)
    cfg = config or tencent_hunyuan_config(sd)
    D, out = cfg.num_attention_heads * cfg.attention_head_dim, {}
    for key, w in sd.items():
        stem, leaf = key.rsplit(".", 1)
        name = _TENCENT_TOP.get(stem)
        for prefix, (blocks, names) in _TENCENT_BLOCKS.items():
            idx, _, inner = stem.removeprefix(prefix + ".").partition(".")
            if stem.startswith(prefix + ".") and idx.isdigit() and inner in names:
                name = f"{blocks}.{idx}.{names[inner]}"
        if name is None:
            raise ValueError(f"unexpected key {key!r} in a Tencent HunyuanVideo checkpoint")
        if "{}" in name:
            out.update({f"{name.format(c)}.{leaf}": part for c, part in zip("qkv", w.chunk(3))})
        elif name.endswith("."):  # single-block linear1
            parts = w.split([D, D, D, w.shape[0] - 3 * D])
            out.update({f"{name}{n}.{leaf}": part for n, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts)})
        elif stem == "final_layer.adaLN_modulation.1":
            shift, scale = w.chunk(2)
            out[f"{name}.{leaf}"] = torch.cat([scale, shift])
        else:
            out[f"{name}.{leaf}"] = w
    return cfg, out


ARCHITECTURE = ("HunyuanVideoTransformer3DModel", HunyuanVideoConfig, HunyuanVideoTransformer)  # registered by model.py
PRESETS = {
    "hunyuan-video": HunyuanVideoConfig(),
    "tiny-hunyuan": HunyuanVideoConfig(
        num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=2, num_refiner_layers=1,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)),
}
