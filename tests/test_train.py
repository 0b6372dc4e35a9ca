"""train.py: every stage on both tiny presets, exact resume, torchrun DDP + FSDP2 (gloo, CPU), bad input,
NaN stop, dry run of the full-size HunyuanVideo on the meta device."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model
from storage import checkpoint, resume
from storage.latents import shard_name, text_width, write_manifest, write_shard
import train
from tools import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["tiny-cogvideox", "tiny-hunyuan", "tiny-wan"]
KAPPA = {"tiny-wan": 34}  # the authors' Wan cut (randint(35, 50)); 37 for the others
SMALL = ["--probe-every", "1", "--device", "cpu"]  # CPU: bit-exact, gloo
LORA = ["--lora-rank", "4", "--disc-hidden", "32"]  # detail-stage flags (the other stages refuse them)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def make_dataset(d, preset, n=8, shape=(4, 4, 4), latents=None, seed=0):
    """A dataset folder in storage/latents.py's format for `preset` (pooled + text mask where the model takes them)."""
    cfg, L = model.PRESETS[preset], 6
    g = torch.Generator().manual_seed(seed)
    t = {"latents": torch.randn(n, cfg.in_channels, *shape, generator=g) if latents is None else latents,
         "text": torch.randn(n, L, text_width(cfg), generator=g)}
    un = {"text": torch.zeros(1, L, text_width(cfg))}
    pooled = getattr(cfg, "pooled_projection_dim", None)
    if pooled:
        t |= {"pooled": torch.randn(n, pooled, generator=g), "text_mask": (torch.arange(L) < 4).long().repeat(n, 1)}
        un |= {"pooled": torch.zeros(1, pooled), "text_mask": (torch.arange(L) < 1).long()[None]}
    write_shard(d, 0, t)
    write_manifest(d, model=preset, latent_shape=list(t["latents"].shape[1:]), vae_scaling_factor=1.0,
                   shards=[{"file": shard_name(0), "num": len(t["latents"])}], uncond=un)
    return str(d)


def run(*argv):
    return train.main([str(a) for a in argv])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tensors(path):
    """Every tensor in a checkpoint folder: weights files and the train state (train_state.pt with the AdamW moments
    and EMA of their own files put back: resume.read_state), flattened by key path."""
    out = {}

    def walk(x, key):
        if isinstance(x, torch.Tensor):
            out[key] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}[{i}]")
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if f in (checkpoint.MOMENTS, checkpoint.EMA) and os.path.normpath(root) == os.path.normpath(path):
                continue  # in the train state
            if f.endswith(".safetensors"):
                walk(load_file(p), os.path.relpath(p, path))
            elif f == "train_state.pt":
                walk(resume.read_state(root), f)
    return out


_BASE = {}


@pytest.fixture
def base(tmp_path_factory):
    """preset -> data, a 3-step teacher and a 2-step semantic expert (built once per session)."""
    def get(preset):
        if preset not in _BASE:
            root = tmp_path_factory.mktemp(preset)
            d = make_dataset(root / "data", preset)
            t = run("--config", preset, "--stage", "teacher", "--data", d, "--out", root / "teacher",
                    "--max-steps", 3, "--batch-size", 2, "--save-every", 2, *SMALL)
            s = run("--stage", "semantic", "--teacher", t["checkpoint"], "--data", d, "--out", root / "semantic",
                    "--max-steps", 2, "--batch-size", 2, "--lr", 1e-3, *SMALL)
            _BASE[preset] = dict(root=root, data=d, teacher=t, semantic=s)
        return _BASE[preset]
    return get


@pytest.mark.parametrize("preset", PRESETS)
def test_teacher_and_semantic(base, preset):
    b = base(preset)
    t, s = b["teacher"], b["semantic"]
    assert t["step"] == 3 and sorted(os.listdir(t["out"])) == ["config.json", "log.jsonl", "probes.jsonl",
                                                               "step_0000002", "step_0000003"]
    assert sorted(os.listdir(t["checkpoint"])) == ["checksums.json", "config.json", "optimizer.safetensors",
                                                   "train_state.pt", "transformer"]
    assert [r["step"] for r in read_jsonl(os.path.join(t["out"], "log.jsonl"))] == [1, 2, 3]
    probes = read_jsonl(os.path.join(t["out"], "probes.jsonl"))
    assert len(probes) == 3 and all(p["high_loss"] > 0 and p["low_grad_norm"] > 0 for p in probes)
    assert {"cd", "tc", "loss", "grad_norm", "lr"} <= set(s["losses"])
    assert s["losses"]["loss"] == pytest.approx(s["losses"]["cd"] + s["losses"]["tc"], rel=1e-5)
    # the semantic stage probes only its own (high-noise) sub-trajectory
    assert set(read_jsonl(os.path.join(s["out"], "probes.jsonl"))[0]) == {"step", "high_loss", "high_grad_norm"}
    with open(os.path.join(s["checkpoint"], "config.json")) as f:
        cfg = json.load(f)
    kap = KAPPA.get(preset, 37)
    assert cfg["boundaries"] == [kap] and cfg["k_range"] == [kap + 1, 49] and cfg["model_config"]["_class_name"]


