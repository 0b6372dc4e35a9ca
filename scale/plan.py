"""Memory planner for `train.py --dry-run`: does one training step fit on a GPU? (weights, grads, AdamW, EMA, teacher,
discriminator, FSDP all-gathers, and the activations of the stage's passes at the run's token count.)

Activations are counted from the architecture: the tensors autograd saves per block per token, in units of the
hidden width D (`block_units`, formula and reasons there), times the tokens each rank holds (video tokens / SP degree
+ the replicated text tokens) and the batch. The formula is checked against CPU measurements of tiny presets
(tests/test_plan.py: the saved tensors of one block, via saved_tensors_hooks, and the peak live bytes of one whole
training step, via torch's MemTracker); `--device cuda` (the default for a plan) adds the fp32 copies CUDA autocast
makes for layer_norm, which the CPU measurement cannot show.
"""
import math
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

import losses
import model as models
from scale import fsdp
from storage import image_io, latents
from student import shares_teacher
from teacher import uses_cfg

GIB = 2**30
W_GRAD = 3  # backward working set of one block beyond its saved tensors (units): grads of the block's output, input
#             and of the largest intermediate in flight; calibrated on CPU (tests/test_plan.py)


@dataclass
class Shape:
    """Per-rank token counts of one sample: video tokens (after SP) and text tokens (replicated)."""
    video: int
    text: int

    @property
    def joint(self):
        return self.video + self.text


def _ratio(cfg):
    """MLP hidden width / D (Wan gives ffn_dim)."""
    D = cfg.num_attention_heads * cfg.attention_head_dim
    return cfg.ffn_dim / D if hasattr(cfg, "ffn_dim") else getattr(cfg, "mlp_ratio", 4.0)


def block_units(cfg, dtype, device="cuda", grads="full", per_token=False):
    """{block kind: (count, token stream, bytes per token per unit of D)} of the tensors one block saves for backward.

    Autograd saves a tensor only where a gradient needs it, so the count depends on what trains (`grads`): "full"
    (every weight: the semantic student), "lora" (the detail student: frozen backbone, LoRA on the attention linears,
    trainable timestep copies, so the AdaLN modulation has a gradient), "none" (the frozen teacher run for the GAN /
    FM gradients: only the input's gradient). Units of D per token (r = MLP ratio, e = activation bytes: 2 in bf16
    autocast, 4 in fp32), CogVideoX block on the joint [text, video] tokens:
      always  8 + r: the inputs of the nonlinear ops: LayerNorm-1, norm_q, norm_k, SDPA's q, k, v and output (the
              flash kernels keep only these and the log-sum-exp, no L x L matrix), LayerNorm-2, the GELU input (r);
      weights 3 + r: the inputs of the linears, needed for their weight gradient: q/k/v input, out-projection input
              (heads merged, a copy), MLP input, second MLP linear input (r);
      AdaLN   4: the modulated/gated tensors, needed for the gradient of scale/gate (normed x twice, attention and
              MLP outputs);  LoRA: the q/k/v input and the out-projection input (its A matrix's input), 2.
    HunyuanVideo double block (joint tokens): always 6 + r (LN-1, SDPA 4, LN-2, GELU r) + the q/k RMSNorms; weights
    3 + r; AdaLN 4; LoRA 2. Single block: always 5 + r + RMS; weights 2 + r (modulated input, the [attention, MLP]
    concat 1 + r); AdaLN 2; LoRA 1. RMSNorm (q and k) computes in fp32: it keeps its input (fp32 mode: q itself;
    bf16: two fp32 casts) and, when its weight trains, the fp32 normalised product. Refiner blocks (text only): as
    CogVideoX's. Wan block (video tokens; the text enters by cross-attention): its three LayerNorms and three q/k
    RMSNorms keep fp32 inputs (4 bytes each: an fp32 copy, and autocast runs rms_norm in fp32), always; also SDPA 4,
    the cross-attention's q and output (2), the GELU input (r); weights 8 + r (the four projection inputs that see video tokens, the
    MLP input, the second MLP linear input r, the three q/k RMSNorms' normalised products for their weights); AdaLN: the two fp32 normed tensors and the fp32 MLP output (4 bytes
    each) and the gated self-attention output; LoRA: the four attention-linear inputs. CUDA autocast runs layer_norm
    in fp32: its saved inputs are fp32 copies (device "cuda"), which a CPU measurement cannot show (CPU autocast
    keeps them in bf16). per_token (TI2V's first-frame condition: a modulation per token, wan.py): the fp32
    scale / shift / gate tensors per token (8 of them, 32 bytes), measured."""
    e, bf16 = (2 if dtype == "bf16" else 4), dtype == "bf16"
    w, t, lora = grads == "full", grads in ("full", "lora"), grads == "lora"
    ln = 4 if device == "cuda" else e  # bytes of a saved layer_norm input
    rms = 2 * ((8 if bf16 else 4) + 4 * w)  # q and k: fp32 input(s), + the fp32 product when the weight trains
    r = _ratio(cfg)
    if "Wan" in type(cfg).__name__:
        always, weights = (6 + r) * e + 24 + 32 * per_token, (8 + r) * e  # 3 LN + 3 RMSNorm inputs fp32 (autocast)
        return {"block": (cfg.num_layers, "video", always + w * weights + t * (12 + e) + (lora and not w) * 4 * e)}

    def units(always, n_ln, weights, adaln, lora_in):
        return (always + w * weights + t * adaln + (lora and not w) * lora_in) * e + n_ln * ln
    cog = units(4 + r, 2, 3 + r, 4, 2) + 2 * ln  # norm_q / norm_k are LayerNorms too
    if "CogVideoX" in type(cfg).__name__:
        return {"block": (cfg.num_layers, "joint", cog)}
    return {"double": (cfg.num_layers, "joint", units(4 + r, 2, 3 + r, 4, 2) + rms),
            "single": (cfg.num_single_layers, "joint", units(4 + r, 1, 2 + r, 2, 1) + rms),
            "refiner": (cfg.num_refiner_layers, "text", units(4 + 4, 2, 3 + 4, 2, 2))}


