"""plan.py (train.py --dry-run): the activation count per block and the whole-step estimate against CPU measurements
of tiny presets (semantic and detail stage, grad checkpointing on/off, fp32/bf16), the paper's settings, bad input."""
import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from storage import checkpoint, latents, resume
import data
import model
from scale import plan
import train


class LiveBytes(TorchDispatchMode):
    """The measurement: bytes of every live tensor storage made inside the mode (each counted once, until freed).
    Storages made by `empty` are read at their current size instead: FSDP2 frees a gathered block by resizing its
    storages to 0 bytes and gathers it again into the same storages (which a count at creation would miss)."""

    def __init__(self):
        super().__init__()
        self.fixed = self.peak = 0
        self.seen = set()
        self.resizable = weakref.WeakValueDictionary()

    @property
    def live(self):
        return self.fixed + sum(st.nbytes() for st in self.resizable.values())

    def _free(self, key, n):
        self.fixed -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if id(st) in self.seen or id(st) in self.resizable:
                    continue
                if func.__name__.startswith("empty"):
                    self.resizable[id(st)] = st
                elif st.nbytes():
                    self.seen.add(id(st))
                    self.fixed += st.nbytes()
                    weakref.finalize(st, self._free, id(st), st.nbytes())
        self.peak = max(self.peak, self.live)
        return out


CONFIGS = {  # width 128 and 1024 video tokens: activations dominate the weights, as at full size
    "cogvideox": dataclasses.replace(model.PRESETS["tiny-cogvideox"], num_attention_heads=2, attention_head_dim=64,
                                     time_embed_dim=64, max_text_seq_length=8),
    "hunyuan": dataclasses.replace(model.PRESETS["tiny-hunyuan"], num_attention_heads=2, attention_head_dim=64,
                                   rope_axes_dim=(16, 24, 24), num_layers=1, num_single_layers=1),
}
WAN = dataclasses.replace(model.PRESETS["tiny-wan"], num_attention_heads=2, attention_head_dim=64, ffn_dim=512,
                          num_layers=1)  # the per-block check only
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
    latents.write_shard(root / "d", 0, t)
    latents.write_manifest(root / "d", model="custom", latent_shape=[C, *SIZE], vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(0), "num": 2}], uncond=un)
    return ["--teacher", str(root / "t"), "--init", str(root / "t"), "--data", str(root / "d"), "--batch-size", "1",
            "--probe-every", "0", "--save-every", "0", "--device", "cpu"]


def measured(argv, monkeypatch):
    """Peak live bytes during train.py's 2nd step over those live as it starts (weights, AdamW states, teacher, EMA,
    discriminator, data: the planner's static terms) = what the step adds: activations, grads, latents, FSDP's
    gathered blocks and buffers. The step ends where the final save begins (under FSDP a save gathers the full
    state: not a training step's memory)."""
    tracker, draws, save, step_peak = LiveBytes(), latents.draws, resume.save_step, []

    def spy(index, step, *a, **k):
        if step == 1:
            tracker.start = tracker.peak = tracker.live
        return draws(index, step, *a, **k)

    def saved(*a, **k):
        step_peak.append(tracker.peak)
        return save(*a, **k)
    monkeypatch.setattr(latents, "draws", spy)
    monkeypatch.setattr(resume, "save_step", saved)
    with tracker:
        train.main(argv + ["--max-steps", "2"])
    return step_peak[0] - tracker.start


