"""The on-disk dataset format train.py reads: its writer, its reader (memory-mapped, checked by content) and the
training order. The command that fills it from real videos (or random ones) is data.py.

A dataset is a folder:

    DIR/manifest.json            what is inside (see `write_manifest`), with the sha256 and size of every shard
                                 and the sha256 of the uncond file
    DIR/shard_00000.safetensors  "latents" [n, C, F, H, W] (already multiplied by the VAE scaling
                                 factor, or for Wan normalised by the VAE's per-channel mean/std, as the
                                 backbone consumes them), "text" [n, L, D_text],
                                 optional "text_mask" [n, L] (1 = real token), "pooled" [n, D_pool],
                                 image-to-video models: "image_latents" (+ "image_embeds"), storage/image_io.py;
                                 optional extra per-sample tensors (e.g. the toy's "label" [n])
    DIR/uncond.safetensors       the unconditional (empty prompt) conditioning, stored once:
                                 "text" [1, L, D_text] (+ "text_mask", "pooled" where the model has them)
    DIR/encode.json              (datasets made by `python data.py encode`) the settings it used; a resumed
                                 run must match them. Its shards carry safetensors metadata "videos" (the
                                 source file of each sample) and "skipped" (JSON list of {video, reason}).

A dataset is identified by its content, not its folder: `LatentDataset` checks every shard and the uncond file
against the sha256 the manifest recorded (a file changed since then is refused) and `LatentDataset.digest` hashes
the latent shape and those digests, so a moved or copied dataset keeps its digest and a rewritten one does not
(train.py's --resume compares it). Manifests written before the digests existed still load (digests computed then).

A conditioning file for sample.py is one safetensors file with the same conditioning keys and a
leading batch dimension (`save_cond` / `load_cond`). `check_fits` checks data against a model config;
`batches` and `draws` are the training order (resumable) and each sample's noise (split-independent).
"""
import glob
import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load

from storage import image_io, integrity, safetensors_io
from tools import checks

FORMAT = "dcm-latents-v1"
COND_KEYS = ("text", "text_mask", "pooled")


class DataError(ValueError):
    """A dataset or conditioning file that does not match what was asked of it."""


def shard_name(i):
    return f"shard_{i:05d}.safetensors"


def atomic_save_file(tensors, path, metadata=None):
    """safetensors save via a temp file + rename, so a crash never leaves a half-written file (hashed as written)."""
    safetensors_io.save(tensors, path, metadata)


def atomic_write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_shard(dir, index, tensors, metadata=None):
    """Write one shard; every tensor must have the same leading (sample) dimension. `metadata`: str -> str."""
    n = {v.shape[0] for v in tensors.values()}
    if len(n) != 1:
        raise DataError(f"shard {index}: tensors disagree on the number of samples: "
                        f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if "latents" not in tensors or "text" not in tensors:
        raise DataError(f"shard {index}: needs 'latents' and 'text', got {sorted(tensors)}")
    os.makedirs(dir, exist_ok=True)
    atomic_save_file(tensors, os.path.join(dir, shard_name(index)), metadata=metadata)
    return n.pop()


def write_manifest(dir, *, model, latent_shape, vae_scaling_factor, shards, uncond, extra=None):
    """manifest.json: the model preset the latents are for, their shape [C, F, H, W], the VAE scaling factor
    already applied to them, the shards [{"file", "num", "sha256", "bytes"}], and the unconditional conditioning
    (written here, its sha256 recorded). `shards`: [{"file", "num"}], already written into `dir`."""
    os.makedirs(dir, exist_ok=True)
    atomic_save_file(uncond, os.path.join(dir, "uncond.safetensors"))
    # digests at manifest time, one read of each file: encode_dataset's shards may come from an earlier process
    shards = [{**s, "sha256": integrity.digest(os.path.join(dir, s["file"])),
               "bytes": os.path.getsize(os.path.join(dir, s["file"]))} for s in shards]
    manifest = {
        "format": FORMAT,
        "model": model,
        "latent_shape": list(latent_shape),
        "vae_scaling_factor": vae_scaling_factor,
        "cond_keys": sorted(k for k in uncond if k in COND_KEYS),
        "shards": shards,
        "num_samples": sum(s["num"] for s in shards),
        "uncond": "uncond.safetensors",
        "uncond_sha256": integrity.digest(os.path.join(dir, "uncond.safetensors")),
        **(extra or {}),
    }
    atomic_write_json(manifest, os.path.join(dir, "manifest.json"))
    return manifest


def dataset_files(dir):
    """The names of the files of a dataset (or of an unfinished encoding) in `dir`, manifest.json first: the
    manifest, encode.json, the uncond file, shard_*.safetensors and any other file the manifest names."""
    names = {n for n in ("manifest.json", "encode.json", "uncond.safetensors") if os.path.isfile(os.path.join(dir, n))}
    names |= {os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(dir), "shard_*.safetensors"))}
    try:
        with open(os.path.join(dir, "manifest.json")) as f:
            m = json.load(f)
        named = [s.get("file") for s in m.get("shards", [])] + [m.get("uncond")]
    except (OSError, ValueError, AttributeError, TypeError):  # a damaged manifest: the usual names still go
        named = []
    names |= {n for n in named if isinstance(n, str) and not os.path.isabs(n)  # never a file outside dir
              and os.path.normpath(n).split(os.sep)[0] != ".." and os.path.isfile(os.path.join(dir, n))}
    return sorted(names, key=lambda n: (n != "manifest.json", n))


