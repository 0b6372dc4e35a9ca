"""Parameter-efficient dual expert (paper sec. 3.3, Fig. 4): one frozen semantic backbone, plus LoRA
on the attention linears and trainable copies of the timestep-dependent layers for the detail expert.

Routing design. The detail path is a *second module tree* (`expert.detail`) that shares every module
and parameter of the backbone except the LoRA-wrapped linears and the copied layers, which are grafted
in. Which path a sample takes is decided by which tree is called, never by a flag that a later call
could flip: a flag breaks under activation checkpointing, because the backward pass re-runs each
checkpointed block after the forward has returned (and after e.g. a no-grad target forward has set the
flag the other way). With two trees the recomputation always calls the same block objects as the
forward did. A batch straddling the boundary is split into two sub-batches, each run through its tree,
and scattered back, so it equals running the two halves separately bit for bit.

Only `backbone`, `lora` and `copies` are registered submodules: state_dict/parameters hold every
weight once; `.to()`/`.float()` update the shared tensors in place so both trees see them.
"""
import copy
import json

import torch
import torch.nn as nn
from safetensors import safe_open

import model as model_lib
from data import atomic_save_file
from lora import LoRALinear, _matches, arch_of, module_key, targets_for
from storage import checkpoint

FORMAT = "dcm-detail-v1"
def _graft(root, replacements):
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


def _at(v, idx):
    """v[idx] with the (host or device) index moved to v's device without a host sync (non-blocking host ->
    device only: a non-blocking copy to the host could be read before it lands)."""
    return v[idx.to(v.device, non_blocking=v.device.type != "cpu")]


