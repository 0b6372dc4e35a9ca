"""sample.py: the few-step schedule and the expert at each step, determinism, the 1-step and teacher
reductions, pixel-space videos, and clear one-line errors for bad input.

The distilled checkpoints come from 1-step train.py runs on tiny-hunyuan (teacher -> semantic ->
detail, and the ablation OD), so this also checks that sample.py reads what train.py writes; the
detail adapter is then overwritten with a random one so that the detail path visibly differs.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from storage import checkpoint
import experts
from storage import integrity, latents
import model as models
import sample
import sampling
import solver
import train
from teacher import Teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAT = [16, 2, 4, 4]  # tiny latents [C, F, H, W]
SIZE = ["--frames", "2", "--height", "4", "--width", "4"]


def tiny_dataset(folder, n=4, L=6):
    cfg = models.PRESETS["tiny-hunyuan"]
    g = torch.Generator().manual_seed(0)
    latents.write_shard(folder, 0, {"latents": torch.randn(n, *LAT, generator=g),
                                    "text": torch.randn(n, L, cfg.text_embed_dim, generator=g),
                                    "text_mask": torch.ones(n, L, dtype=torch.long),
                                    "pooled": torch.randn(n, cfg.pooled_projection_dim, generator=g)})
    uncond = {"text": torch.zeros(1, L, cfg.text_embed_dim), "text_mask": torch.ones(1, L, dtype=torch.long),
              "pooled": torch.zeros(1, cfg.pooled_projection_dim)}
    latents.write_manifest(folder, model="tiny-hunyuan", latent_shape=LAT, vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(0), "num": n}], uncond=uncond)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """teacher/, sem/, det/ (LoRA adapter, randomised) and od/ (ablation OD) from 1-step train.py runs."""
    root = tmp_path_factory.mktemp("runs")
    p = {k: str(root / k) for k in ("ds", "teacher", "sem", "det", "od")}
    tiny_dataset(p["ds"])
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer("tiny-hunyuan"), p["teacher"])
    common = ["--teacher", p["teacher"], "--data", p["ds"], "--max-steps", "1", "--device", "cpu", "--probe-every", "0"]
    train.main(["--stage", "semantic", "--out", p["sem"], *common])
    init = ["--init", os.path.join(p["sem"], "step_0000001"), "--lora-rank", "4", "--disc-hidden", "32", "--w-gan", "0",
            "--w-fm", "0"]
    train.main(["--stage", "detail", "--out", p["det"], *init, *common])
    train.main(["--stage", "detail", "--detail-full", "--out", p["od"], *init[:2], *init[4:], *common])  # OD: no LoRA rank
    # a 1-step LoRA is ~0: make the detail path really differ from the semantic one
    step = os.path.join(p["det"], "step_0000001")
    expert = experts.DualExpert.from_detail(checkpoint.load_transformer(os.path.join(step, "transformer")),
                                            os.path.join(step, "detail.safetensors"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in [*expert.lora.parameters(), *expert.copies.parameters()]:
            prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    meta = experts.DualExpert.read_detail_meta(os.path.join(step, "detail.safetensors"))
    expert.save_detail(os.path.join(step, "detail.safetensors"), {"kappa": meta["kappa"]})
    integrity.write_checksums(step)  # an intended change: record it, or the step counts as corrupted
    return p


def run(tmp_path, *argv):
    return sample.main([*argv, "--out", str(tmp_path / "out"), *SIZE])


def noise(n=1, seed=0, shape=LAT):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def manual(models_per_step, ks, x, cond, grid):
    """Student sampling written out: model i at grid point ks[i], Euler jump to the next point, then to 0."""
    t, alpha, sigma = solver.sample_points(grid, ks)
    with torch.no_grad():
        for i, m in enumerate(models_per_step):
            tb, g = torch.full((x.shape[0],), float(t[i])), torch.full((x.shape[0],), 6016.0)
            v = m(x, tb, guidance=g, **cond)
            x = solver.ode_step(x, v, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], grid.kind)
    return x


def uncond_of(runs, n=1):
    u = latents.load_cond(os.path.join(runs["ds"], "uncond.safetensors"))
    return {k: v.expand(n, *v.shape[1:]) for k, v in u.items()}


def test_authors_4_step_schedule_and_the_expert_at_each_step(runs, tmp_path):
    s = run(tmp_path, "--ckpt", runs["det"], "--steps", "4", "--no-merge")
    torch.testing.assert_close(torch.tensor(s["sigmas"], dtype=torch.float64), torch.tensor([1.0, 0.9920, 0.9818, 0.9124, 0.0],
                                                                      dtype=torch.float64), atol=5e-5, rtol=0)
    assert s["experts"] == ["semantic", "semantic", "detail", "detail"]
    assert s["grid_indices"] == [49, 43, 37, 18] and s["mode"] == "dual"
    step = os.path.join(runs["det"], "step_0000001")
    assert os.path.samefile(s["ckpt"], step)  # the run folder resolves to its newest complete step
    expert = experts.DualExpert.from_detail(checkpoint.load_transformer(os.path.join(step, "transformer")),
                                            os.path.join(step, "detail.safetensors")).eval()
    grid, sem, det = solver.flow_grid(50, 17.0), expert.backbone, expert.detail
    want = manual([sem, sem, det, det], s["grid_indices"], noise(), uncond_of(runs), grid)
    assert torch.equal(s["latents"], want)
    wrong = manual([sem] * 4, s["grid_indices"], noise(), uncond_of(runs), grid)
    assert (s["latents"] - wrong).abs().max() > 1e-3  # the detail path matters: routing is really tested
    # what is stored: latents + metadata
    meta = json.loads(json.dumps({k: s[k] for k in ("seed", "steps", "sigmas", "experts")}))
    from safetensors import safe_open
    with safe_open(s["path"], "pt") as f:
        assert torch.equal(f.get_tensor("latents"), s["latents"])
        assert {k: json.loads(f.metadata()[k]) for k in meta} == meta
    merged = run(tmp_path, "--ckpt", runs["det"], "--steps", "4")  # default: the LoRA merged once per run
    assert merged["lora_merged"] and not s["lora_merged"]
    # fp32 round-off: measured max abs 1.1e-5 on latents up to |29.4| (a few ulps), with a random rank-4 adapter
    torch.testing.assert_close(merged["latents"], want, rtol=0, atol=5e-5)


def test_adapter_file_next_to_a_backbone_equals_the_step_folder(runs, tmp_path):
    step = os.path.join(runs["det"], "step_0000001")
    a = run(tmp_path, "--ckpt", step, "--steps", "3", "--seed", "5")
    b = run(tmp_path, "--ckpt", os.path.join(step, "transformer"), "--detail", os.path.join(step, "detail.safetensors"),
            "--steps", "3", "--seed", "5", "--cond", os.path.join(runs["ds"], "uncond.safetensors"))
    assert a["experts"] == b["experts"] == ["semantic", "semantic", "detail"]
    assert torch.equal(a["latents"], b["latents"])


def test_same_seed_is_bit_identical_and_independent_of_batching(runs, tmp_path):
    a = run(tmp_path, "--ckpt", runs["det"], "--num", "3", "--seed", "7")
    b = run(tmp_path, "--ckpt", runs["det"], "--num", "3", "--seed", "7")
    assert torch.equal(a["latents"], b["latents"])
    c = run(tmp_path, "--ckpt", runs["det"], "--num", "3", "--seed", "8")
    assert not torch.allclose(a["latents"], c["latents"])
    d = run(tmp_path, "--ckpt", runs["det"], "--num", "3", "--seed", "7", "--batch-size", "2")
    # float32 rounding of differently batched matmuls only: latents reach ~30, a few ulps there are ~1e-5
    torch.testing.assert_close(a["latents"], d["latents"], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(a["latents"][0], a["latents"][1])  # one noise draw per sample


def test_one_step_is_one_student_forward_and_a_jump_to_the_clean_end(runs, tmp_path):
    s = run(tmp_path, "--ckpt", runs["det"], "--steps", "1", "--seed", "3")
    assert s["experts"] == ["semantic"] and s["grid_indices"] == [49] and s["sigmas"] == [1.0, 0.0]
    sem = checkpoint.load_transformer(os.path.join(runs["det"], "step_0000001", "transformer")).eval()
    x = noise(seed=3)
    with torch.no_grad():
        v = sem(x, torch.full((1,), 1000.0), guidance=torch.full((1,), 6016.0), **uncond_of(runs))
    x0, _ = solver.to_x0_eps(x, v, 0.0, 1.0, "flow")  # the clean end: x - sigma * v at sigma = 1
    torch.testing.assert_close(s["latents"], x0, atol=1e-6, rtol=1e-6)


def test_teacher_mode_equals_teacher_sampling(runs, tmp_path):
    cond = {"text": torch.randn(2, 5, 32), "text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "pooled": torch.randn(2, 16)}
    latents.save_cond(cond, str(tmp_path / "cond.safetensors"))
    s = run(tmp_path, "--ckpt", runs["teacher"], "--teacher", "--steps", "6", "--num", "2",
            "--cond", str(tmp_path / "cond.safetensors"))
    assert s["experts"] == ["teacher"] * 6 and s["grid_indices"] == [5, 4, 3, 2, 1, 0]
    ref = Teacher(checkpoint.load_transformer(runs["teacher"]), solver.flow_grid(6, 17.0), 6.0)
    assert ref.mode == "embedded"
    assert torch.equal(s["latents"], ref.sample(noise(2), cond, progress=False))


def test_teacher_mode_with_cfg(tmp_path):
    """CogVideoX: classifier-free guidance with the --uncond file, on the DDIM grid."""
    torch.manual_seed(0)
    m = models.build_transformer("tiny-cogvideox")
    checkpoint.save_transformer(m, str(tmp_path / "cog"))
    cond, uncond = {"text": torch.randn(1, 8, 32)}, {"text": torch.randn(1, 8, 32)}
    latents.save_cond(cond, str(tmp_path / "c.safetensors"))
    latents.save_cond(uncond, str(tmp_path / "u.safetensors"))
    s = sample.main(["--ckpt", str(tmp_path / "cog"), "--teacher", "--steps", "4", "--out", str(tmp_path / "o"),
                     "--cond", str(tmp_path / "c.safetensors"), "--uncond", str(tmp_path / "u.safetensors")])
    assert s["latents"].shape == (1, 4, 3, 6, 8)  # tiny-cogvideox's sample size: 9 frames -> 3 latent, 6 x 8
    ref = Teacher(checkpoint.load_transformer(str(tmp_path / "cog")), solver.grid_for(m.config, 4), 6.0, uncond)
    assert ref.mode == "cfg"
    assert torch.equal(s["latents"], ref.sample(noise(shape=(4, 3, 6, 8)), cond, progress=False))


def test_ablation_od_routes_between_two_separate_models(runs, tmp_path):
    s = run(tmp_path, "--ckpt", runs["od"], "--steps", "4")
    assert s["mode"] == "od" and s["experts"] == ["semantic", "semantic", "detail", "detail"]
    sem = checkpoint.load_transformer(os.path.join(runs["sem"], "step_0000001", "transformer")).eval()
    det = checkpoint.load_transformer(os.path.join(runs["od"], "step_0000001", "transformer")).eval()
    want = manual([sem, sem, det, det], s["grid_indices"], noise(), uncond_of(runs), solver.flow_grid(50, 17.0))
    assert torch.equal(s["latents"], want)


def pixel_checkpoint(folder, stage="vcm"):
    """A toy-like single-student step folder in train.py's layout: 3-channel pixel-space videos."""
    cfg = dataclasses.replace(models.PRESETS["tiny-hunyuan"], in_channels=3, out_channels=3)
    step = os.path.join(folder, "step_0000002")
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer(cfg), os.path.join(step, "transformer"))
    run_cfg = {"stage": stage, "boundaries": [], "grid_steps": 50, "shift": 17.0, "guidance": 6.0, "kappa": 37,
               "model_config": models.config_to_dict(cfg), "prediction": "flow", "pixel_space": True,
               "data_manifest": {"model": "toy", "latent_shape": [3, 4, 8, 8]}}
    latents.atomic_write_json(run_cfg, os.path.join(step, "config.json"))
    return step