@pytest.mark.parametrize("preset", PRESETS)
def test_baselines_and_detail(base, preset, tmp_path):
    b = base(preset)
    common = ["--teacher", b["teacher"]["checkpoint"], "--data", b["data"], "--max-steps", 2, "--batch-size", 2, *SMALL]
    for stage, bounds, extra in (("vcm", [], ["--grad-ckpt"]), ("pcm", [37, 24, 12], ["--dtype", "bf16"])):
        r = run("--stage", stage, "--out", tmp_path / stage, "--w-tc", 0, *extra, *common)
        with open(os.path.join(r["checkpoint"], "config.json")) as f:
            assert json.load(f)["boundaries"] == bounds
        assert set(r["losses"]) >= {"cd", "loss"} and "tc" not in r["losses"]
    sem = b["semantic"]["checkpoint"]
    r = run("--stage", "detail", "--init", sem, "--out", tmp_path / "detail", "--lr", 1e-3, *common, *LORA)
    assert {"cd", "gan_g", "fm", "d", "d_grad_norm"} <= set(r["losses"])
    assert r["losses"]["loss"] == pytest.approx(r["losses"]["cd"] + 0.5 * r["losses"]["gan_g"] + 0.1 * r["losses"]["fm"], rel=1e-5)
    # frozen semantic weights stay bit-identical; the adapter moved
    before, after = tensors(os.path.join(sem, "transformer")), tensors(os.path.join(r["checkpoint"], "transformer"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(os.path.join(r["checkpoint"], "detail.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    with open(os.path.join(r["checkpoint"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["trainable"] < cfg["params"] and cfg["k_range"] == [0, KAPPA.get(preset, 37)]
    # ablation OD, no GAN / FM: a full copy, every weight trainable
    r = run("--stage", "detail", "--detail-full", "--init", sem, "--out", tmp_path / "od", "--w-gan", 0, "--w-fm", 0, *common,
            "--disc-hidden", 32)
    assert not {"gan_g", "fm", "d"} & set(r["losses"]) and not os.path.exists(os.path.join(r["checkpoint"], "detail.safetensors"))
    with open(os.path.join(r["checkpoint"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["trainable"] == cfg["params"]


@pytest.mark.parametrize("preset", PRESETS)
def test_teacher_loss_falls(tmp_path, preset):
    """One latent repeated: the diffusion loss (flow: logit-normal sigma; vpred: uniform t) must fall."""
    pattern = torch.randn(1, model.PRESETS[preset].in_channels, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    d = make_dataset(tmp_path / "data", preset, n=4, latents=pattern.repeat(4, 1, 1, 1, 1))
    run("--config", preset, "--stage", "teacher", "--data", d, "--out", tmp_path / "run", "--max-steps", 150, "--batch-size", 4, "--lr", 1e-2,
        "--probe-every", 0, "--save-every", 0, "--device", "cpu")
    losses = [r["diffusion"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("stage,preset", [("semantic", "tiny-cogvideox"), ("detail", "tiny-cogvideox"), ("detail", "tiny-wan")])
def test_exact_resume(base, tmp_path, stage, preset, capsys):
    b = base(preset)
    # batch 3 of 8 samples, 2 micro-steps: the data order wraps an epoch mid-run
    argv = ["--stage", stage, "--teacher", b["teacher"]["checkpoint"], "--init", b["semantic"]["checkpoint"],
            "--data", b["data"], "--batch-size", 3, "--grad-accum", 2, "--lr", 1e-3, "--target-ema", 0.9,
            "--save-every", 2, *SMALL, *(LORA if stage == "detail" else [])]
    straight = run(*argv, "--out", tmp_path / "a", "--max-steps", 4)
    run(*argv, "--out", tmp_path / "b", "--max-steps", 2)
    run(*argv, "--out", tmp_path / "b", "--max-steps", 4, "--resume")
    assert "resuming from" in capsys.readouterr().out

    def assert_same():
        a, c = tensors(straight["checkpoint"]), tensors(tmp_path / "b" / "step_0000004")
        assert a.keys() == c.keys() and len(a) > 50
        assert [k for k in a if not torch.equal(a[k], c[k])] == []
        losses = [[r["loss"] for r in read_jsonl(tmp_path / x / "log.jsonl")] for x in "ab"]
        assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert_same()
    # a finished run resumed again is a no-op that reports its last logged step
    again = run(*argv, "--out", tmp_path / "b", "--max-steps", 4, "--resume")
    assert again["step"] == 4 and again["losses"] == read_jsonl(tmp_path / "b" / "log.jsonl")[-1]
    # a truncated newest checkpoint is skipped, by name, and the run redone from the one before
    victim = "train_state.pt" if stage == "detail" else "transformer/diffusion_pytorch_model.safetensors"
    with open(tmp_path / "b" / "step_0000004" / victim, "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    run(*argv, "--out", tmp_path / "b", "--max-steps", 4, "--resume")
    err = capsys.readouterr().err
    assert "skipping incomplete or damaged checkpoint" in err and "step_0000004" in err
    assert_same()


def test_torchrun_ddp_and_fsdp(base, tmp_path):
    """2 gloo ranks x batch 2 == 1 process x batch 4 (one step), for DDP and FSDP2, detail stage (LoRA, GAN, EMA)."""
    b = base("tiny-cogvideox")
    argv = ["--stage", "detail", "--teacher", b["teacher"]["checkpoint"], "--init", b["semantic"]["checkpoint"],
            "--data", b["data"], "--max-steps", 1, "--lr", 1e-3, "--target-ema", 0.5, *SMALL, *LORA]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_ddp_check.py"), str(tmp_path), *map(str, argv), "--batch-size", "2"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one = run(*argv, "--batch-size", 4, "--out", tmp_path / "one")
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the ranks end identical
    ref = tensors(one["checkpoint"])
    for mode in ("ddp", "fsdp"):
        row = read_jsonl(tmp_path / mode / "log.jsonl")[0]
        for k in ("loss", "cd", "gan_g", "fm", "d", "grad_norm", "d_grad_norm"):
            assert row[k] == pytest.approx(one["losses"][k], rel=1e-4), (mode, k)
        got = tensors(tmp_path / mode / "step_0000001")
        weights = [k for k in ref if k.startswith(("detail", "train_state.pt/ema", "train_state.pt/disc"))]
        assert len(weights) > 20
        for k in weights:  # one AdamW step moves a weight by <= lr; a sync error would flip whole signs
            assert torch.allclose(got[k], ref[k], atol=2e-4, rtol=0), (mode, k, (got[k] - ref[k]).abs().max())


def cli(monkeypatch, *argv):
    """train.py's command line in-process: its exit status (the message is on stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        train.cli()
    return e.value.code


def test_bad_input(base, tmp_path, monkeypatch, capsys):
    b, h = base("tiny-cogvideox"), make_dataset(tmp_path / "hdata", "tiny-hunyuan")
    teacher = b["teacher"]["checkpoint"]
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(teacher, "transformer"), broken)
    with open(broken / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.truncate(200)
    incomplete = tmp_path / "incomplete" / "step_0000005"
    shutil.copytree(teacher, incomplete)
    os.remove(incomplete / "train_state.pt")
    cases = {
        "neither a preset": ["--stage", "teacher", "--config", "no-such-model", "--data", b["data"]],
        "does not fit model": ["--stage", "teacher", "--config", "tiny-cogvideox", "--data", h],
        "needs --init": ["--stage", "detail", "--teacher", teacher, "--data", b["data"]],
        "needs --teacher": ["--stage", "semantic", "--data", b["data"]],
        "cannot load": ["--stage", "semantic", "--teacher", broken, "--data", b["data"], "--out", tmp_path / "x"],
        "no complete checkpoint": ["--stage", "teacher", "--init", teacher, "--data", b["data"], "--out",
                                   incomplete.parent, "--resume"],
        "already holds checkpoints": ["--stage", "teacher", "--init", teacher, "--data", b["data"], "--out",
                                      b["teacher"]["out"]],
        "is not a dataset": ["--stage", "teacher", "--config", "tiny-cogvideox", "--data", tmp_path],
    }
    for want, argv in cases.items():
        assert cli(monkeypatch, *argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after a warning naming a skipped checkpoint)
        assert err.startswith("error: ") and want in err, (want, err)
    assert cli(monkeypatch, "--stage", "bogus") == 2 and "invalid choice" in capsys.readouterr().err
    # the real command line: one line on stderr, exit 2 (bad input, as argparse), no traceback
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "detail", "--data", b["data"]],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr


def test_nan_stops_and_keeps_last_good_checkpoint(base, tmp_path, monkeypatch):
    b = base("tiny-cogvideox")
    argv = ["--stage", "semantic", "--teacher", b["teacher"]["checkpoint"], "--data", b["data"], "--out", tmp_path,
            "--max-steps", 4, "--save-every", 2, "--batch-size", 2, *SMALL]
    monkeypatch.setenv("DCM_TRAIN_NAN_AT_STEP", "3")
    with pytest.raises(checks.RunFailed, match=r"non-finite .* at step 3.*step_0000002"):
        run(*argv)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step")) == ["step_0000002"]
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2]
    good = tensors(tmp_path / "step_0000002")
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())
    monkeypatch.delenv("DCM_TRAIN_NAN_AT_STEP")
    assert run(*argv, "--resume")["step"] == 4  # the kept checkpoint is a working one


def test_dry_run_full_size_on_meta():
    r = run("--stage", "detail", "--config", "hunyuan-video", "--init", "unused", "--dry-run", "--dtype", "bf16",
            "--fsdp", "--world-size", "24", "--batch-size", 1)
    assert r["teacher"] == pytest.approx(12.821e9, rel=1e-3) and r["world"] == 24
    assert 0 < r["trainable"] < 0.05 * r["params"] and r["disc"] > 0
    assert r["memory"]["teacher (bf16)"] == pytest.approx(2 * r["teacher"] / 24)
    r = run("--stage", "semantic", "--config", "hunyuan-video", "--dry-run", "--world-size", "1")
    assert r["trainable"] == r["params"] == r["teacher"]
    assert r["memory"]["AdamW states (fp32)"] == 8 * r["params"]


def test_d_lr_and_betas_reach_the_optimizer_and_the_training_signals_are_logged(base, tmp_path):
    """--d-lr / --d-betas set the discriminator's AdamW; every step logs D's loss and accuracy, probe steps each
    generator term's gradient norm at the student's output."""
    b = base("tiny-hunyuan")
    r = run("--stage", "detail", "--teacher", b["teacher"]["checkpoint"], "--init", b["semantic"]["checkpoint"],
            "--data", b["data"], "--max-steps", 1, "--batch-size", 2, "--d-lr", 3e-4, "--d-betas", 0.5, 0.9,
            "--out", tmp_path / "d", *SMALL, *LORA)
    state = torch.load(os.path.join(r["checkpoint"], "train_state.pt"), weights_only=False)
    assert [(g["lr"], tuple(g["betas"])) for g in state["d_opt"]["param_groups"]] == [(3e-4, (0.5, 0.9))]
    row = read_jsonl(tmp_path / "d" / "log.jsonl")[0]
    assert row["d"] > 0 and 0 <= row["d_acc_real"] <= 1 and 0 <= row["d_acc_fake"] <= 1
    assert {"gn_cd", "gn_gan_g", "gn_fm"} <= set(row) and min(row["gn_cd"], row["gn_gan_g"], row["gn_fm"]) > 0
    default = train.parse_args(["--stage", "detail", "--teacher", "t", "--init", "i", "--data", "d"])
    assert (default.d_lr, tuple(default.d_betas)) == (train.d_lr, train.d_betas)


def test_flow_teacher_without_guidance_input_trains_with_condition_dropout(tmp_path):
    """--cond-drop reaches a flow model with no guidance input (the toy's CFG teacher): dropping every condition
    trains bit-identically to the same data with every condition replaced by the dataset's uncond."""
    from toy import data as toy_data
    b, un = toy_data.make_batch(4, seed=0), toy_data.uncond()

    def write(d, cond):
        write_shard(d, 0, {"latents": b["latents"], **cond})
        write_manifest(d, model="toy", latent_shape=list(b["latents"].shape[1:]), vae_scaling_factor=1.0,
                       shards=[{"file": shard_name(0), "num": 4}], uncond=un)
        return str(d)
    real = write(tmp_path / "real", {"text": b["text"], "pooled": b["pooled"]})
    empty = write(tmp_path / "empty", {k: v.expand(4, *v.shape[1:]).clone() for k, v in un.items()})
    argv = ["--config", os.path.join(ROOT, "toy", "config.json"), "--stage", "teacher", "--max-steps", 2, "--batch-size",
            2, "--lr", 1e-3, "--probe-every", 0, "--save-every", 0, "--device", "cpu", "--shift", 3]
    out = {name: run(*argv, "--data", d, "--cond-drop", p, "--out", tmp_path / name)
           for name, d, p in (("dropped", real, 1.0), ("empty", empty, 0.0), ("kept", real, 0.0))}
    loss = {n: [r["diffusion"] for r in read_jsonl(tmp_path / n / "log.jsonl")] for n in out}
    assert loss["dropped"] == loss["empty"] != loss["kept"]
    w = {n: tensors(os.path.join(r["checkpoint"], "transformer")) for n, r in out.items()}
    assert all(torch.equal(w["dropped"][k], w["empty"][k]) for k in w["empty"])


def test_dist_timeout_reaches_the_process_group(base, tmp_path, monkeypatch):
    """--dist-timeout (minutes) is the timeout of the group train.py makes (here --fsdp's 1-process group)."""
    import datetime

    from scale import parallel
    b, seen, real = base("tiny-cogvideox"), [], parallel.dist.init_process_group
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda *a, **k: (seen.append(k.get("timeout")), real(*a, **k)))
    run("--stage", "teacher", "--init", b["teacher"]["checkpoint"], "--data", b["data"], "--out", tmp_path / "r",
        "--max-steps", 1, "--fsdp", "--dist-timeout", 7.5, *SMALL)
    assert seen == [datetime.timedelta(minutes=7.5)]


def test_fsdp_grad_accum_holds_only_shards(base, tmp_path):
    """--fsdp --grad-accum 2 on 2 gloo ranks: between micro-steps each rank holds at most its local shard of the
    gradients (FSDP2 reduce-scatters every micro-step; without that sync it kept the whole model's, 2x here), and the
    run equals 1 process on the whole batch (2 ranks x batch 1 x 2 micro-steps = batch 4)."""
    from test_train_sp import assert_close, assert_losses
    b = base("tiny-cogvideox")
    argv = ["--stage", "semantic", "--teacher", b["teacher"]["checkpoint"], "--data", b["data"], "--max-steps", 2,
            "--lr", 1e-3, *SMALL]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_fsdp_accum_check.py"), str(tmp_path), *map(str, argv), "--fsdp",
           "--grad-accum", "2", "--batch-size", "1"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        with open(tmp_path / f"rank{r}.json") as f:
            got = json.load(f)
        assert 0 < got["held"] <= got["shard"], got
    one = run(*argv, "--batch-size", 4, "--out", tmp_path / "one")
    assert_losses(tmp_path / "run", one["out"], ["loss", "cd", "tc", "grad_norm"])
    assert_close(tmp_path / "run" / "step_0000002", one["checkpoint"], "fsdp grad accum")


def test_rank_0_decides_the_resume(base, tmp_path):
    """2 gloo ranks: rank 0 alone verifies the checkpoint it resumes from (the others read it without re-hashing),
    and a rank that cannot read rank 0's choice makes every rank fail with the same one-line error instead of going
    on from its own view (start fresh, another step) and hanging at the first collective."""
    b = base("tiny-cogvideox")
    argv = ["--stage", "semantic", "--teacher", b["teacher"]["checkpoint"], "--data", b["data"], "--lr", 1e-3,
            "--batch-size", 2, *SMALL]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_resume_view_check.py"), str(tmp_path), *map(str, argv)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["verified"] >= 1 and r1["verified"] == 0
    assert r0["error"] == r1["error"] and "rank 1 cannot read" in r0["error"] and "step_0000002" in r0["error"]


@pytest.mark.parametrize("real", ["target", "data", "teacher"])
def test_gan_real_side(base, tmp_path, monkeypatch, real):
    """--gan-real: the GAN's real sample is the consistency target (paper eq. 9), the step's training latents, or the
    teacher's own solution from the same x_k (neither of the other two)."""
    import losses
    b, seen = base("tiny-cogvideox"), {}
    step, adv = losses.consistency_step, losses.adversarial_terms

    def spy_step(*a, **k):
        out = step(*a, **k)
        seen.setdefault("x0", a[5]), seen.setdefault("x_tgt", out[2])  # the training step's (probes come after)
        return out

    def spy_adv(*a, **k):
        seen["real"] = a[2]
        return adv(*a, **k)
    monkeypatch.setattr(losses, "consistency_step", spy_step)
    monkeypatch.setattr(losses, "adversarial_terms", spy_adv)
    run("--stage", "detail", "--teacher", b["teacher"]["checkpoint"], "--init", b["semantic"]["checkpoint"], "--data",
        b["data"], "--out", tmp_path / "o", "--max-steps", 1, "--gan-real", real, *SMALL, *LORA)
    same = {k: torch.equal(seen["real"], seen[k]) for k in ("x0", "x_tgt")}
    assert same == {"x0": real == "data", "x_tgt": real == "target"} and seen["real"].isfinite().all()
