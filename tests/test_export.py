"""export.py diffusers: a tiny Wan student trained here, exported as a WanPipeline folder, runs in stock diffusers
with no code of ours; its two transformers are our semantic and merged detail experts; its latents equal sample.py's
on the pipeline's points, and the README's "use a student in diffusers" block runs on it. export.py lora: a stock
pipeline + load_lora_weights(FILE) equals our experts, in diffusers' key layout and in ComfyUI's (original Wan names);
HunyuanVideo in ComfyUI's layout: ComfyUI's way of applying it equals our experts, and stock diffusers reads only part
of it (named here). (export.py authors: tests/test_released.py.)"""
import contextlib
import io
import os
import re

import pytest
import torch

from storage import latents
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
    latents.write_shard(str(root / "data"), 0, {"latents": torch.randn(n, 4, 2, 4, 4, generator=g),
                                                "text": torch.randn(n, L, 16, generator=g)})
    latents.write_manifest(str(root / "data"), model="wan2.1-t2v-1.3b", latent_shape=[4, 2, 4, 4],
                           vae_scaling_factor=1.0, shards=[{"file": latents.shard_name(0), "num": n}],
                           uncond={"text": torch.zeros(1, L, 16)})
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


def _step(tmp_path, arch, sem_rank=0, lora_targets="authors", copy_adaln=False):
    """A detail-stage step folder of a tiny `arch` with every adapter trained-looking (random), as train.py writes it;
    with sem_rank, a --semantic-lora run over a teacher folder. -> (step, our DualExpert)."""
    import json

    import experts
    from storage import checkpoint
    from test_one_gpu import randomize
    torch.manual_seed(0)
    base = models.build_transformer(arch)
    checkpoint.save_transformer(base, str(tmp_path / "teacher"))
    sem = experts.SemanticLoRA(base, sem_rank, 2 * sem_rank, lora_targets, copy_adaln) if sem_rank else None
    if sem is not None:
        randomize(sem.lora, sem.copies, seed=1)
    expert = experts.DualExpert(base, 900.0, 4, 8, copy_adaln, lora_targets=lora_targets,
                                semantic=sem and sem.requires_grad_(False)).eval()
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


