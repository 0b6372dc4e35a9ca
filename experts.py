"""Parameter-efficient experts (paper sec. 3.3, Fig. 4): the dual expert (a frozen semantic expert + the detail
expert's LoRA on the attention linears and trainable copies of the timestep-dependent layers), and the semantic expert
built the same way over the teacher's frozen weights (`SemanticLoRA`, train.py --semantic-lora: one GPU).

Routing design. The detail path is a *second module tree* (`expert.detail`) that shares every module
and parameter of the backbone except the LoRA-wrapped linears and the copied layers, which are grafted
in. Which path a sample takes is decided by which tree is called, never by a flag that a later call
could flip: a flag breaks under activation checkpointing, because the backward pass re-runs each
checkpointed block after the forward has returned (and after e.g. a no-grad target forward has set the
flag the other way). With two trees the recomputation always calls the same block objects as the
forward did. A batch straddling the boundary is split into two sub-batches, each run through its tree,
and scattered back, so it equals running the two halves separately bit for bit.

Only `backbone`, `lora` and `copies` (and a LoRA semantic expert's `semantic_lora` / `semantic_copies`) are
registered submodules: state_dict/parameters hold every weight once; `.to()`/`.float()` update the shared tensors in
place so every tree sees them.

With --semantic-lora the semantic expert is a tree of the same kind (`SemanticLoRA.adapted`: the frozen base + its
own LoRA and copies), and the base tree itself, every adapter off, is the teacher (`BaseView`): one copy of the
weights for teacher, semantic and detail expert. A detail expert on such a semantic expert stacks its LoRA on the
semantic one (lora.LoRALinear `under`) and copies the semantic copies: detail = base + semantic + detail adapters.
"""
import os

import torch
import torch.nn as nn

import model as model_lib
from lora import (FORMAT, SEMANTIC_FORMAT, LoRALinear, adapter_state, graft, load_adapter, load_copies, merged_state,
                  new_adapter, read_meta, resolve_targets, save_adapter)
from storage import checkpoint


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


class BaseView:
    """The frozen base of a --semantic-lora student, every adapter off: the teacher. Calls go through the owner's
    forward (`base=True`), so an FSDP2 root gathers its weights as for any other call; not an nn.Module, so a
    Teacher does not freeze the owner's adapters."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, x, t, **kw):
        return self.owner(x, t, base=True, **kw)

    def time_embed(self, t, **cond):
        return self.owner.time_embed(t, base=True, **cond)

    def head(self, h, temb, grid):
        return self.owner.head(h, temb, grid, base=True)

    def parameters(self):
        return self.owner.backbone.parameters()

    def __getattr__(self, name):  # config, prediction, guidance, default_taps: the base's own
        return getattr(self.owner.backbone, name)


class _OverBackbone(nn.Module):
    """What SemanticLoRA and DualExpert share: a registered `backbone` and grafted trees over it (`_trees()`, plain
    attributes whose path copies are not registered, so train() and gradient checkpointing reach them here), and the
    backbone's interface."""

    def _trees(self):
        raise NotImplementedError

    config = property(lambda self: self.backbone.config)
    prediction = property(lambda self: self.backbone.prediction)

    def default_taps(self):
        return self.backbone.default_taps()

    @property
    def gradient_checkpointing(self):
        return self.backbone.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        for tree in (self.backbone, *self._trees()):
            tree.gradient_checkpointing = bool(on)

    def train(self, mode=True):
        super().train(mode)
        for tree in self._trees():
            tree.train(mode)
        return self