def _tokens(units, shape, kind):
    return {"joint": shape.joint, "text": shape.text, "video": shape.video}[kind]


def saved_bytes(cfg, shape, B, dtype, ckpt, device="cuda", grads="full", per_token=False):
    """(bytes saved by all blocks of one forward with grad, bytes of one block's full saved set) at batch B."""
    D = cfg.num_attention_heads * cfg.attention_head_dim
    e = 2 if dtype == "bf16" else 4
    units = block_units(cfg, dtype, device, grads, per_token)
    per_block = {k: B * D * _tokens(units, shape, s) * u for k, (n, s, u) in units.items()}
    if ckpt:  # a checkpointed block keeps its inputs only: the residual stream(s), e bytes per D per token
        inputs = sum(n * B * D * e * _tokens(units, shape, s) for n, s, _ in units.values())
        return inputs, max(per_block.values())
    return sum(n * per_block[k] for k, (n, _, _) in units.items()), max(per_block.values())


def fsdp_backward(kinds, per_block, inputs, ckpt, work, step, g, sh):
    """Peak bytes of the student's backward under FSDP2, walking its blocks in reverse (kinds: [(kind, params,
    trainable)] in forward order; per_block / inputs: a kind's saved tensors / checkpointed inputs; work: a block's
    recompute working set; step: the gradients in flight at a block, W_GRAD units). At block i the blocks before it
    still hold their saved tensors (or inputs), the blocks after it have left their grads reduce-scattered (fp32,
    sharded over sh), and i itself holds its saved tensors (recomputed) with its gathered weights, the previous
    block's (FSDP2's backward prefetch) and its unsharded grads; once done, its activations and weights are freed
    and its grads reduce-scattered from an fp32 buffer. Block by block, so it holds for any mix of block sizes: a
    bound by the largest block and the whole model's grads over-counted tiny presets (3 unequal blocks) by ~30%."""
    peak = 0
    for i, (kind, params, trainable) in enumerate(kinds):
        held = sum(inputs[k] if ckpt else per_block[k] for k, _, _ in kinds[:i])
        done = 4 * sum(t for _, _, t in kinds[i + 1:]) / sh
        prev = g * kinds[i - 1][1] if i else 0
        mine = (max(per_block[kind], work) if ckpt else per_block[kind]) + step
        peak = max(peak, done + held + max(mine + g * params + prev + g * trainable, prev + (g + 4) * trainable))
    return peak


