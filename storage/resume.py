"""Saving and resuming a train.py run (DESIGN sec. 9): the step folder written from every rank (storage/checkpoint.py
holds its layout), the newest intact one found again, the run's settings compared before going on from it, and what a
run starts from (--teacher / --init) checked before anything loads."""
import contextlib
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from storage import checkpoint, integrity, safetensors_io
from storage.checkpoint import EMA, MOMENTS, RESUMABLE, atomic_dir, save_transformer, step_dir, step_folders, step_missing
from tools import checks

# run settings a resumed run must share with its checkpoint: the state's shape (never overridable) and
# what the run trains on and towards (--resume-anyway goes on with the new values); the data by its content
# (latents.LatentDataset.digest): a moved or copied dataset resumes, one rewritten in place does not
RESUME_SHAPE = ("stage", "detail_full", "grid_steps", "shift", "lora_rank", "lora_targets", "lora_alpha", "semantic_lora",
                "disc_hidden", "boundaries")
RESUME_RUN = ("teacher", "init", "data_digest", "batch_size", "grad_accum", "seed", "w_tc", "w_gan", "w_fm", "loss",
              "target_ema", "guidance", "cond_drop")


def same_run(ckpt, old, settings, anyway=False):
    """Refuse to go on from a checkpoint saved with other RESUME_SHAPE settings, or other RESUME_RUN ones unless
    `anyway` (then a warning); settings: this run's config values (paths absolute). A checkpoint saved before
    runs recorded the data's digest is compared by the --data path."""
    def differ(keys):
        show = lambda k, v: f"{v[:12]}..." if k == "data_digest" and v else repr(v)  # noqa: E731 - 64 hex digits
        return [f"{k}={show(k, old.get(k))} (now {show(k, settings.get(k))})" for k in keys
                if k in settings and old.get(k) != settings[k]]
    run_keys = RESUME_RUN if "data_digest" in old else tuple("data" if k == "data_digest" else k for k in RESUME_RUN)
    if bad := differ(RESUME_SHAPE):
        raise ValueError(f"{ckpt} was saved with {', '.join(bad)}: its state cannot go on in this run")
    if (bad := differ(run_keys)) and not anyway:
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
                state = read_state(ckpt)
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
    (resume_from) -> (step folder, train_state) or (None, None). Rank 0 (`main`) alone decides — it reads the folder,
    verifies the checksums, removes leftovers and reports — and every rank follows its decision: a rank that cannot
    read rank 0's checkpoint fails with all the others (one line each) instead of starting fresh or from another step
    on its own view of the storage and then hanging at the first collective."""
    decision = [None, None]  # (the step folder to go on from, or an error message for every rank)
    if main:
        try:
            if not resume and step_folders(out):
                raise ValueError(f"{out} already holds checkpoints: pass --resume or choose another --out")
            integrity.clean_tmp(out)
            ckpt, state = resume_from(out, settings, anyway) if resume else (None, None)
            decision[0] = ckpt
            if resume:
                print(f"resuming from {ckpt} (step {state['step']})" if ckpt else f"--resume: no checkpoint in {out}, "
                      "starting at step 0")
        except ValueError as e:
            decision[1] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    if decision[1]:
        raise ValueError(decision[1])
    ckpt, problem = decision[0], None
    if ckpt and not main:  # rank 0's choice, read without verifying again (no checksum storm before the first step)
        try:
            state = read_state(ckpt)
        except Exception as e:  # noqa: BLE001 - missing, unreadable, half-synced storage: all the same here
            problem = (f"rank {dist.get_rank()} cannot read {ckpt}, the checkpoint rank 0 resumes from ({type(e).__name__}): "
                       f"--out must be one folder that every rank sees")
    if dist.is_initialized() and ckpt:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ValueError(problem)
    return (ckpt, state) if ckpt else (None, None)


def read_state(folder):
    """A step folder's train state: train_state.pt with the AdamW moments (`opt`, FQN-keyed as
    get_optimizer_state_dict gives them) and the EMA weights (`ema`) put back from their files, all memory-mapped: a
    rank reads only the pages it uses (under FSDP the others never touch the optimizer's). Folders from before the
    moments had their own files hold everything in train_state.pt."""
    state = torch.load(os.path.join(folder, "train_state.pt"), map_location="cpu", weights_only=False, mmap=True)
    if state.get("opt", {}).get("moments") == MOMENTS:
        opt = state["opt"]
        for k, v in safetensors_io.mapped(os.path.join(folder, opt.pop("moments"))).items():
            fqn, key = k.rsplit(".", 1)  # "<parameter FQN>.exp_avg"
            opt["state"].setdefault(fqn, {})[key] = v
    if state.get("ema") == EMA:
        state["ema"] = safetensors_io.mapped(os.path.join(folder, EMA))
    return state


def _full(v):
    """A tensor of a state as one process holds it whole, on the host: an FSDP2 shard all-gathered (a collective)."""
    return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()


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


def save_step(out, step, model, opt, state, run_config, ema=None, sharded=False, build=None, meta=None):
    """Write step_dir(out, step) (layout above); call it on every rank. The optimizer's, EMA's and (sharded: FSDP2)
    model's states are gathered as full FQN-keyed states, portable across FSDP/DDP and world sizes, with every
    rank's RNG state; rank 0 writes atomically, sharded from build() (an unsharded copy on the meta device).
    state: the rest of train_state.pt; an adapter model (experts: save_parts) writes its adapter files, `meta` in them.
    Under FSDP every tensor is gathered when its turn to be written comes and written by rank 0 as it arrives: a whole
    model's weights, then the AdamW moments and the EMA weights (MOMENTS, EMA: safetensors files, read back
    memory-mapped by read_state), so rank 0's host holds one tensor, not the state (13B semantic with EMA: 205 GB). An
    adapter model's files (the adapter, a DualExpert's frozen semantic backbone) still come from one gathered copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # (imported here: ~1 s, a save needs it)
    main = not dist.is_initialized() or dist.get_rank() == 0
    with atomic_dir(step_dir(out, step)) if main else contextlib.nullcontext() as tmp:
        if main:
            time.sleep(float(os.environ.get("DCM_TEST_SAVE_SLEEP", 0)))  # test hook: a slow save to signal inside
        if sharded and not hasattr(model, "save_parts"):  # a whole model: gathered one tensor at a time as it is written
            save_transformer(model, os.path.join(tmp, "transformer") if main else None, whole=_full)
        else:  # one process, or an adapter model (experts: save_parts): its files from a gathered copy on the meta build
            sd = get_model_state_dict(model, options=full) if sharded else None  # collectives: every rank takes part
            if main:
                whole = model
                if sd is not None:
                    whole = build()
                    whole.load_state_dict(sd, assign=True)
                if hasattr(whole, "save_parts"):  # experts.DualExpert / SemanticLoRA: adapter files (+ transformer/)
                    whole.save_parts(tmp, meta)
                else:
                    save_transformer(whole, os.path.join(tmp, "transformer"))
                del whole
            del sd
        name = {p: n for n, p in model.named_parameters()}  # FQNs, as get_optimizer_state_dict keys them
        moments = {f"{name[p]}.{k}": v for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v) and v.dim()}
        safetensors_io.save_each({k: safetensors_io.spec(v) for k, v in moments.items()}, lambda k: _full(moments[k]),
                                 os.path.join(tmp, MOMENTS) if main else None)
        small = lambda st: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()  # noqa: E731 - AdamW's step
                            if not (torch.is_tensor(v) and v.dim())}
        osd = {"moments": MOMENTS, "state": {name[p]: small(st) for p, st in opt.state.items()},
               "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [name[p] for p in g["params"]]}
                                for g in opt.param_groups]}
        if ema is not None:
            esd = ema.state_dict()
            safetensors_io.save_each({k: safetensors_io.spec(v) for k, v in esd.items()}, lambda k: _full(esd[k]),
                                     os.path.join(tmp, EMA) if main else None)
        rngs = [rng_state()] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(rngs, rngs[0])
        if main:
            with integrity.hashed(os.path.join(tmp, "train_state.pt")) as f:  # its checksum taken as it is written
                torch.save({**state, "step": step, "opt": osd, "ema": EMA if ema is not None else None,
                            "rng": rngs}, f)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({**run_config, "step": step}, f, indent=2)
            integrity.write_checksums(tmp)  # before the folder goes live: every live step folder has them
    if dist.is_initialized():
        dist.barrier()