def clear_for_new(dir, overwrite):
    """Refuse (DataError) to write a new dataset into `dir` over one already there unless `overwrite`, which first
    removes the old one's files, manifest first: no stale shard survives next to the new dataset."""
    old = dataset_files(dir) if os.path.isdir(dir) else []
    if old and not overwrite:
        raise DataError(f"{dir} already holds a dataset ({', '.join(old[:3])}{', ...' * (len(old) > 3)}); "
                        "pass --overwrite to replace it, or choose another --out")
    for n in old:
        os.remove(os.path.join(dir, n))


def read_manifest(dir):
    path = os.path.join(dir, "manifest.json")
    if not os.path.isfile(path):
        raise DataError(f"{dir} is not a dataset: no manifest.json (see storage/latents.py for the format)")
    manifest = checks.read_json(path, "dataset manifest")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    need = {"shards": list, "latent_shape": list, "num_samples": int, "uncond": str}
    if bad := [f"{k} ({t.__name__})" for k, t in need.items() if not isinstance(manifest.get(k), t)]:
        raise DataError(f"{path}: missing or malformed {', '.join(bad)} (see storage/latents.py for the format)")
    if not all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("sha256", ""), str)
               for s in manifest["shards"]) or not isinstance(manifest.get("uncond_sha256", ""), str):
        raise DataError(f"{path}: every entry of 'shards' must be {{\"file\": NAME, \"num\": N, \"sha256\": HEX}} "
                        "and 'uncond_sha256' a hex string")
    for s in manifest["shards"]:
        if not os.path.isfile(os.path.join(dir, s["file"])):
            raise DataError(f"{dir}: shard {s['file']} named in manifest.json is missing")
    return manifest


class Rows:
    """One key of a dataset over all its shards, read from the memory-mapped files when indexed (only the rows asked
    for are copied out): rows[i], rows[a:b], rows[index tensor or list], rows[rows, ...] as a tensor's first dim;
    rows[:] is the whole column. `shape`, `dtype`, `dim()`, `len()` as a tensor's. Every process of a node reads the
    same page cache: no copy of the dataset per process (the shards are never concatenated)."""

    def __init__(self, handles, key):
        self.slices = [f.get_slice(key) for f in handles]
        lens = [s.get_shape()[0] for s in self.slices]
        self.starts = np.cumsum([0] + lens)
        self.shape = torch.Size([int(self.starts[-1]), *self.slices[0].get_shape()[1:]])
        self.dtype = safetensors_io.DTYPES[self.slices[0].get_dtype()]

    def __len__(self):
        return self.shape[0]

    def dim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        idx, rest = (idx[0], idx[1:]) if isinstance(idx, tuple) else (idx, ())
        rows = torch.arange(len(self))[idx]  # any index a tensor's first dim takes -> global row numbers
        flat = rows.reshape(-1).tolist()
        parts, i = [], 0
        while i < len(flat):  # runs of consecutive rows inside one shard: one read each
            s = int(np.searchsorted(self.starts, flat[i], side="right")) - 1
            j = i + 1
            while j < len(flat) and flat[j] == flat[j - 1] + 1 and flat[j] < self.starts[s + 1]:
                j += 1
            lo = flat[i] - int(self.starts[s])
            parts.append(self.slices[s][lo:lo + j - i])
            i = j
        out = torch.cat(parts) if parts else torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        out = out.reshape(tuple(rows.shape) + tuple(self.shape[1:]))  # an int index drops the row dim, as a tensor's
        return out[(slice(None),) * rows.dim() + rest] if rest else out