def block_saved(block, args, dtype):
    """Bytes autograd saves in one block's forward: parameters, their autocast casts and the inputs left out."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    flat = [t for a in args for t in (a if isinstance(a, tuple) else (a,))]  # RoPE tables come as a (cos, sin) pair
    skip = params | {a.untyped_storage().data_ptr() for a in flat if torch.is_tensor(a) and not a.requires_grad}
    shapes = {s for p in block.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}  # W and W.t()
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and not (t.dtype == torch.bfloat16 and tuple(t.shape) in shapes):
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(*args)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("grads", ["full", "none"])
def test_block_units_equal_saved_tensors(dtype, grads):
    """plan.block_units (the per-block formula) against the bytes autograd saves in each kind of block, trained
    (the student) and frozen (the teacher's GAN pass, input gradient only); within 8%
    (measured: -2.2% to +5.5%: docs/training.md)."""
    B, Lv, Lt, D = 1, 512, 32, 128
    act = torch.bfloat16 if dtype == "bf16" else torch.float32
    x, c = (torch.randn(B, n, D, dtype=act, requires_grad=True) for n in (Lv, Lt))
    h = torch.randn(B, Lv + Lt, D, dtype=act, requires_grad=True)
    cos, sin = torch.randn(Lv + Lt, 64), torch.randn(Lv + Lt, 64)
    cog, hun = (model.build_transformer(CONFIGS[k]) for k in ("cogvideox", "hunyuan"))
    wan = model.build_transformer(WAN)
    for m in (cog, hun, wan):
        m.requires_grad_(grads == "full")
    blocks = {("cogvideox", "block"): (cog.transformer_blocks[0], (x, c, torch.randn(B, 64))),
              ("hunyuan", "double"): (hun.transformer_blocks[0], (x, c, torch.randn(B, D), None, cos, sin)),
              ("hunyuan", "single"): (hun.single_transformer_blocks[0], (h, torch.randn(B, D), None, cos, sin)),
              ("wan", "block"): (wan.blocks[0], (x, c, torch.randn(B, 6, D), (cos[:Lv], sin[:Lv]))),
              # TI2V's first-frame condition: a modulation per token
              ("wan", "per-token"): (wan.blocks[0], (x, c, torch.randn(B, Lv, 6, D, requires_grad=grads == "full"),
                                                     (cos[:Lv], sin[:Lv])))}
    for (arch, kind), (block, args) in blocks.items():
        got = block_saved(block, args, dtype)
        cfg = WAN if arch == "wan" else CONFIGS[arch]
        tokens = Lv if arch == "wan" else Lv + Lt  # Wan's text enters by cross-attention only
        units = plan.block_units(cfg, dtype, "cpu", grads, per_token=kind == "per-token")
        want = units["block" if kind == "per-token" else kind][2] * D * B * tokens
        print(f"{arch} {kind} {dtype} {grads}: saved {got} formula {want:.0f} error {want / got - 1:+.1%}")
        assert abs(got / want - 1) < 0.08, (arch, kind, dtype, grads, got, want)


STEPS = [("cogvideox", "semantic", True, "fp32", []), ("cogvideox", "detail", False, "fp32", []),
         ("hunyuan", "semantic", False, "bf16", []), ("hunyuan", "detail", True, "bf16", []),
         ("cogvideox", "semantic", True, "bf16", ["--semantic-lora", "8"]),  # one GPU: LoRA semantic expert, GAN first
         ("hunyuan", "detail", True, "bf16", ["--semantic-lora", "8", "--gan-first"]),
         # FSDP2 in one process: gathered blocks and roots, unsharded grads and reduce-scatter buffers (issue 28 item 7)
         ("cogvideox", "semantic", False, "fp32", ["--fsdp"]), ("hunyuan", "detail", True, "bf16", ["--fsdp"])]


@pytest.mark.parametrize("arch,stage,ckpt,dtype,extra", STEPS)
def test_step_peak_within_15_percent(tmp_path, monkeypatch, arch, stage, ckpt, dtype, extra):
    """The dry run's activations + grads + latents against the measured peak of one real train.py step (CPU, the
    LiveBytes measurement above): within the issue's 15% (measured: 1-7%, see docs/training.md)."""
    argv = make_run(tmp_path, CONFIGS[arch]) + ["--stage", stage, "--dtype", dtype] + ["--grad-ckpt"] * ckpt + (
        ["--lora-rank", "8", "--disc-hidden", "64"] if stage == "detail" else []) + extra
    if "--semantic-lora" in extra:  # a LoRA semantic expert starts from the teacher; its detail stage builds on one
        argv.remove("--init"), argv.remove(str(tmp_path / "t"))
        if stage == "detail":
            train.main(argv[:argv.index("--stage")] + ["--stage", "semantic", "--semantic-lora", "8", "--max-steps", "1",
                                                      "--out", str(tmp_path / "sem")])
            argv += ["--init", str(tmp_path / "sem")]
    got = measured(argv + ["--out", str(tmp_path / "run")], monkeypatch)
    p = train.main(argv + ["--dry-run"])["plan"]
    want = p["total"] - sum(p["static"].values())
    print(f"{arch} {stage} {dtype} ckpt {ckpt} {' '.join(extra)}: measured {got / 2**20:.1f} MiB, plan {want / 2**20:.1f} MiB "
          f"({want / got - 1:+.1%})")
    assert abs(want / got - 1) < 0.15, (got, want, p["passes"])


