"""The detail expert's adapter (paper sec. 3.3): which layers get LoRA and which are copied, per architecture
(`--lora-targets authors|all`), and the LoRA layers themselves. experts.py grafts them into the dual expert.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

QKVO = ("to_q", "to_k", "to_v", "to_out.0")
# where the detail expert differs from the semantic one, per architecture (`--lora-targets all`); `*` = one
# name component, `**` = any number of leading ones.
# "lora": attention linears (authors: to_q/to_k/to_v/to_out.0 of every attention; we add the
# double blocks' text-stream projections, which are the same attention's linears under other names;
# single blocks' fused proj_out is an MLP+attention output, not an attention linear: left out).
# "copy": timestep-dependent layers, trainable copies. "adaln": per-block modulation linears,
# copied only with copy_adaln=True.
TARGETS = {
    "CogVideoX": {
        "lora": [f"transformer_blocks.*.attn1.{n}" for n in QKVO],
        "copy": ["time_embedding", "norm_out", "proj_out"],
        "adaln": ["transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm2.linear"],
    },
    "HunyuanVideo": {
        "lora": [f"transformer_blocks.*.attn.{n}" for n in
                 QKVO + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
                + [f"single_transformer_blocks.*.attn.{n}" for n in QKVO[:3]]
                + [f"context_embedder.token_refiner.refiner_blocks.*.attn.{n}" for n in QKVO],
        "copy": ["time_text_embed", "context_embedder.time_text_embed", "norm_out", "proj_out"],
        "adaln": ["transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear",
                  "single_transformer_blocks.*.norm.linear",
                  "context_embedder.token_refiner.refiner_blocks.*.norm_out.linear"],
    },
    # Wan = the authors' set (modeling_wan.py add_layer): copies of condition_embedder (time MLP, the blocks'
    # time_proj, text projection), norm_out (parameter-free), proj_out; scale_shift_table stays shared.
    "Wan": {
        "lora": [f"blocks.*.{a}.{n}" for a in ("attn1", "attn2") for n in QKVO],
        "copy": ["condition_embedder", "norm_out", "proj_out"],
        "adaln": [],  # per block only a scale_shift_table parameter, added to the (copied) time_proj output
    },
}


# `--lora-targets authors`: their PEFT target_modules=["to_q", "to_k", "to_v", "to_out.0"], which wraps every module
# named or ending in "." + one of them (HunyuanVideo: also the single blocks' and the token refiner's attention, not
# add_*_proj / to_add_out), + their add_layer() copies (HunyuanVideo: no refiner copy; CogVideoX, not theirs: ours).
AUTHORS_LORA, AUTHORS_COPY = [f"**.{n}" for n in QKVO], {"HunyuanVideo": ["time_text_embed", "norm_out", "proj_out"]}
LORA_TARGETS = ("authors", "all")


def targets_for(arch, which="authors"):
    """The target spec {"lora", "copy", "adaln"} of an architecture for --lora-targets `which`."""
    if which not in LORA_TARGETS:
        raise ValueError(f"lora_targets must be one of {LORA_TARGETS}, got {which!r}")
    return TARGETS[arch] if which == "all" else {"lora": AUTHORS_LORA, "adaln": TARGETS[arch].get("adaln", []),
                                                 "copy": AUTHORS_COPY.get(arch, TARGETS[arch]["copy"])}


class LoRA(nn.Module):
    """The trainable low-rank pair of one linear: delta W = (alpha / rank) * B @ A (Hu et al. 2021)."""

    def __init__(self, in_features, out_features, rank, alpha, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        """A like nn.Linear's default init, B = 0: a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def weight_delta(self):
        """scale * B @ A in float32 (what merge adds to the base weight)."""
        return (self.B.float() @ self.A.float()) * self.scale


class LoRALinear(nn.Module):
    """y = base(x) + sum of frozen lower adapters + scale * B A x: an nn.Linear with its adapter.

    `under`: LoRA pairs this one sits on (the frozen semantic LoRA under a detail LoRA, --semantic-lora), a plain
    tuple: they are registered where they are trained, not here. merge() holds W + every delta (fp32 sum, cast back)
    as this layer's own weight: one matmul per call, and base.weight (shared with the other trees of a DualExpert)
    is never touched; unmerge() drops it. Costs one weight copy while merged; merged vs unmerged outputs agree to
    round-off. A merged layer gives its LoRA no gradient: merge for sampling.
    """

    def __init__(self, base, rank, alpha, lora=None, under=(), dtype=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        w = base.weight
        self.lora = lora if lora is not None else LoRA(
            base.in_features, base.out_features, rank, alpha, device=w.device, dtype=dtype or w.dtype)
        self.under = tuple(under)  # a tuple: not registered (see above)
        self._merged_weight = None  # a plain attribute: never in the state dict

    @property
    def merged(self):
        return self._merged_weight is not None

    def forward(self, x):
        if self.merged:
            return F.linear(x, self._merged_weight, self.base.bias)
        y = self.base(x)
        for u in self.under:
            y = y + u(x)
        return y + self.lora(x)

    @torch.no_grad()
    def weight(self):
        """The merged weight W + every delta, summed in fp32, in W's dtype."""
        w = self.base.weight
        return (w.float() + sum(u.weight_delta() for u in self.under) + self.lora.weight_delta()).to(w.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        self._merged_weight = self.weight()

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        self._merged_weight = None


def arch_of(backbone):
    """The TARGETS key of a backbone from model.py, from its config class (e.g. CogVideoXConfig)."""
    names = [type(getattr(backbone, "config", None)).__name__.removesuffix("Config"), type(backbone).__name__]
    for name in names:
        for arch in TARGETS:
            if name.startswith(arch):
                return arch
    raise ValueError(f"no DualExpert targets for a backbone of class {names[1]} (config {names[0]}); "
                     f"known architectures: {sorted(TARGETS)} (or pass targets=)")


def _matches(pattern, names):
    """Names matching a dotted pattern: `*` is one component, a leading `**.` any number (PEFT's suffix rule)."""
    head, rest = (r"(?:[^.]+\.)*", pattern[3:]) if pattern.startswith("**.") else ("", pattern)
    rx = re.compile(head + r"\.".join(r"[^.]+" if p == "*" else re.escape(p) for p in rest.split(".")))
    return [n for n in names if rx.fullmatch(n)]


def module_key(name):
    """A dotted module name as a ModuleDict key."""
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots
