"""Every way a student leaves the project (one command, one subcommand per format).

    python export.py authors --ckpt out/detail --out DCM_MINE/transformer [--dtype bf16]
    python export.py diffusers --ckpt out/wdet --weights Wan2.1-T2V-1.3B-Diffusers --out DCM_WAN_PIPE
    python export.py lora --ckpt out/wdet --out dcm_detail.safetensors [--expert semantic] [--layout comfyui]

authors: a LoRA detail expert trained here (`--lora-targets authors`, HunyuanVideo or Wan) -> the authors' released
single-file layout (storage/released.py, DESIGN sec. 7), which their inference scripts and our sample.py load.
lora: a student -> one LoRA file in the key layout of diffusers' `pipe.load_lora_weights` (`transformer.<module>.lora_A/B`,
scale 1): the detail expert over the weights the run starts from (a fully fine-tuned semantic expert's, or with
--semantic-lora the teacher's, the semantic LoRA stacked in), or `--expert semantic`; each linear of the copied
timestep layers as an exact full-rank pair (an identity and the weight difference, the bias difference as
lora_B.bias). Layers that are no linear (CogVideoX's norm_out LayerNorm) cannot go into such a file: refused.
--layout comfyui: the same pairs under the module names ComfyUI's LoRA loader reads, bias deltas as `.diff_b`. Wan:
the original Wan names (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`; WAN_ORIGINAL), which diffusers'
load_lora_weights converts back on its own. HunyuanVideo: Tencent's original names as ComfyUI keeps them
(HUNYUAN_BLOCKS, HUNYUAN_TOP), the pairs of a fused linear as one exact pair (A stacked, B block-diagonal, zero rows
where a part has none); diffusers refuses that file (its `.diff_b` keys): for diffusers use the default layout.
CogVideoX (no ComfyUI model): refused.
diffusers: a Wan student -> a complete `WanPipeline` folder that stock diffusers loads and runs with no code of ours:
transformer/ = the semantic expert, transformer_2/ = the detail expert merged, model_index.json's boundary_ratio
between them, a FlowMatchEulerDiscreteScheduler whose few points come closest to the student's (WanPipeline only
calls set_timesteps(num_inference_steps): our own points cannot be passed; both point sets are printed), and the
text encoder, tokenizer and VAE of --weights. HunyuanVideo and CogVideoX have no two-transformer pipeline in diffusers.
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch

import experts
import model as models
import sampling
import solver
from storage import checkpoint, latents, released
from tools import checks


class ExportError(checks.InputError):
    """A run or flag that cannot be exported as asked; one error line."""


def student_parts(args, merged=True):
    """(resolved step, the semantic expert's backbone, the DualExpert on it) of a LoRA detail-stage run. A
    --semantic-lora adapter is merged into its base (merged=True: one full semantic expert, fp32 sum) or kept as the
    DualExpert's stacked semantic adapter over the untouched base (merged=False: the LoRA export)."""
    src = checkpoint.resolve(args.ckpt, "--ckpt")
    adapter = getattr(args, "detail", None) or src.detail
    if src.kind != "step" or not adapter or not os.path.isfile(adapter):
        raise ExportError(f"--ckpt {args.ckpt}: not a LoRA detail-stage run or step folder (no detail adapter"
                          f"{'' if not adapter else ' ' + adapter})")
    if src.run.get("detail_base"):  # a two-expert teacher's run: the adapter on its low-noise expert, the semantic
        if not src.run.get("init") or not os.path.exists(src.run["init"]):  # expert is the run's --init
            raise ExportError(f"--ckpt {args.ckpt}: its semantic expert (--init {src.run.get('init')!r}) is missing")
        semantic = sampling.load_backbone(checkpoint.resolve(src.run["init"], "the run's semantic expert"),
                                          torch.float32, "cpu")
        expert = experts.DualExpert.from_detail(checkpoint.load_transformer(src.weights), adapter)
        expert.on_teacher = True  # (its backbone is the low-noise expert, not the semantic one)
        return src, semantic, expert
    semantic = checkpoint.load_transformer(src.weights)
    sem = experts.SemanticLoRA.from_file(semantic, src.semantic) if src.semantic else None
    if sem is not None and merged:
        semantic, sem = sem.merge_into_base(), None
    expert = experts.DualExpert.from_detail(semantic, adapter, semantic=sem, semantic_merged=bool(src.semantic) and merged)
    return src, semantic, expert


# ComfyUI reads Wan LoRAs only under the original Wan2.1 repository's module names (wan/modules/model.py, which
# ComfyUI's comfy/ldm/wan/model.py keeps): comfy/lora.py model_lora_keys_unet maps `diffusion_model.<name>` and
# `lora_unet_<name with _>` of its own state dict and has no rule for diffusers' Wan names (docs/sampling.md). The
# table: diffusers' module name -> the original one, for every linear a LoRA file of ours can hold (diffusers'
# scripts/convert_wan_to_diffusers.py renames the other way); inside blocks.N. first, then the top-level layers.
WAN_ORIGINAL_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                      "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                      "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                      "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # I2V
                      "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
WAN_ORIGINAL = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
                "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                "condition_embedder.time_proj": "time_projection.1",
                "condition_embedder.text_embedder.linear_1": "text_embedding.0",
                "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",  # I2V
                "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3", "proj_out": "head.head"}
# ComfyUI's HunyuanVideo (comfy/ldm/hunyuan_video/model.py, on Flux's layers) renames Tencent's original modules
# (supported_models.py HunyuanVideo.process_unet_state_dict: `img_mod.lin`, `img_attn.qkv`, `mlp.0`, MLPEmbedders'
# `in_layer`/`out_layer`), and its LoRA keys (comfy/lora.py model_lora_keys_unet, the HunyuanVideo branch) are
# `diffusion_model.<its name>` with Tencent's `_mod.linear`, `_attn_qkv`, `_attn_proj`, `mlp.fc1/fc2`,
# `modulation.linear` put back, so Tencent's names but in_layer/out_layer (docs/sampling.md). The table (the reverse of
# backbones/hunyuan_video.py's converter): ours -> the original block list, {original linear: our linears, its rows in
# that order (several = one fused linear)}; then the top-level linears, original: ours.
HUNYUAN_BLOCKS = {
    "transformer_blocks": ("double_blocks", {
        "img_attn_qkv": "attn.to_q attn.to_k attn.to_v", "txt_attn_qkv": "attn.add_q_proj attn.add_k_proj attn.add_v_proj",
        "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out", "img_mod.linear": "norm1.linear",
        "txt_mod.linear": "norm1_context.linear", "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
        "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"}),
    "single_transformer_blocks": ("single_blocks", {
        "linear1": "attn.to_q attn.to_k attn.to_v proj_mlp", "linear2": "proj_out", "modulation.linear": "norm.linear"}),
    "context_embedder.token_refiner.refiner_blocks": ("txt_in.individual_token_refiner.blocks", {
        "self_attn_qkv": "attn.to_q attn.to_k attn.to_v", "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"})}
HUNYUAN_TOP = {f"{theirs}.{a}": f"{ours}.linear_{i}" for theirs, ours in (
    ("time_in", "time_text_embed.timestep_embedder"), ("guidance_in", "time_text_embed.guidance_embedder"),
    ("vector_in", "time_text_embed.text_embedder"), ("txt_in.t_embedder", "context_embedder.time_text_embed.timestep_embedder"),
    ("txt_in.c_embedder", "context_embedder.time_text_embed.text_embedder")) for i, a in ((1, "in_layer"), (2, "out_layer"))}
HUNYUAN_TOP |= {"txt_in.input_embedder": "context_embedder.proj_in", "final_layer.linear": "proj_out",
                "final_layer.adaLN_modulation.1": "norm_out.linear"}  # the last: rows (shift, scale), ours (scale, shift)
LAYOUTS = ("diffusers", "comfyui")


def wan_original(name):
    """A Wan linear's diffusers module name -> its original (ComfyUI) name; one that has none is refused."""
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if block and block[2] in WAN_ORIGINAL_BLOCK:
        return f"blocks.{block[1]}.{WAN_ORIGINAL_BLOCK[block[2]]}"
    if name in WAN_ORIGINAL:
        return WAN_ORIGINAL[name]
    raise ExportError(f"--layout comfyui: the layer {name} has no name in the original Wan layout ComfyUI reads "
                      "(use --layout diffusers)")