class LatentDataset(torch.utils.data.Dataset):
    """All shards of a dataset folder, memory-mapped (`tensors`: key -> Rows) and checked against the manifest's
    digests (read once, streamed); item i -> dict of per-sample tensors; `digest`: the dataset's content (not its
    path) as one hex string."""

    def __init__(self, dir):
        self.dir = dir
        self.manifest = read_manifest(dir)
        handles, shas = [], []
        for s in self.manifest["shards"]:
            handle, sha = _open_checked(dir, s["file"], s.get("sha256"), "dataset shard")
            handles.append(handle)
            shas.append(sha)
        keys = set(handles[0].keys()) if handles else set()
        if handles and not {"latents", "text"} <= keys:
            raise DataError(f"{dir}/{self.manifest['shards'][0]['file']}: needs 'latents' and 'text', has {sorted(keys)}")
        for s, h in zip(self.manifest["shards"], handles):
            if set(h.keys()) != keys:
                raise DataError(f"{dir}/{s['file']}: keys {sorted(h.keys())} differ from the first shard's {sorted(keys)}")
        self.tensors = {k: Rows(handles, k) for k in keys}
        self.uncond, uncond_sha = _load_checked(dir, self.manifest["uncond"], self.manifest.get("uncond_sha256"),
                                                "dataset uncond file")
        n = len(self.tensors["latents"]) if handles else 0
        if n != self.manifest["num_samples"]:
            raise DataError(f"{dir}: manifest says {self.manifest['num_samples']} samples, shards hold {n}")
        if handles and list(self.tensors["latents"].shape[1:]) != self.manifest["latent_shape"]:
            raise DataError(f"{dir}: latents are {list(self.tensors['latents'].shape[1:])}, "
                            f"manifest says {self.manifest['latent_shape']}")
        self.digest = hashlib.sha256(json.dumps([self.manifest["latent_shape"], shas, uncond_sha]).encode()).hexdigest()

    def __len__(self):
        return len(self.tensors["latents"]) if self.tensors else 0

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def _open_checked(dir, name, recorded, what):
    """(safe_open handle, sha256) of a dataset shard: its bytes hashed a buffer at a time (integrity.digest: never held
    whole), the file memory-mapped; bytes other than the `recorded` sha256 -> DataError naming the file."""
    path = os.path.join(dir, name)
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} named in manifest.json does not exist")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise DataError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    sha = integrity.digest(path)
    if recorded is not None and sha != recorded:
        raise DataError(f"{path} changed since its manifest was written (sha256 {sha[:12]}... != recorded "
                        f"{recorded[:12]}...); write the dataset again or restore the file")
    return handle, sha


def _load_checked(dir, name, recorded, what):
    """(tensors, sha256) of one file of a dataset, its bytes read once; bytes other than the `recorded` sha256
    (None: a manifest older than the digests) -> DataError naming the file."""
    path = os.path.join(dir, name)
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} named in manifest.json does not exist")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise DataError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    sha = hashlib.sha256(blob).hexdigest()
    if recorded is not None and sha != recorded:
        raise DataError(f"{path} changed since its manifest was written (sha256 {sha[:12]}... != recorded "
                        f"{recorded[:12]}...); write the dataset again or restore the file")
    return tensors, sha


def patch_of(cfg):
    """(pt, ph, pw) of a backbone config: Wan's patch_size triple, else (patch_size_t or 1, patch_size, patch_size)."""
    p = cfg.patch_size
    return tuple(p) if isinstance(p, (tuple, list)) else (getattr(cfg, "patch_size_t", None) or 1, p, p)


def text_width(cfg):
    """Width of the text states a backbone config takes (`text_embed_dim`; Wan: `text_dim`)."""
    return cfg.text_dim if hasattr(cfg, "text_dim") else cfg.text_embed_dim


