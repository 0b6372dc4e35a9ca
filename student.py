"""The model each train.py stage trains, built from the run's flags: a backbone (teacher, VCM, PCM, a fully fine-tuned
semantic expert, the OD ablation), a `experts.DualExpert` (the detail stage) or a `experts.SemanticLoRA` (the
semantic stage with --semantic-lora) — fresh, from --init / --teacher, from a checkpoint, or on the meta device for
the planner and the FSDP start-up. Frozen weights are held in the compute dtype (--dtype bf16: bf16), what trains in
fp32, and fresh copies of bf16-held layers are read from the checkpoint in fp32.

On a two-expert teacher (Wan2.2-A14B, DESIGN.md section 12) the stages map onto its experts: the semantic stage
distils (and starts from) the high-noise expert, the detail stage puts its adapter on the low-noise expert, which is
also its teacher (`experts.DualExpert(on_teacher=True)`); kappa defaults to the last grid point below the boundary,
so each stage calls one expert only.
"""
import os

import torch
from safetensors import safe_open

import experts
import lora
import model as models
import solver
from backbones import wan
from storage import checkpoint
from teacher import Teacher
from tools import checks

SHIFT, GUIDANCE = 17.0, 6.0  # the authors' distillation settings (Wan2.1, HunyuanVideo; CogVideoX's CFG scale)


def two_experts(args):
    """checkpoint.TwoExperts of the run's --teacher (a Wan2.2-A14B pipeline folder), else None; a dry run on the
    --config of an A14B release plans its two experts (no folder: TwoExperts without paths)."""
    if args.teacher and os.path.isdir(args.teacher):
        return checkpoint.two_experts(args.teacher)
    ratio = wan.PIPELINES.get(getattr(args, "config", None) or "", {}).get("boundary_ratio")
    return checkpoint.TwoExperts(None, None, ratio) if ratio and getattr(args, "dry_run", False) else None


def detail_on_teacher(args):
    """A LoRA detail stage on a two-expert teacher: its adapter sits on the teacher's low-noise expert."""
    return args.stage == "detail" and not args.detail_full and two_experts(args) is not None


def shares_teacher(args):
    """The teacher is the student's own frozen base (experts.BaseView): no second copy of it."""
    return args.stage != "teacher" and (args.semantic_lora > 0 or detail_on_teacher(args))


def teacher_path(args):
    """The weights of the stage's own teacher: a two-expert teacher's low-noise expert in the detail stage, its
    high-noise expert otherwise; the --teacher itself for one-expert teachers."""
    moe = two_experts(args)
    return args.teacher if moe is None else moe.low if args.stage == "detail" else moe.high


def settle_defaults(args, cfg, kind):
    """The flags left open, per model: --shift / --guidance / --guidance-2 (the authors' 17 and 6; a Wan2.2 release
    its own, backbones/wan.PIPELINES) and --kappa (a two-expert teacher: the last grid point below its boundary).
    Returns the teacher's grid."""
    moe = two_experts(args)
    release = wan.PIPELINES.get(wan.release_of(cfg, moe and moe.boundary_ratio), {})
    args.shift = release.get("shift", SHIFT) if args.shift is None else args.shift
    args.guidance = release.get("guidance", GUIDANCE) if args.guidance is None else args.guidance
    args.guidance_2 = release.get("guidance_2", args.guidance) if args.guidance_2 is None else args.guidance_2
    grid = solver.flow_grid(args.grid_steps, args.shift) if kind == "flow" else solver.grid_for(cfg, args.grid_steps)
    if args.kappa is None:
        args.kappa = solver.kappa_below(grid, 1000 * moe.boundary_ratio) if moe else solver.default_kappa(
            cfg, args.grid_steps)
    if moe and args.fsdp and all(experts_used(args, grid, moe)):  # (checked before anything loads)
        raise checks.InputError(f"--kappa {args.kappa}: the {args.stage} stage's grid indices cross the teacher's "
                                f"expert boundary (t = {1000 * moe.boundary_ratio:g}); with --fsdp keep the default "
                                "kappa (one expert per stage)")
    return grid


def experts_used(args, grid, moe):
    """(high, low): whether the stage's grid indices reach the two-expert teacher's high- / low-noise expert."""
    lo, hi = {"semantic": (args.kappa + 1, grid.N - 1), "detail": (0, args.kappa)}.get(args.stage, (0, grid.N - 1))
    t = grid.t[1:].float()[lo:hi + 1]  # t at those grid indices, as the model receives it
    return bool((t >= 1000 * moe.boundary_ratio).any()), bool((t < 1000 * moe.boundary_ratio).any())


