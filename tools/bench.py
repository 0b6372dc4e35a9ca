"""Measured speed and memory: our backbones against diffusers', the 4-step student against the 50-step
teacher, and the DCM training steps against the same steps built on diffusers' model (bench_train.py).
Prints a table and writes JSON.

    python tools/bench.py --compile            # GPU: real sizes, random bf16 weights, eager and compiled rows
    python tools/bench.py --device cpu         # tiny presets: the ours/diffusers ratio, smoke runs of the rest
    python tools/bench.py --rows forward,train,detail --compile

diffusers is the reference we race, so it is needed here (and in the tests), never in the library.
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
from dataclasses import asdict

if __name__ == "__main__":  # `python tools/bench.py` puts tools/ on sys.path, not the repo root of the library
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import experts
import model as M
import solver
from teacher import Teacher
from tools import bench_train, checks
from tools.bench_train import compile_blocks, free, make_inputs, timed

# --- settings: the shapes of DESIGN.md section 4 -------------------------------------------------
# preset -> (batch, latent frames, latent H, latent W, text tokens); CogVideoX batch 2 = CFG
GPU_SHAPES = {
    "cogvideox-2b": (2, 13, 60, 90, 226),   # 49 frames 480x720 -> 17,776 tokens
    "cogvideox-5b": (2, 13, 60, 90, 226),
    "hunyuan-video": (1, 9, 68, 120, 256),  # 33 frames 544x960 -> 18,616 tokens
    "wan2.1-t2v-1.3b": (1, 21, 60, 104, 512),  # 81 frames 480x832 -> 32,760 tokens (the authors' Wan size)
}
CPU_SHAPES = {
    "tiny-cogvideox": (2, 3, 12, 16, 8),
    "tiny-cogvideox-rope": (2, 3, 12, 16, 8),
    "tiny-hunyuan": (2, 3, 12, 16, 8),
    "tiny-wan": (2, 3, 12, 16, 8),
}
TRAIN_SHAPE = (1, 8, 60, 90, 226)  # CogVideoX-2B, 29 frames 480x720 -> 11,026 tokens (paper's setting)
WARMUP, REPEAT = 2, 5


def diffusers_twin(ours, cfg, device, dtype):
    """diffusers' model with our weights (same config keys, same state-dict keys)."""
    import diffusers
    cls = (diffusers.CogVideoXTransformer3DModel if isinstance(cfg, M.CogVideoXConfig) else
           diffusers.WanTransformer3DModel if isinstance(cfg, M.WanConfig) else diffusers.HunyuanVideoTransformer3DModel)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = cls(**asdict(cfg))
    finally:
        torch.set_default_dtype(old)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval().requires_grad_(False)