def test_plans_scale_and_answer(capsys):
    """Full-size plans on the meta device: SP divides the video tokens and the activations, FSDP the states; the
    paper's HunyuanVideo semantic step (115,200 tokens) needs ~69 GiB at SP 1 on 24 GPUs: it does not fit 60 GiB there
    and does at SP 2 (~39 GiB)."""
    base = ["--stage", "semantic", "--config", "hunyuan-video", "--dry-run", "--dtype", "bf16", "--grad-ckpt", "--fsdp",
            "--world-size", "24", "--frames", "32", "--height", "90", "--width", "160", "--gpu-mem", "60"]
    r = train.main(base)
    assert r["plan"]["shape"].video == 115200 and not r["fits"] and r["min_sp"] == 2
    out = capsys.readouterr().out
    assert "does NOT fit in 60 GiB" in out and "smallest SP degree that fits: 2" in out
    args, cfg = train.parse_args(base), model.PRESETS["hunyuan-video"]
    counts = r["counts"]
    p1, p4 = (plan.plan(args, cfg, counts, sp) for sp in (1, 4))
    assert p4["shape"].video == 115200 // 4 and p4["total"] < p1["total"] and p4["static"] == p1["static"]
    assert p1["static"]["AdamW states (fp32)"] == 8 * counts["trainable"] / 24
    args.frames = args.height = args.width = None  # no size known: weights, grads and optimizer only
    assert plan.plan(args, cfg, counts, 1)["passes"] == {}


def test_dry_run_bad_input(monkeypatch, capsys):
    """Impossible sizes: one error line naming the flags, non-zero exit, before any model is built."""
    base = ["train.py", "--stage", "semantic", "--config", "tiny-hunyuan", "--dry-run"]
    for bad, want in ((["--frames", "32", "--height", "91", "--width", "160"], "divisible by the patch"),
                      (["--frames", "0", "--height", "90", "--width", "160"], "must be >= 1"),
                      (["--frames", "32"], "go together"),
                      (["--frames", "4", "--height", "8", "--width", "8", "--gpu-mem", "0"], "--gpu-mem 0.0"),
                      (["--frames", "4", "--height", "8", "--width", "8", "--sp", "3", "--world-size", "6"],
                       "--sp 3 must divide the attention heads (2)")):
        monkeypatch.setattr("sys.argv", base + bad)
        with pytest.raises(SystemExit) as e:
            train.cli()
        msg = capsys.readouterr().err.strip()
        assert e.value.code == 2 and msg.startswith("error: ") and want in msg and "\n" not in msg, msg


