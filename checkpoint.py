"""Transformer checkpoints in the diffusers folder layout (and original formats through converters).

A diffusers `transformer/` folder holds `config.json` plus `diffusion_pytorch_model.safetensors`, or
shards listed in `diffusion_pytorch_model.safetensors.index.json` (`weight_map`: key -> shard file).
Loading builds the model on the meta device and assigns the stored tensors one by one, so weights
never sit in memory twice.
"""

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model as M

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout is tested against

# ---- original (non-diffusers) checkpoint formats ---------------------------------------------
# file name -> converter(path) returning (config, state dict with diffusers keys). The HunyuanVideo
# helper registers Tencent's `mp_rank_00_model_states.pt` here (see _tencent_hunyuan below).
ORIGINAL_FORMATS = {}


def _tencent_hunyuan(path):
    """Tencent HunyuanVideo `mp_rank_00_model_states.pt` -> (config, diffusers-key state dict)."""
    convert = getattr(M, "convert_tencent_hunyuan", None)  # lives with the HunyuanVideo classes
    if convert is None:
        raise ValueError(f"{path}: the Tencent HunyuanVideo converter (model.convert_tencent_hunyuan) is not available")
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    out = convert(sd.get("module", sd))
    return out if isinstance(out, tuple) else (M.PRESETS["hunyuan-video"], out)


ORIGINAL_FORMATS["mp_rank_00_model_states.pt"] = _tencent_hunyuan


def _load_state_dict_file(path):
    """A single original-format checkpoint file -> (config, state dict), via ORIGINAL_FORMATS."""
    name = os.path.basename(path)
    if name not in ORIGINAL_FORMATS:
        raise ValueError(f"{path}: not a diffusers transformer folder and no converter for {name!r}; "
                         f"known: {sorted(ORIGINAL_FORMATS)}")
    return ORIGINAL_FORMATS[name](path)


# ---- loading -----------------------------------------------------------------------------------


def transformer_folder(path):
    """The folder holding config.json: `path` itself or its `transformer/` subfolder."""
    for folder in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise ValueError(f"{path}: no config.json here or in {os.path.join(path, 'transformer')}")


def _shard_files(folder):
    """Shard file -> list of keys, from the index's weight_map (or the single weights file)."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
    elif os.path.isfile(os.path.join(folder, WEIGHTS)):
        shards = {WEIGHTS: None}
    else:
        raise ValueError(f"{folder}: neither {WEIGHTS} nor {INDEX} found")
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise ValueError(f"{folder}: shard files listed in the index are missing: {missing}")
    return shards


def _folder_tensors(folder):
    """(key -> shape, loader) for a diffusers folder; loader() yields (key, tensor) one at a time."""
    shards, shapes = _shard_files(folder), {}
    for shard, listed in shards.items():
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            keys = list(f.keys())
            if listed is not None and set(listed) != set(keys):
                absent, unlisted = sorted(set(listed) - set(keys)), sorted(set(keys) - set(listed))
                raise ValueError(f"{folder}/{shard}: keys differ from the index weight_map "
                                 f"(not in file: {absent}, not in index: {unlisted})")
            for k in keys:
                if k in shapes:
                    raise ValueError(f"{folder}: key {k!r} is stored in more than one shard")
                shapes[k] = tuple(f.get_slice(k).get_shape())

    def load():
        for shard in shards:
            with safe_open(os.path.join(folder, shard), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)

    return shapes, load


def check_keys(model, shapes, where):
    """Raise one ValueError naming every missing, unexpected and shape-mismatched key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [f"{k}: stored {shapes[k]} vs model {expected[k]}"
                  for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]]
    if missing or unexpected or mismatched:
        raise ValueError(f"{where}: checkpoint does not match {type(model).__name__}:\n  missing keys: {missing}\n"
                         f"  unexpected keys: {unexpected}\n  shape mismatches: {mismatched}")


def _drain(d):
    """Yield and remove the items of d, so each source tensor can be freed once converted."""
    while d:
        k = next(iter(d))
        yield k, d.pop(k)


def load_transformer(path, dtype=None, device=None):
    """Load a transformer from a diffusers folder (or its parent) or an original-format file.

    dtype=None keeps the stored dtype; device defaults to cpu."""
    path, device = os.fspath(path), torch.device(device or "cpu")
    if os.path.isfile(path):
        cfg, src = _load_state_dict_file(path)
        shapes, load = {k: tuple(v.shape) for k, v in src.items()}, lambda: _drain(src)
    else:
        folder = transformer_folder(path)
        with open(os.path.join(folder, "config.json")) as f:
            cfg = M.config_from_dict(json.load(f))
        shapes, load = _folder_tensors(folder)
    model = M.build_transformer(cfg, device="meta")
    check_keys(model, shapes, path)
    sd = {}
    for k, v in load():  # one stored tensor at a time; the stored copy is freed after the cast/move
        w = v.to(device=device, dtype=dtype or v.dtype)
        # safetensors' CPU tensors view unaligned file buffers: own, aligned memory is faster and
        # gives the same kernels (bitwise the same outputs) as a model that was never saved
        sd[k] = w.clone() if w.data_ptr() == v.data_ptr() else w
    model.load_state_dict(sd, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"{path}: tensors not in the checkpoint were left unmaterialised: {still_meta}")
    return model


# ---- saving ------------------------------------------------------------------------------------

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size):
    """'5GB' -> 5_000_000_000 (decimal units like diffusers; KiB/MiB/GiB binary); ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '200KB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _shards(sd, limit):
    """Split a state dict greedily, in order, into shards of at most `limit` bytes (bigger tensors alone)."""
    shards, cur, cur_size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and cur_size + n > limit:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[k], cur_size = v, cur_size + n
    return shards + [cur] if cur else shards


def save_transformer(model, folder, max_shard_size="5GB"):
    """Write `model` as a diffusers transformer folder (config.json, shards, index when > 1 shard)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards = _shards(sd, parse_size(max_shard_size))
    config = {**M.config_to_dict(model.config), "_diffusers_version": DIFFUSERS_VERSION}
    with atomic_dir(folder) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


@contextmanager
def atomic_dir(final):
    """Yield a temp dir beside `final`; on success it replaces `final`, on error it is removed."""
    final = os.path.abspath(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"{final} exists and is not a directory")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):  # move the old one aside first: at every instant one complete copy exists
        old = tmp + ".old"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
