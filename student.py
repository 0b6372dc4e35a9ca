"""The model each train.py stage trains, built from the run's flags: a backbone (teacher, VCM, PCM, a fully fine-tuned
semantic expert, the OD ablation), a `experts.DualExpert` (the detail stage) or a `experts.SemanticLoRA` (the
semantic stage with --semantic-lora) — fresh, from --init / --teacher, from a checkpoint, or on the meta device for
the planner and the FSDP start-up. Frozen weights are held in the compute dtype (--dtype bf16: bf16), what trains in
fp32, and fresh copies of bf16-held layers are read from the checkpoint in fp32.
"""
import os

import torch
from safetensors import safe_open

import experts
import lora
import model as models
import solver
from storage import checkpoint
from tools import checks


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
    dual, sem_lora = args.stage == "detail" and not args.detail_full, args.semantic_lora > 0
    frozen = torch.bfloat16 if args.dtype == "bf16" and (dual or sem_lora) else torch.float32
    src = args.teacher if sem_lora else ckpt or args.init or args.teacher  # a LoRA semantic expert's base: the teacher
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
                               dtype=torch.float32)
        if ckpt:
            m.load_detail(os.path.join(ckpt, "detail.safetensors"))
    if frozen != torch.float32 and device != "meta" and not ckpt and src:  # fresh copies of bf16-held layers: their
        m.init_copies(read_masters(args, src, lora.copy_keys(m)))  # fp32 values from the file, not bf16-rounded
    return m


def read_masters(args, src, keys):
    """The stored (fp32) values of the layers a fresh adapter copies: from the LoRA semantic expert's adapter file
    (a --semantic-lora detail stage), else from the checkpoint `src` itself."""
    if args.stage == "detail" and args.semantic_lora:
        with safe_open(os.path.join(checkpoint.resolve(args.init, "--init").folder, "semantic.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    return checkpoint.read_tensors(src, keys)
