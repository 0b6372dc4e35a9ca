"""The training-step races of tools/bench.py: one semantic CD step and one detail step (CD + GAN + feature
matching + the discriminator step), each built on our CogVideoX model and on diffusers' CogVideoXTransformer3DModel
with the same random weights, the same inputs and the same step code (losses.py), eager and with the blocks
compiled; seconds, peak memory and MFU per side. Run through `python tools/bench.py --rows train,detail [--compile]`.
The helpers both kinds of race share (inputs, timing, compiling) live here, below bench.py, which imports them.

The diffusers side wraps diffusers' model in `DiffusersCogVideoX`, which gives it our call signature and the hooks
the losses use (time_embed, head, taps): the step code cannot tell the two backbones apart, so the race measures
the backbones. The detail student on both sides is experts.DualExpert (LoRA on the attention linears + copies).
"""
import contextlib
import functools
import gc
import statistics
import time
from dataclasses import asdict

import torch
import torch.nn as nn

import experts
import lora
import losses
import model as M
import solver
from storage import latents
from teacher import Teacher, embedded_guidance

KAPPA = 37  # the authors' cut on the 50-step grid


class DiffusersCogVideoX(nn.Module):
    """diffusers' CogVideoXTransformer3DModel behind our interface: forward(x [B, C, F, H, W], t [B], text, taps),
    time_embed(t), head(h, temb, grid), default_taps(), config, prediction, gradient_checkpointing."""

    prediction = "vpred"

    def __init__(self, ref, cfg):
        super().__init__()
        self.ref, self.config, self._sink = ref, cfg, None
        ref.enable_gradient_checkpointing()  # installs diffusers' own checkpoint function; off until asked for
        ref.gradient_checkpointing = False
        for i, block in enumerate(ref.transformer_blocks):  # taps: the video tokens after block i
            block.register_forward_hook(functools.partial(self._tap, i))

    def _tap(self, i, block, args, out):
        if self._sink is not None:  # only inside a forward with taps (not in the backward's recompute)
            self._sink[i] = out[0]

    @classmethod
    def twin_of(cls, ours, dtype=None):
        """The diffusers model with `ours`' weights (same config and state-dict keys), wrapped."""
        import diffusers
        cfg, p = ours.config, next(ours.parameters())
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype or p.dtype)
        try:
            with torch.device(p.device):
                ref = diffusers.CogVideoXTransformer3DModel(**asdict(cfg))
        finally:
            torch.set_default_dtype(old)
        ref.load_state_dict(ours.state_dict(), strict=True)
        return cls(ref, cfg)

    @property
    def gradient_checkpointing(self):
        return self.ref.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        self.ref.gradient_checkpointing = bool(on)

    def default_taps(self):
        return list(range(0, self.config.num_layers, 2))

    def time_embed(self, t, **cond):
        w = self.ref.time_embedding.linear_1.weight
        return self.ref.time_embedding(self.ref.time_proj(t.to(w.device, non_blocking=w.device.type != "cpu")).to(w.dtype))

    def head(self, h, temb, grid):
        """Video tokens [B, F*h*w, D] -> [B, C, F, H, W] through diffusers' norm_final, norm_out, proj_out."""
        (n_f, H, W), p, B = grid, self.config.patch_size, h.shape[0]
        h = self.ref.proj_out(self.ref.norm_out(self.ref.norm_final(h), temb=temb))
        h = h.reshape(B, n_f, H // p, W // p, -1, p, p).permute(0, 4, 1, 2, 5, 3, 6)  # [B, C, F, h, ph, w, pw]
        return h.reshape(B, -1, n_f, H, W)  # [B, C, F, H, W]

    def forward(self, x, t, text=None, taps=None):
        cfg, (n_f, H, W), n_text = self.config, x.shape[2:], text.shape[1]
        rope = None
        if cfg.use_rotary_positional_embeddings:  # diffusers takes the 5B RoPE from its pipeline (video rows)
            cos, sin = M.cogvideox_rope(cfg, (n_f, H // cfg.patch_size, W // cfg.patch_size), n_text, x.device)
            rope = (cos[n_text:], sin[n_text:])
        self._sink = {} if taps is not None else None
        try:
            out = self.ref(hidden_states=x.transpose(1, 2), encoder_hidden_states=text,  # diffusers: [B, F, C, H, W]
                           timestep=t.to(x.device, non_blocking=x.device.type != "cpu"), image_rotary_emb=rope, return_dict=False)[0]
            feats = None if taps is None else [self._sink[i] for i in taps]
        finally:
            self._sink = None
        out = out.transpose(1, 2)  # [B, F, C, H, W] -> [B, C, F, H, W]
        return out if taps is None else (out, feats)


# --- shared with bench.py's forward races: inputs, timing, compiling ------------------------------
TEXT_REAL = 60  # HunyuanVideo prompt tokens that are not padding (a typical prompt)


def make_inputs(cfg, shape, device, dtype, seed=0):
    """Random latents, timesteps and conditioning for one forward; our keyword names."""
    B, n_f, H, W, L = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x = rnd(B, cfg.in_channels, n_f, H, W)
    cond = {"text": rnd(B, L, latents.text_width(cfg))}
    if isinstance(cfg, M.CogVideoXConfig):
        t = torch.randint(0, 1000, (B,), generator=g).to(device).float()
    elif isinstance(cfg, M.WanConfig):  # umT5 states only (padding rows are zeros in real data, attended to)
        t = (torch.rand(B, generator=g) * 1000).to(device, dtype)
    else:
        t = (torch.rand(B, generator=g) * 1000).to(device, dtype)
        mask = torch.zeros(B, L, dtype=torch.long)
        mask[:, :min(TEXT_REAL, L)] = 1
        cond.update(text_mask=mask.to(device), pooled=rnd(B, cfg.pooled_projection_dim),
                    guidance=torch.full((B,), embedded_guidance(6.0), device=device, dtype=dtype))
    return x, t, cond


def timed(fn, device):
    """Seconds of one call of fn (CUDA events on the GPU) and the peak memory it added, in GiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, (torch.cuda.max_memory_allocated() - base) / 2**30, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, float("nan"), out


def compile_blocks(model, backend="inductor"):
    """torch.compile each transformer block (one compiled graph serves every block of a class); a DualExpert's
    detail tree holds its own copies of the LoRA'd blocks: those too."""
    # a training step calls a block class in up to ~8 guard variants (grad on/off x fp32 student / bf16 teacher x
    # LoRA'd or plain): past the default recompile limit dynamo would quietly fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    trees = [model] + ([model.detail] if isinstance(model, experts.DualExpert) else [])
    for block in {id(b): b for tree in trees for b in tree.modules() if type(b).__name__.endswith("Block")}.values():
        block.compile(backend=backend)


def free(device):
    """Drop the last row's models before the next row's peak is read."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(side, name, stage, device, grad_ckpt, disc_hidden, lora_rank=128):
    """(student, teacher model, discriminator or None) of one side, from seed-0 random weights: fp32 master
    student (detail: a DualExpert on it), bf16 frozen teacher (fp32 on the CPU)."""
    torch.manual_seed(0)
    ours = M.build_transformer(name, device=device, dtype=torch.float32)
    tdtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if side == "ours":
        teacher_model = M.build_transformer(name, device=device, dtype=tdtype)
        teacher_model.load_state_dict(ours.state_dict())
        student = ours
    else:
        teacher_model, student = DiffusersCogVideoX.twin_of(ours, tdtype), DiffusersCogVideoX.twin_of(ours)
        del ours
    teacher_model.requires_grad_(False)
    if stage == "detail":
        lora_names = [f"{'ref.' * (side == 'diffusers')}{n}" for n in lora.TARGETS["CogVideoX"]["lora"]]
        copies = [f"{'ref.' * (side == 'diffusers')}{n}" for n in lora.TARGETS["CogVideoX"]["copy"]]
        grid = solver.grid_for(student.config)
        student = experts.DualExpert(student, solver.boundary_t(grid, KAPPA), lora_rank, 2 * lora_rank,
                                     targets={"lora": lora_names, "copy": copies})
    student.train()
    student.gradient_checkpointing = teacher_model.gradient_checkpointing = grad_ckpt
    torch.manual_seed(1)  # the discriminator's init: the same on both sides
    disc = losses.Discriminator.for_model(teacher_model, disc_hidden).to(device) if stage == "detail" else None
    return student, teacher_model, disc


def make_step(student, teacher_model, disc, x0, cond, stage, seed=0):
    """One training step of `stage` as train.py runs it (bf16 autocast on the GPU, host indices): semantic:
    CD + TC; detail: CD + 0.5 G + 0.1 FM and the discriminator step; clip 1, AdamW (fused on CUDA)."""
    device, cfg = x0.device, student.config
    grid = solver.grid_for(cfg)
    teacher = Teacher(teacher_model, grid, 6.0, {"text": torch.zeros_like(cond["text"][:1])})
    params = [p for p in student.parameters() if p.requires_grad]
    fused = device.type == "cuda" or None
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-3, fused=fused)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-5, betas=(0.0, 0.999), fused=fused) if disc else None
    lo, hi = (0, KAPPA) if stage == "detail" else (KAPPA + 1, grid.N - 1)
    tok = (x0.shape[2], x0.shape[3] // cfg.patch_size, x0.shape[4] // cfg.patch_size)
    g = torch.Generator().manual_seed(seed)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()  # noqa: E731

    def step():
        B = x0.shape[0]
        k, k_adv = torch.randint(lo, hi + 1, (B,), generator=g), torch.randint(0, KAPPA + 1, (B,), generator=g)
        eps, n = (torch.randn(x0.shape, generator=g).to(device, non_blocking=True) for _ in range(2))
        with autocast():
            l_cd, xhat, x_tgt, k_end = losses.consistency_step(student, student, teacher, grid, [KAPPA], x0, eps, k,
                                                               cond, cond)
            if stage == "detail":
                g_loss, fm, feats = losses.adversarial_terms(teacher_model, disc, x_tgt, xhat, n, k_end, k_adv, grid,
                                                             cond, tok)
                loss = l_cd + 0.5 * g_loss + 0.1 * fm
            else:
                loss = l_cd + losses.temporal_coherence_loss(xhat, x_tgt)
        loss.backward()
        if stage == "detail":
            with autocast():
                d_loss = losses.discriminator_loss(disc, feats, tok)
            d_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o in [opt] + ([d_opt] if d_opt else []):
            o.step()
            o.zero_grad(set_to_none=True)
        return loss
    return step


def step_flops(name, stage, shape, disc_hidden):
    """Model FLOPs of one step (forwards + backwards, no activation recompute), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = torch.device("meta")
    student, teacher_model, disc = build("ours", name, stage, meta, False, disc_hidden)
    x0, _, cond = make_inputs(student.config, shape, meta, torch.float32)
    step = make_step(student, teacher_model, disc, x0, cond, stage)
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def row_train(name, stage, shape, device, peak_tflops, compile_too, backend="inductor", warmup=2, repeat=5,
              disc_hidden=1024):
    """One stage's step, ours vs diffusers-built, eager (and compiled): median s, peak GiB, MFU, ratios.
    The sides run one after the other (each alone in memory, so the peak is its own), same inputs and draws."""
    flops = step_flops(name, stage, shape, disc_hidden)
    row = {"preset": name, "stage": stage, "shape": list(shape), "model_flops": flops}
    for compiled in (False, True) if compile_too else (False,):
        for side in ("ours", "diffusers"):
            student, teacher_model, disc = build(side, name, stage, device, True, disc_hidden)
            if compiled:
                compile_blocks(student, backend)
                compile_blocks(teacher_model, backend)
            x0, _, cond = make_inputs(student.config, shape, device, torch.float32)
            cond = {k: v.to(torch.bfloat16) if device.type == "cuda" else v for k, v in cond.items()}
            step = make_step(student, teacher_model, disc, x0, cond, stage)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            secs = []
            for i in range(warmup + 2 * compiled + repeat):  # compiling: two more warm-up steps
                s, _, loss = timed(step, device)
                secs.append(s)
            sec = statistics.median(secs[warmup + 2 * compiled:])
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            key = side + ("+compile" if compiled else "")
            row[key] = {"s": sec, "peak_gib": peak, "loss": loss.item(),
                        "mfu": flops / sec / 1e12 / peak_tflops if peak_tflops else None}
            del student, teacher_model, disc, step
            free(device)
        suffix = "+compile" if compiled else ""
        row["ratio" + ("_compiled" if compiled else "")] = row["ours" + suffix]["s"] / row["diffusers" + suffix]["s"]
    return row


def table_lines(result):
    """Markdown rows of the training races for bench.table."""
    lines = []
    races = [r for r in (result.get("train_race") or []) if r]
    if races:
        lines += ["", "| training step (bf16 autocast, fp32 master, grad ckpt) | ours s | diffusers s | ours/diffusers | "
                      "ours peak GiB | diffusers peak GiB | ours MFU | diffusers MFU |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "n/a" if v is None or v != v else format(v, f)  # noqa: E731 - None / NaN on the CPU
    for r in races:
        for suffix, how in (("", "eager"), ("+compile", "blocks compiled")):
            if "ours" + suffix not in r:
                continue
            o, d = r["ours" + suffix], r["diffusers" + suffix]
            lines.append(f"| {r['stage']} ({r['preset']} {r['shape']}, {how}) | {o['s']:.3f} | {d['s']:.3f} | "
                         f"{o['s'] / d['s']:.3f} | {fmt(o['peak_gib'], '.1f')} | {fmt(d['peak_gib'], '.1f')} | "
                         f"{fmt(o['mfu'], '.2f')} | {fmt(d['mfu'], '.2f')} |")
    return lines
