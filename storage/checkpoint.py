"""Transformer checkpoints in the diffusers folder layout (and original formats through converters),
train.py's step folders, and `resolve`: the one place a checkpoint path is told apart and verified.

A diffusers `transformer/` folder holds `config.json` plus `diffusion_pytorch_model.safetensors`, or
shards listed in `diffusion_pytorch_model.safetensors.index.json` (`weight_map`: key -> shard file).
Loading builds the model on the meta device and assigns the stored tensors one by one, so weights
never sit in memory twice.

A training step folder `OUT/step_{step:07d}/` (written by storage/resume.py) holds `transformer/` (diffusers
layout; the dual expert's frozen semantic backbone), `detail.safetensors` (the LoRA detail expert's adapter),
`semantic.safetensors` in place of `transformer/` in a --semantic-lora run (the semantic adapter; its base: the run's
--teacher, recorded in config.json),
`train_state.pt` (optimizer settings and step counts, discriminator, RNG, data position), `optimizer.safetensors` (the
AdamW moments, FQN-keyed), `ema.safetensors` (with --target-ema: the EMA weights) and `config.json` (the run config:
stage, model config, grid, ...); storage/resume.py read_state puts the train state back together (and reads the older
folders that held the moments and the EMA inside train_state.pt).
A detail-stage step on a two-expert teacher (Wan2.2-A14B) holds `detail.safetensors` only: its base is the teacher's
low-noise expert (the run config's `detail_base`), its semantic expert the run's --init (DESIGN.md section 12).
"""

import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import safe_open

import model as M
from storage import integrity, safetensors_io
from tools import checks

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout is tested against

# ---- original (non-diffusers) checkpoint formats ---------------------------------------------
# file name -> converter(path) returning (config, state dict with diffusers keys)
ORIGINAL_FORMATS = {}


def _tencent_hunyuan(path):
    """Tencent HunyuanVideo `mp_rank_00_model_states.pt` -> (config, diffusers-key state dict)."""
    return M.convert_tencent_hunyuan(torch.load(path, map_location="cpu", mmap=True, weights_only=True))


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
    """The diffusers transformer folder a checkpoint path stands for (resolve: a step folder's transformer/, a
    pipeline folder's transformer/, the folder itself, a run folder's newest complete step's transformer/)."""
    src = resolve(path)
    if src.kind == "original":
        raise CheckpointError(f"{path}: an original-format file, not a diffusers transformer folder")
    return src.weights


@dataclass
class TwoExperts:
    """A two-expert pipeline folder (Wan2.2-A14B): `high` (transformer/, t >= boundary_ratio * 1000) and `low`
    (transformer_2/) transformer folders."""
    high: str
    low: str
    boundary_ratio: float


def two_experts(path):
    """TwoExperts of a diffusers pipeline folder whose model_index.json names a transformer_2 and a boundary_ratio
    (hub ids resolved), else None."""
    path = hub_path(path) if path else path
    index = os.path.join(path or "", "model_index.json")
    if not path or not os.path.isfile(index):
        return None
    d = checks.read_json(index, "pipeline index")
    second = d.get("transformer_2")
    if not (isinstance(second, list) and second and second[0]) or d.get("boundary_ratio") is None:
        return None
    high, low = (os.path.join(path, n) for n in ("transformer", "transformer_2"))
    for folder in (high, low):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{path}: model_index.json names two experts but {folder} has no config.json")
    return TwoExperts(high, low, float(d["boundary_ratio"]))