def load_optimizer(model, opt, osd, broadcast=False):
    """The optimizer state saved by save_step (full, FQN-keyed) into `opt`, for DDP, FSDP2 or one process.
    broadcast (FSDP2 on several ranks): rank 0 alone reads the state (train_state.pt is memory-mapped, so the other
    ranks never touch its optimizer bytes) and sends each rank its shards, tensor by tensor: no full copy of a 13B
    model's AdamW states read by every rank of every node."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    broadcast = broadcast and dist.is_initialized() and dist.get_world_size() > 1
    set_optimizer_state_dict(model, opt, osd if not broadcast or dist.get_rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))


def trim_logs(out, step):
    """Cut log.jsonl and probes.jsonl back to `step` (a resumed run rewrites what came after) -> the last log row."""
    row = {}
    for path in [os.path.join(out, f) for f in ("log.jsonl", "probes.jsonl")]:
        if os.path.isfile(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(path, "w") as f:
                f.writelines(keep)
            row = row or (json.loads(keep[-1]) if keep else {})  # the summary of a run already finished
    return row


def check_sources(args, cfg):
    """--teacher / --init resolved and verified before any load; --init: the teacher's architecture, a semantic expert."""
    src = {k: checkpoint.resolve(p, f"--{k}") for k in ("teacher", "init") if (p := getattr(args, k)) and not args.dry_run}
    if "init" in src and (diff := checks.config_diff(checkpoint.read_config(src["init"].weights), cfg)):
        raise checks.InputError(f"--init {args.init} is another architecture than the model "
                                f"({args.teacher or args.config}): " + "; ".join(diff[:6]))
    if "init" not in src or args.stage != "detail":
        return
    parent = os.path.dirname(os.path.normpath(args.init))  # a step's transformer/ given: its step's run config
    stage = (src["init"].run or (checks.read_json(os.path.join(parent, "config.json"), "run config")
                                 if checkpoint.is_run_config(parent) else {})).get("stage")
    if stage not in ("semantic", "detail", None):
        raise checks.InputError(f"--init {args.init} is a {stage}-stage checkpoint; --stage detail builds on the "
                                "semantic expert (train it first: --stage semantic --teacher ...)")
    init_rank = (src["init"].run or {}).get("semantic_lora") or 0
    if init_rank != args.semantic_lora:
        raise checks.InputError(f"--init {args.init} is " + (f"a LoRA semantic expert (--semantic-lora {init_rank}): pass "
                                f"--semantic-lora {init_rank}" if init_rank else "a fully fine-tuned semantic expert: "
                                f"--semantic-lora {args.semantic_lora} builds on a LoRA one (leave it out)"))
    if init_rank:
        init_run = src["init"].run
        if os.path.realpath(init_run["teacher"]) != os.path.realpath(args.teacher):
            raise checks.InputError(f"--teacher {args.teacher} is not the base of the LoRA semantic expert --init "
                                    f"{args.init} (its run's --teacher {init_run['teacher']})")
        if init_run.get("lora_targets") != args.lora_targets:
            raise checks.InputError(f"--lora-targets {args.lora_targets}: the LoRA semantic expert --init {args.init} "
                                    f"was trained with --lora-targets {init_run.get('lora_targets')}; the detail expert "
                                    "stacks on the same layers")
    if stage != "semantic":
        print(f"warning: --init {args.init} " + ("records no training stage; it is taken as the semantic expert" if stage
              is None else "is a detail-stage checkpoint: its frozen semantic backbone is used, its adapter is not"),
              file=sys.stderr)