def test_dry_run_without_a_latent_size_says_it_cannot_tell(capsys):
    """No --frames/--height/--width, no --data and none in the config (HunyuanVideo's): the activations are not
    counted, so no "fits" verdict; weights and states alone over --gpu-mem are a certain "does NOT fit"."""
    base = ["--stage", "semantic", "--config", "tiny-hunyuan", "--dry-run"]
    r = train.main(base)
    out = capsys.readouterr().out
    assert r["fits"] is None and r["min_sp"] is None and r["plan"]["passes"] == {}
    assert ("cannot tell whether it fits in 80 GiB without --frames/--height/--width (or --data): activations not "
            "counted") in out
    assert "fits in 80" not in out.replace("whether it fits in 80", "") and "smallest SP" not in out
    r = train.main(base + ["--gpu-mem", "0.0001"])  # 0.1 MiB: below the tiny model's ~2 MiB of weights and states
    out = capsys.readouterr().out
    assert r["fits"] is False and "does NOT fit in 0.0001 GiB even before the activations" in out
    r = train.main(base + ["--frames", "2", "--height", "4", "--width", "4"])
    out = capsys.readouterr().out
    assert r["fits"] is True and "latent 2x4x4 (from --frames/--height/--width)" in out and "fits in 80 GiB" in out


def test_one_gpu_plans(capsys):
    """The one-GPU rows of docs/training.md: with --semantic-lora (and --gan-first in the detail stage) Wan2.1-1.3B
    fits 24 GiB in both stages at 21x60x104 where the full fine-tune does not, and HunyuanVideo's detail stage fits
    80 GiB at 16x90x160 where it does not without --gan-first; the shared teacher costs nothing."""
    wan = ["--config", "wan2.1-t2v-1.3b", "--dry-run", "--dtype", "bf16", "--grad-ckpt", "--frames", "21", "--height",
           "60", "--width", "104", "--gpu-mem", "24"]
    full, sem = (train.main(["--stage", "semantic", *wan, *x]) for x in ([], ["--semantic-lora", "16"]))
    det = train.main(["--stage", "detail", *wan, "--init", "x", "--semantic-lora", "16", "--gan-first"])
    assert not full["fits"] and sem["fits"] and det["fits"] and sem["teacher"] == det["teacher"] == 0
    assert sem["trainable"] < 0.05 * sem["params"] and sem["total"] < 0.5 * full["total"]
    hy = ["--stage", "detail", "--config", "hunyuan-video", "--dry-run", "--dtype", "bf16", "--grad-ckpt", "--frames",
          "16", "--height", "90", "--width", "160", "--init", "x", "--semantic-lora", "16"]
    plain, first = train.main(hy), train.main(hy + ["--gan-first"])
    assert not plain["fits"] and first["fits"] and first["total"] < plain["total"] - 16 * 2**30
    capsys.readouterr()


# (preset, student backbone, its teacher in each stage): a two-expert teacher's stages each hold one expert, the
# detail stage none beside its own base (its adapter sits on the low-noise expert, which is its teacher)
NEW = [("wan2.2-t2v-a14b", 14_288_491_584, {"semantic": 14_288_491_584, "detail": 0}),
       ("wan2.2-i2v-a14b", 14_288_901_184, {"semantic": 14_288_901_184, "detail": 0}),
       ("wan2.2-ti2v-5b", 4_999_787_712, {"semantic": 4_999_787_712, "detail": 4_999_787_712}),
       ("wan2.1-i2v-14b-720p", 16_394_878_784, {"semantic": 16_394_878_784, "detail": 16_394_878_784})]


@pytest.mark.parametrize("preset,params,teacher", NEW, ids=[n for n, *_ in NEW])
def test_new_presets_plan(preset, params, teacher, capsys):
    for stage in ("semantic", "detail"):
        argv = ["--stage", stage, "--config", preset, "--dry-run", "--frames", "21", "--height", "44", "--width", "80",
                "--world-size", "8", "--fsdp", "--grad-ckpt", "--dtype", "bf16"] + ["--init", "x"] * (stage == "detail")
        p = train.main(argv)
        assert p["teacher"] == teacher[stage] and p["params"] - p["trainable"] * (stage == "detail") == params
        assert p["plan"]["total"] > 0 and capsys.readouterr().out.count("GiB per GPU") >= 5


