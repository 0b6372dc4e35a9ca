"""No hidden copy (--semantic-lora): the peak live tensor bytes of one semantic and one detail train.py step, whole
(weights, optimizer states, teacher, activations), with the LoRA semantic expert vs the full mode, against the plan.

    python tests/one_gpu_memory.py [--out FILE.md]

A ~150 M-parameter Wan-shaped model (random weights; D 1024, 9 blocks) at 4x16x16 latents, bf16 autocast, grad ckpt,
on the CPU: the planner's measurement method (tests/test_plan.py LiveBytes: every tensor storage made inside the run,
counted until freed), over the 2nd step of each run. Prints a markdown table (docs/training.md holds its result).
"""
import argparse
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import model  # noqa: E402
import train  # noqa: E402
from storage import checkpoint, latents  # noqa: E402
from test_plan import LiveBytes  # noqa: E402

CFG = dataclasses.replace(model.PRESETS["wan2.1-t2v-1.3b"], num_attention_heads=8, attention_head_dim=128, ffn_dim=4096,
                          num_layers=9, text_dim=512)
SIZE = (4, 16, 16)  # latent F, H, W: 256 video tokens


def make_run(root, cfg=CFG, size=SIZE):
    """A random teacher transformer folder and a 2-sample dataset; the common train.py flags."""
    torch.manual_seed(0)
    checkpoint.save_transformer(model.build_transformer(cfg), os.path.join(root, "t"))
    C, L, g = cfg.in_channels, 8, torch.Generator().manual_seed(0)
    t = {"latents": torch.randn(2, C, *size, generator=g),
         "text": torch.randn(2, L, latents.text_width(cfg), generator=g)}
    d = os.path.join(root, "d")
    latents.write_shard(d, 0, t)
    latents.write_manifest(d, model="custom", latent_shape=[C, *size], vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(0), "num": 2}], uncond={"text": torch.zeros(1, L, t["text"].shape[2])})
    return ["--teacher", os.path.join(root, "t"), "--data", d, "--batch-size", "1", "--probe-every", "0",
            "--save-every", "0", "--device", "cpu", "--dtype", "bf16", "--grad-ckpt"]


def step_peak(argv):
    """Peak live bytes during the 2nd step of a 2-step run (everything alive then, the step's own tensors too)."""
    tracker, draws = LiveBytes(), latents.draws

    def spy(index, step, *a, **k):
        if step == 1:
            tracker.peak = tracker.live
        return draws(index, step, *a, **k)
    latents.draws = spy
    try:
        with tracker:
            train.main(argv + ["--max-steps", "2"])
    finally:
        latents.draws = draws
    return tracker.peak


def measure(root, cfg=CFG, size=SIZE, rank=16):
    """{(stage, mode): (measured bytes, planned bytes, params stored, params trained)} for mode full / lora."""
    common, rows = make_run(root, cfg, size), {}
    for mode, extra in (("full", []), ("lora", ["--semantic-lora", str(rank)])):
        sem_out = os.path.join(root, f"sem_{mode}")
        for stage in ("semantic", "detail"):
            argv = [*common, "--stage", stage, *extra]
            if stage == "detail":  # detail-only flags (the semantic stage refuses them)
                argv += ["--init", sem_out, "--gan-first", "--lora-rank", "16", "--disc-hidden", "64"]
            out = sem_out if stage == "semantic" else os.path.join(root, f"det_{mode}")
            got = step_peak(argv + ["--out", out])
            r = train.main(argv + ["--dry-run"])
            rows[stage, mode] = (got, r["total"], r["params"] + r["teacher"], r["trainable"])
    return rows


def table(rows):
    lines = ["| stage | semantic expert | params stored | trained | measured peak | plan | plan error |", "|---" * 7 + "|"]
    for (stage, mode), (got, want, stored, trained) in rows.items():
        lines.append(f"| {stage} | {'LoRA r16 (shared base)' if mode == 'lora' else 'full fine-tune'} | "
                     f"{stored / 1e6:.1f} M | {trained / 1e6:.2f} M | {got / 2**20:.0f} MiB | {want / 2**20:.0f} MiB | "
                     f"{want / got - 1:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    print(f"params: {sum(p.numel() for p in model.build_transformer(CFG, device='meta').parameters()) / 1e6:.1f} M")
    with tempfile.TemporaryDirectory() as root:
        rows = measure(root)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    bad = [k for k, (got, want, *_) in rows.items() if abs(want / got - 1) >= 0.15]
    sys.exit(f"plan off by >= 15%: {bad}" if bad else 0)