def hunyuan_original(name):
    """A HunyuanVideo linear's module name -> (the original (ComfyUI) linear holding it, our linears that are its rows,
    in order); one that has none is refused."""
    block = re.fullmatch(rf"({'|'.join(map(re.escape, HUNYUAN_BLOCKS))})\.(\d+)\.(.+)", name)
    for theirs, ours in HUNYUAN_BLOCKS[block[1]][1].items() if block else ():
        if block[3] in ours.split():
            return f"{HUNYUAN_BLOCKS[block[1]][0]}.{block[2]}.{theirs}", [f"{block[1]}.{block[2]}.{o}" for o in ours.split()]
    for theirs, ours in HUNYUAN_TOP.items():
        if name == ours:
            return theirs, [ours]
    raise ExportError(f"--layout comfyui: the layer {name} has no name in the original HunyuanVideo layout ComfyUI "
                      "reads (use --layout diffusers)")


def hunyuan_comfyui(pairs, modules):
    """{our linear: [A, B, bias delta or None]} -> ComfyUI's HunyuanVideo LoRA keys: the pairs of one fused original
    linear as one exact pair (A = the parts' A stacked, B block-diagonal, rank = the sum; zero rows for a part with no
    pair), the bias delta as `.diff_b` (zeros for a part without one)."""
    out, done = {}, set()
    for n in pairs:
        theirs, parts = hunyuan_original(n)
        if theirs in done:
            continue
        done.add(theirs)
        have = [p for p in parts if p in pairs]
        rows = [modules[p].weight.shape[0] for p in parts]
        a = torch.cat([pairs[p][0] for p in have], 0)
        b, bias, r, o = torch.zeros(sum(rows), a.shape[0]), torch.zeros(sum(rows)), 0, 0
        for p, m in zip(parts, rows):
            if p in pairs:
                k = pairs[p][0].shape[0]
                b[o:o + m, r:r + k], r = pairs[p][1], r + k
                bias[o:o + m] = pairs[p][2] if pairs[p][2] is not None else 0
            o += m
        if theirs == "final_layer.adaLN_modulation.1":  # ours (scale, shift) -> (shift, scale)
            b, bias = (torch.cat(x.chunk(2)[::-1]) for x in (b, bias))
        out |= {f"diffusion_model.{theirs}.lora_A.weight": a, f"diffusion_model.{theirs}.lora_B.weight": b}
        if any(pairs[p][2] is not None for p in have):
            out[f"diffusion_model.{theirs}.diff_b"] = bias
    return out


