"""Video diffusion transformers (CogVideoX, HunyuanVideo, Wan2.1) in plain PyTorch: the config registry, the presets
and `build_transformer`. The architectures are one file each (backbones/cogvideox.py, hunyuan_video.py, wan.py) on the
shared layers of backbones/layers.py; each declares its `ARCHITECTURE` and `PRESETS`, which this file registers.
`model.CogVideoXTransformer` etc. resolve to the architecture files.

Module and parameter names equal diffusers' state-dict keys, so a diffusers `transformer/` folder
loads 1:1 (see storage/checkpoint.py). Public call: `model(x [B,C,F,H,W], t [B], text=...) -> [B,C,F,H,W]`.
Positional tables and sinusoids are computed in fp32/fp64 for the actual latent size (never stored in the
state dict; the tables are cached per size, device and dtype: layers.cached_table); attention runs in the input
dtype through SDPA.
"""

from contextlib import contextmanager
from dataclasses import asdict, fields

import torch

from backbones import cogvideox, hunyuan_video, wan

# ----------------------------------------------------------------------------------------------
# config registry


_ARCH_MODULES = (cogvideox, hunyuan_video, wan)
ARCHITECTURES = {}  # diffusers `_class_name` -> (ConfigCls, ModelCls)
PRESETS = {}  # name -> config
for _m in _ARCH_MODULES:
    _name, _config_cls, _model_cls = _m.ARCHITECTURE
    ARCHITECTURES[_name] = (_config_cls, _model_cls)
    PRESETS.update(_m.PRESETS)


def config_from_fields(cls, d):
    """Build config dataclass `cls` from a diffusers config.json dict; keys starting with '_' are ignored."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    want = lambda f: f"{getattr(f.type, '__name__', f.type)}{' >= 1' * (f.name in _AT_LEAST_1)}"  # noqa: E731
    bad = [f"{f.name}={d[f.name]!r} (want {want(f)})" for f in fields(cls) if f.name in d and not _fits(f, d[f.name])]
    if bad:
        raise ValueError(f"{cls.__name__}: bad config values {', '.join(bad)}")
    return cls(**{k: v for k, v in d.items() if k in known})


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "tuple": (list, tuple)}
_AT_LEAST_1 = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "patch_size",
               "patch_size_t", "text_embed_dim", "time_embed_dim", "temporal_compression_ratio", "max_text_seq_length")


def _fits(f, v):
    """A config.json value against its dataclass field: its type (ints not bools) and, for sizes, >= 1."""
    names = [t.strip() for t in (f.type.__name__ if isinstance(f.type, type) else str(f.type)).split("|")]
    if v is None:
        return "None" in names
    ok = any(isinstance(v, _TYPES.get(t, (object,))) and not (t != "bool" and isinstance(v, bool)) for t in names)
    return ok and not (f.name in _AT_LEAST_1 and isinstance(v, int) and v < 1)


def config_from_dict(d):
    """Dispatch a diffusers config.json dict to its config class by `_class_name`."""
    name = d.get("_class_name")
    if name not in ARCHITECTURES:
        raise ValueError(f"config _class_name {name!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return config_from_fields(ARCHITECTURES[name][0], d)


def class_name_of(cfg):
    """diffusers `_class_name` of a config instance."""
    for name, (config_cls, _) in ARCHITECTURES.items():
        if type(cfg) is config_cls:
            return name
    raise ValueError(f"no architecture registered for config type {type(cfg).__name__}")


def config_to_dict(cfg):
    """diffusers-style config.json dict (with `_class_name`)."""
    return {"_class_name": class_name_of(cfg), **asdict(cfg)}


@contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"model dtype must be floating point, got {dtype}")
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(preset_or_config, device=None, dtype=None):
    """Build a transformer from a preset name or config (device="meta" builds without memory)."""
    cfg = preset_or_config
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown preset {cfg!r}; known: {sorted(PRESETS)}")
        cfg = PRESETS[cfg]
    model_cls = ARCHITECTURES[class_name_of(cfg)][1]
    with torch.device(device or "cpu"), _default_dtype(dtype):  # params born on device and in dtype
        return model_cls(cfg)


# ----------------------------------------------------------------------------------------------


def __getattr__(name):
    """model.CogVideoXTransformer, model.HunyuanVideoConfig, ...: names of the architecture files."""
    for module in _ARCH_MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