def test_pixel_space_model_writes_gif_and_mp4(tmp_path):
    import imageio.v3 as imageio
    import imageio_ffmpeg
    step = pixel_checkpoint(str(tmp_path / "toy"))
    s = sample.main(["--ckpt", str(tmp_path / "toy"), "--steps", "2", "--num", "2", "--out", str(tmp_path / "o")])
    assert s["mode"] == "vcm" and s["experts"] == ["student", "student"] and s["grid_indices"] == [49, 24]
    assert s["latents"].shape == (2, 3, 4, 8, 8) and os.path.samefile(s["ckpt"], step)
    names = sorted(os.path.basename(v) for v in s["videos"])
    assert names == ["sample_000.gif", "sample_000.mp4", "sample_001.gif", "sample_001.mp4"]
    gif = imageio.imread(str(tmp_path / "o" / "sample_001.gif"))  # [F, H, W, 3 or 4]
    assert gif.shape[:3] == (4, 8, 8)
    want = ((s["latents"][1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)  # [F, H, W, 3]
    assert (torch.from_numpy(gif[..., :3].copy()).int() - want.int()).abs().max() <= 8  # GIF palette rounding
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "o" / "sample_000.mp4"))[0] == 4
    # decoding an earlier run's latents writes the same videos again
    os.remove(tmp_path / "o" / "sample_000.gif")
    again = sample.main(["--latents", str(tmp_path / "o" / "latents.safetensors")])
    assert os.path.isfile(tmp_path / "o" / "sample_000.gif") and len(again["videos"]) == 4


