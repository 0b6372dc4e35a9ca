"""The detail expert's adapter (paper sec. 3.3): which layers get LoRA and which are copied, per architecture
(`--lora-targets authors|all`), the LoRA layers themselves, and adapter sets: built, grafted into a module tree, saved
and loaded (experts.py builds the dual expert and the LoRA semantic expert from them).
"""
import copy
import json
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from storage.latents import atomic_save_file

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

    @torch.no_grad()
    def reset_parameters(self):
        """A like nn.Linear's default init, B = 0: a fresh adapter changes nothing. A is drawn from the CPU generator
        whatever its device, so a run on CUDA (DDP), the FSDP start-up (which draws on the CPU) and a CPU run start
        from the same adapter."""
        if not self.A.is_meta:
            a = torch.empty(self.A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.copy_(a)
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


# ---- adapter sets: built, grafted into a tree, saved and loaded (experts.py uses them) ----------------------
FORMAT, SEMANTIC_FORMAT = "dcm-detail-v1", "dcm-semantic-lora-v1"


def graft(root, replacements):
    """A shallow copy of the module tree `root` with modules swapped in at dotted names.

    Only the modules on the paths to the replaced names are copied (their own params/buffers dicts
    stay shared with the original); everything else is the very same object in both trees.
    """
    copied = {"": copy.copy(root)}
    copied[""]._modules = dict(root._modules)
    for name, new in replacements.items():
        *path, leaf = name.split(".")
        parent, prefix = copied[""], ""
        for part in path:
            prefix = f"{prefix}.{part}" if prefix else part
            if prefix not in copied:
                c = copy.copy(parent._modules[part])
                c._modules = dict(c._modules)
                copied[prefix] = parent._modules[part] = c
            parent = copied[prefix]
        parent._modules[leaf] = new
    return copied[""]


def resolve_targets(backbone, targets, lora_targets, copy_adaln):
    """(arch, lora_targets, target spec, LoRA module names, copied module names) of a backbone (lora.targets_for)."""
    arch = arch_of(backbone) if targets is None else "custom"
    which = lora_targets if targets is None else "custom"
    spec = targets_for(arch, lora_targets) if targets is None else targets
    if not {"lora", "copy"} <= set(spec) or not set(spec) <= {"lora", "copy", "adaln"}:
        raise ValueError(f"targets must have keys 'lora', 'copy' (and optionally 'adaln'), got {sorted(spec)}")
    spec = {k: list(spec.get(k, [])) for k in ("lora", "copy", "adaln")}
    modules = dict(backbone.named_modules())
    names = list(modules)

    def resolve(patterns):
        found = []
        for p in patterns:
            hit = _matches(p, names)
            if not hit:
                raise ValueError(f"adapter target '{p}' matches no module of the {arch} backbone")
            found += [n for n in hit if n not in found]
        return sorted(found, key=names.index)

    lora_names, copy_names = resolve(spec["lora"]), resolve(spec["copy"] + (spec["adaln"] if copy_adaln else []))
    everything = lora_names + copy_names
    for a in everything:
        for b in everything:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"adapter targets overlap: '{b}' lies inside '{a}'")
        if len([n for n in everything if n == a]) > 1:
            raise ValueError(f"'{a}' is both a LoRA target and a copied layer")
    for n in lora_names:
        if not isinstance(modules[n], nn.Linear):
            raise ValueError(f"LoRA target '{n}' is a {type(modules[n]).__name__}, not nn.Linear")
    return arch, which, spec, lora_names, copy_names


def new_adapter(backbone, lora_names, copy_names, rank, alpha, under=None, dtype=None):
    """(lora ModuleDict, copies ModuleDict, {name: module to graft}) of a new adapter set on `backbone`; on top of
    the SemanticLoRA `under`: its LoRA below each new one, its copies copied. LoRA pairs are drawn in name order."""
    modules = dict(backbone.named_modules())
    lora, copies, swaps = nn.ModuleDict(), nn.ModuleDict(), {}
    for n in lora_names:
        key = module_key(n)
        swaps[n] = LoRALinear(modules[n], rank, alpha, under=() if under is None else (under.lora[key],), dtype=dtype)
        lora[key] = swaps[n].lora
    for n in copy_names:
        swaps[n] = copies[module_key(n)] = copy.deepcopy(modules[n] if under is None else under.copies[module_key(n)])
        if dtype is not None:
            swaps[n].to(dtype)
    return lora, copies, swaps