def is_run_config(folder):
    """Whether folder/config.json is a train.py run config (run or step folder), not a transformer's."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model_config" in d and "stage" in d


def read_config(path):
    """Model config of a preset name, a config.json (diffusers', or a train.py run's with `model_config`),
    or a folder holding one (transformer_folder)."""
    if not os.path.exists(path) and path in M.PRESETS:
        return M.PRESETS[path]
    path = hub_path(path, "config")
    if os.path.isdir(path):
        path = os.path.join(transformer_folder(path), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is neither a preset ({', '.join(M.PRESETS)}) nor a config file or folder")
    d = checks.read_json(path, "config")
    try:
        return M.config_from_dict(d.get("model_config", d))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


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
        src = resolve(path)
        if src.kind == "authors":  # PEFT's adapter keys: a dual expert, not one transformer
            raise ValueError(f"{path}: the authors' DCM layout (semantic weights + PEFT 'lora1' + *_lora copies): "
                             "sample it with sample.py --ckpt, load it with storage.released.load_released")
        shapes, load = _folder_tensors(src.weights)
        cfg = read_config(os.path.join(src.weights, "config.json"))
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


def read_tensors(path, keys):
    """The stored tensors `keys` of a transformer checkpoint (a folder resolve() knows, or an original-format file), in
    their stored dtype, read one by one: e.g. the fp32 masters of layers a bf16-loaded model copies to train."""
    if os.path.isfile(path):
        sd = _load_state_dict_file(path)[1]
        return {k: sd[k] for k in keys}
    folder, want, out = resolve(path).weights, set(keys), {}
    for shard in _shard_files(folder):
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            for k in want & set(f.keys()):
                out[k] = f.get_tensor(k)
    if missing := sorted(want - set(out)):
        raise ValueError(f"{path}: keys not in the checkpoint: {missing[:10]}")
    return out


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


def save_transformer(model, folder, max_shard_size="5GB", whole=None):
    """Write `model` as a diffusers transformer folder (config.json, shards, index when > 1 shard). whole(tensor): a
    state tensor as written (storage/resume.py: an FSDP2 shard gathered, one at a time as the files are written);
    folder None: every tensor made in the same order, nothing written (the ranks that only take part in gathers)."""
    sd = model.state_dict()
    specs = {k: safetensors_io.spec(v) for k, v in sd.items()}
    shards = _shards(specs, parse_size(max_shard_size))
    names = [WEIGHTS] if len(shards) == 1 else [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                 for i in range(len(shards))]
    make = lambda k: (whole or torch.Tensor.detach)(sd[k])  # noqa: E731
    if folder is None:
        for shard in shards:
            safetensors_io.save_each(shard, make, None)
        return
    config = {**M.config_to_dict(model.config), "_diffusers_version": DIFFUSERS_VERSION}
    with atomic_dir(folder) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name, shard in zip(names, shards):
            safetensors_io.save_each(shard, make, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) == 1:
            return
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in specs.values())
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
    integrity.as_umask(tmp, directory=True)  # mkdtemp makes 0700; the result is an ordinary folder
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


# ---- train.py step folders ---------------------------------------------------------------------
STEP = re.compile(r"step_\d{7}")
RESUMABLE = ("config.json", "train_state.pt")  # what a step folder needs to go on from, beyond the weights
MOMENTS, EMA = "optimizer.safetensors", "ema.safetensors"  # its AdamW moments and EMA weights (storage/resume.py)
verify_checksums = True  # step folders are checked against their integrity.CHECKSUMS (--verify none: False)


def step_dir(out, step):
    return os.path.join(out, f"step_{step:07d}")


def step_folders(out):
    """Names of the step_* folders in `out`, oldest first ([] when there is no such folder)."""
    return sorted(d for d in os.listdir(out) if STEP.fullmatch(d)) if os.path.isdir(out) else []


def _readable(path):
    """A safetensors header or a torch.save zip's central directory reads (a truncated file fails either)."""
    try:
        if path.endswith(".pt"):
            zipfile.ZipFile(path).close()
        else:
            with safe_open(path, framework="pt"):
                pass
        return True
    except Exception:  # noqa: BLE001 - a damaged file fails in many ways; all mean "not there"
        return False