def test_latent_model_without_vae_says_how_to_decode_later(runs, tmp_path, capsys):
    s = run(tmp_path, "--ckpt", runs["det"])
    assert s["videos"] == []
    out = capsys.readouterr().out
    assert f"python sample.py --latents {s['path']} --decode WEIGHTS" in out


def fails(capsys, *argv):
    """cli(argv) must exit non-zero with one 'error:' line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        sample.cli(list(argv))
    assert e.value.code not in (0, None)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_bad_input_gives_one_clear_line(runs, tmp_path, capsys):
    assert "does not exist" in fails(capsys, "--ckpt", str(tmp_path / "nope"))
    # a step folder that lost its adapter, and a run folder with no complete step
    part = tmp_path / "part"
    shutil.copytree(runs["det"], part)
    os.remove(part / "step_0000001" / "detail.safetensors")
    assert "incomplete checkpoint" in fails(capsys, "--ckpt", str(part / "step_0000001"))
    assert "detail.safetensors" in fails(capsys, "--ckpt", str(part))
    # conditioning of the wrong width, and latents the patch does not divide
    latents.save_cond({"text": torch.zeros(1, 4, 31), "pooled": torch.zeros(1, 16)}, str(tmp_path / "bad.safetensors"))
    line = fails(capsys, "--ckpt", runs["det"], "--cond", str(tmp_path / "bad.safetensors"))
    assert "text is [1, 4, 31]" in line and "[B, L, 32]" in line
    assert "divisible by the patch" in fails(capsys, "--ckpt", runs["det"], "--height", "3")
    assert "--teacher" in fails(capsys, "--ckpt", runs["teacher"])  # a plain backbone: teacher or adapter?


def test_newest_complete_step_wins(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["det"], out)
    os.makedirs(out / "step_0000005" / "transformer")  # a newer, incomplete step is skipped, saying so
    s = sample.main(["--ckpt", str(out), "--out", str(tmp_path / "o"), *SIZE])
    assert s["ckpt"].endswith("step_0000001")
    assert "skipping incomplete or damaged checkpoint" in capsys.readouterr().err


def test_command_line_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: --ckpt {tmp_path / 'missing'} does not exist"]


def test_run_folder_before_its_first_checkpoint(tmp_path):
    """A run folder holding only the config.json train.py writes before its first save: one line saying so (not
    "damaged or incomplete"), exit status 2, no traceback, nothing written to --out."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = models.config_to_dict(models.PRESETS["tiny-cogvideox"])
    latents.atomic_write_json({"stage": "teacher", "model_config": cfg, "out": str(run)}, str(run / "config.json"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(run), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: --ckpt {run}: no checkpoint yet in this run folder (no step_* folder: the run has not saved a step)"]
    assert not os.path.exists(tmp_path / "o") and sorted(os.listdir(run)) == ["config.json"]


def test_the_latent_size_line_says_where_the_size_came_from(tmp_path, capsys):
    """sample.py prints the latent size it samples and its source: the run's dataset manifest, the flags (all or some),
    or the model's full-size default when no dataset is recorded (the authors' students, a transformer folder)."""
    pixel_checkpoint(str(tmp_path / "toy"))
    argv = ["--ckpt", str(tmp_path / "toy"), "--steps", "1", "--out", str(tmp_path / "o")]
    manifest = "the run's dataset manifest"
    for flags, size, source in (([], [4, 8, 8], manifest),
                                (["--frames", "2", "--height", "4", "--width", "6"], [2, 4, 6], "--frames/--height/--width"),
                                (["--height", "4"], [4, 4, 8], f"--height, the rest from {manifest}")):
        s = sample.main(argv + flags)
        assert f"latent [3, {', '.join(map(str, size))}] from {source}" in capsys.readouterr().out.splitlines()
        assert list(s["latents"].shape[2:]) == size
    wan = {"cfg": models.PRESETS["wan2.1-t2v-1.3b"], "run": {}}  # the authors' Wan student: no run, no dataset
    assert sampling.latent_size(wan) == sampling.WAN_LATENT
    assert capsys.readouterr().out == ("latent [16, 21, 60, 104] from the model's full-size default (no dataset recorded; "
                                       "pass --frames/--height/--width)\n")


def test_points_option_picks_the_schedule(runs, tmp_path, capsys):
    """--points even | proportional | explicit grid indices: solver.student_schedule's rule, sampled as written."""
    grid = solver.flow_grid(50, 17.0)
    for points, want in (("even", [49, 43, 37, 18]), ("proportional", [49, 37, 25, 12])):  # kappa 37: 12 vs 38 points
        s = run(tmp_path, "--ckpt", runs["det"], "--steps", "4", "--points", points)
        assert s["grid_indices"] == want == solver.student_schedule(grid, [37], 4, points)
    s = run(tmp_path, "--ckpt", runs["det"], "--points", "49,40,20", "--no-merge")  # exact: the unmerged LoRA
    assert s["grid_indices"] == [49, 40, 20] and s["steps"] == 3 and s["experts"] == ["semantic", "semantic", "detail"]
    step = os.path.join(runs["det"], "step_0000001")
    expert = experts.DualExpert.from_detail(checkpoint.load_transformer(os.path.join(step, "transformer")),
                                            os.path.join(step, "detail.safetensors")).eval()
    want = manual([expert.backbone, expert.backbone, expert.detail], [49, 40, 20], noise(), uncond_of(runs), grid)
    assert torch.equal(s["latents"], want)
    for bad, msg in ((["--points", "49,x"], "--points"), (["--points", "40,20"], "from N-1"),
                     (["--points", "49,20", "--steps", "3"], "--points")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            sample.cli(["--ckpt", runs["det"], *bad, "--out", str(tmp_path / "bad"), *SIZE])
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: ") and msg in err and "Traceback" not in err, err


def test_wan_end_to_end_student_and_cfg_teacher(tmp_path):
    """tiny-wan through train.py (semantic, then detail with GAN + FM) and sample.py: the authors' Wan cut
    (kappa 34) routes 2 + 2 steps, the latents equal the steps written out; the teacher samples with CFG."""
    cfg, p = models.PRESETS["tiny-wan"], {k: str(tmp_path / k) for k in ("ds", "teacher", "sem", "det")}
    g = torch.Generator().manual_seed(0)
    latents.write_shard(p["ds"], 0, {"latents": torch.randn(4, *LAT, generator=g), "text": torch.randn(4, 6, cfg.text_dim, generator=g)})
    uncond = {"text": torch.randn(1, 6, cfg.text_dim, generator=g)}
    latents.write_manifest(p["ds"], model="tiny-wan", latent_shape=LAT, vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(0), "num": 4}], uncond=uncond)
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer("tiny-wan"), p["teacher"])
    common = ["--teacher", p["teacher"], "--data", p["ds"], "--max-steps", "1", "--device", "cpu", "--probe-every", "0"]
    train.main(["--stage", "semantic", "--out", p["sem"], *common])
    r = train.main(["--stage", "detail", "--out", p["det"], "--init", os.path.join(p["sem"], "step_0000001"),
                    "--lora-rank", "4", "--disc-hidden", "32", "--lr", "1e-2", *common])
    assert {"cd", "gan_g", "fm", "d"} <= set(r["losses"])
    s = run(tmp_path, "--ckpt", p["det"], "--steps", "4", "--no-merge")  # exact: the unmerged LoRA
    assert s["grid_indices"] == [49, 42, 34, 17] and s["experts"] == ["semantic", "semantic", "detail", "detail"]
    step = os.path.join(p["det"], "step_0000001")
    expert = experts.DualExpert.from_detail(checkpoint.load_transformer(os.path.join(step, "transformer")),
                                            os.path.join(step, "detail.safetensors")).eval()
    t, alpha, sigma = solver.sample_points(solver.grid_for(cfg), s["grid_indices"])

    def written_out(trees):
        x = noise()
        with torch.no_grad():  # no guidance input: the student runs without CFG (authors: guidance 1.0 at inference)
            for i, m in enumerate(trees):
                v = m(x, torch.full((1,), float(t[i])), **uncond)
                x = solver.ode_step(x, v, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], "flow")
        return x
    assert torch.equal(s["latents"], written_out([expert.backbone] * 2 + [expert.detail] * 2))
    assert (s["latents"] - written_out([expert.backbone] * 4)).abs().max() > 1e-4  # the trained detail path is used
    # the 50-step teacher with CFG 6 against the dataset's unconditional conditioning
    latents.save_cond({"text": torch.randn(1, 6, cfg.text_dim, generator=g)}, str(tmp_path / "c.safetensors"))
    s = sample.main(["--ckpt", p["teacher"], "--teacher", "--steps", "50", "--out", str(tmp_path / "o"), *SIZE,
                     "--cond", str(tmp_path / "c.safetensors"), "--uncond", os.path.join(p["ds"], "uncond.safetensors")])
    ref = Teacher(checkpoint.load_transformer(p["teacher"]), solver.grid_for(cfg), 6.0, uncond)
    assert ref.mode == "cfg" and len(s["grid_indices"]) == 50
    want = ref.sample(noise(), latents.load_cond(str(tmp_path / "c.safetensors")), progress=False)
    assert torch.equal(s["latents"], want)