def stage_teacher(args, grid, tmodel, uncond, device, dtype):
    """The stage's Teacher around tmodel (its own expert, teacher_path); a two-expert teacher whose boundary the
    stage's grid indices cross (a --kappa off the boundary, vcm / pcm) gets its other expert loaded too."""
    moe = two_experts(args)
    if tmodel is None:
        return None
    if moe is None:
        return Teacher(tmodel, grid, args.guidance, uncond)
    bt, (high, low) = 1000 * moe.boundary_ratio, experts_used(args, grid, moe)
    if not (high and low):
        return Teacher(tmodel, grid, args.guidance if high else args.guidance_2, uncond)
    other = load(moe.high if args.stage == "detail" else moe.low, dtype, device)
    hi_m, lo_m = (other, tmodel) if args.stage == "detail" else (tmodel, other)
    return Teacher(hi_m, grid, args.guidance, uncond, model_2=lo_m, boundary_t=bt, guidance_scale_2=args.guidance_2)


def model_config(args):
    """The model config: the --teacher's, else --config's (a preset or config.json); both given, they must agree."""
    own = args.teacher or (args.init if args.stage == "teacher" else None)  # the teacher stage starts from --init
    cfg, tcfg = (checkpoint.read_config(p) if p else None for p in (args.config, own))
    if cfg is not None and tcfg is not None and cfg != tcfg:
        raise checks.InputError(f"--config {args.config} differs from the config of {own}")
    if cfg is None and tcfg is None:
        raise checks.InputError("no model: give --config (a preset or config.json) or --teacher")
    return cfg if tcfg is None else tcfg


def load(path, dtype, device):
    """checkpoint.load_transformer of a transformer or step folder; any failure is an InputError naming it."""
    try:
        return checks.finite_model(checkpoint.load_transformer(path, dtype=dtype, device=device), path)
    except Exception as e:  # noqa: BLE001 - truncated files raise safetensors/OS errors of many kinds
        raise checks.InputError(f"cannot load the transformer in {path}: {str(e).splitlines()[0]}") from e


def build_student(args, cfg, grid, ckpt=None, device="cpu"):
    """The trained model from ckpt, --init or --teacher (fresh when none, or on meta): a backbone, a DualExpert
    (detail), a SemanticLoRA (--semantic-lora, semantic stage). Frozen weights in the compute dtype, trained in fp32."""
    dual, on_teacher = args.stage == "detail" and not args.detail_full, detail_on_teacher(args)
    sem_lora = args.semantic_lora > 0 and not on_teacher  # (a detail adapter on the teacher: whatever the semantic run)
    frozen = torch.bfloat16 if args.dtype == "bf16" and (dual or sem_lora) else torch.float32
    src = args.teacher if sem_lora else ckpt or args.init or args.teacher  # a LoRA semantic expert's base: the teacher
    src = teacher_path(args) if on_teacher else src  # (its steps hold the adapter only)
    m = (models.build_transformer(cfg, device=device, dtype=frozen) if device == "meta" or not src
         else load(src, frozen, device))
    alpha = lambda rank: args.lora_alpha or 2 * rank  # noqa: E731 - of the adapter this stage trains
    if sem_lora and args.stage == "semantic":
        m = experts.SemanticLoRA(m, args.semantic_lora, alpha(args.semantic_lora), args.lora_targets, dtype=torch.float32)
        if ckpt:
            m.load(os.path.join(ckpt, "semantic.safetensors"))
    elif sem_lora:  # detail: the trained semantic adapter, frozen (a fresh one of rank R only to plan on meta)
        with torch.random.fork_rng(devices=[]):  # overwritten at once: the detail LoRA draws as without it
            if args.dry_run:
                m = experts.SemanticLoRA(m, args.semantic_lora, 2 * args.semantic_lora, args.lora_targets, dtype=frozen)
            else:
                folder = ckpt or checkpoint.resolve(args.init, "--init").folder
                m = experts.SemanticLoRA.from_file(m, os.path.join(folder, "semantic.safetensors"), frozen)
        m.requires_grad_(False)
    if dual:
        m = experts.DualExpert(m.backbone if sem_lora else m, solver.boundary_t(grid, args.kappa), args.lora_rank,
                               alpha(args.lora_rank), lora_targets=args.lora_targets, semantic=m if sem_lora else None,
                               dtype=torch.float32, on_teacher=on_teacher)
        if ckpt:
            m.load_detail(os.path.join(ckpt, "detail.safetensors"))
    if frozen != torch.float32 and device != "meta" and not ckpt and src:  # fresh copies of bf16-held layers: their
        m.init_copies(read_masters(args, src, lora.copy_keys(m)))  # fp32 values from the file, not bf16-rounded
    return m


def read_masters(args, src, keys):
    """The stored (fp32) values of the layers a fresh adapter copies: from the LoRA semantic expert's adapter file
    (a --semantic-lora detail stage), else from the checkpoint `src` itself."""
    if args.stage == "detail" and args.semantic_lora and not detail_on_teacher(args):
        with safe_open(os.path.join(checkpoint.resolve(args.init, "--init").folder, "semantic.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    return checkpoint.read_tensors(src, keys)
