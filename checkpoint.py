"""Transformer checkpoints in the diffusers folder layout (and original formats through converters),
and train.py's step folders.

A diffusers `transformer/` folder holds `config.json` plus `diffusion_pytorch_model.safetensors`, or
shards listed in `diffusion_pytorch_model.safetensors.index.json` (`weight_map`: key -> shard file).
Loading builds the model on the meta device and assigns the stored tensors one by one, so weights
never sit in memory twice.

A training step folder `OUT/step_{step:07d}/` holds `transformer/` (diffusers layout; the dual expert's
frozen semantic backbone), `detail.safetensors` (the LoRA detail expert's adapter), `train_state.pt`
(optimizers, RNG, data position) and `config.json` (the run config: stage, model config, grid, ...).
"""

import json
import os
import random
import re
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

import checks
import integrity
import model as M

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
    """The folder holding the transformer's config.json: `path/transformer/` first (a step folder's own
    config.json is the run config), else `path` itself, else (a train.py run folder) the transformer of
    its newest complete step."""
    for folder in (os.path.join(path, "transformer"), path):
        if os.path.isfile(os.path.join(folder, "config.json")) and not is_run_config(folder):
            return folder
    step = latest_step(path) if step_folders(path) else None
    if step is not None:
        return transformer_folder(step)
    raise ValueError(f"{path}: no config.json here or in {os.path.join(path, 'transformer')}, "
                     "and no complete step_* checkpoint")


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
        folder = transformer_folder(path)
        shapes, load = _folder_tensors(folder)
        if any(".lora_A.lora1." in k for k in shapes):  # PEFT's adapter keys: a dual expert, not one transformer
            raise ValueError(f"{path}: the authors' DCM layout (semantic weights + PEFT 'lora1' + *_lora copies): "
                             "sample it with sample.py --ckpt, load it with released.load_released")
        cfg = read_config(os.path.join(folder, "config.json"))
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
            integrity.as_umask(os.path.join(tmp, WEIGHTS))
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            integrity.as_umask(os.path.join(tmp, name))
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
verify_checksums = True  # step folders are checked against their integrity.CHECKSUMS (--verify none: False)
# run settings a resumed run must share with its checkpoint: the state's shape (never overridable) and
# what the run trains on and towards (--resume-anyway goes on with the new values)
RESUME_SHAPE = ("stage", "detail_full", "grid_steps", "shift", "lora_rank", "lora_targets", "disc_hidden", "boundaries")
RESUME_RUN = ("teacher", "init", "data", "batch_size", "grad_accum", "seed", "w_tc", "w_gan", "w_fm", "loss",
              "target_ema", "guidance", "cond_drop")


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
    lora = run.get("stage") == "detail" and not run.get("detail_full")
    need = [*need, "transformer/config.json"] + ["detail.safetensors"] * lora
    missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
    try:
        files = [os.path.join("transformer", s) for s in _shard_files(os.path.join(folder, "transformer"))]
    except ValueError:
        files, missing = [], missing + ["transformer weights"]
    files += [f for f in need if f.endswith((".safetensors", ".pt")) and f not in missing]
    missing += [f"{f} (unreadable)" for f in files if not _readable(os.path.join(folder, f))]
    skip = () if "train_state.pt" in need else ("train_state.pt",)  # sampling does not read the train state
    return missing or (integrity.verify(folder, skip) if verify_checksums else [])


def check_step(path):
    """A step folder given directly (--init, --teacher, --ckpt) must be complete and match its checksums."""
    if STEP.fullmatch(os.path.basename(os.path.normpath(path))) and (bad := step_missing(path)):
        raise ValueError(f"checkpoint {path} is damaged or incomplete: {', '.join(bad)}")


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


