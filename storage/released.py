"""The authors' released DCM students (the `DCM_HY/` and `DCM_WAN/` pipeline folders) <-> our DualExpert.

    python export.py authors --ckpt out/detail --out DCM_MINE/transformer [--dtype bf16]   # ours -> their layout

Their `transformer/diffusion_pytorch_model.safetensors` is the full state dict of a diffusers transformer
after PEFT `add_adapter(LoraConfig(r=128, lora_alpha=256, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
adapter_name="lora1")` and their `add_layer()` (DESIGN.md sec. 7):
- a LoRA-wrapped linear `X` (every module named `X = ...to_q` etc.) stores `X.base_layer.weight/.bias` (the
  semantic expert's weight) and `X.lora_A.lora1.weight` [r, in] / `X.lora_B.lora1.weight` [out, r];
- the detail expert's copies are extra modules `<name>_lora` (HunyuanVideo: time_text_embed, norm_out,
  proj_out; Wan: condition_embedder, norm_out, proj_out), with the original module's keys below them;
- every other key is the semantic backbone's, named as in diffusers.
That is exactly our DualExpert with `lora_targets="authors"`, so loading is a key renaming and a strict check:
a key that is not in the layout, or one that is missing, is an error naming it. Their inference routes a
batch by its first sample: adapters and `*_lora` modules on when int(t[0]) <= 981 (HunyuanVideo) or 978
(Wan), i.e. t < 982 / 979; our DualExpert applies the same rule to every sample (boundary_t below).
The file holds no LoRA alpha (their scripts hard-code alpha = 2 * r): an export of ours records rank and alpha in the
weights file's metadata (older exports: `_dcm_lora_alpha` in config.json), else we use 2 * r. Their scripts build the
transformer as `cls(**json.load(config.json))` with their own classes, which take exactly their `__init__` arguments
(`config_keys` below): an export writes those keys and no other, not even diffusers' `_class_name`.
"""
import json
import os
from dataclasses import fields

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import experts
import lora
from storage import checkpoint

ADAPTER = checkpoint.AUTHORS_ADAPTER  # "lora1"
# per architecture: their copy module -> ours; detail when int(t) <= threshold (their inference scripts; their Wan
# detail-training script routes at 981, its inference at 978: we follow inference); the sampling schedule of
# scripts/inference/*.sh (HunyuanVideo: cus_sigmas in inference_hy.py; Wan: cus_timesteps in inference_wan.py)
LAYOUTS = {
    "HunyuanVideo": {"copies": {"time_text_embed_lora": "time_text_embed", "norm_out_lora": "norm_out",
                                "proj_out_lora": "proj_out"},
                     "threshold": 981, "schedule": ("sigmas", [1.0, 0.9920, 0.9818, 0.9124]),
                     # the __init__ arguments of their class, fastvideo/models/hunyuan_hf/modeling_hunyuan.py 678-696
                     "config_keys": ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                                     "num_layers", "num_single_layers", "num_refiner_layers", "mlp_ratio", "patch_size",
                                     "patch_size_t", "qk_norm", "guidance_embeds", "text_embed_dim",
                                     "pooled_projection_dim", "rope_theta", "rope_axes_dim")},
    "Wan": {"copies": {"condition_embedder_lora": "condition_embedder", "norm_out_lora": "norm_out",
                       "proj_out_lora": "proj_out"},
            "threshold": 978, "schedule": ("timesteps", [1000, 992, 982, 949, 905, 810]),
            # their fastvideo/models/wan_hf/modeling_wan.py 387-404
            "config_keys": ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                            "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
                            "image_dim", "added_kv_proj_dim", "rope_max_seq_len")},
}


class ReleasedError(ValueError):
    """A file that is not (exactly) in the authors' layout; the command lines print it as one line."""


def boundary_t(threshold):
    """DualExpert boundary_t equal to their rule int(t) <= threshold for float32 t >= 0 (what the samplers pass):
    the largest float32 below threshold + 1."""
    return float(torch.nextafter(torch.tensor(threshold + 1.0), torch.tensor(0.0)))


def their_names(expert):
    """{their key: our DualExpert state-dict key} of an expert built with lora_targets="authors"."""
    if expert.arch not in LAYOUTS or expert.lora_targets != "authors" or expert.copy_adaln:
        raise ReleasedError(f"the authors' layout holds only a {'/'.join(LAYOUTS)} detail expert with "
                            f"--lora-targets authors and no AdaLN copies (this one: {expert.arch}, "
                            f"{expert.lora_targets}{', copy_adaln' if expert.copy_adaln else ''})")
    copies = {ours: theirs for theirs, ours in LAYOUTS[expert.arch]["copies"].items()}
    if sorted(copies) != sorted(expert.copy_names):
        raise ReleasedError(f"copied layers {expert.copy_names} are not the authors' {sorted(copies)}")
    wrapped, names = set(expert.lora_names), {}
    for k in expert.backbone.state_dict():
        module, _, leaf = k.rpartition(".")  # top-level parameters (Wan's scale_shift_table) have no module
        names[f"{module}.base_layer.{leaf}" if module in wrapped else k] = f"backbone.{k}"
    for n in expert.lora_names:
        names[f"{n}.lora_A.{ADAPTER}.weight"] = f"lora.{lora.module_key(n)}.A"
        names[f"{n}.lora_B.{ADAPTER}.weight"] = f"lora.{lora.module_key(n)}.B"
    for n in expert.copy_names:
        for k in expert.copies[lora.module_key(n)].state_dict():
            names[f"{copies[n]}.{k}"] = f"copies.{lora.module_key(n)}.{k}"
    return names


