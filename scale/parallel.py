"""Ulysses sequence parallelism (DESIGN.md sec. 8): the video tokens of each sample are split over an SP group of
N ranks; around attention an all-to-all turns [tokens/N, all heads] into [all tokens, heads/N] and back.

Text tokens are replicated: each rank attends with its own head slice and the text outputs are gathered over
heads. Video tokens are padded to a multiple of N; padded keys are masked out of attention and padded rows are
trimmed by `sp_gather`, so the output is exact. The backbone calls `sp_shard` after its patch embedding (the input
[B, C, F, H, W] and the conditioning are the same on every rank of the group), passes the returned `Shard` to
`layers.attention`, slices its positional tables with `sp_rows` and calls `sp_gather` before its head; without an
SP group (`set_group(None)`, the default) all of these are the identity and the backbone runs as before.

Gradients: every collective's backward is its adjoint (all-to-all <-> inverse all-to-all, all-gather <->
reduce-scatter, slice <-> zero-padded slice), so the gradient of a loss that every rank of the group computes
alike is split over the ranks: its SUM over the group is N times the single-process gradient, and the average
over the whole world that DDP and FSDP2 take (world = DP x SP) is the DP average of the single-process gradients.
This file imports torch only (layers.py re-exports it to the backbones).
"""
import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

_GROUP = None  # the SP process group of this rank; None = no sequence parallelism


def set_group(group):
    """Make `group` (a torch.distributed process group, or None = off) the SP group of every later forward."""
    global _GROUP
    _GROUP = group


def get_group():
    return _GROUP


def size():
    """N, the SP degree (1 without a group)."""
    return 1 if _GROUP is None else dist.get_world_size(_GROUP)