def lora_state(expert, which="detail", layout="diffusers"):
    """{LoRA key: tensor} of an expert of a DualExpert relative to its backbone's weights (module docstring); which:
    "detail" (with a LoRA semantic expert's pairs stacked under the detail ones) or "semantic"; layout: "diffusers"
    (`transformer.<module>.lora_A.weight`) or "comfyui" (`diffusion_model.<original module>...`: Wan, WAN_ORIGINAL;
    HunyuanVideo, hunyuan_comfyui)."""
    import torch.nn as nn

    from lora import arch_of, module_key
    sem = expert.sem
    if which == "semantic" and sem is None:
        raise ExportError("--expert semantic: this run's semantic expert is fully fine-tuned (its weights are the "
                          "transformer itself, no LoRA)")
    layers = ([sem] if sem is not None else []) + ([expert] if which == "detail" else [])
    copies = expert.copies if which == "detail" else sem.copies
    out, base = {}, dict(expert.backbone.named_modules())
    for n in expert.lora_names:  # stacked pairs: B @ A = sum of each layer's scale * B_i @ A_i, scale 1 in the file
        pairs = [layer.lora[module_key(n)] for layer in layers]
        out[f"transformer.{n}.lora_A.weight"] = torch.cat([p.A.detach().float() for p in pairs], 0)
        out[f"transformer.{n}.lora_B.weight"] = torch.cat([p.B.detach().float() * p.scale for p in pairs], 1)
    for n in expert.copy_names:
        for k, mod in copies[module_key(n)].named_modules():
            name, orig = f"{n}.{k}" if k else n, base[f"{n}.{k}" if k else n]
            params = dict(mod.named_parameters(recurse=False))
            if params and not isinstance(mod, nn.Linear):
                bad = [p for p, v in params.items() if not torch.equal(v, getattr(orig, p))]
                if bad:
                    raise ExportError(f"the copied layer {name} ({type(mod).__name__}: {', '.join(bad)}) is no linear "
                                      "layer: it cannot go into a LoRA file (use export.py diffusers / authors)")
            if not isinstance(mod, nn.Linear):
                continue
            delta = (mod.weight.detach().float() - orig.weight.detach().float())
            eye = torch.eye(min(delta.shape))  # an exact full-rank pair: rank = the smaller side
            a, b = (eye, delta) if delta.shape[1] <= delta.shape[0] else (delta, eye)
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = a, b
            if mod.bias is not None:
                out[f"transformer.{name}.lora_B.bias"] = mod.bias.detach().float() - orig.bias.detach().float()
    if layout == "comfyui" and arch_of(expert.backbone) == "HunyuanVideo":
        pairs = {}  # {our linear: [A, B, bias delta or None]}
        for k, v in out.items():
            n, tail = k[len("transformer."):].rsplit(".lora_", 1)
            pairs.setdefault(n, [None, None, None])[("A.weight", "B.weight", "B.bias").index(tail)] = v
        return {k: v.contiguous() for k, v in hunyuan_comfyui(pairs, base).items()}
    if any(k.endswith(".lora_B.bias") for k in out):  # PEFT's lora_bias is one switch for every layer
        for k in [k for k in out if k.endswith(".lora_B.weight")]:
            out.setdefault(k.replace(".weight", ".bias"), torch.zeros(out[k].shape[0]))
    if layout == "comfyui":  # a bias delta is ComfyUI's `.diff_b` (it reads no lora_B.bias); the zero ones stay, as
        # diffusers' converter makes every diff_b a lora_B.bias and a layer left without one stays on the meta device
        tail = {".lora_A.weight": ".lora_A.weight", ".lora_B.weight": ".lora_B.weight", ".lora_B.bias": ".diff_b"}
        split = [(k[len("transformer."):].rsplit(".lora_", 1)[0], k[k.rindex(".lora_"):], v) for k, v in out.items()]
        return {f"diffusion_model.{wan_original(n)}{tail[t]}": v.contiguous() for n, t, v in split}
    return {k: v.contiguous() for k, v in out.items()}


def lora(args):
    """A LoRA detail-stage run -> one LoRA file for diffusers or ComfyUI (module docstring)."""
    from lora import arch_of
    if args.layout == "comfyui":  # before any weight is loaded
        cfg, _ = sampling.checkpoint_config(args.ckpt, "--ckpt")
        if not isinstance(cfg, (models.WanConfig, models.HunyuanVideoConfig)):
            raise ExportError(f"--layout comfyui: ComfyUI's key names are written for Wan and HunyuanVideo students "
                              f"only; --ckpt {args.ckpt} is a {type(cfg).__name__.removesuffix('Config')} student (use "
                              "--layout diffusers)")
    src, _, expert = student_parts(args, merged=False)
    if expert.on_teacher and args.expert == "semantic":
        raise ExportError(f"--expert semantic: {args.ckpt} is a two-expert teacher's run, whose semantic expert is its "
                          f"--init {src.run.get('init')} (full weights or an adapter over the high-noise expert)")
    sd = lora_state(expert, args.expert, args.layout)
    latents.atomic_save_file(sd, args.out, metadata={"format": "pt"})
    on = ("the teacher's low-noise expert (its transformer_2/)" if expert.on_teacher else "the teacher's weights "
          "(--teacher of the run)" if expert.sem is not None else "the semantic expert's weights (the step's transformer/)")
    reader = ("diffusers' load_lora_weights" if args.layout == "diffusers" else "ComfyUI's LoRA loaders (original "
              "Wan keys; diffusers' load_lora_weights reads them too)" if arch_of(expert.backbone) == "Wan" else "ComfyUI's "
              "LoRA loaders (original HunyuanVideo keys; diffusers reads --layout diffusers)")
    print(f"{src.folder} -> {args.out}: the {args.expert} expert as LoRA for {reader}, on {on}; "
          f"{sum(k.endswith('lora_A.weight') for k in sd)} layers, {sum(v.numel() for v in sd.values()) / 1e6:.2f} M values")
    return sd


