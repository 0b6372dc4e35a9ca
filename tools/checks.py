"""Input checks shared by train.py, sample.py, data.py and tools/bench.py: each turns a bad flag or file into one InputError
naming it, before any expensive work starts (a traceback or a silently wrong result is a bug).

    device("cuda")                -> torch.device, or "--device cuda: torch has no CUDA here"
    out_dir(path, "--out")        -> the folder can be created and written, checked before the run
    memory(nbytes, "what", dev)   -> enough free memory for a tensor about to be allocated (estimated first)
    finite(tensors, "where")      -> no NaN/inf in weights or conditioning
    load_safetensors / read_json  -> a damaged or foreign file named, not a parser's traceback
    cli(main, argv)               -> every command line: the one `error:` line and the exit status (2, 1, 130, 143)
    train_args(args, given)       -> train.py's flag combinations, a flag its stage would ignore refused
"""
import json
import os
import sys
from contextlib import contextmanager

from storage import preempt  # torch is imported where it is used: a command line checks its flags before it loads


class InputError(ValueError):
    """A bad flag or file; the command lines print it as one `error:` line and exit 2 (as argparse does)."""


class RunFailed(Exception):
    """Work that started and failed (a diverged loss): one `error:` line, exit 1."""


def cli(main, argv=None):
    """Every command line's main(argv): bad input (ValueError and its kin) -> one `error:` line, exit 2, as argparse;
    RunFailed -> one line, exit 1; a signal -> its line, 130 (SIGINT) / 143 (SIGTERM). DCM_TRACEBACK=1 re-raises."""
    try:
        main(argv)
    except preempt.Interrupted as e:  # its line (none on ranks > 0: rank 0 speaks for the run)
        if str(e):
            print(e, file=sys.stderr)
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (storage/preempt.py handles it inside one)
        print("interrupted (Ctrl-C): nothing saved", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, ImportError, RunFailed) as e:
        if os.environ.get("DCM_TRACEBACK"):
            raise
        print("error: " + ("; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__),
              file=sys.stderr)
        raise SystemExit(1 if isinstance(e, RunFailed) else 2) from None
    return 0


def device(name, flag="--device"):
    """'auto' | 'cpu' | 'cuda[:i]' -> a usable torch.device (auto = cuda when present)."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"{flag} {name!r} is not a device: use auto, cpu or cuda[:i]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {name}: this torch ({torch.__version__}) sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"{flag} {name!r}: only cpu and cuda are supported")
    return dev


def out_dir(path, flag="--out"):
    """The output folder `path` exists as a folder or can be made, and is writable (nothing is created)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is an existing file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):  # the nearest existing ancestor must be a writable folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{flag} {path}: cannot make a folder there, {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {probe} is not writable")
    return path


def available_bytes(dev):
    """Free memory on `dev`: CUDA's free bytes, else the host's MemAvailable (None when unknown)."""
    if dev.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def memory(nbytes, what, dev="cpu"):
    """Refuse an allocation of `nbytes` (an estimate made before allocating) that cannot fit on `dev`."""
    import torch
    free = available_bytes(torch.device(dev))
    if free is not None and nbytes > free:
        raise InputError(f"{what} needs {nbytes / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB is free on {dev}")


