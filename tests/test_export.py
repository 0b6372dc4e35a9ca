"""export.py diffusers: a tiny Wan student trained here, exported as a WanPipeline folder, runs in stock diffusers
with no code of ours; its two transformers are our semantic and merged detail experts; its latents equal sample.py's
on the pipeline's points, and the README's "use a student in diffusers" block runs on it. export.py lora: a stock
pipeline + load_lora_weights(FILE) equals our experts, in diffusers' key layout and in ComfyUI's (original Wan names).
(export.py authors: tests/test_released.py.)"""
import contextlib
import io
import os
import re

import pytest
import torch

import data
import export
import model as models
import sample
import sampling
import train
from test_data_wan import wan_weights  # noqa: F401 - tiny Wan hub folder: vae/ (4 channels), text_encoder/, tokenizer/

PROMPT = "a red square slides to the left"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny Wan (text width 16, 4 latent channels: the tiny umT5 and VAE) teacher, semantic and detail expert."""
    import dataclasses
    root = tmp_path_factory.mktemp("wan_student")
    cfg = dataclasses.replace(models.PRESETS["tiny-wan"], text_dim=16, in_channels=4, out_channels=4)
    torch.manual_seed(0)
    from storage import checkpoint
    checkpoint.save_transformer(models.build_transformer(cfg), str(root / "teacher"))
    g, n, L = torch.Generator().manual_seed(0), 4, 8
    data.write_shard(str(root / "data"), 0, {"latents": torch.randn(n, 4, 2, 4, 4, generator=g),
                                             "text": torch.randn(n, L, 16, generator=g)})
    data.write_manifest(str(root / "data"), model="wan2.1-t2v-1.3b", latent_shape=[4, 2, 4, 4], vae_scaling_factor=1.0,
                        shards=[{"file": data.shard_name(0), "num": n}], uncond={"text": torch.zeros(1, L, 16)})
    common = ["--teacher", str(root / "teacher"), "--data", str(root / "data"), "--device", "cpu", "--probe-every", "0",
              "--max-steps", "2", "--lr", "1e-3", "--batch-size", "2"]
    train.main(["--stage", "semantic", *common, "--out", str(root / "sem")])
    train.main(["--stage", "detail", *common, "--init", str(root / "sem"), "--out", str(root / "det"), "--lora-rank", "4",
                "--disc-hidden", "32"])
    return root


@pytest.fixture(scope="module")
def pipe_folder(student, wan_weights, tmp_path_factory):  # noqa: F811
    """(the student exported by `export.py diffusers`, what it printed): one export for the tests below."""
    out, printed = str(tmp_path_factory.mktemp("wan_pipe") / "pipe"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main(["diffusers", "--ckpt", str(student / "det"), "--weights", wan_weights, "--out", out])
    return out, printed.getvalue()


def test_stock_wan_pipeline_runs_the_exported_student(student, wan_weights, pipe_folder, tmp_path):  # noqa: F811
    from diffusers import WanPipeline
    out, printed = pipe_folder
    assert "WanPipeline, transformer = semantic expert" in printed and "largest difference" in printed
    pipe = WanPipeline.from_pretrained(out)  # stock diffusers, nothing of ours imported by it
    ours, info = sampling.load_student(str(student / "det"))  # the dual expert, LoRA merged below as sample.py does
    ours.merge_lora()
    bt = info["boundary_t"]
    assert pipe.config.boundary_ratio * 1000 > bt
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 8, 16, generator=g)
    for t, theirs in ((bt + 30.0, pipe.transformer), (bt, pipe.transformer_2), (bt - 200.0, pipe.transformer_2)):
        tt = torch.full((2,), t)
        with torch.no_grad():
            want, got = ours(x, tt, text=text), theirs(x, tt, encoder_hidden_states=text, return_dict=False)[0]
        assert float((got - want).abs().max()) <= 1e-5, t
    # the pipeline's own 4 points (it only calls set_timesteps(4)) -> the same latents as sample.py on those points
    latents = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=32, width=32, num_frames=5,  # 8x config
                   output_type="latent", generator=torch.Generator().manual_seed(3)).frames
    sig = pipe.scheduler.sigmas[:-1].tolist()
    argv = ["--ckpt", str(student / "det"), "--weights", wan_weights, "--prompt", PROMPT, "--device", "cpu", "--seed", "3"]
    same = sample.main(argv + ["--sigmas", ",".join(f"{s!r}" for s in sig), "--out", str(tmp_path / "same")])["latents"]
    err = float((same - latents).abs().max())
    own = sample.main(argv + ["--out", str(tmp_path / "own")])["latents"]
    print(f"\nWanPipeline vs sample.py on its points: {err:.1e}; on our own points: {float((own - latents).abs().max()):.3f}"
          f" (values up to {float(latents.abs().max()):.2f})")
    assert latents.shape == (1, 4, 2, 4, 4) and err <= 1e-5


README_BLOCK = "Use a student in diffusers"  # the README heading whose ```python block is run below
# (what the README writes, what runs here): each is found exactly once, so a README of another shape fails this test
README_SUBS = (('"DCM_WAN_PIPE"', None),  # -> the tiny student's exported folder
               ("torch.bfloat16", "torch.float32"),  # a CPU; fp32 so the frames can equal ours to round-off
               ('.to("cuda")', ""),  # a CPU
               ("guidance_scale=1.0)",  # the tiny model's size, and a seed our sampler draws the same noise from
                "guidance_scale=1.0, height=32, width=32, num_frames=5, generator=torch.Generator().manual_seed(3))"))


def test_readme_block_runs_the_student(student, wan_weights, pipe_folder, tmp_path, monkeypatch):  # noqa: F811
    """The README's "use a student in diffusers" block, nothing of ours imported by it, on the exported tiny student:
    its frames equal sample.py's latents on the pipeline's points through the VAE, and its MP4 holds them."""
    import types

    import imageio.v3 as iio
    import numpy as np

    from storage import video_io
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    found = re.search(rf"^#+ {README_BLOCK}\n.*?```python\n(.*?)```", readme, re.S | re.M)
    assert found, f"README.md: no ```python block under a heading '{README_BLOCK}'"
    code = found[1]
    for old, new in README_SUBS:
        assert code.count(old) == 1, f"README.md's {README_BLOCK!r} block: {old!r} is not there exactly once"
        code = code.replace(old, repr(pipe_folder[0]) if new is None else new)
    monkeypatch.chdir(tmp_path)  # the block writes its MP4 into the working folder
    ns = {"__name__": "readme_block"}
    exec(compile(code, f"README.md ({README_BLOCK})", "exec"), ns)
    outside = {k: getattr(v, "__module__", None) or v.__name__ for k, v in ns.items()
               if not k.startswith("__") and isinstance(v, (types.ModuleType, type, types.FunctionType))}
    assert outside and all(m.split(".")[0] in ("torch", "diffusers") for m in outside.values()), outside
    pipe, video = ns["pipe"], ns["video"]  # video: [frames, H, W, 3] in [0, 1]
    prompt = re.search(r'pipe\("([^"]+)"', code)[1]
    sig = ",".join(f"{s!r}" for s in pipe.scheduler.sigmas[:-1].tolist())  # the points the block's pipeline ran
    same = sample.main(["--ckpt", str(student / "det"), "--weights", wan_weights, "--prompt", prompt, "--device", "cpu",
                        "--seed", "3", "--sigmas", sig, "--out", str(tmp_path / "same")])["latents"]
    want = video_io.decode_latents(video_io.load_vae("wan2.1-t2v-1.3b", wan_weights), same)[0]  # [3, F, H, W]
    want = ((want + 1) / 2).permute(1, 2, 3, 0).numpy()
    mp4 = [m[1] for m in re.finditer(r'export_to_video\(video, "([^"]+)"', code)]
    assert video.shape == want.shape and video.shape[0] == 5, (video.shape, want.shape)
    err = float(np.abs(video - want).max())
    print(f"\nREADME block vs sample.py + VAE on the pipeline's points: {err:.1e} (frames {video.shape})")
    assert err <= 1e-5 and len(mp4) == 1 and iio.imread(mp4[0]).shape[:3] == video.shape[:3]


def test_export_diffusers_bad_input(student, wan_weights, tmp_path, capsys):  # noqa: F811
    """A non-Wan run, a weights folder without a text encoder, an existing --out: one error line each."""
    from storage import checkpoint
    checkpoint.save_transformer(models.build_transformer("tiny-hunyuan"), str(tmp_path / "hy"))
    (tmp_path / "novae" / "vae").mkdir(parents=True)
    for argv, want in (([str(student / "det"), str(tmp_path / "novae")], "text_encoder is missing"),
                       ([str(tmp_path / "hy"), wan_weights], "diffusers has a two-transformer pipeline for Wan only"),
                       ([str(student / "det"), wan_weights, str(tmp_path)], "exists: choose a new folder")):
        out = argv[2] if len(argv) > 2 else str(tmp_path / "o")
        with pytest.raises(SystemExit) as e:
            export.main(["diffusers", "--ckpt", argv[0], "--weights", argv[1], "--out", out])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and want in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / "o")


def test_hub_ids_resolve_from_the_cache_and_fail_in_one_line(student, tmp_path, monkeypatch, capsys):
    """--ckpt org/name: huggingface_hub's snapshot (offline: the local cache, HF_HUB_OFFLINE=1 as in every test); an
    id in no cache, or without huggingface_hub, is one error line; a missing path under an existing folder stays a
    local path (no hub lookup)."""
    import shutil
    import sys

    from storage import checkpoint
    cache = tmp_path / "hub"  # the hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    snap = cache / "models--dcm-test--tiny-wan" / "snapshots" / ("0" * 40)
    shutil.copytree(student / "teacher", snap / "transformer")
    (cache / "models--dcm-test--tiny-wan" / "refs").mkdir()
    (cache / "models--dcm-test--tiny-wan" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert checkpoint.resolve("dcm-test/tiny-wan", "--ckpt").weights == str(snap / "transformer")
    monkeypatch.chdir(tmp_path)
    for argv, want in ((["--ckpt", "dcm-test/absent", "--teacher"], "the hub has no model dcm-test/absent here"),
                       (["--ckpt", "hub/absent", "--teacher"], "--ckpt hub/absent does not exist")):  # hub/: a folder
        monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
        with pytest.raises(SystemExit) as e:
            sample.cli()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and want in err and "\n" not in err, err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(checkpoint.CheckpointError, match="as a hub id it needs huggingface_hub"):
        checkpoint.resolve("dcm-test/tiny-wan")


def _step(tmp_path, arch, sem_rank=0):
    """A detail-stage step folder of a tiny `arch` with every adapter trained-looking (random), as train.py writes it;
    with sem_rank, a --semantic-lora run over a teacher folder. -> (step, our DualExpert)."""
    import json

    import experts
    from storage import checkpoint
    from test_one_gpu import randomize
    torch.manual_seed(0)
    base = models.build_transformer(arch)
    checkpoint.save_transformer(base, str(tmp_path / "teacher"))
    sem = experts.SemanticLoRA(base, sem_rank, 2 * sem_rank) if sem_rank else None
    if sem is not None:
        randomize(sem.lora, sem.copies, seed=1)
    expert = experts.DualExpert(base, 900.0, 4, 8, semantic=sem and sem.requires_grad_(False)).eval()
    randomize(expert.lora, expert.copies, seed=2)
    step = tmp_path / "run" / "step_0000002"
    step.mkdir(parents=True)
    expert.save_parts(str(step), {"kappa": 37})
    run = {"stage": "detail", "step": 2} | ({"semantic_lora": sem_rank, "teacher": str(tmp_path / "teacher")}
                                            if sem_rank else {})
    (step / "config.json").write_text(json.dumps(run))
    return step, expert


PIPELINES = {"tiny-wan": ("WanPipeline", "WanTransformer3DModel"),
             "tiny-hunyuan": ("HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel")}


def _assert_original_wan_names(path, ref):
    """Every key of the --layout comfyui file `path` names a module in the original Wan layout: diffusers' own
    original -> diffusers converter (single_file_utils, the table of its scripts/convert_wan_to_diffusers.py) takes
    each to the key of the diffusers-layout file `ref` holding the very same tensor (`.diff_b` = PEFT's lora_B.bias)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file
    sd, ref = load_file(path), load_file(ref)
    key = r"diffusion_model\.[\w.]+\.(lora_A\.weight|lora_B\.weight|diff_b)"  # what ComfyUI's load_lora reads
    assert all(re.fullmatch(key, k) for k in sd), sorted(sd)
    as_diffusers = {"transformer." + k.removeprefix("diffusion_model.").replace(".diff_b", ".lora_B.bias"): v
                    for k, v in sd.items()}
    theirs = convert_wan_transformer_to_diffusers(as_diffusers)
    assert theirs.keys() == ref.keys() and all(torch.equal(theirs[k], ref[k]) for k in ref)


@pytest.mark.parametrize("arch,sem_rank,layout", [("tiny-wan", 0, "diffusers"), ("tiny-hunyuan", 0, "diffusers"),
                                                  ("tiny-wan", 3, "diffusers"), ("tiny-wan", 0, "comfyui"),
                                                  ("tiny-wan", 3, "comfyui")])
def test_lora_file_in_a_stock_pipeline(arch, sem_rank, layout, tmp_path, capsys):
    """export.py lora -> a stock diffusers pipeline + load_lora_weights(FILE) = our detail path (<= 1e-5, fp32); with
    a --semantic-lora run, on the teacher's own weights, for the detail and the semantic expert. --layout comfyui: the
    keys are the original Wan names ComfyUI reads, and stock diffusers converts them back to the same result."""
    import diffusers

    from test_experts import inputs
    step, expert = _step(tmp_path, arch, sem_rank)
    x, cond = inputs(expert.backbone, 2)
    t = torch.tensor([300.0, 100.0])  # detail side
    for which, ours in (("detail", expert.detail), ("semantic", expert.semantic)) if sem_rank else (("detail", expert.detail),):
        out = str(tmp_path / f"{which}.safetensors")
        export.main(["lora", "--ckpt", str(step), "--out", out, "--expert", which, "--layout", layout])
        assert ("for ComfyUI's LoRA loaders" if layout == "comfyui" else "as LoRA for diffusers' load_lora_weights") \
            in capsys.readouterr().out
        if layout == "comfyui":
            export.main(["lora", "--ckpt", str(step), "--out", str(tmp_path / "ref.safetensors"), "--expert", which])
            _assert_original_wan_names(out, str(tmp_path / "ref.safetensors"))
        cls, model_cls = (getattr(diffusers, n) for n in PIPELINES[arch])
        folder = tmp_path / "teacher" if sem_rank else step / "transformer"  # what the file applies to
        tr = model_cls.from_pretrained(str(folder)).eval()
        args = cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount]  # every other component: None
        pipe = cls(**{k: None for k in args if k != "transformer"}, transformer=tr)
        pipe.load_lora_weights(out)
        with torch.no_grad():
            want = ours(x, t, **cond)
            if arch == "tiny-wan":
                got = tr(x, t, encoder_hidden_states=cond["text"], return_dict=False)[0]
            else:
                got = tr(x, t, cond["text"], cond["text_mask"], cond["pooled"], cond["guidance"], return_dict=False)[0]
        err = float((got - want).abs().max())
        print(f"{arch} {which} ({layout} layout): stock pipeline + LoRA file vs ours {err:.1e}")
        assert err <= 1e-5, (which, err)


def test_lora_file_refuses_what_a_lora_cannot_hold(tmp_path, capsys):
    """CogVideoX's copied norm_out holds a LayerNorm's weight and bias: no LoRA file can carry them (one error line);
    --expert semantic on a fully fine-tuned semantic expert: one error line; --layout comfyui on a run that is no Wan
    student: one error line, before its weights load."""
    step, _ = _step(tmp_path, "tiny-cogvideox")
    for argv, want in ((["--expert", "detail"], "norm_out.norm (LayerNorm: weight, bias) is no linear layer"),
                       (["--expert", "semantic"], "semantic expert is fully fine-tuned"),
                       (["--layout", "comfyui"], "--layout comfyui: ComfyUI's key names are written for Wan students "
                                                 "only; --ckpt " + str(step) + " is a CogVideoX student")):
        with pytest.raises(SystemExit) as e:
            export.main(["lora", "--ckpt", str(step), "--out", str(tmp_path / "x.safetensors"), *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and want in err and "\n" not in err, err