def read_config(folder):
    """(model config, raw dict) of their config.json: by `_class_name`, else (their save_checkpoint writes
    dict(transformer.config), which lacks it) the one architecture whose config fields hold all its keys."""
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    if "_class_name" not in raw:
        keys = {k for k in raw if not k.startswith("_")}
        fits = [n for n, (cls, _) in checkpoint.M.ARCHITECTURES.items() if keys <= {f.name for f in fields(cls)}]
        if len(fits) != 1:
            raise ReleasedError(f"{folder}/config.json: no _class_name, and its keys fit {fits or 'no architecture'}")
        raw = {"_class_name": fits[0], **raw}
    return checkpoint.M.config_from_dict(raw), raw


def load_released(path, dtype=None, device="cpu"):
    """(DualExpert, info) from the authors' layout at `path` (pipeline folder or transformer/, or its resolved
    checkpoint.Source); info holds arch, threshold, schedule (kind, values), folder, rank, alpha. Strict: the first
    unknown, missing or mis-shaped key is named in the error."""
    src = path if isinstance(path, checkpoint.Source) else checkpoint.resolve(path, "the authors' student")
    if src.kind != "authors":
        raise ReleasedError(f"{src.path}: not the authors' DCM layout (no '{ADAPTER}' LoRA keys in its transformer weights)")
    folder = src.weights
    cfg, raw = read_config(folder)
    shapes, load = checkpoint._folder_tensors(folder)
    rank = next(s[0] for k, s in shapes.items() if k.endswith(f".lora_A.{ADAPTER}.weight"))
    meta = {}
    if os.path.isfile(os.path.join(folder, checkpoint.WEIGHTS)):
        with safe_open(os.path.join(folder, checkpoint.WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
    alpha = float(meta.get("dcm_lora_alpha", raw.get("_dcm_lora_alpha", 2 * rank)))
    backbone = checkpoint.M.build_transformer(cfg, device="meta")
    arch = lora.arch_of(backbone)
    if arch not in LAYOUTS:
        raise ReleasedError(f"{folder}: the authors released HunyuanVideo and Wan students, not {arch}")
    layout = LAYOUTS[arch]
    expert = experts.DualExpert(backbone, boundary_t(layout["threshold"]), rank, alpha, lora_targets="authors")
    names = their_names(expert)
    ours = {k: tuple(v.shape) for k, v in expert.state_dict().items()}
    for k in shapes:
        if k not in names:
            raise ReleasedError(f"{folder}: key '{k}' is not part of the authors' {arch} layout")
    for k in names:
        if k not in shapes:
            raise ReleasedError(f"{folder}: key '{k}' of the authors' {arch} layout is missing")
        if shapes[k] != ours[names[k]]:
            raise ReleasedError(f"{folder}: '{k}' has shape {shapes[k]}, the {arch} config wants {ours[names[k]]}")
    sd = {}
    for k, v in load():
        w = v.to(device=device, dtype=dtype or v.dtype)
        sd[names[k]] = w.clone() if w.data_ptr() == v.data_ptr() else w  # own memory (see load_transformer)
    expert.load_state_dict(sd, strict=True, assign=True)  # shared modules: both expert trees see the tensors
    info = {"arch": arch, "threshold": layout["threshold"], "schedule": layout["schedule"], "folder": folder,
            "rank": rank, "alpha": alpha}
    return expert, info


def released_state(expert):
    """The expert's tensors under the authors' keys (the file their inference loads with strict=True)."""
    sd = expert.state_dict()
    return {theirs: sd[ours].detach().contiguous() for theirs, ours in their_names(expert).items()}


def routing_disagreements(expert, grid):
    """Grid t where the expert's t <= boundary_t and the authors' int(t) <= threshold pick different experts."""
    thr = LAYOUTS[expert.arch]["threshold"]
    t32 = grid.t[1:].float()
    ours = t32 <= torch.tensor(expert.boundary_t, dtype=torch.float32)
    return [float(t) for t, o in zip(t32, ours) if bool(o) != (int(t) <= thr)]


def their_config(expert):
    """config.json for their class: exactly its __init__ arguments (LAYOUTS config_keys); a setting of ours their
    class cannot express (a non-default value of another field) is an error naming it."""
    ours, keys = checkpoint.M.config_to_dict(expert.config), LAYOUTS[expert.arch]["config_keys"]
    defaults = {f.name: f.default for f in fields(type(expert.config))}
    lost = [k for k, v in ours.items() if not k.startswith("_") and k not in keys and v != defaults.get(k)]
    if lost:
        raise ReleasedError(f"the authors' {expert.arch} class has no {', '.join(f'{k} (here {ours[k]!r})' for k in lost)}")
    return {k: ours[k] for k in keys}


def export_released(expert, folder, dtype=None):
    """Write `expert` as the authors' transformer/ folder: config.json (their class's arguments only, their_config)
    and one diffusion_pytorch_model.safetensors, rank and alpha in its metadata. Their inference scripts hard-code
    r=128, alpha=256."""
    sd = released_state(expert)
    config = their_config(expert)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with checkpoint.atomic_dir(folder) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(sd, os.path.join(tmp, checkpoint.WEIGHTS), metadata={"format": "pt", "dcm_lora_rank": str(expert.rank),
                                                                        "dcm_lora_alpha": str(expert.alpha)})
    return folder