def working_bytes(cfg, shape, B, dtype, sp=1):
    """One block's no-grad working set: residual, normed, q, k, v, attention output, 2 MLP-sized tensors (4 + 2r
    units), plus the Ulysses all-to-all buffers under SP (q, k, v, output exist before and after the exchange)."""
    D, e = cfg.num_attention_heads * cfg.attention_head_dim, (2 if dtype == "bf16" else 4)
    r = _ratio(cfg)
    return B * D * e * shape.joint * (6 + 2 * r + (4 if sp > 1 else 0))


def shape_of(args, cfg, sp):
    """Per-rank Shape from --frames/--height/--width (latent units), else the --data manifest, else the config."""
    pt, p = (cfg.patch_size[0], cfg.patch_size[1]) if isinstance(cfg.patch_size, tuple) else (
        getattr(cfg, "patch_size_t", None) or 1, cfg.patch_size)
    text = None
    size = [getattr(args, k, None) for k in ("frames", "height", "width")]
    if any(v is not None for v in size):
        if any(v is None for v in size):
            raise ValueError("--frames, --height and --width (latent units) go together")
    elif getattr(args, "data", None):
        manifest = latents.read_manifest(args.data)
        size = manifest["latent_shape"][1:]
        with safe_open(os.path.join(args.data, manifest["shards"][0]["file"]), framework="pt") as f:
            text = f.get_slice("text").get_shape()[1]  # the dataset's text length (padded)
    elif hasattr(cfg, "sample_frames"):  # CogVideoX: the config's training size, frames in latent units
        size = [(cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1, cfg.sample_height, cfg.sample_width]
    else:
        return None, None  # no size known: the plan leaves the activations out and says so
    f, h, w = size
    if min(size) < 1 or f % pt or h % p or w % p:
        raise ValueError(f"--frames/--height/--width {f}x{h}x{w}: latent sizes must be >= 1 and divisible by the "
                         f"patch sizes ({pt}, {p}, {p})")
    if text is None:
        text = getattr(cfg, "max_text_seq_length", 512 if "Wan" in type(cfg).__name__ else 256)  # padded lengths
    return Shape(math.ceil(f // pt * (h // p) * (w // p) / sp), text), (f, h, w)


def first_frame(args):
    """A dataset (--data) whose image condition is TI2V's clean first frame: per-token timesteps in the model."""
    return bool(getattr(args, "data", None)) and latents.read_manifest(args.data).get("image_cond") == "first_frame"


def plan(args, cfg, counts, sp, device="cuda"):
    """{term: bytes per GPU} of one training step, and its peak, for SP degree sp (see the module docstring)."""
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    shape, _ = shape_of(args, cfg, sp)
    B, bf16, stage = args.batch_size, args.dtype == "bf16", args.stage
    e, te = (2, 2) if bf16 else (4, 4)
    P, T, Pt, Pd, block = counts["params"], counts["trainable"], counts["teacher"], counts["disc"], counts["block"]
    fsdp = bool(args.fsdp)
    sh = world // (getattr(args, "hsdp", 1) or 1) if args.fsdp else 1  # HSDP: sharded over a group, not the world
    ckpt = args.grad_ckpt
    ema = args.target_ema > 0 and stage != "teacher"
    gan = stage == "detail" and bool(args.w_gan or args.w_fm)
    cfg_batch = 2 if stage != "teacher" and counts["cfg"] else 1  # CFG teachers run cond + uncond in one batch
    fe = 2 if bf16 and T < P else 4  # frozen student weights (the base, a frozen semantic expert): compute dtype
    shared = shares_teacher(args)  # the EMA copies the adapters only (losses.SwappedEMA)
    static = {"student weights, trained (fp32)": 4 * T / sh, f"student weights, frozen ({'bf16' if fe == 2 else 'fp32'})":
              fe * (P - T) / sh, "AdamW states (fp32)": 8 * T / sh,
              "EMA target (a copy of the student)": (4 * T + fe * (P - T) * (not shared)) / sh * ema,
              f"teacher ({args.dtype})": te * Pt / sh,
              # FSDP2 never reshards a root after its forward (its backward would gather it again); a frozen teacher
              # has no backward of its own, so its root group stays gathered from its first forward on
              "teacher's root group, left gathered (FSDP)": te * counts["teacher_root"] * fsdp,
              "discriminator + grads + AdamW": 16 * Pd}
    grads = 4 * T / sh + (4 * T if world > 1 and not fsdp else 0)  # DDP: its gradient buckets are a 2nd copy
    # FSDP2 (scale/fsdp.py): a gathered weight has g bytes (bf16: the mixed-precision policy's param dtype, or a
    # frozen bf16 weight; fp32 runs: 4). Blocks in flight: in the forward the block computing and, on a GPU, the
    # next one gathered ahead on FSDP's all-gather stream (a CPU gathers one at a time); in the backward the block
    # computing and the one before it, prefetched explicitly on any device (fsdp_backward)
    kinds = counts["kinds"]
    pair = max([a[1] + b[1] for a, b in zip(kinds, kinds[1:])] or [block])  # two neighbouring blocks, the largest
    g, ahead = (2 if bf16 else 4), (block if device == "cpu" else pair)
    gather = g * ahead * fsdp
    # the student's root group (embeddings, head; a DualExpert's LoRA and copies too), and the EMA's, gathered from
    # their first forward of the step to the end of the backward (the EMA's: to ema_update, which reshards it)
    roots = g * (counts["root"] + counts["root"] * (ema and not shared)) * fsdp
    # the root's unsharded grads (param dtype) accumulate through the whole backward, reduce-scattered at its end
    # (a block's: fsdp_backward)
    root_grads = g * counts["root_trainable"] * fsdp
    # autocast caches a bf16 cast of every trainable fp32 weight until it exits (before backward); train.py turns the
    # cache off under FSDP, where it would keep a copy of every unsharded weight
    cache = 2 * T * bf16 * (not fsdp)
    out = {"static": static, "grads": grads, "passes": {}, "latents": 0, "peak_pass": None, "shape": shape,
           "world": world, "sp": sp, "total": sum(static.values()) + grads}
    if shape is None:  # no latent size known: weights, grads and optimizer states only
        return out
    D = cfg.num_attention_heads * cfg.attention_head_dim
    full = shape.video * sp  # SP gathers the video tokens before the head and for the GAN taps
    C, patch = image_io.latent_channels(cfg), (math.prod(cfg.patch_size) if isinstance(cfg.patch_size, tuple)
                                                   else cfg.patch_size ** 2)
    # x0, eps, x_k, x_tgt, xhat, v (fp32); an I2V model's image condition and its concatenated input
    latents = 4 * B * full * patch * (6 * C + 2 * (cfg.in_channels - C))
    rope = 8 * cfg.attention_head_dim * shape.joint * (getattr(cfg, "use_rotary_positional_embeddings", True))
    per_token = first_frame(args)  # TI2V's per-token modulation [B, L, 6, D] and temb [B, L, D], fp32, once
    io = B * D * e * (shape.video + 3 * full) + rope + 28 * B * D * full * per_token  # + patch emb out, head, RoPE
    # passes before the student's: the teacher (no grad, CFG doubles the batch), the target (no grad)
    passes = {}
    if stage != "teacher":
        passes["teacher forward (no grad)"] = working_bytes(cfg, shape, cfg_batch * B, args.dtype, sp) + (
            te * ahead if fsdp else 0)
        passes["target forward (no grad)"] = working_bytes(cfg, shape, B, args.dtype, sp) + gather + cache + roots
    trains = "lora" if T < P else "full"  # the detail expert, a --semantic-lora semantic expert
    s_all, s_one = saved_bytes(cfg, shape, B, args.dtype, ckpt, device, trains, per_token)
    work = working_bytes(cfg, shape, B, args.dtype, sp) if ckpt else 0  # a checkpointed block in progress
    held = s_all + io + cache + gather + roots  # the student's graph, held from its forward to the backward
    passes["student forward"] = held + work
    kept = 0
    if gan:  # the frozen teacher's forward on the fake endpoint keeps its graph: GAN + FM backprop into the student
        n_taps = len(counts["taps"])
        t_all, t_one = saved_bytes(cfg, shape, B, args.dtype, ckpt, device, "none", per_token)
        h = args.disc_hidden
        feats = n_taps * B * full * D * e  # the real features (no grad), kept for FM and the D step
        # per tap: permuted copy, 6 hidden-wide (conv, GN, act); feature matching: the head on each fake tap (LN, mod,
        # proj input). Grad ckpt recomputes each tap's head in the backward (losses.py): one tap's at a time
        per_tap = (1 if ckpt else n_taps) * B * full * e
        disc, fm = per_tap * (2 * D + 6 * h), per_tap * 3 * D
        kept = t_all + feats + io  # + the teacher's own embedding, head and RoPE tables; the backward frees D/FM first
        # the fake pass's block in progress, then the discriminator's and FM's tensors on top of its graph; --gan-first:
        # its gradient at the output is taken (a backward through the teacher's graph alone) before the student's
        # forward with grad, which then holds only the real features
        first = getattr(args, "gan_first", False)
        passes["GAN + FM passes (teacher graph)"] = (0 if first else held) + kept + max(work, disc + fm)
        if getattr(args, "gan_real", "target") == "teacher":  # its no-grad solver steps, after the student's forward
            passes["teacher solution (--gan-real teacher)"] = (0 if first else held) + working_bytes(
                cfg, shape, cfg_batch * B, args.dtype, sp) + (te * ahead if fsdp else 0)
        if first:
            t_bwd = (max(t_one, working_bytes(cfg, shape, B, args.dtype, sp)) if ckpt else 0) + W_GRAD * B * D * e * shape.joint
            passes["GAN + FM backward (teacher graph, --gan-first)"] = kept + t_bwd + roots
            passes["student forward"] += feats
            kept = feats
        else:
            s_one = max(s_one, t_one)
        # D step: fake+real batched (2B): their concatenation, then the heads (one at a time under grad ckpt)
        extra_d = feats + (n_taps * 2 * B * full * D * e + 2 * per_tap * (3 * D + 6 * h) if ckpt else
                           n_taps * 2 * B * full * (3 * D + 6 * h) * e)
    unit = B * D * e * shape.joint
    # the block being recomputed (checkpointing) holds its saved tensors, or a forward's working set if larger
    bwd_block = (max(s_one, working_bytes(cfg, shape, B, args.dtype, sp)) if ckpt else 0) + W_GRAD * unit
    # backward: the blocks' saved tensors are freed as their weight gradients appear, so the blocks' part peaks at
    # max(saved, grads) plus the block being recomputed; under bf16 autocast the CPU measurement shows the weight
    # gradients held in bf16 while the blocks run (2 bytes per trainable parameter), the fp32 .grad after them
    # (under FSDP each block's grads are reduce-scattered as it finishes: only the sharded fp32 grads accumulate)
    if fsdp:  # the teacher's graph first (GAN + FM: frozen blocks, gathered too), then the student's blocks
        units = block_units(cfg, args.dtype, device, trains, per_token)
        per = {k: B * D * _tokens(units, shape, st) * u for k, (_, st, u) in units.items()}
        ins = {k: B * D * e * _tokens(units, shape, st) for k, (_, st, _) in units.items()}
        teacher_part = s_all + kept + bwd_block + te * pair if gan and not getattr(args, "gan_first", False) else 0
        passes["backward (grads + one block)"] = max(teacher_part, fsdp_backward(
            counts["kinds"], per, ins, ckpt, working_bytes(cfg, shape, B, args.dtype, sp), W_GRAD * unit, g, sh)) + (
            roots + root_grads)
    else:
        passes["backward (grads + one block)"] = max(s_all + kept, 2 * T if bf16 else grads) + bwd_block
    passes["end of backward (fp32 grads)"] = grads + roots + root_grads * (g + 4) // g
    if gan:
        passes["discriminator step"] = extra_d
    # grads exist only from the backward on (zero_grad sets them to None): they are in the backward's row
    total = sum(static.values()) + max(passes.values()) + latents
    return out | {"passes": passes, "latents": latents, "peak_pass": max(passes, key=passes.get), "total": total}


def counts_of(args, cfg, build):
    """Parameter counts (student, trainable, teacher, discriminator, largest block) on the meta device."""
    count = lambda m, train=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not train)  # noqa: E731
    student = build()
    shared = shares_teacher(args)  # the teacher is the student's own frozen base: no second copy
    tmodel = None if args.stage == "teacher" or shared else models.build_transformer(cfg, device="meta")
    gan = args.stage == "detail" and (args.w_gan or args.w_fm)
    with torch.device("meta"):
        disc = count(losses.Discriminator.for_model(student, args.disc_hidden)) if gan else 0
    blocks = fsdp.blocks(student)
    hunyuan = hasattr(getattr(student, "backbone", student), "single_transformer_blocks")  # block_units' kind names
    kind = {"transformer_blocks": "double" if hunyuan else "block", "single_transformer_blocks": "single",
            "refiner_blocks": "refiner", "blocks": "block"}
    root = lambda m, train=False: count(m, train) - sum(count(b, train) for b in fsdp.blocks(m))  # noqa: E731
    return {"params": count(student), "trainable": count(student, True), "teacher": count(tmodel) if tmodel else 0, "disc": disc,
            "block": max(count(b) for b in blocks), "kinds": [(kind[n], count(b), count(b, True)) for n, b in fsdp.blocks(student, lists=True)],
            "root": root(student), "root_trainable": root(student, True),  # scale/fsdp.py: what is not in a block
            "teacher_root": root(tmodel) if tmodel else 0,
            "taps": student.default_taps(), "cfg": uses_cfg(getattr(student, "backbone", student))}


SAVE_RATE = 200e6  # bytes/s a save is assumed to move (gather to rank 0 + one writer on shared storage): conservative


def save_bytes(args, counts):
    """(bytes of one checkpoint, the most rank 0's host holds at once under FSDP) (storage/resume.py save_step): the
    student's weights as written (an adapter run: the adapter, plus a DualExpert's frozen semantic backbone unless the
    run's teacher is its base), AdamW states, the EMA, the discriminator and its AdamW; under FSDP rank 0 writes each
    tensor as it is gathered, except an adapter run's weights (gathered whole: the second number)."""
    P, T, bf16 = counts["params"], counts["trainable"], args.dtype == "bf16"
    fe, shared = (2 if bf16 and T < P else 4), shares_teacher(args)
    weights = 4 * T + fe * (P - T) * (not shared)
    ema = (4 * T + fe * (P - T) * (not shared)) * (args.target_ema > 0 and args.stage != "teacher")
    return weights + 8 * T + ema + 12 * counts["disc"], (4 * T + fe * (P - T)) * (T < P)  # the gathered copy: all of it


def sp_degrees(cfg, world):
    """SP degrees that divide the head count and the world size, ascending."""
    return [n for n in range(1, world + 1) if cfg.num_attention_heads % n == 0 and world % n == 0]


def dry_run(args, cfg, build):
    """Print the per-GPU plan, whether it fits --gpu-mem GiB and the smallest SP degree that fits; return it (fits: None
    when it cannot tell, with no latent size known)."""
    sp = getattr(args, "sp", None) or 1
    gpu = getattr(args, "gpu_mem", 80.0)
    if gpu <= 0 or args.batch_size < 1:
        raise ValueError(f"--gpu-mem {gpu} and --batch-size {args.batch_size} must be > 0")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    if sp < 1 or cfg.num_attention_heads % sp or world % sp:
        raise ValueError(f"--sp {sp} must divide the attention heads ({cfg.num_attention_heads}) and the world size "
                         f"({world}; --world-size)")
    shape_of(args, cfg, sp)  # a bad size fails before any model is built
    counts = counts_of(args, cfg, build)
    device = "cpu" if args.device == "cpu" else "cuda"  # CUDA autocast saves fp32 layer_norm inputs; CPU's does not
    p = plan(args, cfg, counts, sp, device)
    world, size = p["world"], shape_of(args, cfg, sp)[1]
    fits = {n: plan(args, cfg, counts, n, device)["total"] <= gpu * GIB for n in sp_degrees(cfg, world)}
    min_sp = next((n for n, ok in fits.items() if ok), None) if size else None
    print(f"stage {args.stage}, {type(cfg).__name__}, world {world}{' FSDP' if args.fsdp else ' DDP'}, SP {sp}, "
          f"{args.dtype}, grad ckpt {'on' if args.grad_ckpt else 'off'}, batch {args.batch_size} per rank")
    source = ("--frames/--height/--width" if getattr(args, "frames", None) is not None else
              "--data's manifest" if getattr(args, "data", None) else "the model config's sample size")
    print(f"latent {'x'.join(map(str, size))} (from {source}): {p['shape'].video} video tokens per rank (after SP) + "
          f"{p['shape'].text} text" if size else "latent size unknown (no --frames/--height/--width, no --data, none in "
          "the model config): activations not counted")
    print(f"params: student {counts['params'] / 1e9:.3f} B ({counts['trainable'] / 1e9:.4f} B trainable), "
          f"teacher {counts['teacher'] / 1e9:.3f} B, discriminator {counts['disc'] / 1e6:.1f} M")
    rows = {**p["static"], "grads (fp32, in the backward rows)": p["grads"], "latents in flight": p["latents"],
            "autocast bf16 weight cache (forward)": 2 * counts["trainable"] * (args.dtype == "bf16" and not args.fsdp)}
    for k, v in rows.items():
        print(f"  {k:40s} {v / GIB:9.2f} GiB per GPU")
    for k, v in p["passes"].items():
        print(f"  {'activations: ' + k:40s} {v / GIB:9.2f} GiB{'  <- peak' if k == p['peak_pass'] else ''}")
    ok = p["total"] <= gpu * GIB
    ok = ok if size or not ok else None  # without a latent size only a "no" is certain: activations only add
    flags = "--frames/--height/--width"
    if size:
        verdict = f"{'fits' if ok else 'does NOT fit'} in {gpu:g} GiB"
    elif ok is False:
        verdict = f"does NOT fit in {gpu:g} GiB even before the activations (not counted: no {flags} or --data)"
    else:
        verdict = f"cannot tell whether it fits in {gpu:g} GiB without {flags} (or --data): activations not counted"
    total = "total (peak)" if size else "total (without activations)"
    print(f"  {total:40s} {p['total'] / GIB:9.2f} GiB per GPU: {verdict}")
    if size:
        print("smallest SP degree that fits: " + (str(min_sp) if min_sp else f"none up to {max(fits)} (world {world})"))
    dp = world // sp
    print(f"global batch {args.batch_size} x {args.grad_accum} x {dp} = {args.batch_size * args.grad_accum * dp}")
    save, host = save_bytes(args, counts)
    minutes, limit = save / SAVE_RATE / 60, getattr(args, "dist_timeout", None)
    print(f"a checkpoint: {save / 1e9:.1f} GB" + (", gathered on rank 0 and written by it one tensor at a time" + (
        f" (the adapter run's {host / 1e9:.1f} GB of weights at once)" if host else "") if args.fsdp else "") +
          f", ~{minutes:.0f} min at {SAVE_RATE / 1e6:.0f} MB/s" + (f" (--dist-timeout {limit:g} min" + (
              ": raise it, the other ranks wait that long in a collective)" if minutes > limit else ")")
              if limit and world > 1 else ""))
    mem = {**p["static"], "grads (fp32)": p["grads"]}
    return {"params": counts["params"], "trainable": counts["trainable"], "teacher": counts["teacher"],
            "disc": counts["disc"], "memory": mem, "world": world, "plan": p, "total": p["total"], "fits": ok,
            "min_sp": min_sp, "counts": counts, "save": save}