def check_fits(cfg, cond=None, latent_shape=None, uncond=None, where="data"):
    """Conditioning tensors (batch first; keys outside COND_KEYS ignored but the image keys, checked against the
    latents), latents [C, F, H, W] and uncond keys against a model config: one DataError naming every mismatch; a
    dataset (cond and latent_shape) for an image-to-video model must hold its image keys. -> the sorted COND_KEYS
    present, then the image keys present (the model's conditioning)."""
    pooled, bad = getattr(cfg, "pooled_projection_dim", None), []
    if latent_shape is not None:
        (C, n_f, H, W), (pt, ph, pw) = latent_shape, patch_of(cfg)
        if C != image_io.latent_channels(cfg):
            bad.append(f"latents have {C} channels, the model takes {image_io.latent_channels(cfg)}")
        if min(n_f, H, W) < 1 or n_f % pt or H % ph or W % pw:
            bad.append(f"latent F, H, W = {n_f}, {H}, {W} must be positive and divisible by the patch ({pt}, {ph}, {pw})")
    keys = sorted(set(cond or ()) & set(COND_KEYS))
    if cond is not None:
        want = {"text", "pooled"} if pooled else {"text"}
        if not want <= set(keys) <= want | ({"text_mask"} if pooled else set()):
            bad.append(f"conditioning keys {keys}, the model takes {sorted(want)}{' (+ text_mask)' if pooled else ''}")
        text, mask, pool = (cond.get(k) for k in COND_KEYS)
        if text is not None and (text.dim() != 3 or text.shape[-1] != text_width(cfg)):
            bad.append(f"text is {list(text.shape)}, the model takes [B, L, {text_width(cfg)}]")
        if pooled and pool is not None and (pool.dim() != 2 or pool.shape[-1] != pooled):
            bad.append(f"pooled is {list(pool.shape)}, the model takes [B, {pooled}]")
        if text is not None and mask is not None and mask.shape != text.shape[:2]:
            bad.append(f"text_mask is {list(mask.shape)}, text {list(text.shape)}: the mask must be [B, L]")
        bad += image_io.problems(cfg, cond, latent_shape, need=latent_shape is not None)
        sized = keys + [k for k in image_io.KEYS if k in cond]
        if len({cond[k].shape[0] for k in sized}) > 1:
            bad.append("batch sizes differ: " + ", ".join(f"{k} {list(cond[k].shape)}" for k in sized))
    if uncond is not None and sorted(uncond) != keys:
        bad.append(f"uncond keys {sorted(uncond)} differ from the samples' {keys}")
    if bad:
        raise DataError(f"{where} does not fit model {type(cfg).__name__}: " + "; ".join(bad))
    return keys + [k for k in image_io.KEYS if k in (cond or ())]


def batches(ds, sampler, batch, epoch=0, pos=0):
    """Micro-batches of `batch` samples forever from micro-batch `pos` of `epoch` in a DistributedSampler's seeded
    order, each with its dataset "index" [batch]; yields (micro-batch, epoch, pos after it): resumable exactly."""
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[pos * batch:]
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=order, drop_last=True,
                                             generator=torch.Generator())  # keeps the global RNG untouched
        for i, b in enumerate(loader):
            pos += 1
            yield b | {"index": torch.tensor(order[i * batch:(i + 1) * batch])}, epoch, pos
        epoch, pos = epoch + 1, 0


def draws(index, step, seed, shape, gan, device="cpu"):
    """Per-sample eps [B, *shape] and GAN noise n [B, *shape] (or None) on `device`, uniforms u [B, 3] on the CPU,
    each sample's from a CPU generator keyed by (seed, step, its dataset index): a global batch draws the same
    however it is split over ranks and micro-steps, on any device."""
    eps, u, n = [], [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, i]).generate_state(1, np.uint64)[0]))
        eps.append(torch.randn(shape, generator=g))
        u.append(torch.rand(3, generator=g, dtype=torch.float64))
        n.append(torch.randn(shape, generator=g) if gan else None)
    return torch.stack(eps).to(device), torch.stack(u), torch.stack(n).to(device) if gan else None


def save_cond(cond, path):
    """A conditioning file for sample.py: the COND_KEYS tensors with a leading batch dim."""
    atomic_save_file({k: v for k, v in cond.items() if k in COND_KEYS}, path)


def load_cond(path):
    cond = checks.load_safetensors(path, "conditioning file")
    if "text" not in cond:
        raise DataError(f"{path}: a conditioning file needs a 'text' tensor, has {sorted(cond)}")
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise DataError(f"{path}: unexpected keys {sorted(unknown)} (allowed: {COND_KEYS})")
    return cond
