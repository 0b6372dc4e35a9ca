"""DCM on a two-expert teacher (Wan2.2-A14B-style tiny twin, DESIGN.md section 12): kappa at the teacher's boundary,
the semantic stage distils the high-noise expert alone and the detail stage puts its adapter on the low-noise expert,
which is its teacher too (no second copy); resume is exact; sample.py routes the two students' experts; sample.py
--teacher switches the teacher's experts with the release's settings."""
import json
import os

import pytest
import torch

import data
import experts
import model
import sample
import sampling
import solver
from storage import checkpoint, latents
from test_one_gpu import randomize
from test_train import LORA, SMALL, make_dataset, run, tensors

N = 8  # grid: with shift 12, t = 1000, 988, 973, 952, 923, 878 | 800, 0.6 -> kappa 1 below the boundary 875


def two_expert_folder(root, preset="tiny-wan", boundary=0.875):
    """A diffusers pipeline folder with two random experts (transformer/ high-noise, transformer_2/ low-noise)."""
    for i, sub in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(10 + i)
        m = model.build_transformer(preset)
        randomize(m, seed=10 + i)
        checkpoint.save_transformer(m, root / sub)
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                   "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": boundary}, f)
    return root


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    teacher = two_expert_folder(root / "A14B")
    d = make_dataset(root / "data", "tiny-wan", shape=(2, 4, 4))
    common = ["--teacher", teacher, "--data", d, "--batch-size", 2, "--lr", 1e-3, "--grid-steps", N, *SMALL]
    sem = run("--stage", "semantic", *common, "--out", root / "sem", "--max-steps", 2)
    det = ["--stage", "detail", "--init", root / "sem", *common, *LORA]
    return root, teacher, d, common, sem, det


def test_kappa_at_the_boundary_and_the_semantic_stage_distils_the_high_noise_expert(moe, tmp_path):
    """Defaults from the release (shift 12, CFG 4 / 3), kappa = the last grid point below t = 875; the semantic run
    equals the same run on the high-noise expert alone as a one-expert teacher, bit for bit."""
    root, teacher, d, common, sem, _ = moe
    cfg = json.load(open(root / "sem" / "config.json"))
    grid = solver.flow_grid(N, 12.0)
    assert (cfg["shift"], cfg["guidance"], cfg["guidance_2"], cfg["kappa"]) == (12.0, 4.0, 3.0, 1)
    assert grid.t[cfg["kappa"] + 1] < 875 <= grid.t[cfg["kappa"] + 2]
    one = run("--stage", "semantic", "--teacher", teacher / "transformer", "--data", d, "--batch-size", 2, "--lr", 1e-3,
              "--grid-steps", N, "--shift", 12, "--guidance", 4, "--kappa", 1, *SMALL, "--out", tmp_path / "one",
              "--max-steps", 2)
    a, b = tensors(sem["checkpoint"]), tensors(one["checkpoint"])
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_detail_stage_is_an_adapter_on_the_low_noise_expert_which_is_its_teacher(moe, tmp_path):
    """The detail run equals the existing detail stage given the low-noise expert both as its base (--init) and as
    a separate teacher copy, with the release's low-noise CFG: the adapter trained on it and against it. Its step
    folders hold the adapter only; resume is exact."""
    root, teacher, d, common, _, det = moe
    full = run(*det, "--out", tmp_path / "det", "--max-steps", 2)
    assert sorted(os.listdir(full["checkpoint"])) == ["checksums.json", "config.json", "detail.safetensors",
                                                      "optimizer.safetensors", "train_state.pt"]
    low = teacher / "transformer_2"
    ref = run("--stage", "detail", "--init", low, "--teacher", low, "--data", d, "--batch-size", 2, "--lr", 1e-3,
              "--grid-steps", N, "--shift", 12, "--guidance", 3, "--kappa", 1, *SMALL, *LORA, "--out", tmp_path / "ref",
              "--max-steps", 2)
    a, b = tensors(full["checkpoint"]), tensors(ref["checkpoint"])
    a = {k: v for k, v in a.items() if k.startswith(("detail.safetensors", "train_state.pt"))}
    assert len(a) > 20 and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert full["losses"]["gan_g"] > 0 and full["losses"]["fm"] > 0
    run(*det, "--out", tmp_path / "res", "--max-steps", 1)
    run(*det, "--out", tmp_path / "res", "--max-steps", 2, "--resume")
    c = tensors(tmp_path / "res" / "step_0000002")
    assert [k for k in a if not torch.equal(a[k], c[k])] == []


