"""plan.py (train.py --dry-run): the activation count per block and the whole-step estimate against CPU measurements
of tiny presets (semantic and detail stage, grad checkpointing on/off, fp32/bf16), the paper's settings, bad input."""
import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import checkpoint
import data
import model
import plan
import train


class LiveBytes(TorchDispatchMode):
    """The measurement: bytes of every live tensor storage made inside the mode (each counted once, until freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if id(st) not in self.seen and st.nbytes():
                    self.seen.add(id(st))
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, id(st), st.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


CONFIGS = {  # width 128 and 1024 video tokens: activations dominate the weights, as at full size
    "cogvideox": dataclasses.replace(model.PRESETS["tiny-cogvideox"], num_attention_heads=2, attention_head_dim=64,
                                     time_embed_dim=64, max_text_seq_length=8),
    "hunyuan": dataclasses.replace(model.PRESETS["tiny-hunyuan"], num_attention_heads=2, attention_head_dim=64,
                                   rope_axes_dim=(16, 24, 24), num_layers=2, num_single_layers=2),
}
SIZE = (4, 32, 32)  # latent F, H, W: 1024 video tokens


def make_run(root, cfg):
    """A teacher transformer folder and a 2-sample dataset of SIZE for cfg."""
    torch.manual_seed(0)
    checkpoint.save_transformer(model.build_transformer(cfg), root / "t")
    C, L, g = cfg.in_channels, 8, torch.Generator().manual_seed(0)
    t = {"latents": torch.randn(2, C, *SIZE, generator=g), "text": torch.randn(2, L, cfg.text_embed_dim, generator=g)}
    un = {"text": torch.zeros(1, L, cfg.text_embed_dim)}
    if getattr(cfg, "pooled_projection_dim", None):
        t |= {"pooled": torch.randn(2, cfg.pooled_projection_dim), "text_mask": torch.ones(2, L, dtype=torch.long)}
        un |= {"pooled": torch.zeros(1, cfg.pooled_projection_dim), "text_mask": torch.ones(1, L, dtype=torch.long)}
    data.write_shard(root / "d", 0, t)
    data.write_manifest(root / "d", model="custom", latent_shape=[C, *SIZE], vae_scaling_factor=1.0,
                        shards=[{"file": data.shard_name(0), "num": 2}], uncond=un)
    return ["--teacher", str(root / "t"), "--init", str(root / "t"), "--data", str(root / "d"), "--batch-size", "1",
            "--probe-every", "0", "--save-every", "0", "--device", "cpu", "--lora-rank", "8", "--disc-hidden", "64"]


def measured(argv, monkeypatch):
    """Peak live bytes during train.py's 2nd step over those live as it starts (weights, AdamW states, teacher, EMA,
    discriminator, data: the planner's static terms) = what the step adds: activations, grads, latents."""
    tracker, draws = LiveBytes(), data.draws

    def spy(index, step, *a, **k):
        if step == 1:
            tracker.start, tracker.peak = tracker.live, tracker.live
        return draws(index, step, *a, **k)
    monkeypatch.setattr(data, "draws", spy)
    with tracker:
        train.main(argv + ["--max-steps", "2"])
    return tracker.peak - tracker.start