def adapter_state(lora, copies, lora_names, copy_names):
    """Adapter tensors under backbone names: '<linear>.lora_A.weight' / '.lora_B.weight' (PEFT naming) for LoRA,
    and the copied layers' own backbone keys (e.g. 'proj_out.weight')."""
    sd = {}
    for n in lora_names:
        sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = lora[module_key(n)].A, lora[module_key(n)].B
    for n in copy_names:
        sd.update({f"{n}.{k}": v for k, v in copies[module_key(n)].state_dict().items()})
    return sd


@torch.no_grad()
def load_copies(copies, copy_names, state):
    """Fresh copied layers set from `state` (backbone keys -> tensors, e.g. the fp32 masters read from the checkpoint
    of a backbone loaded in bf16), cast to each copy's dtype."""
    for n in copy_names:
        for k, v in copies[module_key(n)].state_dict().items():
            v.copy_(state[f"{n}.{k}"])


def copy_keys(m):
    """The backbone keys of a DualExpert's / SemanticLoRA's copied layers."""
    return [f"{n}.{k}" for n in m.copy_names for k in m.copies[module_key(n)].state_dict()]


def save_adapter(state, info, meta, path):
    clash = set(info) & set(meta or {})
    if clash:
        raise ValueError(f"meta may not override the adapter's own fields {sorted(clash)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_save_file(tensors, path, metadata={"dcm": json.dumps(info | (meta or {}))})


def read_meta(path, fmt=FORMAT):
    """The metadata of an adapter file written by save_detail (fmt FORMAT) or SemanticLoRA.save (SEMANTIC_FORMAT)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "dcm" not in meta:
        raise ValueError(f"{path} is not a DCM adapter file (no 'dcm' metadata)")
    info = json.loads(meta["dcm"])
    if info.get("format") != fmt:
        raise ValueError(f"{path}: format {info.get('format')!r}, expected {fmt!r}")
    info.setdefault("lora_targets", "custom" if info.get("arch") == "custom" else "all")  # files from before the flag
    return info


@torch.no_grad()
def load_adapter(path, fmt, mine, dst):
    """Strict load of an adapter file into the tensors `dst` (checked against the expert's metadata `mine`)."""
    info = read_meta(path, fmt)
    bad = [f"{k}: file {info.get(k)!r} vs expert {v!r}" for k, v in mine.items() if info.get(k) != v]
    if bad:
        raise ValueError(f"{path} was saved for a different expert: " + "; ".join(bad))
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(dst) - keys), sorted(keys - set(dst))
        if missing or unexpected:
            raise ValueError(f"{path}: missing keys {missing[:10]} ({len(missing)} in all), "
                             f"unexpected keys {unexpected[:10]} ({len(unexpected)} in all)")
        for k, d in dst.items():
            v = f.get_tensor(k)
            if v.shape != d.shape:
                raise ValueError(f"{path}: '{k}' has shape {tuple(v.shape)}, expected {tuple(d.shape)}")
            d.copy_(v)
    return info


def merged_state(sd, adapters, lora_names, copy_names, copies):
    """A backbone state dict with the LoRA deltas of `adapters` (objects with .lora) summed in (fp32, cast back)
    and the copied layers `copies` in place."""
    sd = dict(sd)
    for n in lora_names:
        w = sd[f"{n}.weight"]
        sd[f"{n}.weight"] = (w.float() + sum(a.lora[module_key(n)].weight_delta() for a in adapters)).to(w.dtype)
    for n in copy_names:
        sd.update({f"{n}.{k}": v for k, v in copies[module_key(n)].state_dict().items()})
    return sd
