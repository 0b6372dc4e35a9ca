"""Evaluate a student on VBench's prompt suite and report it as the paper's Table 1 (VBench total / quality /
semantic, and latency with the speed-up over the teacher's 50-step sampling).

    python eval.py vbench --ckpt runs/det --weights /models/HunyuanVideo --out eval/det [--steps 4]
        [--per-prompt 5] [--dimensions subject_consistency scene ...] [--prompts FILE] [--teacher CKPT]
    python eval.py table --results eval/det/vbench_results --out eval/det   # Table 1 from VBench's result JSONs

`vbench`: the prompts are VBench's standard list (`VBench_full_info.json` bundled with the `vbench` package,
filtered by --dimensions), else --prompts (one per line, or a JSON list of {"prompt_en", "dimension"}); they are
encoded as `python data.py encode-prompts` does (video_io.TextEncoder), each sampled --per-prompt times with a
seed fixed by (--seed, prompt, index), decoded with the VAE and written as OUT/videos/{prompt}-{index}.mp4, the
names VBench's standard mode looks up (its prompts/README.md). Finished videos are skipped (each file appears
whole, via a rename), so a rerun resumes. With `vbench` installed, its evaluation runs and the scores go to
OUT/vbench_scores.json and OUT/table.md; otherwise the exact commands are printed. Latency (OUT/latency.json):
seconds of sampling per video (decoding excluded, as the paper's Lat. column grows with the step count), and the
teacher's (--teacher, default the run's) N-step guided sampling: --teacher-timed-steps guided calls timed after
a warm-up, times N (an extrapolation, said so in the table). VBench's normalisation and weights (dynamic degree
0.5; quality 4 : semantic 1) are the numbers of its scripts/constant.py.
"""
import argparse
import glob
import importlib.resources
import json
import os
import statistics
import sys
import time
import zlib

import torch
from tqdm.auto import tqdm

import conditioning
import sampling
from storage import checkpoint, latents
from teacher import Teacher
from tools import checks

QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY + SEMANTIC
WEIGHT = {d: 0.5 if d == "dynamic_degree" else 1.0 for d in DIMENSIONS}
NORM = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),  # (min, max) per dimension
        "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "scene": (0.0, 0.8222),
        "appearance_style": (0.0009, 0.2855), "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364)}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0
FPS = {"cogvideox": 8, "hunyuan": 24}  # the released pipelines' frame rates


class EvalError(ValueError):
    """Bad input to eval.py; the command line prints it as one line."""


def read_prompts(path, dimensions=None):
    """Prompts from a .txt (one per line) or a VBench full-info .json (filtered by dimensions), unique, in order."""
    if not os.path.isfile(path):
        raise EvalError(f"prompts file {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            info = json.load(f)
        prompts = [e["prompt_en"] for e in info if not dimensions or set(e.get("dimension", ())) & set(dimensions)]
    else:
        with open(path) as f:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise EvalError(f"{path}: no prompts" + (f" for dimensions {dimensions}" if dimensions else ""))
    return list(dict.fromkeys(prompts))


def vbench_info():
    """The vbench package's VBench_full_info.json, or None when vbench is not installed."""
    try:
        path = importlib.resources.files("vbench") / "VBench_full_info.json"
    except ModuleNotFoundError:
        return None
    return str(path) if path.is_file() else None


def video_name(prompt, i):
    """VBench's file name of sample i of a prompt."""
    if "/" in prompt or "\0" in prompt or len(prompt.encode()) > 240:
        raise EvalError(f"prompt {prompt[:60]!r}... cannot be a file name (a '/', or longer than 240 bytes)")
    return f"{prompt}-{i}.mp4"


def seed_for(seed, prompt, i):
    """The noise seed of sample i of a prompt: fixed by the prompt's text, not by its place in the list."""
    return (seed * 1_000_003 + zlib.crc32(prompt.encode()) * 101 + i) % 2**63


def scores(raw):
    """VBench raw scores {dimension: value} -> normalised and weighted per dimension, quality, semantic, total
    (in %); quality / semantic / total only from the dimensions present, with the list of those missing."""
    norm = {d: (v - NORM.get(d, (0.0, 1.0))[0]) / (NORM.get(d, (0.0, 1.0))[1] - NORM.get(d, (0.0, 1.0))[0])
            for d, v in raw.items() if d in WEIGHT}

    def mean(group):
        have = [d for d in group if d in norm]
        return 100 * sum(WEIGHT[d] * norm[d] for d in have) / sum(WEIGHT[d] for d in have) if have else None
    q, s = mean(QUALITY), mean(SEMANTIC)
    total = (QUALITY_WEIGHT * q + SEMANTIC_WEIGHT * s) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT) \
        if q is not None and s is not None else None
    return {"total": total, "quality": q, "semantic": s, "normalised": norm, "raw": raw,
            "missing": [d for d in DIMENSIONS if d not in raw]}