class SemanticLoRA(_OverBackbone):
    """The semantic expert as LoRA + trainable copies of the timestep layers over the teacher's frozen weights
    (train.py --semantic-lora R). `base_view()` is the teacher: the same tree with the adapter off."""

    def __init__(self, backbone, rank, alpha, lora_targets="authors", copy_adaln=False, targets=None, dtype=None):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.rank, self.alpha, self.copy_adaln = int(rank), float(alpha), bool(copy_adaln)
        self.arch, self.lora_targets, self.targets, self.lora_names, self.copy_names = resolve_targets(
            backbone, targets, lora_targets, self.copy_adaln)
        self.lora, self.copies, swaps = new_adapter(backbone, self.lora_names, self.copy_names, self.rank, self.alpha,
                                                 dtype=dtype)
        self.copies.requires_grad_(True)  # copied from the frozen base: trainable again
        self.__dict__["adapted"] = graft(backbone, swaps)  # plain attribute: not a second registration

    def _trees(self):
        return (self.adapted,)

    def forward(self, x, t, base=False, **kw):
        """The semantic expert (the adapted tree), or with base=True the teacher (the base tree)."""
        self.adapted.gradient_checkpointing = self.backbone.gradient_checkpointing
        return (self.backbone if base else self.adapted)(x, t, **kw)

    def time_embed(self, t, base=False, **cond):
        return (self.backbone if base else self.adapted).time_embed(t, **cond)

    def head(self, h, temb, grid, base=False):
        return (self.backbone if base else self.adapted).head(h, temb, grid)

    def base_view(self):
        return BaseView(self)

    def init_copies(self, state):
        """The copied layers from backbone-keyed tensors (copy_keys): exact fp32 masters over a bf16 base."""
        load_copies(self.copies, self.copy_names, state)

    def meta(self):
        return {"format": SEMANTIC_FORMAT, "arch": self.arch, "rank": self.rank, "alpha": self.alpha,
                "copy_adaln": self.copy_adaln, "targets": self.targets, "lora_targets": self.lora_targets}

    def state(self):
        return adapter_state(self.lora, self.copies, self.lora_names, self.copy_names)

    def save(self, path, meta=None):
        """The adapter as one small safetensors file (PEFT-style keys, as DualExpert.save_detail)."""
        save_adapter(self.state(), self.meta(), meta, path)

    @torch.no_grad()
    def load(self, path):
        return load_adapter(path, SEMANTIC_FORMAT, self.meta(), self.state())

    @classmethod
    def from_file(cls, backbone, path, dtype=None):
        info = read_meta(path, SEMANTIC_FORMAT)
        m = cls(backbone, info["rank"], info["alpha"], info["lora_targets"], info["copy_adaln"],
                info["targets"] if info["arch"] == "custom" else None, dtype)
        m.load(path)
        return m

    @torch.no_grad()
    def merged_state(self):
        """The semantic expert as a plain backbone state dict: LoRA merged (fp32 sum, cast back), copies in place."""
        return merged_state(self.backbone.state_dict(), [self], self.lora_names, self.copy_names, self.copies)

    def save_parts(self, folder, meta=None):
        """A step folder's weights: FOLDER/semantic.safetensors (the base is the run's teacher)."""
        self.save(os.path.join(folder, "semantic.safetensors"), meta)

    @torch.no_grad()
    def merge_into_base(self):
        """Sampling and export: the base becomes the semantic expert (merged in place) -> the backbone; the teacher
        is gone after this."""
        self.backbone.load_state_dict(self.merged_state(), strict=True)
        return self.backbone