def sampling_memory(cfg, num, batch, size, dtype, dev):
    """Refuse a sample run that cannot fit: noise + results (float32) and one batch's activations (about 16 values
    per token and channel: a block's with its 4x MLP; SDPA keeps attention linear in the tokens)."""
    import torch
    (f, h, w), p, pt = size, cfg.patch_size, getattr(cfg, "patch_size_t", None) or 1
    p, pt = (p[-1], p[0]) if isinstance(p, (tuple, list)) else (p, pt)  # Wan: patch_size (t, h, w)
    tokens = (f // pt) * (h // p) * (w // p) + getattr(cfg, "max_text_seq_length", 512)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    need = 2 * 4 * num * cfg.in_channels * f * h * w + 16 * batch * tokens * width * torch.finfo(dtype).bits // 8
    memory(need, f"sampling {num} x [{cfg.in_channels}, {f}, {h}, {w}] (--num/--frames/--height/--width)",
           torch.device(dev))


@contextmanager
def naming(what):
    """`with naming(what): load(...)`: a damaged file's error (safetensors, OS, key checks) as one InputError naming
    `what` (a context, not a callback: the caller calls its loader itself, so no call runs back up through here)."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/garbage files fail in the parser with many error types
        raise InputError(f"cannot load {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def finite(tensors, where):
    """Every floating tensor of `tensors` (dict or named_parameters pairs) is free of NaN/inf."""
    import torch
    items = tensors.items() if isinstance(tensors, dict) else tensors
    bad = [k for k, v in items if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{where}: non-finite values (NaN/inf) in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def load_safetensors(path, what="file"):
    """safetensors.torch.load_file with a missing, truncated or foreign file named in one InputError; each tensor
    a fresh copy: load_file's tensors can start at any 8-byte offset, and a vectorized CPU kernel orders its sums
    by the data's alignment (conditioning read from a file then differed in the last bit from the same tensors
    encoded in the process)."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} does not exist")
    try:
        return {k: v.clone() for k, v in load_file(path).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise InputError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_json(path, what="file", kind=dict):
    """A JSON file of the given top-level kind; a missing or invalid one named in one InputError."""
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(obj, kind):
        raise InputError(f"{what} {path}: expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def at_least(args, minimum, *names):
    """Integer flags (argparse names) that must be >= minimum."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < minimum:
            raise InputError(f"--{name.replace('_', '-')} {v} must be >= {minimum}")


# train.py flags -> the stages that use them; given to another stage they would be ignored, so they are refused
STAGE_FLAGS = {**dict.fromkeys(("detail_full", "lora_rank", "disc_hidden", "d_lr", "d_betas", "w_gan", "w_fm", "gan_first",
                                 "gan_real"),
                                ("detail",)),
               **dict.fromkeys(("semantic_lora", "lora_targets", "lora_alpha"), ("semantic", "detail")),
               "kappa": ("semantic", "detail"), "phases": ("pcm",), "cond_drop": ("teacher",),
               **dict.fromkeys(("teacher", "w_tc", "target_ema", "loss"), ("vcm", "pcm", "semantic", "detail"))}
DRY_RUN_FLAGS = ("world_size", "frames", "height", "width", "gpu_mem")


def train_args(args, given=()):
    """train.py's flags that argparse cannot check alone (one InputError naming the flag); `given`: the flags the
    command line named (argparse dests), each refused where the run would ignore it."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name in sorted(given):
        if args.stage not in STAGE_FLAGS.get(name, (args.stage,)):
            hint = (": the teacher stage trains the teacher itself; start it from weights with --init"
                    if name == "teacher" else f" (used by --stage {' / '.join(STAGE_FLAGS[name])})")
            raise InputError(f"{flag(name)} means nothing to --stage {args.stage}{hint}")
        if name in DRY_RUN_FLAGS and not args.dry_run:
            raise InputError(f"{flag(name)} plans a run: it goes with --dry-run")
    if "resume_anyway" in given and not args.resume:
        raise InputError("--resume-anyway goes with --resume")
    if args.detail_full and given & {"lora_rank", "lora_targets", "lora_alpha"}:
        raise InputError(f"{flag(min(given & {'lora_rank', 'lora_targets', 'lora_alpha'}))}: --detail-full trains no LoRA")
    if args.semantic_lora < 0:
        raise InputError(f"--semantic-lora {args.semantic_lora}: a LoRA rank must be >= 1 (0 = the fully fine-tuned "
                         "semantic expert)")
    if args.stage == "semantic" and not args.semantic_lora and given & {"lora_targets", "lora_alpha"}:
        raise InputError(f"{flag(min(given & {'lora_targets', 'lora_alpha'}))} means nothing to --stage semantic without "
                         "--semantic-lora (the semantic expert is fully fine-tuned)")
    for name in ("gan_first", "gan_real") if not (args.w_gan or args.w_fm) else ():
        if name in given:
            raise InputError(f"{flag(name)} with --w-gan 0 --w-fm 0: there is no GAN or FM term")
    if args.semantic_lora and args.detail_full:
        raise InputError("--semantic-lora with --detail-full: the OD ablation trains a full copy of the semantic expert, "
                         "which a LoRA semantic expert does not have")
    if args.semantic_lora and args.target_ema and args.fsdp:
        raise InputError("--target-ema with --semantic-lora and --fsdp: the adapters' EMA is swapped into the student "
                         "for the target, which FSDP2's gathered root would not see; use one process / DDP, or the "
                         "stop-grad target (--target-ema 0, the authors')")
    if args.semantic_lora and args.stage == "semantic" and args.init:
        raise InputError("--init with --semantic-lora: a LoRA semantic expert starts from the teacher's weights")
    if args.stage == "detail" and not args.init:
        raise InputError("--stage detail needs --init: the semantic expert checkpoint to build on")
    if args.stage != "teacher" and not (args.teacher or args.dry_run):
        raise InputError(f"--stage {args.stage} needs --teacher (the model to distil)")
    if not (args.data or args.dry_run):
        raise InputError("--data is required (a dataset folder, see data.py)")
    at_least(args, 1, "max_steps", "batch_size", "grad_accum", "lora_rank", "disc_hidden", "world_size")
    if args.lora_alpha is not None and not 0 < args.lora_alpha < float("inf"):
        raise InputError(f"--lora-alpha {args.lora_alpha} must be a finite number > 0")
    at_least(args, 0, "save_every", "probe_every", "keep_last")
    if not args.dist_timeout > 0:
        raise InputError(f"--dist-timeout {args.dist_timeout} must be > 0 minutes")
    if args.stage == "detail" and args.disc_hidden % 32:
        raise InputError(f"--disc-hidden {args.disc_hidden} must be a multiple of 32 (the heads' GroupNorm(32))")
    if args.grid_steps < 2:
        raise InputError(f"--grid-steps {args.grid_steps}: the teacher's grid needs N >= 2 steps")
    if args.stage == "pcm" and not 2 <= args.phases <= args.grid_steps:
        raise InputError(f"--phases {args.phases}: pcm needs 2..N = 2..{args.grid_steps} phases "
                         "(--stage vcm is the one-phase model)")
    for name, lo, hi in (("target_ema", 0.0, 1.0), ("cond_drop", 0.0, 1.0)):
        v = getattr(args, name)
        if not lo <= v < hi + (name == "cond_drop"):
            raise InputError(f"--{name.replace('_', '-')} {v} must lie in [{lo}, {hi}{']' if name == 'cond_drop' else ')'}")
    for name in ("lr", "weight_decay", "w_tc", "w_gan", "w_fm", "shift", "guidance", "guidance_2"):
        v = getattr(args, name, None)
        if v is not None and not (v >= 0 and v < float("inf")):  # (None: a per-model default, student.settle_defaults)
            raise InputError(f"--{name.replace('_', '-')} {v} must be a finite number >= 0")


def config_diff(a, b):
    """The fields in which two model configs differ, as 'name a != b' (the class when it differs)."""
    from dataclasses import asdict
    if type(a) is not type(b):
        return [f"{type(a).__name__} != {type(b).__name__}"]
    da, db = asdict(a), asdict(b)
    return [f"{k} {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]]


def finite_model(model, where):
    """The model, after checking its weights and buffers for NaN/inf (a damaged or diverged checkpoint)."""
    finite([*model.named_parameters(), *model.named_buffers()], where)
    return model


def run_summary(run, path):
    """A few lines of the run config for the console (the full JSON is at `path`)."""
    g, m = run.get("grid", {}), run.get("model_config", {})
    lines = [f"run: stage {run['stage']}, {m.get('_class_name')} ({run['params'] / 1e6:.2f} M params, "
             f"{run['trainable'] / 1e6:.2f} M trainable), {run['dtype']} on {run['device']}, world {run['world_size']}",
             f"  data {run['data']} ({run['data_manifest'].get('num_samples')} x {run['data_manifest'].get('latent_shape')})",
             *[f"  {k} {run[k]}" for k in ("teacher", "init") if run.get(k)],
             f"  {run['max_steps']} steps, lr {run['lr']}, global batch {run['batch_size']} x {run['grad_accum']} x "
             f"{run['global_batch'] // (run['batch_size'] * run['grad_accum'])} = {run['global_batch']} "
             f"(SP {run.get('sp', 1)}), seed {run['seed']}",
             f"  grid {g.get('kind')} N={g.get('N')}, boundaries {run['boundaries']}, k in {run['k_range']}; loss {run['loss']}, "
             + ", ".join(f"{k} {run[k]}" for k in ("w_tc", "w_gan", "w_fm", "target_ema")),
             f"  full config -> {path}"]
    return "\n".join(lines)