def step_missing(folder, need=("config.json",)):
    """What a step folder lacks ([] = complete): the `need` files, transformer/ with readable weights, and the
    adapter where its config.json says a LoRA detail stage; a truncated file counts as missing."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        run = {}
    lora, sem_lora = run.get("stage") == "detail" and not run.get("detail_full"), bool(run.get("semantic_lora"))
    sem_lora |= bool(run.get("detail_base"))  # (no transformer/: an adapter over the teacher's low-noise expert)
    need = [*need] + (["semantic.safetensors"] * (not run.get("detail_base")) if sem_lora else
                      ["transformer/config.json"]) + ["detail.safetensors"] * lora
    missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
    try:
        files = [] if sem_lora else [os.path.join("transformer", s) for s in _shard_files(os.path.join(folder, "transformer"))]
    except ValueError:
        files, missing = [], missing + ["transformer weights"]
    files += [f for f in need if f.endswith((".safetensors", ".pt")) and f not in missing]
    missing += [f"{f} (unreadable)" for f in files if not _readable(os.path.join(folder, f))]
    skip = () if "train_state.pt" in need else ("train_state.pt", MOMENTS, EMA)  # sampling reads no train state
    return missing or (integrity.verify(folder, skip) if verify_checksums else [])


def keep_last(out, k):
    """Delete all but the newest k step folders (k = 0 keeps every one)."""
    for d in step_folders(out)[:-k] if k > 0 else []:
        shutil.rmtree(os.path.join(out, d))


def latest_step(out, need=("config.json",), quiet=False):
    """The newest complete step folder of a run (step_missing), or None; newer incomplete ones are skipped,
    saying so on stderr unless quiet."""
    for name in reversed(step_folders(out)):
        path = os.path.join(out, name)
        missing = step_missing(path, need)
        if not missing:
            return path
        if not quiet:
            print(f"skipping incomplete or damaged checkpoint {path}: {', '.join(missing)}", file=sys.stderr)
    return None


# ---- the one resolver: a checkpoint path -> what it is and where its parts are ------------------------------
AUTHORS_ADAPTER = "lora1"  # the PEFT adapter name in the authors' released students (storage/released.py)


class CheckpointError(checks.InputError):
    """A path that is no checkpoint, or a damaged one; the command lines print it as one `error:` line."""


@dataclass
class Source:
    """A resolved checkpoint path: its kind, the folder or file it stands for, and where its parts are."""
    path: str                  # as given
    kind: str                  # "step" | "transformer" | "authors" | "original"
    folder: str                # the step folder, the folder given (pipeline or transformer), or the file
    weights: str               # what load_transformer / released.load_released read
    run: dict | None = None    # a step folder's train.py run config
    detail: str | None = None  # a LoRA detail-stage step's adapter file
    semantic: str | None = None  # a --semantic-lora step's semantic adapter file (weights: its base, the teacher)


def _authors_layout(folder):
    """Whether a transformer folder's weights hold the authors' PEFT adapter keys (their DualExpert layout)."""
    try:
        shapes, _ = _folder_tensors(folder)
    except Exception:  # noqa: BLE001 - a damaged file is not this layout; loading it names the damage
        return False
    return any(f".lora_A.{AUTHORS_ADAPTER}." in k for k in shapes)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_path(path, what="checkpoint"):
    """A local path as given, or for a Hugging Face hub id `org/name` that is not a local path, its snapshot folder:
    downloaded by huggingface_hub (optional; HF_HUB_OFFLINE=1 reads the local cache only). One CheckpointError when
    the package is absent or the id is unknown / not cached."""
    path = os.fspath(path)
    if os.path.exists(path) or not HUB_ID.fullmatch(path) or os.path.isdir(path.split("/")[0]):
        return path  # (a missing path under an existing folder, e.g. runs/typo, is a local path)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{what} {path} does not exist (as a hub id it needs huggingface_hub: pip install "
                              "huggingface_hub)") from None
    try:
        return huggingface_hub.snapshot_download(path)
    except Exception as e:  # noqa: BLE001 - not found, offline without a cached copy, no network, gated, ...
        raise CheckpointError(f"{what} {path} does not exist, and the hub has no model {path} here "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def resolve(path, what="checkpoint"):
    """Any checkpoint path -> Source, verified once (integrity.verify unless --verify none): a train.py run folder
    (its newest complete, intact step), a step folder, a diffusers transformer folder or a pipeline folder holding
    transformer/, the authors' released layout (pipeline folder or its transformer/), or an original-format file."""
    path = hub_path(path, what)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path} does not exist")
    if os.path.isfile(path):
        if os.path.basename(path) not in ORIGINAL_FORMATS:
            raise CheckpointError(f"{what} {path}: a file that is no known checkpoint format "
                                  f"(known: {sorted(ORIGINAL_FORMATS)}, or a folder)")
        return Source(path, "original", path, path)
    has_transformer = os.path.isdir(os.path.join(path, "transformer"))
    if (steps := step_folders(path)) and not has_transformer:  # a run folder: its newest complete, intact step
        if (step := latest_step(path)) is None:
            raise CheckpointError(f"{what} {path}: none of its {len(steps)} step_* checkpoints is complete (the newest, "
                                  f"{steps[-1]}, lacks {', '.join(step_missing(os.path.join(path, steps[-1])))})")
        return resolve(step, what)
    named_step, run_config = STEP.fullmatch(os.path.basename(os.path.normpath(path))), is_run_config(path)
    if run_config and not has_transformer and not named_step:
        raise CheckpointError(f"{what} {path}: no checkpoint yet in this run folder (no step_* folder: the run has not "
                              "saved a step)")
    if named_step or run_config:
        if missing := step_missing(path):
            raise CheckpointError(f"{what} {path}: damaged or incomplete checkpoint: {', '.join(missing)}")
        run = checks.read_json(os.path.join(path, "config.json"), "run config")
        lora = run.get("stage") == "detail" and not run.get("detail_full")
        detail = os.path.join(path, "detail.safetensors") if lora else None
        if run.get("detail_base"):  # a detail adapter over a two-expert teacher's low-noise expert
            if not os.path.exists(run["detail_base"]):
                raise CheckpointError(f"{what} {path}: its base, the teacher's low-noise expert {run['detail_base']}, "
                                      "does not exist (the adapter needs the weights it was trained on)")
            return Source(path, "step", path, resolve(run["detail_base"], f"{what} {path}'s base").weights, run, detail)
        if not run.get("semantic_lora"):
            return Source(path, "step", path, os.path.join(path, "transformer"), run, detail)
        if not run.get("teacher") or not os.path.exists(run["teacher"]):
            raise CheckpointError(f"{what} {path}: a --semantic-lora checkpoint whose base, the run's --teacher "
                                  f"{run.get('teacher')!r}, does not exist (the adapter needs the weights it was trained on)")
        base = resolve(run["teacher"], f"{what} {path}'s base (the run's --teacher)")
        return Source(path, "step", path, base.weights, run, detail, os.path.join(path, "semantic.safetensors"))
    for folder in (os.path.join(path, "transformer"), path):
        if os.path.isfile(os.path.join(folder, "config.json")) and not is_run_config(folder):
            return Source(path, "authors" if _authors_layout(folder) else "transformer", path, folder)
    raise CheckpointError(f"{what} {path} is not a checkpoint: no step_* folders, train.py config.json or "
                          "transformer config.json")