class DualExpert(_OverBackbone):
    """Semantic expert (the backbone) + detail expert (LoRA + copied layers), routed per sample by t.

    Built in "detail" mode (backbone frozen, adapter trainable): building one starts stage 2, from the
    trained semantic expert. The copies are taken at construction.
    """

    def __init__(self, backbone, boundary_t, rank=128, alpha=256, copy_adaln=False, targets=None, lora_targets="authors",
                 semantic=None, dtype=None, on_teacher=False):
        """semantic: a SemanticLoRA over `backbone` (its adapter frozen under ours) or None (the backbone is the
        semantic expert); dtype: of the new adapter (default: the backbone's; train.py: fp32 masters); on_teacher: the
        backbone is the teacher's own low-noise expert (a two-expert teacher, DESIGN.md section 12): frozen, the
        teacher (`base_view`), and not the semantic expert (sampling routes t > boundary_t to the run's --init)."""
        super().__init__()
        self.backbone, self.on_teacher = backbone, bool(on_teacher)
        self.boundary_t = float(boundary_t)
        self.rank, self.alpha, self.copy_adaln = int(rank), float(alpha), bool(copy_adaln)
        self.arch, self.lora_targets, self.targets, self.lora_names, self.copy_names = resolve_targets(
            backbone, targets, lora_targets, self.copy_adaln)
        if semantic is not None and (semantic.backbone is not backbone or semantic.targets != self.targets
                                     or semantic.copy_adaln != self.copy_adaln):
            raise ValueError("a LoRA semantic expert must sit on the same backbone, with the detail expert's targets")
        self.__dict__["sem"] = semantic  # plain attribute: its adapter is registered below, its backbone is ours
        if semantic is not None:
            self.semantic_lora, self.semantic_copies = semantic.lora, semantic.copies
        self.lora, self.copies, swaps = new_adapter(backbone, self.lora_names, self.copy_names, self.rank, self.alpha,
                                                 semantic, dtype)
        self.__dict__["detail"] = graft(backbone, swaps)  # plain attribute: not a second registration
        self.mode = None
        self.set_mode("detail")

    # --- the backbone's interface ---------------------------------------------------------------
    @property
    def semantic(self):
        """The semantic expert's tree: the backbone, or with a LoRA semantic expert its adapted tree."""
        return self.backbone if self.sem is None else self.sem.adapted

    def _trees(self):
        return (self.semantic, self.detail)

    def detail_mask(self, t, B=None):
        """[B] bool, True where t <= boundary_t (detail sub-trajectory), compared in t's own dtype."""
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or (B is not None and t.shape[0] != B):
            raise ValueError(f"t must be a 1-D tensor [B{'' if B is None else f'={B}'}], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        # rounding the boundary like t was rounded keeps a float32 grid timestep on its own side; a host t (the
        # training step's) routes without reading the device (under FSDP2 too: __call__ decides before its hook moves
        # t), a device t costs a host sync in _route
        return t <= torch.full((), self.boundary_t, dtype=t.dtype, device=t.device)

    def __call__(self, x, t, *args, **kw):
        """The routing decided from t where the caller holds it (train.py: on the host), before any forward pre-hook:
        FSDP2's root hook moves tensor inputs to the GPU, where reading the mask would sync the host every call; a
        tuple of Python bools (`route`) is left alone by the hook (issue 28, item 8)."""
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not kw.get("base") and "route" not in kw:
            kw["route"] = tuple(self.detail_mask(t, x.shape[0]).tolist())
        return super().__call__(x, t, *args, **kw)

    def _route(self, mask, call, base=False):
        """call(tree, idx) on each path's sub-batch (idx None = whole batch), results scattered back; base=True:
        the base tree for every sample (a LoRA semantic expert's teacher, BaseView)."""
        semantic = self.backbone if base else self.semantic
        for tree in (self.semantic, self.detail):
            tree.gradient_checkpointing = self.backbone.gradient_checkpointing
        if base or not bool(mask.any()):
            return call(semantic, None)
        if bool(mask.all()):
            return call(self.detail, None)
        idx_d, idx_s = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
        out_d, out_s = call(self.detail, idx_d), call(semantic, idx_s)
        return _join(out_d, out_s, torch.argsort(torch.cat([idx_d, idx_s])))

    def forward(self, x, t, taps=None, base=False, route=None, **cond):
        """Backbone call signature; per-sample routing (returns v, or (v, feats) with taps); base=True: the teacher
        of a LoRA semantic expert (the base tree, no adapter); route: the detail mask as Python bools (__call__)."""
        B = x.shape[0]
        extra = {} if taps is None else {"taps": taps}

        def call(tree, idx):
            if idx is None:
                return tree(x, t, **extra, **cond)
            return tree(_at(x, idx), _at(t, idx), **extra, **_take(cond, idx, B))
        mask = None if base else self.detail_mask(t, B) if route is None else torch.tensor(route)  # [B] bool, host
        return self._route(mask, call, base)

    def time_embed(self, t, base=False, **cond):
        B = t.shape[0]
        return self._route(None if base else self.detail_mask(t), lambda tree, idx: tree.time_embed(
            t if idx is None else _at(t, idx), **(cond if idx is None else _take(cond, idx, B))), base)

    def head(self, h, temb, grid, t=None, base=False):
        """Backbone head, routed per sample by t (needed: norm_out/proj_out differ between experts)."""
        if t is None and not base:
            raise ValueError("DualExpert.head needs t to pick the expert (or call .semantic.head / .detail.head)")
        B = h.shape[0]
        return self._route(None if base else self.detail_mask(t, B), lambda tree, idx: tree.head(
            h if idx is None else _at(h, idx), temb if idx is None else _at(temb, idx), grid), base)

    def base_view(self):
        """The teacher of a LoRA semantic expert: the base tree, every adapter off (BaseView)."""
        if self.sem is None and not self.on_teacher:
            raise ValueError("a DualExpert over a fully fine-tuned semantic expert holds no teacher")
        return BaseView(self)

    def merge_lora(self, merged=True):
        """Sampling: fold each LoRA into a merged weight of its tree's own linear (one GEMM per call, no low-rank
        pair); the backbone's weights stay as they are. merged=False goes back to the LoRA pairs. Merge after moving
        the model (the merged weights are plain attributes, not moved by .to())."""
        for m in [*self.detail.modules(), *self.semantic.modules()]:
            if isinstance(m, LoRALinear) and m.merged != merged:
                m.merge() if merged else m.unmerge()
        return self

    # --- training -------------------------------------------------------------------------------
    def set_mode(self, mode):
        """semantic: the semantic expert trainable (backbone, or its LoRA), detail adapter frozen; detail: only the
        detail LoRA + copies trainable."""
        if mode not in ("semantic", "detail") or (mode == "semantic" and self.on_teacher):
            raise ValueError(f"mode must be 'semantic' or 'detail' ('detail' over the teacher), got {mode!r}")
        self.backbone.requires_grad_(mode == "semantic" and self.sem is None)
        if self.sem is not None:
            self.semantic_lora.requires_grad_(mode == "semantic")
            self.semantic_copies.requires_grad_(mode == "semantic")
        self.lora.requires_grad_(mode == "detail")
        self.copies.requires_grad_(mode == "detail")
        self.mode = mode

    @torch.no_grad()
    def param_counts(self):
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        c = {"backbone": count(self.backbone.parameters()), "lora": count(self.lora.parameters()),
             "copies": count(self.copies.parameters()),
             "semantic_adapter": 0 if self.sem is None else count(self.sem.lora.parameters()) + count(
                 self.sem.copies.parameters())}
        c["adapter"] = c["lora"] + c["copies"]
        c["total"] = c["backbone"] + c["adapter"] + c["semantic_adapter"]
        c["trainable"] = count(p for p in self.parameters() if p.requires_grad)
        return c

    # --- files ----------------------------------------------------------------------------------
    def semantic_state(self):
        return self.backbone.state_dict() if self.sem is None else self.sem.merged_state()

    def save_semantic(self, folder, max_shard_size="5GB"):
        """The fully fine-tuned semantic expert (the backbone) as a transformer folder."""
        if self.sem is not None:
            raise ValueError("a LoRA semantic expert is saved as its adapter (save_parts), its base is the teacher")
        checkpoint.save_transformer(self.backbone, folder, max_shard_size=max_shard_size)

    def save_parts(self, folder, meta=None):
        """A step folder's weights: FOLDER/transformer (the semantic backbone) or, for a LoRA semantic expert,
        FOLDER/semantic.safetensors (its adapter; the base is the run's teacher); FOLDER/detail.safetensors."""
        if self.on_teacher:  # the base is the run's teacher's low-noise expert (run config: detail_base)
            pass
        elif self.sem is None:
            self.save_semantic(os.path.join(folder, "transformer"))
        else:
            self.sem.save(os.path.join(folder, "semantic.safetensors"), meta)
        self.save_detail(os.path.join(folder, "detail.safetensors"), meta)

    def init_copies(self, state):
        """The detail expert's copied layers from backbone-keyed tensors (copy_keys): exact fp32 masters of what it
        copies (the semantic expert's layers) when that is held in bf16."""
        load_copies(self.copies, self.copy_names, state)

    def detail_meta(self):
        return {"format": FORMAT, "arch": self.arch, "boundary_t": self.boundary_t, "rank": self.rank,
                "alpha": self.alpha, "copy_adaln": self.copy_adaln, "targets": self.targets,
                "lora_targets": self.lora_targets, "semantic_lora": 0 if self.sem is None else self.sem.rank}

    def detail_state(self):
        """The detail adapter's tensors (_adapter_state's keys)."""
        return adapter_state(self.lora, self.copies, self.lora_names, self.copy_names)

    def save_detail(self, path, meta=None):
        """The detail adapter as one small safetensors file; `meta` adds e.g. kappa, grid name."""
        save_adapter(self.detail_state(), self.detail_meta(), meta, path)

    read_detail_meta = staticmethod(read_meta)

    @classmethod
    def from_detail(cls, backbone, path, semantic=None, semantic_merged=False):
        """A DualExpert built with the file's rank/alpha/boundary/targets, its adapter loaded: on `semantic` (a
        SemanticLoRA over `backbone`) or, semantic_merged, on a backbone that is such an expert merged (sampling)."""
        info = cls.read_detail_meta(path)
        targets = None if info["arch"] != "custom" else info["targets"]
        expert = cls(backbone, info["boundary_t"], info["rank"], info["alpha"], info["copy_adaln"], targets,
                     info["lora_targets"], semantic)
        expert.load_detail(path, semantic_merged)
        return expert

    @torch.no_grad()
    def load_detail(self, path, semantic_merged=False):
        """Strict load of a save_detail file into this expert; returns its metadata. semantic_merged: the backbone is
        the file's LoRA semantic expert merged (SemanticLoRA.merge_into_base), not a fully fine-tuned one."""
        mine, theirs = self.detail_meta(), read_meta(path).get("semantic_lora")
        if (semantic_merged and self.sem is None) or (not self.sem and not theirs):  # (or a file from before the flag)
            mine.pop("semantic_lora")
        return load_adapter(path, FORMAT, mine, self.detail_state())

    @torch.no_grad()
    def merged_state(self):
        """The detail expert as a plain backbone state dict: LoRA merged (fp32 sum, cast back), copies in place."""
        under = [] if self.sem is None else [self.sem]
        return merged_state(self.backbone.state_dict(), under + [self], self.lora_names, self.copy_names, self.copies)

    def export_merged(self, folder, max_shard_size="5GB"):
        """The detail expert as a full backbone checkpoint, loadable by checkpoint.load_transformer."""
        merged = model_lib.build_transformer(self.backbone.config, device="meta")
        merged.load_state_dict(self.merged_state(), strict=True, assign=True)
        checkpoint.save_transformer(merged, folder, max_shard_size=max_shard_size)
