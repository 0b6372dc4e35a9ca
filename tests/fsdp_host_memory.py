"""Peak host memory of each rank during train.py --fsdp start-up: meta start-up vs the full-copy one (a script, not
part of the suite: ~1 min on 2 cores).

    python tests/fsdp_host_memory.py [--ranks 2] [--layers 8] [--out DIR]

Saves a CogVideoX-style model of `--layers` blocks at width 1024 (8 layers: 157 M parameters, 0.59 GiB fp32) as a
sharded transformer folder, then runs `torchrun --nproc_per_node=RANKS train.py --fsdp --max-steps 0` per case
(teacher stage: the student only; semantic stage: student + fp32 / bf16 teacher; detail: DualExpert + EMA + teacher),
each rank resetting its peak RSS (/proc/self/clear_refs 5) as start-up begins and reading VmHWM when it ends.
Prints a markdown table: per rank, the start-up peak over the RSS it began with, in multiples of the full fp32
model, the rank's own shards (here on the CPU; on a GPU run they live on the GPU) and what start-up needs beyond them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(out, argv):
    """One torchrun rank: train.main with start_up wrapped in a peak-RSS measurement."""
    import torch.distributed as dist
    from scale import fsdp
    import train
    dist.init_process_group("gloo")
    start_up, rank = fsdp.start_up, dist.get_rank()

    def measured(*a, **k):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        before = status_kib("VmRSS")
        models = start_up(*a, **k)
        own = sum(getattr(p, "to_local", lambda p=p: p)().nbytes
                  for m in models if m is not None for p in m.parameters())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"before": before * 1024, "peak": status_kib("VmHWM") * 1024, "own_shards": own}, f)
        return models
    fsdp.start_up = measured
    train.main(argv)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1:])
    import torch
    from storage import checkpoint, latents
    import model
    from dataclasses import replace
    tmp = args.out or tempfile.mkdtemp(prefix="fsdp_mem_")
    cfg = replace(model.PRESETS["cogvideox-2b"], num_attention_heads=16, num_layers=args.layers)
    torch.manual_seed(0)
    m = model.build_transformer(cfg)
    n_params = sum(p.numel() for p in m.parameters())
    checkpoint.save_transformer(m, os.path.join(tmp, "model"), max_shard_size="100MB")
    del m
    n, L = 4, 8
    t = {"latents": torch.randn(n, 16, 2, 4, 4), "text": torch.randn(n, L, cfg.text_embed_dim)}
    d = os.path.join(tmp, "data")
    latents.write_shard(d, 0, t)
    latents.write_manifest(d, model="custom", latent_shape=[16, 2, 4, 4], vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(0), "num": n}],
                           uncond={"text": torch.zeros(1, L, cfg.text_embed_dim)})
    full = 4 * n_params
    cases = {
        "teacher stage (student only)": ["--stage", "teacher", "--init", "model"],
        "semantic, fp32 teacher": ["--stage", "semantic", "--teacher", "model"],
        "semantic, bf16 teacher": ["--stage", "semantic", "--teacher", "model", "--dtype", "bf16"],
        "detail, EMA, bf16 teacher": ["--stage", "detail", "--teacher", "model", "--init", "model", "--dtype", "bf16",
                                      "--target-ema", "0.9", "--lora-rank", "16", "--disc-hidden", "64"],
    }
    print(f"model: {n_params / 1e6:.1f} M parameters, full fp32 copy {full / 2**30:.3f} GiB; {args.ranks} gloo ranks\n")
    print("| case | start-up | rank | peak - RSS at start (GiB) | x full fp32 | own shards (x full) | "
          "beyond own shards (x full) |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for name, flags in cases.items():
        for mode in ("meta", "full copy"):
            run = os.path.join(tmp, f"{name.split()[0]}-{len(flags)}-{mode.split()[0]}")
            os.makedirs(run, exist_ok=True)
            argv = [a if a != "model" else os.path.join(tmp, "model") for a in flags]
            argv += ["--data", d, "--out", os.path.join(run, "run"), "--max-steps", "0", "--probe-every", "0",
                     "--batch-size", "1", "--device", "cpu", "--fsdp"]
            e = {**env, "DCM_FSDP_FULL_COPY": "1"} if mode != "meta" else env
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                   os.path.abspath(__file__), "--worker", run, *argv]
            r = subprocess.run(cmd, env=e, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"error: {name} ({mode}) failed:\n{r.stderr[-2000:]}")
            for rank in range(args.ranks):
                with open(os.path.join(run, f"rank{rank}.json")) as f:
                    x = json.load(f)
                grow = x["peak"] - x["before"]
                print(f"| {name} | {mode} | {rank} | {grow / 2**30:.3f} | {grow / full:.2f} | "
                      f"{x['own_shards'] / full:.2f} | {(grow - x['own_shards']) / full:.2f} |", flush=True)


if __name__ == "__main__":
    main()
