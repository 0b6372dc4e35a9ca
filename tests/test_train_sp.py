"""train.py --sp: 2 gloo processes as one SP group, and 4 as SP 2 x DP 2, end with the weights of 1 process
(semantic stage with the temporal-coherence loss across the shard edge; detail stage with GAN + FM, DDP and FSDP2);
resume under SP is exact and a checkpoint written under SP 2 goes on in 1 process; bad --sp: one error line."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from safetensors.torch import load_file

from storage import checkpoint
import model
import sample
import sampling
import train
from test_train import ENV, LORA, ROOT, SMALL, make_dataset, read_jsonl, run, tensors

SHAPE = (5, 6, 6)  # latent F, H, W: 5 x 3 x 3 = 45 tokens, split 23 + 22 (+1 padding); TC stride 3 spans the edge
REL = 1e-4


def torchrun(n, runs, tmp_path):
    with open(tmp_path / f"runs{n}.json", "w") as f:
        json.dump([[str(a) for a in argv] for argv in runs], f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(ROOT, "tests", "_torchrun_runs.py"), str(tmp_path / f"runs{n}.json")]
    t0 = time.time()
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return time.time() - t0


def assert_close(got_dir, ref_dir, what):
    """Two checkpoints' tensors (weights, EMA, discriminator, optimizer states) -> the worst group's max error relative
    to the group's largest entry; a group = a weights file or state entry (optimizer moments apart). Per group, not
    per tensor: AdamW's first steps are lr * g / (|g| + eps), so an entry whose gradient is ~eps (a zero-initialised
    LoRA B has some) turns fp32 round-off into ~1e-3 of its own tiny size."""
    got, ref = tensors(got_dir), tensors(ref_dir)
    keys = [k for k in ref if ref[k].is_floating_point() and "rng" not in k]
    assert len(keys) > 50 and set(keys) <= set(got), what
    diff, scale = {}, {}
    for k in keys:
        parts = k.split("/")
        group = parts[0] if parts[0].endswith(".safetensors") else "/".join(parts[:2]) + ("/" + parts[-1] if "opt" in parts[1] else "")
        diff[group] = max(diff.get(group, 0.0), float((got[k].float() - ref[k].float()).abs().max()))
        scale[group] = max(scale.get(group, 0.0), float(ref[k].float().abs().max()))
    worst = max((diff[g] / scale[g], g) for g in diff if scale[g] > 0)
    assert worst[0] <= REL, (what, worst)
    return worst[0]


def assert_losses(got_out, ref_out, keys):
    for a, b in zip(read_jsonl(os.path.join(got_out, "log.jsonl")), read_jsonl(os.path.join(ref_out, "log.jsonl")),
                    strict=True):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=REL), (got_out, k)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """preset -> (data with SHAPE latents, a random transformer folder used as teacher and student init)."""
    root, out = tmp_path_factory.mktemp("sp"), {}
    for preset in ("tiny-cogvideox", "tiny-hunyuan"):
        torch.manual_seed(0)
        m = model.build_transformer(preset)
        checkpoint.save_transformer(m, root / preset / "model")
        out[preset] = (make_dataset(root / preset / "data", preset, shape=SHAPE), str(root / preset / "model"))
    return out


def test_sp2_and_sp2xdp2_equal_one_process(models, tmp_path):
    (cdata, cmodel), (hdata, hmodel) = models["tiny-cogvideox"], models["tiny-hunyuan"]
    common = ["--batch-size", 2, "--lr", 1e-4, "--save-every", 2, "--target-ema", 0.5, *SMALL]
    sem = ["--stage", "semantic", "--teacher", cmodel, "--data", cdata, *common]
    det = ["--stage", "detail", "--teacher", hmodel, "--init", hmodel, "--data", hdata, *common, *LORA]
    sp = ["--sp", 2]
    samp = ["--ckpt", tmp_path / "det_sp", "--num", 2, "--seed", 3, "--device", "cpu"]
    secs = torchrun(2, [
        ["train", *sem, *sp, "--out", tmp_path / "sem_sp", "--max-steps", 3],
        ["train", *sem, *sp, "--out", tmp_path / "sem_res", "--max-steps", 2],
        ["train", *sem, *sp, "--out", tmp_path / "sem_res", "--max-steps", 3, "--resume"],
        ["train", *det, *sp, "--out", tmp_path / "det_sp", "--max-steps", 2],
        ["train", *det, *sp, "--out", tmp_path / "det_fsdp", "--max-steps", 2, "--fsdp"],
        ["sample", *samp, *sp, "--out", tmp_path / "samples_sp"],
    ], tmp_path)
    secs4 = torchrun(4, [["train", *det, *sp, "--batch-size", 1, "--out", tmp_path / "det_dp", "--max-steps", 2]], tmp_path)
    print(f"torchrun: 2 processes {secs:.1f} s, 4 processes {secs4:.1f} s")
    t0 = time.time()
    one = {"sem": run(*sem, "--out", tmp_path / "sem1", "--max-steps", 3), "det": run(*det, "--out", tmp_path / "det1", "--max-steps", 2)}
    print(f"1 process: {time.time() - t0:.1f} s")
    assert one["sem"]["losses"]["tc"] > 0 and one["det"]["losses"]["gan_g"] > 0 and one["det"]["losses"]["fm"] > 0
    errs = {}
    for name, ref in (("sem_sp", "sem"), ("det_sp", "det"), ("det_fsdp", "det"), ("det_dp", "det")):
        keys = ["loss", "cd", "grad_norm"] + (["tc"] if ref == "sem" else ["gan_g", "fm", "d", "d_grad_norm"])
        assert_losses(tmp_path / name, one[ref]["out"], keys)
        errs[name] = assert_close(tmp_path / name / f"step_000000{3 if ref == 'sem' else 2}", one[ref]["checkpoint"], name)
    # the global RNGs are seeded by data-parallel rank: SP peers (ranks 0, 1) alike, DP groups (0 vs 2) not
    rng = [torch.load(tmp_path / n / "step_0000002" / "train_state.pt", weights_only=False)["rng"]
           for n in ("sem_res", "det_dp")]
    assert torch.equal(rng[0][0]["torch"], rng[0][1]["torch"]) and rng[0][0]["numpy"][1].tolist() == rng[0][1]["numpy"][1].tolist()
    assert torch.equal(rng[1][0]["torch"], rng[1][1]["torch"]) and not torch.equal(rng[1][0]["torch"], rng[1][2]["torch"])
    # resume under SP 2 is exact
    a, b = tensors(tmp_path / "sem_sp" / "step_0000003"), tensors(tmp_path / "sem_res" / "step_0000003")
    assert a.keys() == b.keys() and [k for k in a if "rng" not in k and not torch.equal(a[k], b[k])] == []
    # a checkpoint written under SP 2 goes on in one process (portable between SP degrees)
    os.makedirs(tmp_path / "port")
    os.symlink(tmp_path / "sem_sp" / "step_0000002", tmp_path / "port" / "step_0000002")
    run(*sem, "--out", tmp_path / "port", "--max-steps", 3, "--resume")
    errs["port"] = assert_close(tmp_path / "port" / "step_0000003", one["sem"]["checkpoint"], "port")
    # sample.py --sp 2: the latents of one process (4-step dual expert, 45 tokens)
    ref = sample.main([str(a) for a in samp + ["--out", tmp_path / "samples1"]])["latents"]
    got = load_file(tmp_path / "samples_sp" / "latents.safetensors")["latents"]
    errs["sample"] = float((got - ref).abs().max() / ref.abs().max())
    assert errs["sample"] <= 1e-5, errs
    print({k: f"{v:.1e}" for k, v in errs.items()})


def test_bad_sp(models, tmp_path, monkeypatch, capsys):
    """--sp without torchrun, not dividing the heads or the world: one error line, before any model is loaded."""
    data, path = models["tiny-cogvideox"]
    argv = ["--stage", "semantic", "--teacher", path, "--data", data, "--out", tmp_path / "x", "--device", "cpu"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv), "--sp", "2"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --sp 2 needs N processes per sample: launch "
                                                              "with torchrun") and len(p.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("RANK", "0")  # as under torchrun; the checks come before any process group
    for sp, world, want in ((3, 3, "must divide the model's 2 attention heads"), (2, 3, "must divide the world size 3")):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv), "--sp", str(sp)])
        with pytest.raises(SystemExit) as e:
            train.cli()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: --sp ") and want in err, err
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(sampling.SampleError, match="launch exactly 2 processes"):
        sample.main(["--ckpt", path, "--teacher", "--sp", "2"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="must divide the model's 2 attention heads"):
        sample.main(["--ckpt", path, "--teacher", "--sp", "4"])
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="needs N processes per sample"):
        sample.main(["--ckpt", path, "--teacher", "--sp", "2"])
