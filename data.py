"""The on-disk dataset format train.py reads, and (below) the tools that fill it from real videos.

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
`python data.py synthetic` / `encode` refuse a folder that already holds a dataset unless --overwrite (which
removes its files first); `encode` goes on with its own unfinished encoding when the settings are the same.

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
from safetensors.torch import load, load_file

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
        raise DataError(f"{dir} is not a dataset: no manifest.json (see data.py for the format)")
    manifest = checks.read_json(path, "dataset manifest")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    need = {"shards": list, "latent_shape": list, "num_samples": int, "uncond": str}
    if bad := [f"{k} ({t.__name__})" for k, t in need.items() if not isinstance(manifest.get(k), t)]:
        raise DataError(f"{path}: missing or malformed {', '.join(bad)} (see data.py for the format)")
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
        self.dtype = SAFETENSORS_DTYPES[self.slices[0].get_dtype()]

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


SAFETENSORS_DTYPES = safetensors_io.DTYPES


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
    """(safe_open handle, sha256) of a dataset shard: its bytes hashed in 16 MiB reads (never held whole), then the
    file memory-mapped; bytes other than the `recorded` sha256 -> DataError naming the file."""
    path = os.path.join(dir, name)
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} named in manifest.json does not exist")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise DataError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    sha = h.hexdigest()
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


# ------------------------------------------------------------------------------------------------------
# Filling a dataset from real videos: `python data.py encode ...` and `python data.py encode-prompts ...`.
# The VAE/text-encoder work lives in storage/video_io.py (optional packages: pip install -r requirements-video.txt).

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_captions(path, names):
    """One caption per video: a .json object {file name: caption}, or text with one caption per line in
    the order of the sorted video file names."""
    if not os.path.isfile(path):
        raise DataError(f"captions file {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise DataError(f"{path}: must be a JSON object {{video file name: caption}}")
        missing = [n for n in names if n not in table]
        if missing:
            raise DataError(f"{path}: no caption for {len(missing)} of the videos, e.g. {missing[:3]}")
        return [table[n] for n in names]
    with open(path) as f:
        lines = f.read().rstrip("\n").split("\n")
    if len(lines) != len(names):
        raise DataError(f"{path} has {len(lines)} captions (one per line) for {len(names)} videos; they are "
                        f"matched by line to the sorted file names ({names[0]} ... {names[-1]})")
    return lines


def shard_info(dir, index):
    """(num samples, metadata) of a finished shard, without loading its tensors."""
    from safetensors import safe_open
    with safe_open(os.path.join(dir, shard_name(index)), "pt") as f:
        return f.get_slice("latents").get_shape()[0], f.metadata() or {}


def _device_dtype(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def encode_dataset(videos, captions, model, weights, out, frames=None, height=None, width=None, shard_size=32,
                   stride=1, fps=None, posterior="sample", seed=0, device=None, dtype=None,
                   save_dtype="float32", tiling=False, progress=True, overwrite=False, image_cond=False):
    """Encode a folder of videos + captions into a dataset folder (format above); resumable (same settings); a
    folder holding another dataset is refused unless `overwrite` (which removes its files first); image-to-video
    models (TI2V with `image_cond`) also get the image keys of each clip's first frame (storage/image_io.py); -> manifest."""
    from tqdm import tqdm

    import model as models
    from storage import video_io
    video_io.model_family(model)  # an unknown --model fails here
    image_mode = image_io.mode(model, models.PRESETS[model], image_cond)
    if not os.path.isdir(videos):
        raise DataError(f"videos folder {videos} does not exist")
    names = sorted(n for n in os.listdir(videos) if n.lower().endswith(VIDEO_EXTS))
    if not names:
        raise DataError(f"{videos} holds no videos ({', '.join(VIDEO_EXTS)})")
    caps = read_captions(captions, names)
    if shard_size < 1 or stride < 1 or posterior not in ("sample", "mode"):
        raise DataError(f"shard_size ({shard_size}) and stride ({stride}) must be >= 1, posterior "
                        f"({posterior!r}) 'sample' or 'mode'")
    cfg = video_io.vae_config(model, weights)
    if image_mode:  # the VAE and the image encoder fit the model, before anything loads
        image_io.check(model, models.PRESETS[model], weights, cfg, image_mode)
    frames, height, width = video_io.clip_size(model, cfg, frames, height, width)
    shape = video_io.latent_shape(cfg, frames, height, width)
    settings = dict(model=model, frames=frames, height=height, width=width, stride=stride, fps=fps,
                    posterior=posterior, seed=seed, shard_size=shard_size, save_dtype=save_dtype, videos=names,
                    **({"image_cond": image_mode} if image_mode else {}))
    settings_path = os.path.join(out, "encode.json")
    if os.path.isfile(settings_path) and not overwrite:  # resuming: finished shards are only valid for the same inputs
        old = checks.read_json(settings_path, "encode settings")
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            raise DataError(f"{out} was encoded with other settings ({', '.join(diff)} differ); "
                            "pass --overwrite to encode it again from scratch, or use a new --out folder")
    else:  # a new encoding, never mixed with another dataset's files
        clear_for_new(out, overwrite)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(settings, settings_path)

    n_shards = -(-len(names) // shard_size)
    todo = [s for s in range(n_shards) if not os.path.isfile(os.path.join(out, shard_name(s)))]
    uncond_path = os.path.join(out, "uncond.safetensors")
    device, dtype = _device_dtype(device, dtype)
    sdtype = DTYPES[save_dtype]
    cast = lambda d: {k: v.to(sdtype) if v.is_floating_point() else v for k, v in d.items()}  # noqa: E731
    if todo or not os.path.isfile(uncond_path):
        text_encoder = video_io.TextEncoder(model, weights, device, dtype)
        uncond = {k: v.cpu() for k, v in cast(text_encoder([""])).items()}
        atomic_save_file(uncond, uncond_path)
    else:
        uncond = load_file(uncond_path)
    vae = video_io.load_vae(model, weights, device, dtype, tiling) if todo else None
    images = todo and image_mode and image_io.ImageEncoder(model, models.PRESETS[model], weights, vae, image_mode,
                                                           frames, height, width, device, dtype)

    bar = tqdm(total=sum(min(shard_size, len(names) - s * shard_size) for s in todo), unit="video",
               disable=not progress, desc=f"encoding {len(todo)}/{n_shards} shards")
    for s in todo:
        latents, kept, skipped, conds = [], [], [], []
        for i in range(s * shard_size, min((s + 1) * shard_size, len(names))):
            bar.update()
            try:
                clip = video_io.read_clip(os.path.join(videos, names[i]), frames, height, width, stride, fps)
            except video_io.VideoError as e:
                skipped.append({"video": names[i], "reason": str(e)})
                bar.write(f"skipping {e}")  # the reason names the file
                continue
            g = torch.Generator(device).manual_seed(seed + i)  # per video: a resumed run draws the same noise
            z = video_io.encode_latents(vae, clip[None], posterior, g)[0].cpu()  # [C, F, H, W]
            if list(z.shape) != shape:
                raise DataError(f"{names[i]}: VAE gave latents {list(z.shape)}, expected {shape}")
            latents.append(z)
            kept.append(i)
            if images:  # the clip's own first frame, after its resize and crop
                conds.append(images(clip[None, :, 0]))
        if kept:
            tensors = {"latents": torch.stack(latents), **text_encoder([caps[i] for i in kept])}
            tensors |= {k: torch.cat([c[k] for c in conds]) for k in (conds[0] if conds else ())}
        else:  # every video failed: an empty shard still records that they were tried
            tensors = {"latents": torch.zeros(0, *shape), **{k: v[:0] for k, v in uncond.items()}}
            tensors |= {k: torch.zeros(0, *s) for k, s in (images.shapes.items() if images else ())}
        meta = {"videos": json.dumps([names[i] for i in kept]), "skipped": json.dumps(skipped)}
        write_shard(out, s, {k: v.cpu() for k, v in cast(tensors).items()}, metadata=meta)
    bar.close()

    shards, skipped = [], []
    for s in range(n_shards):
        num, meta = shard_info(out, s)
        shards.append({"file": shard_name(s), "num": num})
        skipped += json.loads(meta.get("skipped", "[]"))
    scale = video_io.latent_scale(cfg)  # Wan: per-channel mean/std recorded next to the factor 1
    manifest = write_manifest(out, model=model, latent_shape=shape, vae_scaling_factor=scale.pop("vae_scaling_factor"),
                              shards=shards, uncond=uncond, extra={**scale, "skipped": skipped, "encode": settings,
                                                                   **({"image_cond": image_mode} if image_mode else {})})
    print(f"{out}: {manifest['num_samples']} videos in {n_shards} shards, {len(skipped)} skipped"
          + "".join(f"\n  skipped {x['reason']}" for x in skipped))
    return manifest


def encode_prompts(prompts, model, weights, out, device=None, dtype=None):
    """A conditioning file for sample.py from a text file with one prompt per line (an empty line = uncond)."""
    from storage import video_io
    if not os.path.isfile(prompts):
        raise DataError(f"prompts file {prompts} does not exist")
    with open(prompts) as f:
        lines = f.read().rstrip("\n").split("\n")
    cond = video_io.TextEncoder(model, weights, *_device_dtype(device, dtype))(lines)
    save_cond({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in cond.items()}, out)
    print(f"{out}: {len(lines)} prompts, " + ", ".join(f"{k} {list(v.shape)}" for k, v in cond.items()))
    return cond


def synthetic_dataset(model, out, num=8, frames=2, height=4, width=4, text_len=8, seed=0, overwrite=False,
                      image_cond=False):
    """A dataset of random latents and conditioning for `model` (a preset): no VAE or text encoder needed, for
    trying the commands on the tiny presets. HunyuanVideo-style models get pooled vectors and a text mask,
    image-to-video models (TI2V with `image_cond`) image keys (image_io.synthetic).
    A folder already holding a dataset is refused unless `overwrite` (its files are removed first)."""
    import model as models
    if model not in models.PRESETS:
        raise DataError(f"--model {model!r} is not a preset; known: {', '.join(models.PRESETS)}")
    cfg, g = models.PRESETS[model], torch.Generator().manual_seed(seed)
    if min(num, frames, height, width, text_len) < 1:
        raise DataError("--num, --frames, --height, --width and --text-len must be >= 1")
    shape, image_mode = [image_io.latent_channels(cfg), frames, height, width], image_io.mode(model, cfg, image_cond)
    check_fits(cfg, latent_shape=shape, where=f"--frames {frames} --height {height} --width {width}")
    checks.memory(4 * num * (np.prod(shape) + text_len * text_width(cfg)), f"{num} synthetic samples (--num)")
    t = {"latents": torch.randn(num, *shape, generator=g), "text": torch.randn(num, text_len, text_width(cfg), generator=g)}
    t |= image_io.synthetic(cfg, t["latents"], image_mode, g)
    un = {"text": torch.zeros(1, text_len, text_width(cfg))}
    if pooled := getattr(cfg, "pooled_projection_dim", None):
        real = (torch.arange(text_len) < max(1, text_len // 2)).long()  # right-padded prompts
        t |= {"pooled": torch.randn(num, pooled, generator=g), "text_mask": real.repeat(num, 1)}
        un |= {"pooled": torch.zeros(1, pooled), "text_mask": (torch.arange(text_len) < 1).long()[None]}
    clear_for_new(out, overwrite)
    write_shard(out, 0, t)
    manifest = write_manifest(out, model=model, latent_shape=shape, vae_scaling_factor=1.0,
                              shards=[{"file": shard_name(0), "num": num}], uncond=un,
                              extra={"synthetic": True, **({"image_cond": image_mode} if image_mode else {})})
    print(f"{out}: {num} synthetic samples for {model}, latents {shape}, text [{text_len}, {text_width(cfg)}]"
          + "".join(f", {k} {list(t[k].shape[1:])}" for k in image_io.KEYS if k in t))
    return manifest


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="data.py", description="Encode real videos/prompts for DCM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="videos + captions -> latent dataset folder")
    e.add_argument("--videos", required=True, help="folder of video files (sorted by name)")
    e.add_argument("--captions", required=True, help=".txt one caption per line (sorted video order) or .json")
    e.add_argument("--out", required=True, help="dataset folder (an unfinished one, same settings: resumes)")
    e.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default: the model's, storage/video_io.py)")
    e.add_argument("--height", type=int, help="default: 480 CogVideoX / Wan, 544 HunyuanVideo, 720 Wan 720p")
    e.add_argument("--width", type=int, help="default: 720 CogVideoX, 960 HunyuanVideo, 832 Wan, 1280 Wan 720p")
    e.add_argument("--shard-size", type=int, default=32)
    e.add_argument("--stride", type=int, default=1, help="take every stride-th frame")
    e.add_argument("--fps", type=float, help="resample videos to this frame rate first (the releases': CogVideoX 8, "
                   "Wan 16, Wan2.2-TI2V-5B 24)")
    e.add_argument("--posterior", choices=["sample", "mode"], default="sample",
                   help="latent_dist.sample() (seeded per video) or its mean")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--save-dtype", choices=sorted(DTYPES), default="float32")
    e.add_argument("--tiling", action="store_true", help="tiled VAE encode (less memory, seams)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (its files are removed first; default: refuse)")
    q = sub.add_parser("encode-prompts", help="prompts file -> conditioning file for sample.py")
    q.add_argument("--prompts", required=True, help="text file, one prompt per line")
    q.add_argument("--out", required=True, help="FILE.safetensors")
    y = sub.add_parser("synthetic", help="random latents + conditioning for a preset (no weights needed)")
    y.add_argument("--model", required=True, help="a preset, e.g. tiny-hunyuan, tiny-cogvideox")
    y.add_argument("--out", required=True, help="dataset folder")
    y.add_argument("--num", type=int, default=8, help="number of samples")
    for k, v in (("frames", 2), ("height", 4), ("width", 4), ("text-len", 8), ("seed", 0)):
        y.add_argument(f"--{k}", type=int, default=v, help=f"default {v}" + (" (latent size)" * (k in "frames height width")))
    y.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (its files are removed first; default: refuse)")
    for a in (e, y):
        a.add_argument("--image-cond", action="store_true", help="TI2V-5B: store the first frame's image condition "
                       "(image-to-video models always store theirs)")
    for a in (e, q):
        a.add_argument("--model", required=True, help="a preset: cogvideox-2b, hunyuan-video, wan2.1-t2v-1.3b, "
                       "wan2.1-i2v-14b-480p, wan2.2-ti2v-5b, ... (storage/video_io.py: MODELS)")
        a.add_argument("--weights", required=True, help="local hub-layout folder: vae/, text_encoder/, tokenizer/...")
        a.add_argument("--device", help="default: cuda if available")
        a.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on cuda, else fp32)")
    args = p.parse_args(argv)

    def run(_):
        if args.cmd == "synthetic":
            return synthetic_dataset(args.model, args.out, args.num, args.frames, args.height, args.width,
                                     args.text_len, args.seed, args.overwrite, args.image_cond)
        if args.cmd == "encode":
            return encode_dataset(args.videos, args.captions, args.model, args.weights, args.out, args.frames,
                                  args.height, args.width, args.shard_size, args.stride, args.fps, args.posterior,
                                  args.seed, args.device, args.dtype, args.save_dtype, args.tiling,
                                  overwrite=args.overwrite, image_cond=args.image_cond)
        return encode_prompts(args.prompts, args.model, args.weights, args.out, args.device, args.dtype)
    return checks.cli(run)  # bad input: one line, exit 2


if __name__ == "__main__":
    main()