def lead():
    """True on the rank that writes a run's files: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def check_heads(cfg, sp):
    """N must divide the attention head count (Ulysses gives each rank heads/N heads); ValueError otherwise."""
    heads = cfg.num_attention_heads
    if sp < 1 or heads % sp:
        raise ValueError(f"--sp {sp} must divide the model's {heads} attention heads "
                         f"(divisors: {[d for d in range(1, heads + 1) if heads % d == 0]})")


def init(sp):
    """Split the default group's world into SP groups of `sp` consecutive ranks -> (dp_size, dp_rank); torchrun numbers
    a node's ranks consecutively, so a group stays inside a node when sp divides the GPUs per node.

    Every rank creates every group (torch.distributed requires it). sp == 1 sets no group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or world % sp:
        raise ValueError(f"--sp {sp} must divide the world size {world} (world = data parallel x sequence parallel)")
    groups = [dist.new_group(list(range(i, i + sp))) for i in range(0, world, sp)] if sp > 1 else [None]
    set_group(groups[rank // sp] if sp > 1 else None)
    return world // sp, rank // sp


def check(sp, cfg, world):
    """A run's --sp N against the launch (and the model, when cfg is given) before any expensive work: ValueError."""
    if sp == 1:
        return
    if sp < 1:
        raise ValueError(f"--sp {sp} must be >= 1")
    if "RANK" not in os.environ:
        raise ValueError(f"--sp {sp} needs N processes per sample: launch with torchrun "
                         f"(torchrun --nproc_per_node={sp} ... --sp {sp}), not a plain python process")
    if world % sp:
        raise ValueError(f"--sp {sp} must divide the world size {world} (world = data parallel x sequence parallel)")
    if cfg is not None:
        check_heads(cfg, sp)


def all_reduce_mean(tensors):
    """Average `tensors` in place over every rank with one all-reduce of them all (a bucket), not one per tensor."""
    flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum of numels]
    dist.all_reduce(flat)
    for t, v in zip(tensors, (flat / dist.get_world_size()).split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


@contextmanager
def distributed(device, sp=1, fsdp=False, timeout_min=None):
    """torch.distributed for one run: torchrun's default group (or a 1-process group for --fsdp in a plain process)
    when not already set up, and the SP groups -> yields (dp_size, dp_rank); undone on exit. timeout_min: how long a
    collective may wait (None: torch's default, 10 min under NCCL)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda" and device.index is None:  # "cuda" = this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    own = (world > 1 or fsdp) and not dist.is_initialized()
    if own:
        alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        wait = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **alone, **wait)
    try:
        yield init(sp) if dist.is_initialized() else (1, 0)
    finally:
        set_group(None)
        if own:
            dist.destroy_process_group()


@dataclass(frozen=True)
class Shard:
    """One forward's split of the video tokens: n real tokens padded to size * n_local; this rank holds padded
    rows [rank * n_local, (rank + 1) * n_local). video_at: where the video run starts in the attention sequence
    (CogVideoX [text, video]: the text length; HunyuanVideo [video, text] and video-only attention: 0)."""

    group: object
    rank: int
    size: int
    n: int
    n_local: int
    video_at: int = 0

    @property
    def n_pad(self):
        return self.size * self.n_local


# ----------------------------------------------------------------------------------------------
# autograd-correct collectives


def _all_to_all(x, group, scatter_dim, gather_dim):
    """Chunk j of x along scatter_dim goes to rank j; the chunks received are concatenated along gather_dim."""
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()  # [N, *chunk]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all (scatter and gather dims swapped)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(g.contiguous(), group, gather_dim, scatter_dim), None, None, None


_ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.12 names / older
_rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's x along `dim`; backward = reduce-scatter (sum) of the gradient, its adjoint."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.args = group, dim
        n = dist.get_world_size(group)
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # [N * x.shape[0], ...]: the ranks' x, stacked on dim 0
        _ag(out, x.contiguous(), group=group)
        return torch.cat(out.chunk(n), dim=dim)

    @staticmethod
    def backward(ctx, g):
        group, dim = ctx.args
        n = dist.get_world_size(group)
        send = torch.cat(g.chunk(n, dim=dim))  # [N * x.shape[0], ...]: rank j's part j-th on dim 0
        out = send.new_empty((send.shape[0] // n, *send.shape[1:]))
        _rs(out, send, group=group)
        return out, None, None


# ----------------------------------------------------------------------------------------------
# the hooks the backbones call (identity without an SP group)


def sp_shard(h, video_at=0):
    """Video tokens h [B, L, D] (the same on every rank) -> (this rank's padded slice [B, L_pad/N, D], Shard);
    (h, None) without an SP group. Padding rows are zeros; the backward of the slice is the zero-padded gradient."""
    if _GROUP is None:
        return h, None
    n_sp, rank, n = dist.get_world_size(_GROUP), dist.get_rank(_GROUP), h.shape[1]
    n_local = -(-n // n_sp)
    h = F.pad(h, (0, 0, 0, n_sp * n_local - n))  # [B, N * n_local, D]
    sp = Shard(_GROUP, rank, n_sp, n, n_local, video_at)
    return h[:, rank * n_local:(rank + 1) * n_local], sp


def sp_gather(h, sp):
    """This rank's video tokens [B, n_local, ...] -> all real tokens [B, n, ...] on every rank (padding trimmed)."""
    if sp is None:
        return h
    return _AllGather.apply(h, sp.group, 1)[:, :sp.n]


def sp_rows(table, sp):
    """A positional table [L, ...] whose rows video_at .. video_at + n are the video tokens' -> this rank's rows
    [L - n + n_local, ...] (text rows kept, video rows padded with zeros and sliced like sp_shard)."""
    if sp is None:
        return table
    a, b = sp.video_at, sp.video_at + sp.n
    vid = F.pad(table[a:b], (0, 0) * (table.dim() - 1) + (0, sp.n_pad - sp.n))  # [n_pad, ...]
    return torch.cat([table[:a], vid[sp.rank * sp.n_local:(sp.rank + 1) * sp.n_local], table[b:]])


def _key_mask(mask, sp, L_local, device):
    """Key mask [B|1, 1, 1, L_full] of the gathered sequence: the text columns of the backbone's local key mask
    (or all true) and, for the video run, true on the n real tokens only; None when nothing is masked."""
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)):
        raise ValueError(f"sequence parallel attention takes a boolean key mask [B, 1, 1, L], got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if mask is None and sp.n == sp.n_pad:
        return None
    a, b = sp.video_at, sp.video_at + sp.n_local
    if mask is None:
        mask = torch.ones(1, 1, 1, L_local, dtype=torch.bool, device=device)
    vid = (torch.arange(sp.n_pad, device=device) < sp.n).expand(mask.shape[0], 1, 1, sp.n_pad)
    return torch.cat([mask[..., :a], vid, mask[..., b:]], dim=-1)  # [B|1, 1, 1, L_full]


def sp_attention(q, k, v, mask, sp, sdpa):
    """Ulysses attention on this rank's q, k, v [B, heads, L_local, d] (text rows replicated, video rows
    video_at .. video_at + n_local this rank's) -> [B, heads, L_local, d]; `sdpa(q, k, v, mask)` runs on
    heads/N heads over the whole sequence [text, all video tokens]."""
    n_sp, H = sp.size, q.shape[1]
    if H % n_sp:
        raise ValueError(f"sequence parallel degree {n_sp} must divide the {H} attention heads")
    a, b = sp.video_at, sp.video_at + sp.n_local
    heads = slice(sp.rank * H // n_sp, (sp.rank + 1) * H // n_sp)
    qkv = torch.stack([q, k, v])  # [3, B, H, L_local, d]
    vid = _AllToAll.apply(qkv[:, :, :, a:b], sp.group, 2, 3)  # [3, B, H/N, n_pad, d]: all tokens, own heads
    qkv = torch.cat([qkv[:, :, heads, :a], vid, qkv[:, :, heads, b:]], dim=3)  # [3, B, H/N, L_full, d]
    pad = sp.n_pad - sp.n
    if mask is None and pad:  # padding rows left out, not masked: SDPA keeps its fused (flash) kernel without a mask
        kept = torch.cat([qkv[:, :, :, :a + sp.n], qkv[:, :, :, a + sp.n_pad:]], dim=3)  # [3, B, H/N, L_full - pad, d]
        o = sdpa(kept[0], kept[1], kept[2], None)
        o = torch.cat([o[:, :, :a + sp.n], o.new_zeros(*o.shape[:2], pad, o.shape[3]), o[:, :, a + sp.n:]], dim=2)
    else:  # a backbone's own key mask (HunyuanVideo's text padding): the video padding joins it
        o = sdpa(qkv[0], qkv[1], qkv[2], _key_mask(mask, sp, q.shape[2], q.device))  # [B, H/N, L_full, d]
    o_vid = _AllToAll.apply(o[:, :, a:a + sp.n_pad], sp.group, 2, 1)  # [B, H, n_local, d]: own tokens, all heads
    o_txt = _AllGather.apply(torch.cat([o[:, :, :a], o[:, :, a + sp.n_pad:]], dim=2), sp.group, 1)  # [B, H, Lt, d]
    return torch.cat([o_txt[:, :, :a], o_vid, o_txt[:, :, a:]], dim=2)  # [B, H, L_local, d]