def closest_scheduler(sigmas):
    """(FlowMatchEulerDiscreteScheduler, its sigmas) whose set_timesteps(len(sigmas)) points come closest to `sigmas`
    (the student's, noisiest first, without the clean end): shift_terminal = the last of them (the scheduler stretches
    its schedule to end there), and the shift (1..100, to 0.01) with the least largest difference."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    want = np.asarray(sigmas, dtype=np.float64)
    terminal = float(want[-1]) if len(want) > 1 and want[-1] < 1 else None

    def fit(shift):
        sch = FlowMatchEulerDiscreteScheduler(shift=float(shift), shift_terminal=terminal)
        sch.set_timesteps(len(want))
        return float(np.abs(sch.sigmas[:-1].double().numpy() - want).max()), sch
    coarse = min(np.arange(1.0, 100.0, 0.5), key=lambda v: fit(v)[0])  # then to 0.01 around it
    best = min(np.round(np.arange(max(1.0, coarse - 0.5), coarse + 0.5, 0.01), 2), key=lambda v: fit(v)[0])
    sch = fit(best)[1]
    return sch, sch.sigmas[:-1].double()


def diffusers(args):
    """A Wan detail-stage run -> a stock diffusers WanPipeline folder (module docstring)."""
    from storage import video_io
    for module, package in (("diffusers", None), ("transformers", None)):
        try:
            video_io.require(module, package)
        except ImportError as e:
            raise ExportError(f"export.py diffusers: {e}") from None
    cfg, run = sampling.checkpoint_config(args.ckpt, "--ckpt")
    if not isinstance(cfg, models.WanConfig):
        raise ExportError(f"--ckpt {args.ckpt} is a {type(cfg).__name__.removesuffix('Config')} student: diffusers has a "
                          "two-transformer pipeline for Wan only (WanPipeline); export HunyuanVideo with export.py authors")
    args.weights = checkpoint.hub_path(args.weights, "--weights")
    for sub in ("text_encoder", "tokenizer", "vae"):
        try:
            video_io.weights_path(args.weights, sub)
        except FileNotFoundError as e:
            raise ExportError(f"--weights: {e}") from None
    if os.path.exists(args.out):
        raise ExportError(f"--out {args.out} exists: choose a new folder")
    src, semantic, expert = student_parts(args)
    grid = sampling.make_grid(cfg, "flow", run)
    ks = solver.student_schedule(grid, [run["kappa"]], args.steps)
    _, _, ours = solver.sample_points(grid, ks)
    sch, theirs = closest_scheduler(ours[:-1].tolist())
    bt = expert.boundary_t
    # WanPipeline: transformer (high noise) where t >= boundary_ratio * 1000, else transformer_2; ours: detail where
    # t <= boundary_t, so the boundary goes just above boundary_t (a grid t of ours at boundary_t stays detail)
    ratio = (bt + 1e-3) / 1000
    index = {"_class_name": "WanPipeline", "_diffusers_version": checkpoint.DIFFUSERS_VERSION, "boundary_ratio": ratio,
             "expand_timesteps": False, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    given = os.path.join(args.weights, "model_index.json")
    known = json.load(open(given)) if os.path.isfile(given) else {}
    for sub in ("text_encoder", "tokenizer", "vae"):
        if sub in known:
            index[sub] = known[sub]
        elif sub == "vae":
            index[sub] = ["diffusers", json.load(open(os.path.join(args.weights, sub, "config.json")))["_class_name"]]
        else:
            conf = os.path.join(args.weights, sub, "config.json" if sub == "text_encoder" else "tokenizer_config.json")
            c = json.load(open(conf))
            index[sub] = ["transformers", c["architectures"][0] if sub == "text_encoder" else c["tokenizer_class"]]
    with checkpoint.atomic_dir(args.out) as tmp:
        checkpoint.save_transformer(semantic, os.path.join(tmp, "transformer"))
        expert.export_merged(os.path.join(tmp, "transformer_2"))
        sch.save_pretrained(os.path.join(tmp, "scheduler"))
        for sub in ("text_encoder", "tokenizer", "vae"):
            shutil.copytree(video_io.weights_path(args.weights, sub), os.path.join(tmp, sub))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
    fmt = lambda v: ", ".join(f"{float(x):.4f}" for x in v)  # noqa: E731
    print(f"{src.folder} -> {args.out}: WanPipeline, transformer = semantic expert, transformer_2 = detail expert "
          f"(merged), boundary_ratio {ratio:.6f} (t {bt:.3f}); {args.steps}-step sigmas: ours {fmt(ours[:-1])}, the "
          f"pipeline's (FlowMatchEulerDiscreteScheduler shift {sch.config.shift:g}, shift_terminal "
          f"{sch.config.shift_terminal}) {fmt(theirs)}; largest difference "
          f"{float((theirs - ours[:-1]).abs().max()):.4f}")
    return {"out": args.out, "ours": ours[:-1], "theirs": theirs, "shift": sch.config.shift, "boundary_ratio": ratio}


def authors(args):
    """A train.py detail run / step folder -> the authors' layout."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "keep": None}[args.dtype]
    src, _, expert = student_parts(args)
    if expert.on_teacher:
        raise ExportError(f"--ckpt {args.ckpt}: the authors' layout holds one set of weights under both experts; this "
                          "student has two (a two-expert teacher's run): export.py diffusers writes both")
    grid = solver.flow_grid(50, 17.0)  # the authors' distillation grid for both released students
    if expert.arch in released.LAYOUTS and (bad := released.routing_disagreements(expert, grid)):
        print(f"warning: their scripts route int(t) <= {released.LAYOUTS[expert.arch]['threshold']} to the detail "
              f"expert; this expert's boundary_t {expert.boundary_t:.3f} differs at grid t {bad}", file=sys.stderr)
    released.export_released(expert, args.out, dtype)
    c = expert.param_counts()
    print(f"{src.folder} -> {args.out}: {expert.arch}, {len(expert.lora_names)} LoRA linears (r {expert.rank}, "
          f"alpha {expert.alpha:g}), adapter {c['adapter'] / 1e6:.2f} M params")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("authors", help="a detail expert trained here -> the authors' single-file layout")
    e.add_argument("--ckpt", required=True, help="train.py detail run or step folder")
    e.add_argument("--detail", help="adapter file (default: the step's detail.safetensors)")
    e.add_argument("--out", required=True, help="output transformer/ folder")
    e.add_argument("--dtype", default="keep", choices=("keep", "fp32", "bf16"), help="their release is bf16")
    d = sub.add_parser("diffusers", help="a Wan student -> a stock diffusers WanPipeline folder")
    d.add_argument("--ckpt", required=True, help="train.py detail run or step folder (a Wan student)")
    d.add_argument("--weights", required=True, help="the teacher's pipeline folder: text_encoder/, tokenizer/, vae/")
    d.add_argument("--out", required=True, help="new pipeline folder")
    d.add_argument("--steps", type=int, default=4, help="the student's step count the scheduler is fitted to")
    q = sub.add_parser("lora", help="a student -> one LoRA file for diffusers' load_lora_weights or ComfyUI")
    q.add_argument("--ckpt", required=True, help="train.py detail run or step folder")
    q.add_argument("--out", required=True, help="output .safetensors file")
    q.add_argument("--expert", default="detail", choices=("detail", "semantic"),
                   help="semantic: a --semantic-lora run's semantic expert alone")
    q.add_argument("--layout", default="diffusers", choices=LAYOUTS,
                   help="key names: diffusers' (transformer.*) or ComfyUI's (Wan: the original diffusion_model.*)")
    args = p.parse_args(argv)
    cmds = {"authors": authors, "diffusers": diffusers, "lora": lora}
    return checks.cli(lambda _: cmds[args.cmd](args))  # bad input: one line


if __name__ == "__main__":
    main()