def test_per_token_timesteps_are_planned(tmp_path):
    """A TI2V dataset with the first-frame condition plans the per-token modulation on top of the same run without it."""
    for name, cond in (("t2v", False), ("i2v", True)):
        data.synthetic_dataset("tiny-wan2.2-ti2v", tmp_path / name, num=2, frames=3, height=8, width=8, image_cond=cond)
    base = ["--stage", "semantic", "--config", "tiny-wan2.2-ti2v", "--dry-run"]
    t2v, i2v = (train.main(base + ["--data", str(tmp_path / n)]) for n in ("t2v", "i2v"))
    D, L = 32, 3 * 4 * 4
    grown = i2v["plan"]["passes"]["student forward"] - t2v["plan"]["passes"]["student forward"]
    assert grown == 28 * D * L + 2 * 32 * D * L  # the fp32 modulation and temb once, 32 bytes per block (2 blocks)


def test_fsdp_units_are_listed_in_the_order_they_run():
    """scale/fsdp.blocks (the FSDP units, and the planner's walk of the backward: plan.fsdp_backward) lists the blocks
    in the order the forward runs them, HunyuanVideo's text refiner first; everything else is the root's group."""
    from scale import fsdp
    for preset in ("tiny-hunyuan", "tiny-cogvideox", "tiny-wan"):
        m = model.build_transformer(preset)
        ran = []
        for b in fsdp.blocks(m):
            b.register_forward_pre_hook(lambda mod, a: ran.append(mod))
        cfg = m.config
        x = torch.randn(1, cfg.in_channels, 2, 4, 4)
        cond = {"text": torch.randn(1, 8, latents.text_width(cfg))}
        if getattr(cfg, "pooled_projection_dim", None):
            cond |= {"pooled": torch.randn(1, cfg.pooled_projection_dim), "text_mask": torch.ones(1, 8, dtype=torch.long)}
        if getattr(cfg, "guidance_embeds", False):
            cond["guidance"] = torch.tensor([6000.0])
        with torch.no_grad():
            m(x, torch.tensor([500.0]), **cond)
        assert ran == fsdp.blocks(m) and len(ran) == len({id(b) for b in ran}), preset
        assert preset != "tiny-hunyuan" or type(ran[0]).__name__ == "HunyuanRefinerBlock"


def test_dry_run_sizes_a_checkpoint_against_the_timeout(capsys):
    """Issue 28 item 4: the dry run says how much a save gathers on rank 0 and writes (the paper's HunyuanVideo semantic
    stage with an EMA target: fp32 weights + AdamW + EMA = 16 bytes per parameter, ~205 GB, which rank 0 holds one
    tensor at a time: tests/test_checkpoint.py) and whether the other ranks' wait for it fits --dist-timeout at a conservative rate."""
    base = ["--stage", "semantic", "--config", "hunyuan-video", "--dry-run", "--dtype", "bf16", "--grad-ckpt", "--fsdp",
            "--world-size", "24", "--frames", "32", "--height", "90", "--width", "160", "--sp", "4", "--target-ema", "0.9"]
    r = train.main(base)
    out = capsys.readouterr().out
    assert r["save"] == 16 * r["params"] and "a checkpoint: 205.1 GB, gathered on rank 0 and written by it one tensor " \
        "at a time, ~17 min" in out
    train.main(base + ["--dist-timeout", "10"])
    assert "--dist-timeout 10 min: raise it" in capsys.readouterr().out
    assert train.main(base[:-2] + ["--stage", "detail", "--init", "x"])["save"] < r["save"] / 5  # adapter + bf16 base
    assert "the adapter run's 26.5 GB of weights at once" in capsys.readouterr().out