# ComfyUI's HunyuanVideo, as read (docs/sampling.md): its module names from Tencent's checkpoint names
# (comfy/supported_models.py HunyuanVideo.process_unet_state_dict, these replaces in this order), and the LoRA key of
# each of its weights (comfy/lora.py model_lora_keys_unet: the HunyuanVideo branch's replaces, and the generic name)
COMFY_NAMES = (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."), ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
               ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."), ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
               ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
               ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"), ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
               (".q_norm.weight", ".norm.query_norm.scale"), (".k_norm.weight", ".norm.key_norm.scale"),
               ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
               ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."))
COMFY_LORA_NAMES = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                    ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear."))


def _comfyui_applies(path, base):
    """What ComfyUI does with the LoRA file `path` on a HunyuanVideo whose weights are our state dict `base`, replayed
    here (ComfyUI is not run): its model's weights = Tencent's names (tests/test_model_hunyuan.to_tencent) renamed as
    ComfyUI does (COMFY_NAMES); its key map (COMFY_LORA_NAMES + `diffusion_model.<name>`); each pair added as B @ A
    (no `.alpha`: scale 1, comfy/weight_adapter/lora.py), each `.diff_b` to the bias. Every key of the file must be one
    ComfyUI reads (else it warns "lora key not loaded"). -> our state dict of the patched weights
    (backbones/hunyuan_video.convert_tencent_hunyuan back)."""
    from safetensors.torch import load_file
    from backbones.hunyuan_video import convert_tencent_hunyuan
    from test_model_hunyuan import to_tencent
    tencent, sd, key_map = to_tencent(base), load_file(path), {}
    for t in tencent:
        c = "diffusion_model." + t
        for a, b in COMFY_NAMES:
            c = c.replace(a, b)
        if c.endswith(".weight"):
            lora_key = c
            for a, b in COMFY_LORA_NAMES:
                lora_key = lora_key.replace(a, b)
            lora_key = lora_key[len("diffusion_model."):-len(".weight")]
            key_map |= {c[:-len(".weight")]: t, f"transformer.{lora_key}": t, f"diffusion_model.{lora_key}": t}
    read = set()
    for x, t in key_map.items():
        if f"{x}.lora_B.weight" in sd:
            tencent[t] = tencent[t] + sd[f"{x}.lora_B.weight"] @ sd[f"{x}.lora_A.weight"]
            read |= {f"{x}.lora_B.weight", f"{x}.lora_A.weight"}
        if f"{x}.diff_b" in sd:
            bias = t.removesuffix(".weight") + ".bias"
            tencent[bias] = tencent[bias] + sd[f"{x}.diff_b"]
            read.add(f"{x}.diff_b")
    assert read == set(sd), f"keys ComfyUI does not read: {sorted(set(sd) - read)}"
    return convert_tencent_hunyuan(tencent, config=models.PRESETS["tiny-hunyuan"])[1]


@pytest.mark.parametrize("targets,adaln,sem_rank", [("authors", False, 0), ("all", True, 0), ("all", True, 3)])
def test_hunyuan_lora_file_for_comfyui(targets, adaln, sem_rank, tmp_path, capsys):
    """--layout comfyui on a HunyuanVideo run: every key is one ComfyUI reads (Tencent's names as ComfyUI keeps them,
    `diffusion_model.` prefix), and the file applied the way ComfyUI applies it gives our detail path (and a
    --semantic-lora run's semantic one) within 1e-5 (fp32): the fused qkv / linear1 pairs, the final layer's (shift,
    scale) rows, the copied timestep layers and their `.diff_b` bias deltas."""
    from test_experts import inputs
    step, expert = _step(tmp_path, "tiny-hunyuan", sem_rank, targets, adaln)
    x, cond = inputs(expert.backbone, 2)
    t = torch.tensor([300.0, 100.0])
    base = expert.backbone.state_dict()  # the weights the file applies to (the teacher's, with a semantic LoRA)
    for which, ours in (("detail", expert.detail), ("semantic", expert.semantic))[:2 if sem_rank else 1]:
        out = str(tmp_path / f"{which}.safetensors")
        export.main(["lora", "--ckpt", str(step), "--out", out, "--expert", which, "--layout", "comfyui"])
        assert "for ComfyUI's LoRA loaders (original HunyuanVideo keys" in capsys.readouterr().out
        theirs = models.build_transformer("tiny-hunyuan")
        theirs.load_state_dict(_comfyui_applies(out, base))
        with torch.no_grad():
            err = float((theirs(x, t, **cond) - ours(x, t, **cond)).abs().max())
        print(f"HunyuanVideo {which} ({targets}, adaln {adaln}): ComfyUI's way of applying the file vs ours {err:.1e}")
        assert err <= 1e-5, (which, err)


# what stock diffusers' HunyuanVideo converter (lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers) cannot
# take from a --layout comfyui file: bias deltas (`.diff_b`: no "lora" in the name, the whole file is refused), the
# single blocks' linear1 (split at a hard-coded width 3072), the token refiner's self_attn_qkv (its lora_A is cut in
# three), ComfyUI's in_layer / out_layer names of time_in, guidance_in, txt_in.t_embedder / c_embedder (not converted:
# skipped), final_layer.adaLN_modulation.1 (its lora_A's rank halves are swapped with B's rows: a wrong product)
DIFFUSERS_SKIPS = (r"\.diff_b$|single_blocks\.\d+\.linear1\.|self_attn_qkv\.|(time_in|guidance_in|txt_in\.[tc]_embedder)\."
                   r"|final_layer\.adaLN_modulation\.1\.")
OURS_SKIPPED = (r"single_transformer_blocks\.\d+\.attn\.to_[qkv]|context_embedder\.token_refiner\.refiner_blocks\.\d+\."
                r"attn\.to_[qkv]|time_text_embed\.(timestep|guidance)_embedder\..*|context_embedder\.time_text_embed\..*"
                r"|norm_out\.linear")  # the same layers, ours


def test_hunyuan_comfyui_lora_file_in_stock_diffusers(tmp_path):
    """Stock diffusers refuses a HunyuanVideo --layout comfyui file (use --layout diffusers there); what it can read of
    one (all but DIFFUSERS_SKIPS: the double blocks' fused qkv pairs, split by it into q, k, v, and the rest) loaded by
    HunyuanVideoPipeline.load_lora_weights equals our detail path without those layers (OURS_SKIPPED: LoRA off, copies
    back to the base weights) and without any bias delta, within 1e-5 (fp32); at the release's width 3072 its converter
    splits a linear1 pair of ours back into the q, k, v pairs (a zero one on the MLP input)."""
    import copy

    import diffusers
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
    from safetensors.torch import load_file

    from lora import module_key
    from test_experts import inputs
    step, expert = _step(tmp_path, "tiny-hunyuan", 0, "all", True)
    out = str(tmp_path / "comfy.safetensors")
    export.main(["lora", "--ckpt", str(step), "--out", out, "--layout", "comfyui"])

    def stock():
        tr = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(str(step / "transformer")).eval()
        init = diffusers.HunyuanVideoPipeline.__init__.__code__  # every other component: None
        return tr, diffusers.HunyuanVideoPipeline(**{k: None for k in init.co_varnames[1:init.co_argcount]
                                                     if k != "transformer"}, transformer=tr)
    sd = load_file(out)
    with pytest.raises(RuntimeError, match=r"split_sizes=\[3072, 3072, 3072, "):  # linear1 at any other width
        stock()[1].load_lora_weights(out)
    with pytest.raises(ValueError, match="all LoRA param names contain `'lora'`"):  # the .diff_b keys
        stock()[1].load_lora_weights({k: v for k, v in sd.items() if "single_blocks" not in k})
    read = {k: v for k, v in sd.items() if not re.search(DIFFUSERS_SKIPS, k)}
    assert any(".img_attn_qkv." in k for k in read) and any(".txt_attn_qkv." in k for k in read)
    tr, pipe = stock()
    pipe.load_lora_weights(read)
    ref = copy.deepcopy(expert)  # ours without what diffusers skips
    base = dict(ref.backbone.named_modules())
    with torch.no_grad():
        for n in ref.lora_names:
            if re.fullmatch(OURS_SKIPPED, n):
                ref.lora[module_key(n)].B.zero_()
        for n in ref.copy_names:
            for k, mod in ref.copies[module_key(n)].named_modules():
                if isinstance(mod, torch.nn.Linear):
                    orig = base[f"{n}.{k}" if k else n]
                    mod.bias.copy_(orig.bias)
                    if re.fullmatch(OURS_SKIPPED, f"{n}.{k}" if k else n):
                        mod.weight.copy_(orig.weight)
        x, cond = inputs(expert.backbone, 2)
        t = torch.tensor([300.0, 100.0])
        want = ref.detail(x, t, **cond)
        got = tr(x, t, cond["text"], cond["text_mask"], cond["pooled"], cond["guidance"], return_dict=False)[0]
        err, skipped = float((got - want).abs().max()), float((want - expert.detail(x, t, **cond)).abs().max())
    print(f"HunyuanVideo comfyui file in stock diffusers (the part it reads) vs ours without the rest: {err:.1e} "
          f"(the rest moves ours by {skipped:.2f})")
    assert err <= 1e-5 and skipped > 1e-3
    # linear1 at width 3072 (skinny stand-ins: 2 inputs, MLP 5 rows): to_q, to_k, to_v pairs back, proj_mlp's zero
    g, D = torch.Generator().manual_seed(0), 3072
    ours = {f"single_transformer_blocks.0.attn.to_{c}": [torch.randn(2, 2, generator=g), torch.randn(D, 2, generator=g),
                                                        None] for c in "qkv"}
    rows = {f"single_transformer_blocks.0.{n}": torch.nn.Linear(2, m) for n, m in (("attn.to_q", D), ("attn.to_k", D),
                                                                                   ("attn.to_v", D), ("proj_mlp", 5))}
    conv = _convert_hunyuan_video_lora_to_diffusers(export.hunyuan_comfyui(ours, rows))
    delta = {n: conv[f"transformer.{n}.lora_B.weight"] @ conv[f"transformer.{n}.lora_A.weight"] for n in rows}
    assert all(torch.equal(delta[n], b @ a) for n, (a, b, _) in ours.items()), "q, k, v pairs"
    assert not delta["single_transformer_blocks.0.proj_mlp"].any()


def test_lora_file_refuses_what_a_lora_cannot_hold(tmp_path, capsys):
    """CogVideoX's copied norm_out holds a LayerNorm's weight and bias: no LoRA file can carry them (one error line);
    --expert semantic on a fully fine-tuned semantic expert: one error line; --layout comfyui on a run that is no Wan
    or HunyuanVideo student: one error line, before its weights load."""
    step, _ = _step(tmp_path, "tiny-cogvideox")
    for argv, want in ((["--expert", "detail"], "norm_out.norm (LayerNorm: weight, bias) is no linear layer"),
                       (["--expert", "semantic"], "semantic expert is fully fine-tuned"),
                       (["--layout", "comfyui"], "--layout comfyui: ComfyUI's key names are written for Wan and "
                                                 "HunyuanVideo students only; --ckpt " + str(step) + " is a CogVideoX "
                                                 "student")):
        with pytest.raises(SystemExit) as e:
            export.main(["lora", "--ckpt", str(step), "--out", str(tmp_path / "x.safetensors"), *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and want in err and "\n" not in err, err
    with pytest.raises(export.ExportError, match="x_embedder.proj has no name in the original HunyuanVideo layout"):
        export.hunyuan_original("x_embedder.proj")  # a conv: no LoRA layer of ours, no row in the table