def table(rows):
    """Markdown laid out like the paper's Table 1; rows: dicts with method, steps, latency, total, quality, semantic."""
    f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    out = ["| Method | Step | Lat. (s) | VBench Total | Quality | Semantic |", "|---|---|---|---|---|---|"]
    out += [f"| {r['method']} | {r['steps']} | {f(r.get('latency'))} | {f(r.get('total'))} | {f(r.get('quality'))} | "
            f"{f(r.get('semantic'))} |" for r in rows]
    return "\n".join(out)


def read_results(folder):
    """{dimension: score} from VBench's *_eval_results.json files ({dimension: [score, per-video list]})."""
    raw = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_eval_results.json"))):
        with open(path) as f:
            raw.update({d: float(v[0] if isinstance(v, list) else v) for d, v in json.load(f).items()})
    if not raw:
        raise EvalError(f"{folder}: no VBench *_eval_results.json files")
    return raw


def report(out, raw, latency, method="student"):
    """OUT/vbench_scores.json + OUT/table.md (+ the teacher's latency row) -> the markdown."""
    sc = scores(raw)
    rows = []
    if latency.get("teacher_seconds"):
        rows.append({"method": f"teacher ({latency['teacher_steps']} steps, timed {latency['teacher_timed_steps']}, "
                               "extrapolated)", "steps": latency["teacher_steps"], "latency": latency["teacher_seconds"]})
    rows.append({"method": method, "steps": latency.get("steps", "?"), "latency": latency.get("seconds_per_video"),
                 **{k: sc[k] for k in ("total", "quality", "semantic")}})
    md = table(rows)
    if latency.get("speedup"):
        md += f"\n\nspeed-up over the teacher: {latency['speedup']:.1f}x"
    if sc["missing"]:
        md += f"\n\nnot evaluated (the scores average the dimensions present): {', '.join(sc['missing'])}"
    latents.atomic_write_json(sc, os.path.join(out, "vbench_scores.json"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md + "\n")
    return md


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def teacher_latency(path, shape, cond, uncond, args):
    """Seconds of the teacher's N-step guided sampling of one video: --teacher-timed-steps calls after a warm-up, x N."""
    model, info = sampling.load_student(path, args.device, args.dtype, teacher=True, steps=args.teacher_steps)
    grid = info["grid"]
    t = Teacher(model, grid, args.guidance, uncond if grid.kind == "vpred" else None)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(args.device)
    times = []
    for i in range(args.teacher_timed_steps + 1):  # the first call warms up (kernels, allocator)
        _sync(args.device)
        t0 = time.perf_counter()
        t.out(x, grid.N - 1 - i, cond)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    del model, t
    return statistics.mean(times[1:]) * grid.N, grid.N


def vbench_commands(videos, results, out, dims):
    return ["pip install vbench   # and its models: see https://github.com/Vchitect/VBench"] + [
        f'vbench evaluate --videos_path "{videos}" --dimension {d} --output_path "{results}"' for d in dims] + [
        f'python eval.py table --results "{results}" --out "{out}"']


def run_vbench(videos, results, dims, device):
    """VBench's evaluation in this process (vbench installed; it fetches its models on first use)."""
    from vbench import VBench
    bench = VBench(torch.device(device), vbench_info(), results)
    try:
        bench.evaluate(videos_path=videos, name="dcm", dimension_list=list(dims), mode="vbench_standard")
    except TypeError:  # versions before the `mode` argument
        bench.evaluate(videos_path=videos, name="dcm", dimension_list=list(dims))
    return read_results(results)


def vbench_main(args):
    from storage import video_io
    dims = args.dimensions or list(DIMENSIONS)
    if bad := [d for d in dims if d not in DIMENSIONS]:
        raise EvalError(f"--dimensions: unknown {bad}; VBench's are {', '.join(DIMENSIONS)}")
    src = checkpoint.resolve(args.ckpt, "--ckpt")
    folder, weights, run = src.folder, src.weights, src.run
    info_path = args.prompts or vbench_info()
    if info_path is None:
        raise EvalError("vbench is not installed (pip install vbench): give --prompts FILE (one prompt per line, or "
                        "VBench_full_info.json)")
    prompts = read_prompts(info_path, dims)
    work = [(p, i, video_name(p, i)) for p in prompts for i in range(args.per_prompt)]
    videos, results = os.path.join(args.out, "videos"), os.path.join(args.out, "vbench_results")
    teacher_path = args.teacher or (run or {}).get("teacher")
    name = sampling.model_name(checkpoint.read_config(weights))
    args.weights = checkpoint.hub_path(args.weights, "--weights")  # an org/name hub id: its local snapshot
    video_io.vae_config(name, args.weights)  # bad weights fail now, before any model loads
    video_io.weights_path(args.weights, "text_encoder")
    os.makedirs(videos, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(videos), ".tmp-*")):  # a video cut off by a crash
        os.remove(stale)
    todo = [w for w in work if not os.path.isfile(os.path.join(videos, w[2]))]
    print(f"{len(prompts)} prompts x {args.per_prompt} = {len(work)} videos in {videos}: {len(work) - len(todo)} done, "
          f"{len(todo)} to go")
    lat_path = os.path.join(args.out, "latency.json")
    latency = json.load(open(lat_path)) if os.path.isfile(lat_path) else {"per_video": {}}
    if todo:
        need = list(dict.fromkeys(p for p, _, _ in todo))  # encoded first, the encoder freed (the peak on one GPU)
        conds = conditioning.encode_prompts(name, args.weights, need + [""], args.device, args.dtype)  # "": the CFG branch
        model, info = sampling.load_student(args.ckpt, args.device, args.dtype, args.detail)
        if info["mode"] == "teacher":
            raise EvalError(f"{args.ckpt} is a teacher checkpoint: eval.py vbench evaluates a distilled student")
        cfg = info["cfg"]
        args.guidance = args.guidance if args.guidance is not None else info["run"].get("guidance", 6.0)
        size = sampling.latent_size(info, args.frames, args.height, args.width)
        latents.check_fits(cfg, conds, where=f"prompts encoded with {args.weights}")
        cond_of = {p: {k: v[j:j + 1].to(args.device) for k, v in conds.items()} for j, p in enumerate(need)}
        uncond = {k: v[-1:].to(args.device) for k, v in conds.items()}
        vae = video_io.load_vae(name, args.weights, args.device, args.dtype, tiling=True)
        fps = args.fps or FPS[video_io.model_family(name)]
        shape = (cfg.in_channels, *size)
        for p, i, file in tqdm(todo, desc="videos"):
            x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed_for(args.seed, p, i)))
            _sync(args.device)
            t0 = time.perf_counter()
            lat = sampling.student_sample(model, x.to(args.device), cond_of[p], info["grid"], info["boundaries"],
                                        args.steps, args.guidance)
            _sync(args.device)
            latency["per_video"][file] = time.perf_counter() - t0
            tmp = os.path.join(videos, f".tmp-{os.getpid()}-{file}")
            video_io.write_video(video_io.decode_latents(vae, lat)[0], tmp, fps)
            os.replace(tmp, os.path.join(videos, file))  # whole files only: a rerun skips exactly the finished ones
        del model, vae
        latency |= {"steps": args.steps, "mode": info["mode"], "ckpt": folder, "latent": list(shape),
                    "device": str(args.device), "dtype": str(args.dtype)}
        if teacher_path and os.path.exists(teacher_path):
            latency["teacher_seconds"], latency["teacher_steps"] = teacher_latency(
                teacher_path, shape, cond_of[need[0]], uncond, args)
            latency["teacher_timed_steps"], latency["teacher"] = args.teacher_timed_steps, teacher_path
    if latency["per_video"]:
        latency["seconds_per_video"] = statistics.median(latency["per_video"].values())
        if latency.get("teacher_seconds"):
            latency["speedup"] = latency["teacher_seconds"] / latency["seconds_per_video"]
        latents.atomic_write_json(latency, lat_path)
        t_note = (f", teacher {latency['teacher_steps']} steps ~{latency['teacher_seconds']:.3f} s: speed-up "
                  f"{latency['speedup']:.1f}x" if latency.get("speedup") else " (no teacher to time: --teacher CKPT)")
        print(f"latency: {latency['seconds_per_video']:.3f} s per video (median, sampling only){t_note}")
    if vbench_info() is None:
        print("vbench is not installed; to score these videos run:\n" + "\n".join(
            "  " + c for c in vbench_commands(videos, results, args.out, dims)))
        return {"videos": videos, "files": [w[2] for w in work], "latency": latency, "scores": None}
    try:
        raw = run_vbench(videos, results, dims, args.device)
    except Exception as e:  # noqa: BLE001 - its models missing or not downloadable, a CUDA-only metric, ...
        print(f"VBench's evaluation failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "run it by hand:\n" + "\n".join("  " + c for c in vbench_commands(videos, results, args.out, dims)))
        return {"videos": videos, "files": [w[2] for w in work], "latency": latency, "scores": None}
    md = report(args.out, raw, latency, method=f"student ({os.path.basename(os.path.normpath(folder))})")
    print(md)
    return {"videos": videos, "files": [w[2] for w in work], "latency": latency, "scores": scores(raw)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vbench", help="VBench prompt suite -> videos (-> VBench scores, Table 1)")
    v.add_argument("--ckpt", required=True, help="student: train.py run/step folder (as sample.py --ckpt)")
    v.add_argument("--detail", help="detail adapter for a semantic backbone --ckpt")
    v.add_argument("--weights", required=True, help="local hub-layout model folder: vae/, text_encoder/, tokenizer/...")
    v.add_argument("--out", required=True, help="output folder (videos/, latency.json, table.md)")
    v.add_argument("--steps", type=int, default=4)
    v.add_argument("--per-prompt", type=int, default=5, help="videos per prompt (VBench: 5)")
    v.add_argument("--dimensions", nargs="+", help=f"VBench dimensions (default all {len(DIMENSIONS)})")
    v.add_argument("--prompts", help="prompt file instead of the vbench package's list (.txt or VBench's .json)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--teacher", help="teacher transformer to time (default: the run's --teacher)")
    v.add_argument("--teacher-steps", type=int, default=50, help="the teacher's N (paper: 50)")
    v.add_argument("--teacher-timed-steps", type=int, default=2, help="teacher calls timed (x N = its latency)")
    v.add_argument("--guidance", type=float, help="default: the run's")
    v.add_argument("--frames", type=int, help="latent frames (default: the run's data, else the model's)")
    v.add_argument("--height", type=int, help="latent height")
    v.add_argument("--width", type=int, help="latent width")
    v.add_argument("--fps", type=int, help="default: CogVideoX 8, HunyuanVideo 24")
    v.add_argument("--dtype", choices=sorted(sampling.DTYPES), help="default bf16 on cuda, fp32 on cpu")
    v.add_argument("--device", default="auto")
    t = sub.add_parser("table", help="VBench result JSONs -> vbench_scores.json + table.md (Table 1)")
    t.add_argument("--results", required=True, help="VBench's --output_path folder")
    t.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "vbench":
        if min(args.steps, args.per_prompt, args.teacher_steps, args.teacher_timed_steps) < 1:
            raise EvalError("--steps, --per-prompt, --teacher-steps and --teacher-timed-steps must be >= 1")
        args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        args.dtype = sampling.DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "table":
        lat_path = os.path.join(args.out, "latency.json")
        latency = json.load(open(lat_path)) if os.path.isfile(lat_path) else {}
        os.makedirs(args.out, exist_ok=True)
        md = report(args.out, read_results(args.results), latency)
        print(md)
        return md
    return vbench_main(args)


def cli(argv=None):
    """main() as a command line: bad input is one `error:` line and exit 2 (tools/checks.cli)."""
    return checks.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