def same_run(ckpt, old, settings, anyway=False):
    """Refuse to go on from a checkpoint saved with other RESUME_SHAPE settings, or other RESUME_RUN ones unless
    `anyway` (then a warning); settings: this run's config values (paths absolute)."""
    differ = lambda keys: [f"{k}={old.get(k)!r} (now {settings.get(k)!r})" for k in keys  # noqa: E731
                           if k in settings and old.get(k) != settings[k]]
    if bad := differ(RESUME_SHAPE):
        raise ValueError(f"{ckpt} was saved with {', '.join(bad)}: its state cannot go on in this run")
    if (bad := differ(RESUME_RUN)) and not anyway:
        raise ValueError(f"--resume: {ckpt} was saved with {', '.join(bad)}; use the same flags, another --out, "
                         "or --resume-anyway to go on with the new values")
    for b in bad:
        print(f"warning: --resume-anyway: {ckpt} was saved with {b}", file=sys.stderr)


def resume_from(out, settings, anyway=False):
    """(newest complete, intact step folder, its train_state) to go on from, or (None, None) in a run without step
    folders; newer damaged ones are skipped and named. `settings`: checked by same_run."""
    names = step_folders(out)
    for name in reversed(names):
        ckpt = os.path.join(out, name)
        bad = step_missing(ckpt, RESUMABLE)
        try:  # mmap: ranks read only the pages they use of the full optimizer state
            if not bad:
                state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=False, mmap=True)
                with open(os.path.join(ckpt, "config.json")) as f:
                    old = json.load(f)
        except Exception as e:  # noqa: BLE001 - garbage bytes fail the unpickler in many ways
            bad = [f"train_state.pt or config.json (unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__})"]
        if bad:
            print(f"skipping incomplete or damaged checkpoint {ckpt}: {', '.join(bad)}", file=sys.stderr)
            continue
        same_run(ckpt, old, settings, anyway)
        return ckpt, state
    if names:
        raise ValueError(f"--resume: no complete checkpoint in {out} (all {len(names)} are incomplete or damaged)")
    return None, None


def open_run(out, resume, settings, anyway=False, main=True):
    """Start the run in `out` (refusing to mix with one already there) or go on from its newest intact checkpoint
    (resume_from) -> (step folder, train_state) or (None, None); `main` (rank 0) removes leftovers and reports."""
    if not resume and step_folders(out):
        raise ValueError(f"{out} already holds checkpoints: pass --resume or choose another --out")
    if main:
        integrity.clean_tmp(out)
    ckpt, state = resume_from(out, settings, anyway) if resume else (None, None)
    if resume and main:
        print(f"resuming from {ckpt} (step {state['step']})" if ckpt else f"--resume: no checkpoint in {out}, "
              "starting at step 0")
    return ckpt, state


def rng_state():
    """Every RNG a training process draws from (python, numpy, torch, CUDA), for train_state.pt."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_step(out, step, model, opt, state, run_config, ema=None, sharded=False, build=None, detail_meta=None):
    """Write step_dir(out, step) (layout above); call it on every rank. The optimizer's, EMA's and (sharded: FSDP2)
    model's states are gathered as full FQN-keyed states, portable across FSDP/DDP and world sizes, with every
    rank's RNG state; rank 0 writes atomically, sharded from build() (an unsharded copy on the meta device).
    state: the rest of train_state.pt; with detail_meta, a DualExpert: its adapter goes to detail.safetensors."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(model, opt, options=full)  # collectives under FSDP: every rank takes part
    sd = get_model_state_dict(model, options=full) if sharded else None
    ema_sd = None if ema is None else get_model_state_dict(ema, options=full) if sharded else ema.state_dict()
    rngs = [rng_state()] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(rngs, rngs[0])
    if not dist.is_initialized() or dist.get_rank() == 0:
        if sd is not None:
            model = build()
            model.load_state_dict(sd, assign=True)
        with atomic_dir(step_dir(out, step)) as tmp:
            if detail_meta is None:
                save_transformer(model, os.path.join(tmp, "transformer"))
            else:
                model.save_semantic(os.path.join(tmp, "transformer"))
                model.save_detail(os.path.join(tmp, "detail.safetensors"), detail_meta)
            torch.save({**state, "step": step, "opt": osd, "ema": ema_sd, "rng": rngs},
                       os.path.join(tmp, "train_state.pt"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({**run_config, "step": step}, f, indent=2)
            integrity.write_checksums(tmp)  # before the folder goes live: every live step folder has them
    if dist.is_initialized():
        dist.barrier()
