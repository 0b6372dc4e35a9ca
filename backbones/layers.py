"""The layers every backbone shares (cogvideox.py, hunyuan_video.py, ...): timestep sinusoids and MLP, SDPA
attention, RoPE, RMSNorm, the diffusers-named feed-forward, per-block activation checkpointing and the
input checks; parallel.py's sequence-parallel hooks are re-exported. The backbones import this file only
(parallel.py imports torch only); model.py imports the backbones (no import cycle).
"""

import dataclasses
import functools
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scale.parallel import sp_attention, sp_gather, sp_rows, sp_shard  # noqa: F401 - the backbones' sequence-parallel hooks


def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0, max_period=10000):
    """Sinusoidal features [B, dim] of timesteps t [B], fp32 (DDPM / diffusers `Timesteps`)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))
    args = t[:, None].float() * freqs[None, :]  # [B, half]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding` names)."""

    def __init__(self, in_dim, dim, out_dim=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def attention(q, k, v, mask=None, sp=None):
    """Softmax attention on [B, heads, L, d] in the input dtype (SDPA picks the fused kernel); sp: the Shard of
    parallel.sp_shard when the video rows of L are this rank's slice (Ulysses, parallel.py), else None."""
    if sp is not None:  # sequence parallel: all-to-all to [all tokens, heads/N], this function, and back
        return sp_attention(q, k, v, mask, sp, attention)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _table_key(v):
    """A hashable cache key for a table function's argument: a config dataclass by its field values, a module by
    its config (positional tables depend on the config only), sequences as tuples."""
    if isinstance(v, nn.Module):
        v = v.config
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (type(v).__qualname__,) + tuple(_table_key(getattr(v, f.name)) for f in dataclasses.fields(v))
    if isinstance(v, (list, tuple)):
        return tuple(_table_key(x) for x in v)
    return v


def cached_table(maxsize=8):
    """Decorator: cache a positional table per (arguments: config, grid shape, device, dtype), least recently used
    dropped beyond maxsize. The tables are constants: built once outside autograd and inference mode (usable
    by any later call), shared by every caller (read-only). Under torch.compile the table is traced into the
    graph instead (no graph break). fn.cache_clear() empties the cache; fn.__wrapped__ is the uncached fn."""
    def decorate(fn):
        cache = OrderedDict()

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            key = _table_key(args) + _table_key(tuple(sorted(kwargs.items())))
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            with torch.inference_mode(False), torch.no_grad():
                out = cache[key] = fn(*args, **kwargs)
            if len(cache) > maxsize:
                cache.popitem(last=False)
            return out

        wrapper.cache_clear, wrapper.cache_len = cache.clear, lambda: len(cache)
        return wrapper
    return decorate


def apply_rope(x, cos, sin):
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]) of x [B, heads, L, d]; cos/sin [L, d] fp32."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, heads, L, d/2] each
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # [B, heads, L, d]: (-x2, x1) per pair
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32, then scaled by `weight` in the weight dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return ((x.float() * rms).to(self.weight.dtype) * self.weight).to(x.dtype)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu-approximate": lambda x: F.gelu(x, approximate="tanh"),
    "linear-silu": F.silu,
}


class _ProjAct(nn.Module):
    """Linear then activation (the `net.0` of diffusers' FeedForward)."""

    def __init__(self, dim, inner, act, bias=True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}; supported: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.proj = nn.Linear(dim, inner, bias=bias)

    def forward(self, x):
        return self.act(self.proj(x))


class FeedForward(nn.Module):
    """Two-layer MLP with diffusers names `net.0.proj` and `net.2` (`net.1` is its no-op dropout)."""

    def __init__(self, dim, inner, act="gelu-approximate", bias=True, dim_out=None):
        super().__init__()
        out = nn.Linear(inner, dim_out or dim, bias=bias)
        self.net = nn.ModuleList([_ProjAct(dim, inner, act, bias), nn.Identity(), out])

    def forward(self, x):
        return self.net[2](self.net[0](x))


def run_block(model, block, *args):
    """block(*args), under activation checkpointing when model.gradient_checkpointing and grads are on."""
    if model.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def reject_cond(cond, allowed=()):
    """Conditioning an architecture does not use must be None (never silently ignored)."""
    bad = sorted(k for k, v in cond.items() if v is not None and k not in allowed)
    if bad:
        raise ValueError(f"unsupported conditioning for this model: {bad}")


def check_t(t):
    """t must be a 1-D tensor [B] (model-native timesteps)."""
    if not torch.is_tensor(t) or t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor [B], got {tuple(t.shape) if torch.is_tensor(t) else type(t)}")


def check_taps(taps, n_blocks):
    """Validate `taps` (increasing global block indices) and return them as a set."""
    taps = list(taps or ())
    if any(not 0 <= i < n_blocks for i in taps) or taps != sorted(set(taps)):
        raise ValueError(f"taps must be increasing block indices in 0..{n_blocks - 1}, got {taps}")
    return set(taps)
