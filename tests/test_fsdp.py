"""fsdp.py: the meta start-up (each rank reads its own shards) equals the full-copy one bit for bit, at start-up and
after training, for the detail stage (DualExpert, EMA, bf16 teacher: fresh adapter, then resumed); its
errors name the checkpoint. Host memory: tests/fsdp_host_memory.py (a script, numbers in docs/training.md)."""
import dataclasses
import os
import shutil
import subprocess
import sys

import torch

from storage import checkpoint
import model
from test_train import ENV, ROOT, make_dataset, run, tensors


def test_meta_start_up_equals_full_copy(tmp_path):
    """2 gloo ranks, time_embed_dim 33 so some parameters shard unevenly (17 + 16 rows)."""
    cfg = dataclasses.replace(model.PRESETS["tiny-cogvideox"], time_embed_dim=33)
    for name, seed in (("teacher", 0), ("init", 1)):
        torch.manual_seed(seed)
        checkpoint.save_transformer(model.build_transformer(cfg), tmp_path / name, max_shard_size="20KB")
    d = make_dataset(tmp_path / "data", "tiny-cogvideox")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_fsdp_check.py"), str(tmp_path / "out"), str(tmp_path / "teacher"),
           str(tmp_path / "init"), d]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1: peak host memory at start-up" in p.stdout
    out = tmp_path / "out"
    for case in ("detail", "detail_resume"):
        for rank in (0, 1):
            meta, full = (torch.load(out / case / mode / f"rank{rank}.pt")["shards"] for mode in ("meta", "full"))
            assert meta.keys() == full.keys() and len(meta) > 150
            assert [k for k in meta if not torch.equal(meta[k], full[k])] == [], (case, rank)
            if case == "detail_resume":  # the resumed adapter is the trained one, not a fresh draw
                fresh = torch.load(out / "detail" / "meta" / f"rank{rank}.pt")["shards"]
                assert any(not torch.equal(meta[k], fresh[k]) for k in meta if "/lora." in k and k.endswith(".B"))
    for step in (1, 2):  # the run, then its resumed continuation: weights, EMA, optimizer, discriminator, RNG
        meta, full = (tensors(out / "detail" / mode / f"step_{step:07d}") for mode in ("meta", "full"))
        assert meta.keys() == full.keys() and any("disc" in k for k in meta) and any("ema" in k for k in meta)
        assert [k for k in meta if not torch.equal(meta[k], full[k])] == [], step


def test_meta_start_up_errors_name_the_checkpoint(tmp_path):
    """A truncated teacher under --fsdp: one ValueError naming it (train.py prints it as one error line)."""
    cfg = model.PRESETS["tiny-cogvideox"]
    checkpoint.save_transformer(model.build_transformer(cfg), tmp_path / "t")
    shutil.copytree(tmp_path / "t", tmp_path / "broken")
    with open(tmp_path / "broken" / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.truncate(200)
    d = make_dataset(tmp_path / "data", "tiny-cogvideox")
    try:
        run("--stage", "semantic", "--teacher", tmp_path / "broken", "--data", d, "--out", tmp_path / "o", "--fsdp",
            "--device", "cpu", "--max-steps", 1)
    except ValueError as e:
        assert "cannot load the transformer in" in str(e) and "broken" in str(e)
    else:
        raise AssertionError("a truncated checkpoint loaded")


def test_bf16_fsdp_gathers_weights_in_bf16_and_keeps_t_in_fp32(tmp_path, monkeypatch):
    """--fsdp --dtype bf16 (issue 28 item 6): a mixed-precision policy, so each block's fp32 masters arrive
    all-gathered in bf16 (half the bytes of fp32) while the sharded masters stay fp32, and the timestep reaches the
    model in fp32 (FSDP's default input cast would round 981.8 to 980); fp32 runs keep fp32. One process."""
    from scale import fsdp
    d = make_dataset(tmp_path / "data", "tiny-wan")
    torch.manual_seed(0)
    checkpoint.save_transformer(model.build_transformer("tiny-wan"), tmp_path / "t")
    shard = fsdp.shard
    for dtype, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen = {"gathered": set(), "master": set(), "t": set()}

        def spy(m, mesh, bf16=False):
            shard(m, mesh, bf16)
            if seen["master"]:
                return  # the student is sharded first; then the frozen teacher (held in its compute dtype)
            block = m.blocks[0]
            block.register_forward_pre_hook(lambda mod, a: seen["gathered"].add(next(mod.parameters()).dtype))
            m.register_forward_pre_hook(lambda mod, a: seen["t"].add(a[1].dtype))
            seen["master"] |= {p.to_local().dtype for p in m.parameters()}
        monkeypatch.setattr(fsdp, "shard", spy)
        run("--stage", "semantic", "--teacher", tmp_path / "t", "--data", d, "--out", tmp_path / dtype, "--fsdp",
            "--dtype", dtype, "--device", "cpu", "--max-steps", 1, "--probe-every", 0)
        assert seen == {"gathered": {want}, "master": {torch.float32}, "t": {torch.float32}}, (dtype, seen)


def test_hsdp_equals_one_process(tmp_path, capsys, monkeypatch):
    """--fsdp --hsdp 2 on 4 gloo ranks (issue 28 item 6: 2 replicas x 2 shards, all-gathers inside each pair) = one
    process on the whole batch of 4, detail stage (LoRA, GAN, FM), weights and losses; --hsdp that does not divide
    the world, or without --fsdp: one line."""
    from test_robust import train_err
    from test_train import LORA, SMALL
    from test_train_sp import assert_losses, torchrun
    torch.manual_seed(0)
    checkpoint.save_transformer(model.build_transformer("tiny-wan"), tmp_path / "t")
    d = make_dataset(tmp_path / "data", "tiny-wan")
    common = ["--teacher", tmp_path / "t", "--init", tmp_path / "t", "--data", d, "--lr", 1e-3, "--max-steps", 2,
              "--stage", "detail", *SMALL, *LORA]
    torchrun(4, [["train", *common, "--fsdp", "--hsdp", 2, "--batch-size", 1, "--out", tmp_path / "hsdp"]], tmp_path)
    run(*common, "--batch-size", 4, "--out", tmp_path / "one")
    assert_losses(tmp_path / "hsdp", tmp_path / "one", ["loss", "cd", "gan_g", "fm", "d", "grad_norm"])
    got, ref = tensors(tmp_path / "hsdp" / "step_0000002"), tensors(tmp_path / "one" / "step_0000002")
    weights = [k for k in ref if k.startswith(("detail", "train_state.pt/disc"))]
    assert len(weights) > 20
    for k in weights:  # two AdamW steps move a weight by <= 2 lr; a sync error would flip whole signs (test_train)
        assert torch.allclose(got[k], ref[k], atol=2e-4, rtol=0), (k, (got[k] - ref[k]).abs().max())
    capsys.readouterr()
    for bad in (["--hsdp", 3, "--fsdp"], ["--hsdp", 1, "--hsdp", 0]):
        err = train_err(monkeypatch, capsys, [*common, "--batch-size", 1, "--out", tmp_path / "x", *bad])
        assert "--hsdp" in err and "divide the world size 1" in err