def _take(kwargs, idx, B):
    """The sub-batch `idx` of every per-sample tensor in kwargs (batch-1 / 0-dim tensors broadcast)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != 1:
            if v.shape[0] != B:
                raise ValueError(f"'{k}' has leading dim {v.shape[0]}, expected the batch size {B} (or 1)")
            v = _at(v, idx)
        out[k] = v
    return out


def _join(a, b, inv):
    """Concatenate two sub-batch results (tensors, or tuples/lists of them) and undo the split order."""
    if isinstance(a, torch.Tensor):
        return _at(torch.cat([a, b]), inv)
    if isinstance(a, (tuple, list)):
        return type(a)(_join(x, y, inv) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cannot scatter a backbone result of type {type(a).__name__}")


class DualExpert(nn.Module):
    """Semantic expert (the backbone) + detail expert (LoRA + copied layers), routed per sample by t.

    Built in "detail" mode (backbone frozen, adapter trainable): building one starts stage 2, from the
    trained semantic expert. The copies are taken at construction.
    """

    def __init__(self, backbone, boundary_t, rank=128, alpha=256, copy_adaln=False, targets=None, lora_targets="authors"):
        super().__init__()
        self.backbone = backbone
        self.boundary_t = float(boundary_t)
        self.rank, self.alpha, self.copy_adaln = int(rank), float(alpha), bool(copy_adaln)
        self.arch = arch_of(backbone) if targets is None else "custom"
        self.lora_targets = lora_targets if targets is None else "custom"
        spec = targets_for(self.arch, lora_targets) if targets is None else targets
        if not {"lora", "copy"} <= set(spec) or not set(spec) <= {"lora", "copy", "adaln"}:
            raise ValueError(f"targets must have keys 'lora', 'copy' (and optionally 'adaln'), got {sorted(spec)}")
        self.targets = {k: list(spec.get(k, [])) for k in ("lora", "copy", "adaln")}

        modules = dict(backbone.named_modules())
        names = list(modules)

        def resolve(patterns):
            found = []
            for p in patterns:
                hit = _matches(p, names)
                if not hit:
                    raise ValueError(f"DualExpert target '{p}' matches no module of the {self.arch} backbone")
                found += [n for n in hit if n not in found]
            return sorted(found, key=names.index)

        self.lora_names = resolve(self.targets["lora"])
        self.copy_names = resolve(self.targets["copy"] + (self.targets["adaln"] if copy_adaln else []))
        everything = self.lora_names + self.copy_names
        for a in everything:
            for b in everything:
                if a != b and b.startswith(a + "."):
                    raise ValueError(f"DualExpert targets overlap: '{b}' lies inside '{a}'")
            if len([n for n in everything if n == a]) > 1:
                raise ValueError(f"'{a}' is both a LoRA target and a copied layer")
        for n in self.lora_names:
            if not isinstance(modules[n], nn.Linear):
                raise ValueError(f"LoRA target '{n}' is a {type(modules[n]).__name__}, not nn.Linear")

        self.lora, self.copies, graft = nn.ModuleDict(), nn.ModuleDict(), {}
        for n in self.lora_names:
            graft[n] = LoRALinear(modules[n], self.rank, self.alpha)
            self.lora[module_key(n)] = graft[n].lora
        for n in self.copy_names:
            graft[n] = self.copies[module_key(n)] = copy.deepcopy(modules[n])
        self.__dict__["detail"] = _graft(backbone, graft)  # plain attribute: not a second registration
        self.mode = None
        self.set_mode("detail")

    # --- the backbone's interface ---------------------------------------------------------------
    @property
    def semantic(self):
        return self.backbone

    @property
    def config(self):
        return self.backbone.config

    @property
    def prediction(self):
        return self.backbone.prediction

    def default_taps(self):
        return self.backbone.default_taps()

    @property
    def gradient_checkpointing(self):
        return self.backbone.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        self.backbone.gradient_checkpointing = self.detail.gradient_checkpointing = bool(on)

    def train(self, mode=True):
        super().train(mode)
        self.detail.train(mode)  # the grafted path copies are not registered here
        return self

    def detail_mask(self, t, B=None):
        """[B] bool, True where t <= boundary_t (detail sub-trajectory), compared in t's own dtype."""
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or (B is not None and t.shape[0] != B):
            raise ValueError(f"t must be a 1-D tensor [B{'' if B is None else f'={B}'}], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        # rounding the boundary like t was rounded keeps a float32 grid timestep on its own side; a host t (the
        # training step's) routes without reading the device, a device t costs a host sync in _route
        return t <= torch.full((), self.boundary_t, dtype=t.dtype, device=t.device)

    def _route(self, mask, call):
        """call(tree, idx) on each path's sub-batch (idx None = whole batch), results scattered back."""
        self.detail.gradient_checkpointing = self.backbone.gradient_checkpointing
        if bool(mask.all()):
            return call(self.detail, None)
        if not bool(mask.any()):
            return call(self.backbone, None)
        idx_d, idx_s = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
        out_d, out_s = call(self.detail, idx_d), call(self.backbone, idx_s)
        return _join(out_d, out_s, torch.argsort(torch.cat([idx_d, idx_s])))

    def forward(self, x, t, taps=None, **cond):
        """Backbone call signature; per-sample routing (returns v, or (v, feats) with taps)."""
        B = x.shape[0]
        extra = {} if taps is None else {"taps": taps}

        def call(tree, idx):
            if idx is None:
                return tree(x, t, **extra, **cond)
            return tree(_at(x, idx), _at(t, idx), **extra, **_take(cond, idx, B))
        return self._route(self.detail_mask(t, B), call)

    def time_embed(self, t, **cond):
        mask = self.detail_mask(t)
        B = t.shape[0]
        return self._route(mask,
                           lambda tree, idx: tree.time_embed(t if idx is None else _at(t, idx),
                                                            **(cond if idx is None else _take(cond, idx, B))))

    def head(self, h, temb, grid, t=None):
        """Backbone head, routed per sample by t (needed: norm_out/proj_out differ between experts)."""
        if t is None:
            raise ValueError("DualExpert.head needs t to pick the expert (or call .semantic.head / .detail.head)")
        B = h.shape[0]
        return self._route(self.detail_mask(t, B), lambda tree, idx: tree.head(
            h if idx is None else _at(h, idx), temb if idx is None else _at(temb, idx), grid))

    def merge_lora(self, merged=True):
        """Sampling: fold each LoRA into a merged weight of the detail tree's own linear (one GEMM per call, no
        low-rank pair); the semantic tree's weights stay as they are. merged=False goes back to the LoRA pair.
        Merge after moving the model (the merged weights are plain attributes, not moved by .to())."""
        for m in self.detail.modules():
            if isinstance(m, LoRALinear) and m.merged != merged:
                m.merge() if merged else m.unmerge()
        return self

    # --- training -------------------------------------------------------------------------------
    def set_mode(self, mode):
        """semantic: backbone trainable, adapter frozen; detail: only LoRA + copies trainable."""
        if mode not in ("semantic", "detail"):
            raise ValueError(f"mode must be 'semantic' or 'detail', got {mode!r}")
        self.backbone.requires_grad_(mode == "semantic")
        self.lora.requires_grad_(mode == "detail")
        self.copies.requires_grad_(mode == "detail")
        self.mode = mode

    @torch.no_grad()
    def param_counts(self):
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        c = {"backbone": count(self.backbone.parameters()), "lora": count(self.lora.parameters()),
             "copies": count(self.copies.parameters())}
        c["adapter"] = c["lora"] + c["copies"]
        c["total"] = c["backbone"] + c["adapter"]
        c["trainable"] = count(p for p in self.parameters() if p.requires_grad)
        return c

    # --- files ----------------------------------------------------------------------------------
    def semantic_state(self):
        return self.backbone.state_dict()

    def save_semantic(self, folder, max_shard_size="5GB"):
        checkpoint.save_transformer(self.backbone, folder, max_shard_size=max_shard_size)

    def detail_meta(self):
        return {"format": FORMAT, "arch": self.arch, "boundary_t": self.boundary_t, "rank": self.rank,
                "alpha": self.alpha, "copy_adaln": self.copy_adaln, "targets": self.targets,
                "lora_targets": self.lora_targets}

    def detail_state(self):
        """Adapter tensors under backbone names: '<linear>.lora_A.weight' / '.lora_B.weight' (PEFT
        naming) for LoRA, and the copied layers' own backbone keys (e.g. 'proj_out.weight')."""
        sd = {}
        for n in self.lora_names:
            sd[f"{n}.lora_A.weight"] = self.lora[module_key(n)].A
            sd[f"{n}.lora_B.weight"] = self.lora[module_key(n)].B
        for n in self.copy_names:
            sd.update({f"{n}.{k}": v for k, v in self.copies[module_key(n)].state_dict().items()})
        return sd

    def save_detail(self, path, meta=None):
        """The detail adapter as one small safetensors file; `meta` adds e.g. kappa, grid name."""
        info = self.detail_meta()
        clash = set(info) & set(meta or {})
        if clash:
            raise ValueError(f"meta may not override the adapter's own fields {sorted(clash)}")
        info.update(meta or {})
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.detail_state().items()}
        atomic_save_file(tensors, path, metadata={"dcm": json.dumps(info)})

    @staticmethod
    def read_detail_meta(path):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "dcm" not in meta:
            raise ValueError(f"{path} is not a DCM detail-adapter file (no 'dcm' metadata)")
        info = json.loads(meta["dcm"])
        if info.get("format") != FORMAT:
            raise ValueError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
        info.setdefault("lora_targets", "custom" if info.get("arch") == "custom" else "all")  # files from before the flag
        return info

    @classmethod
    def from_detail(cls, backbone, path):
        """A DualExpert built with the file's rank/alpha/boundary/targets, its adapter loaded."""
        info = cls.read_detail_meta(path)
        targets = None if info["arch"] != "custom" else info["targets"]
        expert = cls(backbone, info["boundary_t"], info["rank"], info["alpha"], info["copy_adaln"], targets, info["lora_targets"])
        expert.load_detail(path)
        return expert

    @torch.no_grad()
    def load_detail(self, path):
        """Strict load of a save_detail file into this expert; returns its metadata."""
        info = self.read_detail_meta(path)
        mine = self.detail_meta()
        bad = [f"{k}: file {info.get(k)!r} vs expert {v!r}" for k, v in mine.items() if info.get(k) != v]
        if bad:
            raise ValueError(f"{path} was saved for a different detail expert: " + "; ".join(bad))
        dst = self.detail_state()
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

    @torch.no_grad()
    def merged_state(self):
        """The detail expert as a plain backbone state dict: LoRA merged (fp32 sum, cast back), copies in place."""
        sd = dict(self.backbone.state_dict())
        for n in self.lora_names:
            w = sd[f"{n}.weight"]
            sd[f"{n}.weight"] = (w.float() + self.lora[module_key(n)].weight_delta()).to(w.dtype)
        for n in self.copy_names:
            sd.update({f"{n}.{k}": v for k, v in self.copies[module_key(n)].state_dict().items()})
        return sd

    def export_merged(self, folder, max_shard_size="5GB"):
        """The detail expert as a full backbone checkpoint, loadable by checkpoint.load_transformer."""
        merged = model_lib.build_transformer(self.backbone.config, device="meta")
        merged.load_state_dict(self.merged_state(), strict=True, assign=True)
        checkpoint.save_transformer(merged, folder, max_shard_size=max_shard_size)