@pytest.mark.parametrize("semantic_lora", [0, 4], ids=["full-semantic", "lora-semantic"])
def test_sample_routes_the_semantic_expert_and_the_adapted_low_noise_expert(moe, semantic_lora, tmp_path):
    """sample.py on a detail step: t > boundary_t -> the semantic run's expert, t <= boundary_t -> the low-noise
    expert + the detail adapter, on 4 points (2 each side) = the same loop over the experts built by hand."""
    root, teacher, d, common, _, det = moe
    argv = ["--semantic-lora", semantic_lora] if semantic_lora else []
    sem_out = root / "sem" if not semantic_lora else tmp_path / "sem"
    if semantic_lora:
        run("--stage", "semantic", *common, *argv, "--out", sem_out, "--max-steps", 2)
    out = run(*[sem_out if a == root / "sem" else a for a in det], *argv, "--out", tmp_path / "det",
              "--max-steps", 2)["checkpoint"]
    if semantic_lora:  # each stage holds its expert's adapter only: the bases are the teacher's two experts
        assert "semantic.safetensors" in os.listdir(sem_out / "step_0000002")
    m, info = sampling.load_student(out)
    assert info["mode"] == "dual" and isinstance(m, sampling.Routed) and info["boundaries"] == [1]
    src = checkpoint.resolve(sem_out)
    semantic = sampling.load_backbone(src, torch.float32, "cpu")
    low = experts.DualExpert.from_detail(checkpoint.load_transformer(teacher / "transformer_2"),
                                         os.path.join(out, "detail.safetensors"))
    got = sample.main([str(a) for a in ["--ckpt", out, "--steps", 4, "--num", 2, "--frames", 2, "--height", 4, "--width", 4,
                                         "--cond", os.path.join(d, "uncond.safetensors"), "--out", tmp_path / "s"]])["latents"]
    grid = info["grid"]
    t, alpha, sigma = solver.sample_points(grid, solver.student_schedule(grid, [1], 4))
    assert (t[:-1] > info["boundary_t"]).sum() == 2  # two semantic, two detail steps
    noise = torch.randn((2, 16, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    cond = {"text": latents.load_cond(os.path.join(d, "uncond.safetensors"))["text"].expand(2, -1, -1)}
    fn = lambda x, tt: (low if tt[0] <= info["boundary_t"] else semantic)(x, tt, **cond)  # noqa: E731
    with torch.no_grad():
        want = solver.sample(fn, noise, t, alpha, sigma, "flow", progress=False)
    assert float((got - want).abs().max()) < 1e-5


def test_sample_teacher_switches_the_experts_with_the_release_settings(moe, tmp_path, capsys):
    """sample.py --teacher on the two-expert folder: the release's N = 40, shift 12, CFG 4.0 / 3.0 and boundary."""
    _, teacher, *_ = moe
    m, info = sampling.load_student(teacher, teacher=True)
    assert info["grid"].N == 40 and info["boundary_t_teacher"] == 875.0 and info["run"]["guidance_2"] == 3.0
    assert torch.equal(info["grid"].t, solver.flow_grid(40, 12.0).t)
    low = checkpoint.load_transformer(teacher / "transformer_2")
    assert all(torch.equal(a, b) for a, b in zip(info["model_2"].state_dict().values(), low.state_dict().values()))


# --- image-to-video tiny twins: Wan2.1-I2V (image embeds), Wan2.2-I2V-A14B (two experts), TI2V-5B (first frame)
I2V = [("tiny-wan-i2v", None), ("tiny-wan2.2-i2v", 0.9), ("tiny-wan2.2-ti2v", None)]


def i2v_setup(root, preset, boundary):
    d = root / "data"
    data.synthetic_dataset(preset, d, num=4, frames=3, height=4, width=4, image_cond=preset.endswith("ti2v"))
    if boundary:
        teacher = two_expert_folder(root / "teacher", preset, boundary)
    else:
        torch.manual_seed(10)
        m = model.build_transformer(preset)
        randomize(m, seed=10)
        checkpoint.save_transformer(m, root / "teacher")
        teacher = root / "teacher"
    return d, ["--teacher", teacher, "--data", d, "--batch-size", 2, "--lr", 1e-3, "--grid-steps", N, *SMALL]


@pytest.mark.parametrize("preset,boundary", I2V, ids=[p for p, _ in I2V])
def test_image_to_video_dcm_semantic_detail_resume_sample(preset, boundary, tmp_path):
    """Both stages train on the image condition, resume exactly; the student samples with it (TI2V: the given
    frame is the first latent frame), and another image gives another video."""
    d, common = i2v_setup(tmp_path, preset, boundary)
    run("--stage", "semantic", *common, "--out", tmp_path / "sem", "--max-steps", 2)
    det = ["--stage", "detail", "--init", tmp_path / "sem", *common, *LORA]
    full = run(*det, "--out", tmp_path / "det", "--max-steps", 2)
    run(*det, "--out", tmp_path / "res", "--max-steps", 1)
    run(*det, "--out", tmp_path / "res", "--max-steps", 2, "--resume")
    a, b = tensors(full["checkpoint"]), tensors(tmp_path / "res" / "step_0000002")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    m, info = sampling.load_student(full["checkpoint"])
    ds = latents.LatentDataset(d)
    cond = {k: ds.tensors[k][:2] for k in latents.check_fits(info["cfg"], ds.tensors)}
    assert "image_latents" in cond
    pts = sampling.points(info, 4)[:3]
    noise = torch.randn(2, *ds.manifest["latent_shape"], generator=torch.Generator().manual_seed(0))
    x, _ = sampling.generate(m, info, noise, cond, pts, progress=False)
    other = dict(cond, image_latents=cond["image_latents"].flip(0))
    y, _ = sampling.generate(m, info, noise, other, pts, progress=False)
    assert not torch.allclose(x, y)
    if preset.endswith("ti2v"):
        assert torch.equal(x[:, :, :1], cond["image_latents"])


def test_ti2v_losses_act_on_the_generated_frames_only():
    """Under a first-frame condition the CD loss (and the TC loss on losses.generated) ignore the student's output
    at the clean frame; they see every other frame."""
    import losses
    from teacher import Teacher
    cfg = model.PRESETS["tiny-wan2.2-ti2v"]
    torch.manual_seed(0)
    net = model.build_transformer(cfg)
    grid = solver.flow_grid(N, 5.0)
    x0, eps = torch.randn(2, 48, 3, 4, 4), torch.randn(2, 48, 3, 4, 4)
    cond = {"text": torch.randn(2, 6, 32), "image_latents": torch.randn(2, 48, 1, 4, 4)}
    teacher = Teacher(net, grid, 1.0)

    def moved(frame):
        def student(x, t, **c):
            v = net(x, t, **c)
            return v + 10.0 * (torch.arange(v.shape[2]) == frame).view(1, 1, -1, 1, 1)
        return student
    k = torch.tensor([5, 3])
    base, xhat, x_tgt, _ = losses.consistency_step(net, net, teacher, grid, [1], x0, eps, k, cond, cond)
    for frame, same in ((0, True), (1, False)):
        l, xh, xt, _ = losses.consistency_step(moved(frame), net, teacher, grid, [1], x0, eps, k, cond, cond)
        assert torch.equal(l, base) == same
        tc = losses.temporal_coherence_loss(*losses.generated(cond, xh, xt), d=1)
        assert torch.equal(tc, losses.temporal_coherence_loss(*losses.generated(cond, xhat, x_tgt), d=1)) == same


@pytest.mark.parametrize("preset", ["tiny-wan-i2v", "tiny-wan2.2-ti2v"])
def test_sp2_equals_one_process_for_an_image_to_video_preset(preset, tmp_path):
    """--sp 2 (2 gloo ranks), both stages, on the Wan2.1-I2V twin (concatenated condition + image embeds) and the
    TI2V twin (first frame: per-token modulation sharded with the tokens)."""
    from test_train_sp import assert_close, assert_losses, torchrun
    d, common = i2v_setup(tmp_path, preset, None)
    sem = ["--stage", "semantic", *common, "--w-tc", 1.0]
    run(*sem, "--out", tmp_path / "sem", "--max-steps", 2)
    det = ["--stage", "detail", "--init", tmp_path / "sem", *common, *LORA]
    run(*det, "--out", tmp_path / "det", "--max-steps", 2)
    torchrun(2, [["train", *sem, "--sp", 2, "--out", tmp_path / "sem2", "--max-steps", 2],
                 ["train", *det, "--sp", 2, "--out", tmp_path / "det2", "--max-steps", 2]], tmp_path)
    for name, keys in (("sem", ["loss", "cd", "tc", "grad_norm"]), ("det", ["loss", "cd", "gan_g", "fm", "grad_norm"])):
        assert_losses(tmp_path / f"{name}2", tmp_path / name, keys)
        assert_close(tmp_path / f"{name}2" / "step_0000002", tmp_path / name / "step_0000002", name)


def test_export_of_a_two_expert_run(moe, tmp_path, capsys):
    """export.py diffusers: transformer/ = the run's semantic expert (its --init), transformer_2/ = the low-noise expert
    with the detail adapter merged (= the student's detail path); the authors' one-backbone layout is refused."""
    import export
    from diffusers import WanTransformer3DModel
    root, teacher, d, common, _, det = moe
    out = run(*det, "--out", tmp_path / "det", "--max-steps", 1)["checkpoint"]
    w = tmp_path / "weights"  # the folders export.py copies (their contents are not read here)
    for sub, conf in (("text_encoder", {"architectures": ["UMT5EncoderModel"]}),
                      ("tokenizer", {"tokenizer_class": "T5TokenizerFast"}), ("vae", {"_class_name": "AutoencoderKLWan"})):
        os.makedirs(w / sub)
        json.dump(conf, open(w / sub / ("tokenizer_config.json" if sub == "tokenizer" else "config.json"), "w"))
    export.main(["diffusers", "--ckpt", str(out), "--out", str(tmp_path / "pipe"), "--weights", str(w)])
    m, info = sampling.load_student(out)
    x = torch.randn(2, 16, 2, 4, 4)
    cond = {"text": torch.randn(2, 6, 32)}
    for sub, t in (("transformer", 950.0), ("transformer_2", 500.0)):
        ref = WanTransformer3DModel.from_pretrained(tmp_path / "pipe" / sub).eval()
        tt = torch.full((2,), t)
        with torch.no_grad():
            want, got = ref(x, tt, cond["text"], return_dict=False)[0], m(x, tt, **cond)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, sub
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export.main(["authors", "--ckpt", str(out), "--out", str(tmp_path / "authors")])
    assert "this student has two" in capsys.readouterr().err


def test_fsdp_equals_one_process_on_a_two_expert_teacher(moe, tmp_path):
    """--fsdp on 2 gloo ranks (batch 1 each) = one process on the batch of 2, both stages: each shards the one
    expert it holds (the detail stage its adapter's base, which is also its teacher); a resumed FSDP run (the
    optimizer state read by rank 0 and sent: rank 1 fails if it reads it) = the uninterrupted one, bit for bit."""
    from test_train_sp import assert_close, assert_losses, torchrun
    root, teacher, d, common, _, det = moe
    run(*det, "--out", tmp_path / "det", "--max-steps", 2)
    torchrun(2, [["train", "--stage", "semantic", *common, "--fsdp", "--batch-size", 1, "--out", tmp_path / "sem2",
                  "--max-steps", 2],
                 ["train", *det, "--fsdp", "--batch-size", 1, "--out", tmp_path / "det2", "--max-steps", 2],
                 ["train", *det, "--fsdp", "--batch-size", 1, "--out", tmp_path / "det_res", "--max-steps", 1],
                 ["train-opt-on-rank0", *det, "--fsdp", "--batch-size", 1, "--out", tmp_path / "det_res", "--max-steps",
                  2, "--resume"]], tmp_path)
    a, b = tensors(tmp_path / "det2" / "step_0000002"), tensors(tmp_path / "det_res" / "step_0000002")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # resumed under FSDP (optimizer sent from rank 0)
    for got, ref, keys in ((tmp_path / "sem2", root / "sem", ["loss", "cd", "grad_norm"]),
                           (tmp_path / "det2", tmp_path / "det", ["loss", "cd", "gan_g", "fm", "grad_norm"])):
        assert_losses(got, ref, keys)
        assert_close(got / "step_0000002", ref / "step_0000002", got.name)


def test_bad_input_on_a_two_expert_teacher(moe, tmp_path, monkeypatch, capsys):
    """One line each, before any model loads: validation samples of the detail stage (its semantic expert is not
    loaded), a --kappa that makes an FSDP stage need both experts."""
    from test_robust import train_err
    root, teacher, d, common, _, det = moe
    err = train_err(monkeypatch, capsys, [str(a) for a in [*det, "--sample-every", 1, "--out", tmp_path / "a"]])
    assert "--sample-every on a two-expert teacher's detail stage" in err
    err = train_err(monkeypatch, capsys, [str(a) for a in [*det, "--kappa", 3, "--fsdp", "--out", tmp_path / "b"]])
    assert "cross the teacher's expert boundary" in err