def diffusers_call(ref, cfg, x, t, cond):
    """Call a diffusers transformer with our inputs; output back to [B, C, F, H, W]."""
    if isinstance(cfg, M.CogVideoXConfig):  # diffusers CogVideoX wants [B, F, C, H, W]
        rope = None
        if cfg.use_rotary_positional_embeddings:  # diffusers takes the 5B RoPE from its pipeline
            n_f, H, W = x.shape[2:]
            p, n_text = cfg.patch_size, cond["text"].shape[1]
            cos, sin = M.cogvideox_rope(cfg, (n_f, H // p, W // p), n_text, x.device)
            rope = (cos[n_text:], sin[n_text:])  # video rows only
        return ref(hidden_states=x.transpose(1, 2), encoder_hidden_states=cond["text"], timestep=t,
                   image_rotary_emb=rope, return_dict=False)[0].transpose(1, 2)
    if isinstance(cfg, M.WanConfig):
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=cond["text"], return_dict=False)[0]
    return ref(hidden_states=x, timestep=t, encoder_hidden_states=cond["text"],
               encoder_attention_mask=cond["text_mask"], pooled_projections=cond["pooled"],
               guidance=cond["guidance"], return_dict=False)[0]


# --- timing ----------------------------------------------------------------------------------------
def race(fns, device, warmup=WARMUP, repeat=REPEAT):
    """Median seconds and max added peak memory per named fn, calls alternating between them."""
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    secs = {k: [] for k in fns}
    mem = dict.fromkeys(fns, 0.0)
    for _ in range(repeat):
        for k, fn in fns.items():
            s, m, _ = timed(fn, device)
            secs[k].append(s)
            mem[k] = max(mem[k], m)
    return {k: statistics.median(v) for k, v in secs.items()}, mem


def forward_flops(model, x, t, cond):
    """FLOPs of one forward (matmuls, convolutions, attention) counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, **cond)
    return fc.get_total_flops()


def param_gib(model):
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


# --- rows ------------------------------------------------------------------------------------------
def row_forward(name, shape, device, dtype, compile_too, peak_tflops, backend="inductor"):
    """Ours vs diffusers: median forward seconds, added peak memory, achieved TFLOP/s."""
    cfg = M.PRESETS[name]
    torch.manual_seed(0)
    ours = M.build_transformer(name, device=device, dtype=dtype).eval().requires_grad_(False)
    ref = diffusers_twin(ours, cfg, device, dtype)
    x, t, cond = make_inputs(cfg, shape, device, dtype)
    with torch.no_grad():
        v_ref = diffusers_call(ref, cfg, x, t, cond).float()
        err = ((ours(x, t, **cond).float() - v_ref).norm() / v_ref.norm()).item()
        del v_ref
        fns = {"ours": lambda: ours(x, t, **cond), "diffusers": lambda: diffusers_call(ref, cfg, x, t, cond)}
        if compile_too:
            compile_blocks(ours, backend)
            fns["ours+compile"] = lambda: ours(x, t, **cond)
        secs, mem = race(fns, device)
    flops = forward_flops(ours, x, t, cond)
    weights = param_gib(ours)
    row = {"preset": name, "shape": list(shape), "rel_err_vs_diffusers": err, "flops": flops,
           "weights_gib": weights}
    for k in fns:
        row[k] = {"s": secs[k], "peak_gib": weights + mem[k], "tflops": flops / secs[k] / 1e12}
        if peak_tflops:
            row[k]["mfu"] = flops / secs[k] / 1e12 / peak_tflops
    row["ratio"] = secs["ours"] / secs["diffusers"]
    if compile_too:
        row["ratio_compiled"] = secs["ours+compile"] / secs["diffusers"]
    return row  # the models go with this frame, before the next row is built


def row_end_to_end(name, shape, device, dtype, kappa=None, steps=4):
    """Teacher 50 steps (DDIM or Euler) with CFG vs the dual-expert student at 4 steps (no CFG), batch 1; the student
    with its detail LoRA merged (as sample.py runs it) and unmerged."""
    cfg = M.PRESETS[name]
    kappa = solver.default_kappa(cfg) if kappa is None else kappa
    backbone = M.build_transformer(name, device=device, dtype=dtype).eval().requires_grad_(False)
    grid = solver.grid_for(cfg)
    x, _, cond = make_inputs(cfg, (1,) + shape[1:], device, dtype)
    teacher = Teacher(backbone, grid, guidance_scale=6.0, uncond={"text": torch.zeros_like(cond["text"])})
    student = experts.DualExpert(backbone, solver.boundary_t(grid, kappa)).to(device=device, dtype=dtype)
    student.eval().requires_grad_(False)
    ks = solver.student_schedule(grid, [kappa], steps)
    t, alpha, sigma = solver.sample_points(grid, ks)
    run_student = lambda: solver.sample(lambda xx, tt: student(xx, tt.to(xx.dtype), **cond), x, t, alpha, sigma,  # noqa: E731
                                        grid.kind, progress=False)
    with torch.no_grad():
        timed(run_student, device)  # warm-up
        s_unmerged, _, _ = timed(run_student, device)
        student.merge_lora()
        timed(run_student, device)
        s_student, _, _ = timed(run_student, device)
        s_teacher, _, _ = timed(lambda: teacher.sample(x, cond, progress=False), device)
    return {"preset": name, "teacher_steps": grid.N, "student_steps": steps, "teacher_s": s_teacher,
            "student_s": s_student, "speedup": s_teacher / s_student, "lora_merged": True,
            "student_unmerged_s": s_unmerged, "speedup_unmerged": s_teacher / s_unmerged,
            "student_forwards": len(ks), "teacher_forwards": grid.N}


def row_fused_projections(device, dtype):
    """Would fusing projections at load time pay? One GEMM vs separate ones at the real shapes (ms per call)."""
    cases = {  # name: (tokens x batch, width, output widths, calls per forward)
        "cogvideox-2b q/k/v": (2 * 17776, 1920, [1920] * 3, 30),
        "hunyuan-video double-block q/k/v": (18360, 3072, [3072] * 3, 20),
        "hunyuan-video single-block q/k/v/mlp": (18616, 3072, [3072] * 3 + [12288], 40),
    }
    rows = []
    for name, (M_, D, outs, calls) in cases.items():
        x = torch.randn(M_, D, device=device, dtype=dtype)
        ws = [0.02 * torch.randn(o, D, device=device, dtype=dtype) for o in outs]
        bs = [torch.zeros(o, device=device, dtype=dtype) for o in outs]
        w_cat, b_cat = torch.cat(ws), torch.cat(bs)
        secs, _ = race({"separate": lambda: [torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)],
                        "fused": lambda: torch.nn.functional.linear(x, w_cat, b_cat).split(outs, dim=-1)},
                       device, warmup=5, repeat=20)
        rows.append({"case": name, "separate_ms": 1e3 * secs["separate"], "fused_ms": 1e3 * secs["fused"],
                     "saving_ms_per_forward": 1e3 * calls * (secs["separate"] - secs["fused"])})
    return rows


def matmul_ceiling(device):
    """Measured bf16 matmul TFLOP/s (8192^3), the MFU denominator."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    secs, _ = race({"mm": lambda: a @ b}, device, warmup=3, repeat=10)
    return 2 * 8192**3 / secs["mm"] / 1e12


# --- main ------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="forward,e2e,train,detail,fuse",
                   help="comma list of forward, e2e, train (semantic CD step race), detail (detail step race), fuse")
    p.add_argument("--presets", default=None, help="comma list (default: the real ones on GPU, tiny on CPU)")
    p.add_argument("--compile", action="store_true", help="also time with torch.compile per block")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    p.add_argument("--repeat", type=int, default=5, help="training races: timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=2, help="training races: untimed steps first")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--table", metavar="JSON", help="only print the markdown table of a saved result")
    args = p.parse_args(argv)
    rows, known = set(args.rows.split(",")), {"forward", "e2e", "train", "detail", "fuse"}
    if not rows <= known:
        raise checks.InputError(f"--rows {args.rows!r}: choose from {', '.join(sorted(known))} (comma list)")
    if args.repeat < 1 or args.warmup < 0:
        raise checks.InputError("--repeat must be >= 1, --warmup >= 0")
    if args.table:
        saved = checks.read_json(args.table, "--table")
        if not {"info", "forward"} <= set(saved):
            raise checks.InputError(f"--table {args.table} is not a bench.py result (no 'info' and 'forward')")
        print(table(saved))
        return None
    device = checks.device(args.device)
    checks.out_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    gpu = device.type == "cuda"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    presets = args.presets.split(",") if args.presets else list(shapes)
    if unknown := [n for n in presets if n not in shapes]:
        raise checks.InputError(f"--presets: no benchmark shape for {unknown} on {device.type}; known: {sorted(shapes)}")
    dtype = torch.bfloat16 if gpu else torch.float32
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)"}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        raise ImportError("bench.py races diffusers' models: pip install -r requirements-dev.txt") from None
    peak = matmul_ceiling(device) if gpu else None
    info["bf16_matmul_tflops"] = peak
    result = {"info": info, "forward": [], "e2e": None, "train_race": []}
    for name in presets if "forward" in rows else []:
        if name not in shapes:
            raise checks.InputError(f"no benchmark shape for preset {name!r}; known: {sorted(shapes)}")
        r = row_forward(name, shapes[name], device, dtype, args.compile, peak, args.compile_backend)
        result["forward"].append(r)
        print(json.dumps(r), flush=True)
        if gpu:
            torch.cuda.empty_cache()
    if gpu and "fuse" in rows:
        result["fuse"] = row_fused_projections(device, dtype)
        print(json.dumps(result["fuse"]), flush=True)
    # the end-to-end and training rows are CogVideoX-2B on the GPU; on the CPU a tiny smoke run
    small = ("cogvideox-2b", GPU_SHAPES["cogvideox-2b"], TRAIN_SHAPE) if gpu else \
        ("tiny-cogvideox", CPU_SHAPES["tiny-cogvideox"], (1, 3, 12, 16, 8))
    if "e2e" in rows:
        result["e2e"] = row_end_to_end(small[0], small[1], device, dtype)
        print(json.dumps(result["e2e"]), flush=True)
        wan = "wan2.1-t2v-1.3b" if gpu else "tiny-wan"  # Wan: 50 Euler steps + CFG vs 4 steps, kappa 34
        if wan in presets:
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
            result["e2e_wan"] = row_end_to_end(wan, shapes[wan], device, dtype)
            print(json.dumps(result["e2e_wan"]), flush=True)
        if gpu:
            torch.cuda.empty_cache()
    for stage in [s for s in ("semantic", "detail") if {"semantic": "train", "detail": "detail"}[s] in rows]:
        free(device)  # the models of the rows above must be gone before a training step's peak is read
        r = bench_train.row_train(small[0], stage, small[2], device, peak, args.compile, args.compile_backend,
                                  args.warmup, args.repeat, disc_hidden=1024 if gpu else 32)
        result["train_race"].append(r)
        print(json.dumps(r), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    return result


def table(result):
    """Markdown table of a bench result (docs/speed.md's copy is regenerated from this)."""
    i = result["info"]
    ceiling = i.get("bf16_matmul_tflops")
    mfu = lambda d: f"{d['mfu']:.2f}" if d.get("mfu") is not None else "n/a"  # noqa: E731
    lines = [f"device: {i['device']}, torch {i['torch']}, diffusers {i['diffusers']}, {i['date']}"
             + (f"; measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s (the MFU denominator)" if ceiling else ""), "",
             "| model, shape | ours s | diffusers s | ours/diffusers | ours peak GiB | diffusers peak GiB | ours TFLOP/s "
             "| ours MFU | diffusers MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["forward"]:
        lines.append(f"| {r['preset']} {r['shape']} | {r['ours']['s']:.3f} | {r['diffusers']['s']:.3f} | "
                     f"{r['ratio']:.3f} | {r['ours']['peak_gib']:.2f} | {r['diffusers']['peak_gib']:.2f} | "
                     f"{r['ours']['tflops']:.0f} | {mfu(r['ours'])} | {mfu(r['diffusers'])} |")
        if "ours+compile" in r:
            lines.append(f"| ... with torch.compile | {r['ours+compile']['s']:.3f} | | {r['ratio_compiled']:.3f} | "
                         f"{r['ours+compile']['peak_gib']:.2f} | | {r['ours+compile']['tflops']:.0f} | "
                         f"{mfu(r['ours+compile'])} | |")
    for e in (result["e2e"], result.get("e2e_wan")):
        if e:
            lines += ["", f"end to end ({e['preset']}): teacher {e['teacher_steps']} steps + CFG {e['teacher_s']:.2f} s, "
                      f"student {e['student_steps']} steps {e['student_s']:.2f} s: speed-up {e['speedup']:.1f}x"
                      + (f" (detail LoRA merged; unmerged {e['student_unmerged_s']:.2f} s, {e['speedup_unmerged']:.1f}x)"
                         if e.get("lora_merged") else "")]
    if result.get("fuse"):
        lines += ["", "| fused projection (one GEMM instead of several) | separate ms | fused ms | saved per forward ms |",
                  "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['separate_ms']:.3f} | {r['fused_ms']:.3f} | {r['saving_ms_per_forward']:.1f} |"
                  for r in result["fuse"]]
    if result.get("train_race"):
        lines += bench_train.table_lines(result)
    for key in ("train", "train_compiled"):  # the single-sided training row of earlier results (bench_h100.json)
        r = result.get(key)
        if r:
            how = "blocks compiled" if r.get("compiled") else "eager"
            lines += ["", f"semantic CD step ({r['preset']} {r['shape']}, grad ckpt, bf16 autocast, fp32 master, {how}): "
                      f"{r['s']:.3f} s, peak {r['peak_gib']:.1f} GiB, MFU {r['mfu'] or float('nan'):.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(checks.cli(main))
