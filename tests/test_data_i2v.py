"""Image-to-video data: `data.py encode` stores the image condition of each clip's first frame exactly as
WanImageToVideoPipeline builds it (`prepare_latents`' condition, `encode_image`'s CLIP states), for a Wan2.1-I2V-style
model (mask + VAE latents of the image and zero frames, CLIP image embeds), a Wan2.2-I2V-style one (no embeds) and
TI2V-5B's first frame (the Wan2.2 VAE: 48 channels, patchified pixels); on tiny random models in the pipeline layout."""
import json
import os
import sys

import pytest
import torch

import data
import model as models
from storage import image_io, latents, video_io
from test_data import t5_tokenizer

SIZE = ["--frames", "5", "--height", "32", "--width", "32"]
MEAN16, STD16 = [0.1 * i - 0.8 for i in range(16)], [0.5 + 0.1 * i for i in range(16)]
MEAN48, STD48 = [0.05 * i - 1.2 for i in range(48)], [0.4 + 0.05 * i for i in range(48)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 clips of 40 x 56 (resized and cropped to 32 x 32: the first frame is the clip's after that) and a broken file."""
    root = tmp_path_factory.mktemp("i2v_videos")
    gen = torch.Generator().manual_seed(1)
    for i, n in enumerate([6, 9, 7]):
        base = torch.rand(3, 1, 5, 7, generator=gen) * 2 - 1
        clip = torch.nn.functional.interpolate(base, size=(40, 56), mode="bilinear").expand(3, n, 40, 56)
        video_io.write_video(clip + 0.2 * torch.arange(n).view(1, n, 1, 1) / n, str(root / f"clip{i}.mp4"), fps=8)
    (root / "clip3_broken.mp4").write_bytes(b"not a video")
    (root / "captions.txt").write_text("a cat walks on the grass\na dog runs in the park\na red car\nbroken\n")
    return str(root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Pipeline-layout folders sharing tiny parts: 'wan21' (Wan2.1-I2V: vae/ 16 channels 4x4x4, umT5 text_encoder/ +
    tokenizer/, image_encoder/ CLIPVisionModel, image_processor/ CLIPImageProcessor), 'wan22' (Wan2.2-I2V: no image
    encoder) and 'ti2v' (the Wan2.2 VAE: z_dim 48, residual blocks, 2x2 pixel patches: 4x8x8)."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
    root = tmp_path_factory.mktemp("i2v")
    torch.manual_seed(0)
    tiny = dict(base_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True])
    AutoencoderKLWan(z_dim=16, latents_mean=MEAN16, latents_std=STD16, scale_factor_spatial=4,
                     **tiny).save_pretrained(root / "vae16")
    AutoencoderKLWan(z_dim=48, latents_mean=MEAN48, latents_std=STD48, is_residual=True, patch_size=2, in_channels=12,
                     out_channels=12, decoder_base_dim=16, scale_factor_spatial=8, **tiny).save_pretrained(root / "vae48")
    n_vocab = t5_tokenizer(root / "tokenizer", 512)
    UMT5EncoderModel(UMT5Config(vocab_size=n_vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                pad_token_id=0, eos_token_id=1)).save_pretrained(root / "text_encoder")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "image_processor")
    out = {}
    for name, parts in {"wan21": ("vae16", "text_encoder", "tokenizer", "image_encoder", "image_processor"),
                        "wan22": ("vae16", "text_encoder", "tokenizer"), "ti2v": ("vae48", "text_encoder", "tokenizer")}.items():
        os.makedirs(root / name)
        for p in parts:
            os.symlink(root / p, root / name / ("vae" if p.startswith("vae") else p))
        out[name] = str(root / name)
    return out


def encode(videos, weights, model, out, *extra):
    data.main(["encode", "--videos", videos, "--captions", os.path.join(videos, "captions.txt"), "--model", model,
               "--weights", weights, "--out", out, *SIZE, *extra])
    ds = latents.LatentDataset(out)
    keys = latents.check_fits(models.PRESETS[model], ds.tensors, ds.manifest["latent_shape"], ds.uncond, where=out)
    assert keys == ["text"] + [k for k in ("image_latents", "image_embeds") if k in ds.tensors]  # the model's conditioning
    names = [n for s in ds.manifest["shards"] for n in json.loads(data.shard_info(out, int(s["file"][6:11]))[1]["videos"])]
    return ds, [video_io.read_clip(os.path.join(videos, n), 5, 32, 32)[:, 0] for n in names]  # each clip's frame 0


def pipeline(weights, **kw):
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModel
    parts = {"vae": AutoencoderKLWan.from_pretrained(os.path.join(weights, "vae"))}
    if os.path.isdir(os.path.join(weights, "image_encoder")):
        parts |= {"image_encoder": CLIPVisionModel.from_pretrained(os.path.join(weights, "image_encoder")),
                  "image_processor": CLIPImageProcessor.from_pretrained(os.path.join(weights, "image_processor"))}
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, scheduler=None, **parts, **kw)


def pil(image):
    """float [3, H, W] in [-1, 1] -> the PIL image a user would hand the pipeline (uint8)."""
    from PIL import Image
    return Image.fromarray(((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def condition(pipe, image, channels):
    """The pipeline's prepare_latents for one image at the encode size: its `condition` (TI2V: the image latents)."""
    out = pipe.prepare_latents(image[None], 1, channels, 32, 32, 5, torch.float32, "cpu", torch.Generator().manual_seed(0))
    return out[1][0]


def test_wan21_i2v_condition_and_image_embeds_equal_the_pipeline(folders, videos, tmp_path):
    ds, frames = encode(videos, folders["wan21"], "tiny-wan-i2v", str(tmp_path / "ds"), "--shard-size", "1")
    t, m = ds.tensors, ds.manifest  # --posterior sample; the broken video's shard is empty, with every key
    assert len(m["shards"]) == 4 and m["shards"][3]["num"] == 0 and m["skipped"][0]["video"] == "clip3_broken.mp4"
    assert m["latent_shape"] == [16, 2, 8, 8] and m["image_cond"] == "concat" and len(ds) == len(frames) == 3
    assert t["image_latents"].shape == (3, 20, 2, 8, 8) and t["image_embeds"].shape == (3, 17, 24)
    assert set(ds.uncond) == {"text"}  # CFG's unconditional branch sees the same image: no image keys there
    pipe = pipeline(folders["wan21"])
    for i, image in enumerate(frames):
        torch.testing.assert_close(t["image_latents"][i], condition(pipe, image, 16), rtol=0, atol=0)
        torch.testing.assert_close(t["image_embeds"][i], pipe.encode_image(pil(image), "cpu")[0], rtol=0, atol=0)
    mask = t["image_latents"][:, :4]
    assert (mask[:, :, 0] == 1).all() and (mask[:, :, 1:] == 0).all()


def test_wan22_i2v_condition_equals_the_pipeline_and_holds_the_first_latent_frame(folders, videos, tmp_path):
    ds, frames = encode(videos, folders["wan22"], "tiny-wan2.2-i2v", str(tmp_path / "ds"), "--posterior", "mode")
    t = ds.tensors
    assert set(t) == {"latents", "text", "image_latents"} and t["image_latents"].shape == (3, 20, 2, 8, 8)
    pipe = pipeline(folders["wan22"], boundary_ratio=0.9)
    for i, image in enumerate(frames):
        torch.testing.assert_close(t["image_latents"][i], condition(pipe, image, 16), rtol=0, atol=0)
    # the Wan VAE is causal, its first frame encoded alone: the condition's frame 0 is the video's own latent frame 0
    torch.testing.assert_close(t["image_latents"][:, 4:, 0], t["latents"][:, :, 0], rtol=0, atol=0)


def test_ti2v_first_frame_condition_equals_the_pipeline(folders, videos, tmp_path):
    ds, frames = encode(videos, folders["ti2v"], "tiny-wan2.2-ti2v", str(tmp_path / "ds"), "--image-cond")
    t, m = ds.tensors, ds.manifest
    assert m["latent_shape"] == [48, 2, 4, 4] and m["image_cond"] == "first_frame" and m["encode"]["image_cond"]
    assert set(t) == {"latents", "text", "image_latents"} and t["image_latents"].shape == (3, 48, 1, 4, 4)
    assert m["vae_latents_mean"] == MEAN48
    pipe = pipeline(folders["ti2v"], expand_timesteps=True)
    for i, image in enumerate(frames):
        torch.testing.assert_close(t["image_latents"][i], condition(pipe, image, 48), rtol=0, atol=0)


def test_read_image_equals_the_pipelines_preprocess(folders, tmp_path):
    from diffusers.video_processor import VideoProcessor
    image = torch.rand(3, 32, 48) * 2 - 1
    pil(image).save(tmp_path / "a.png")
    ours = image_io.read_image(str(tmp_path / "a.png"), 32, 48)
    ref = VideoProcessor(vae_scale_factor=8).preprocess(pil(image), height=32, width=48)[0]
    assert ours.shape == (3, 32, 48)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert image_io.read_image(str(tmp_path / "a.png"), 32, 32, fit=True).shape == (3, 32, 32)  # crop as the clips


def test_synthetic_image_keys_fit_the_tiny_presets(tmp_path):
    cases = {"tiny-wan-i2v": ({"image_latents": (3, 20, 2, 4, 4), "image_embeds": (3, 257, 24)}, []),
             "tiny-wan2.2-i2v": ({"image_latents": (3, 20, 2, 4, 4)}, []),
             "tiny-wan2.2-ti2v": ({"image_latents": (3, 48, 1, 4, 4)}, ["--image-cond"]),
             "tiny-wan": ({}, [])}
    for name, (want, flag) in cases.items():
        out = str(tmp_path / name)
        data.main(["synthetic", "--model", name, "--out", out, "--num", "3", *flag])
        ds, cfg = latents.LatentDataset(out), models.PRESETS[name]
        assert {k: tuple(v.shape) for k, v in ds.tensors.items() if k in image_io.KEYS} == want
        assert ds.tensors["latents"].shape[1] == (48 if "ti2v" in name else 16)
        latents.check_fits(cfg, ds.tensors, ds.manifest["latent_shape"], ds.uncond, where=out)
        if want:  # the model takes them
            net = models.build_transformer(cfg).eval()
            b = {k: v[:2] for k, v in ds.tensors.items()}
            with torch.no_grad():
                v = net(b["latents"], torch.tensor([500.0, 20.0]), **{k: v for k, v in b.items() if k != "latents"})
            assert v.shape == b["latents"].shape
    il = latents.LatentDataset(str(tmp_path / "tiny-wan2.2-i2v")).tensors["image_latents"][:]
    assert (il[:, :4, 0] == 1).all() and (il[:, :4, 1:] == 0).all()  # the pipeline's first-frame mask


def test_release_sizes_and_shapes():
    wan21 = {"temperal_downsample": [False, True, True], "dim_mult": [1, 2, 4, 4], "z_dim": 16}
    wan22 = {**wan21, "z_dim": 48, "patch_size": 2, "is_residual": True}  # Wan2.2-TI2V-5B's vae/config.json
    assert video_io.vae_ratios(wan21) == (4, 8) and video_io.vae_ratios(wan22) == (4, 16)
    want = {"wan2.2-ti2v-5b": (wan22, [48, 31, 44, 80]), "wan2.1-i2v-14b-480p": (wan21, [16, 21, 60, 104]),
            "wan2.1-i2v-14b-720p": (wan21, [16, 21, 90, 160]), "wan2.2-i2v-a14b": (wan21, [16, 21, 90, 160]),
            "wan2.2-t2v-a14b": (wan21, [16, 21, 90, 160])}
    for name, (vae, shape) in want.items():
        assert video_io.latent_shape(vae, *video_io.clip_size(name, vae)) == shape, name
    assert image_io.shapes(models.PRESETS["wan2.1-i2v-14b-480p"], [16, 21, 60, 104]) == {
        "image_latents": [20, 21, 60, 104], "image_embeds": [257, 1280]}
    assert image_io.shapes(models.PRESETS["wan2.2-ti2v-5b"], [48, 31, 44, 80]) == {"image_latents": [48, 1, 44, 80]}
    assert video_io.native_fps("wan2.2-ti2v-5b") == 24 and video_io.native_fps("wan2.2-i2v-a14b") == 16


def one_error(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_have_one_error_line(folders, videos, tmp_path, capsys, monkeypatch):
    cap = os.path.join(videos, "captions.txt")
    enc = ["encode", "--videos", videos, "--captions", cap, *SIZE, "--out", str(tmp_path / "x")]
    # --image-cond on a model that takes no image (encode and synthetic)
    err = one_error(capsys, data.main, [*enc, "--model", "tiny-wan", "--weights", folders["wan22"], "--image-cond"])
    assert "--image-cond: tiny-wan takes no image condition" in err
    err = one_error(capsys, data.main, ["synthetic", "--model", "wan2.1-t2v-1.3b", "--out", str(tmp_path / "y"),
                                        "--image-cond"])
    assert "--image-cond: wan2.1-t2v-1.3b takes no image condition" in err
    # the Wan2.1 VAE (16 channels) for TI2V-5B's 48-channel condition; Wan2.1-I2V without its CLIP image encoder
    err = one_error(capsys, data.main, [*enc, "--model", "tiny-wan2.2-ti2v", "--weights", folders["wan22"], "--image-cond"])
    assert "vae gives 16 latent channels" in err and "has 48 channels" in err
    err = one_error(capsys, data.main, [*enc, "--model", "tiny-wan-i2v", "--weights", folders["wan22"], "--overwrite"])
    assert "image_encoder is missing" in err
    # an image of the wrong size: the file, and an image handed to the encoder
    pil(torch.zeros(3, 24, 40)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"small.png is 40x24 \(width x height\), the video 32x32") as e:
        image_io.read_image(str(tmp_path / "small.png"), 32, 32)
    assert len(str(e.value).splitlines()) == 1
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained(os.path.join(folders["wan22"], "vae"))
    enc2 = image_io.ImageEncoder("tiny-wan2.2-i2v", models.PRESETS["tiny-wan2.2-i2v"], folders["wan22"], vae, "concat",
                                 5, 32, 32)
    with pytest.raises(ValueError, match=r"the image is \[1, 3, 24, 40\], the clip's frames are \[B, 3, 32, 32\]"):
        enc2(torch.zeros(1, 3, 24, 40))
    # an image-to-video model on a dataset without the image condition: train.py stops before any model loads
    t2v = str(tmp_path / "t2v")
    data.synthetic_dataset("tiny-wan", t2v, num=4)
    with pytest.raises(latents.DataError, match=rf"{t2v} does not fit model WanConfig: no image_latents or "
                                                "image_embeds: this image-to-video model needs the image condition"):
        ds = latents.LatentDataset(t2v)
        latents.check_fits(models.PRESETS["tiny-wan-i2v"], ds.tensors, ds.manifest["latent_shape"], ds.uncond,
                           where=t2v)
    import train
    monkeypatch.setattr(sys, "argv", ["train.py", "--stage", "teacher", "--config", "tiny-wan2.2-i2v", "--data", t2v,
                                      "--out", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1"])
    err = one_error(capsys, train.cli)
    assert t2v in err and "no image_latents" in err and not os.path.exists(tmp_path / "run")
    # image keys of another model's shape
    ti2v = str(tmp_path / "ti2v")
    data.synthetic_dataset("tiny-wan2.2-ti2v", ti2v, num=2, image_cond=True)
    ds = latents.LatentDataset(ti2v)
    with pytest.raises(latents.DataError, match=r"image_latents are \[2, 48, 1, 4, 4\], the model takes \[B, 20, 2, 4, 4\]"):
        latents.check_fits(models.PRESETS["tiny-wan2.2-i2v"], {**ds.tensors, "latents": ds.tensors["latents"][:, :16]},
                           [16, 2, 4, 4], where=ti2v)
    with pytest.raises(latents.DataError,
                       match=r"image_latents \[2, 48, 1, 4, 4\]: the model takes no image condition"):
        latents.check_fits(models.PRESETS["tiny-cogvideox"], {"text": torch.zeros(2, 8, 32), **{
            k: ds.tensors[k] for k in ("image_latents",)}}, where=ti2v)


def test_sample_image_to_video_in_one_command(folders, tmp_path, capsys):
    """sample.py --prompt --image on a tiny Wan2.1-I2V pipeline folder (a random transformer/ + the tiny parts): the
    image keys are the encoder's for that image (the same as data.py's), the video is written; bad input: an image of
    another size, --image for a text-to-video model, one line each."""
    import conditioning
    import sample
    import sampling
    from PIL import Image
    from storage import checkpoint
    from teacher import Teacher
    pipe = tmp_path / "pipe"
    os.makedirs(pipe)
    for p in os.listdir(folders["wan21"]):
        os.symlink(os.path.join(folders["wan21"], p), pipe / p)
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer("tiny-wan-i2v"), pipe / "transformer")
    img = tmp_path / "first.png"
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy()).save(img)
    argv = ["--ckpt", str(pipe), "--teacher", "--steps", "2", "--prompt", "a red car", "--frames", "2", "--height", "8",
            "--width", "8", "--guidance", "1", "--out", str(tmp_path / "s")]
    got = sample.main([*argv, "--image", str(img)])
    assert len(got["videos"]) == 1 and os.path.isfile(got["videos"][0])
    m, info = sampling.load_student(str(pipe), teacher=True, steps=2)
    vae = video_io.load_vae("tiny-wan-i2v", str(pipe))
    enc = image_io.ImageEncoder("tiny-wan-i2v", m.config, str(pipe), vae, "concat", 5, 32, 32)
    keys = enc(image_io.read_image(str(img), 32, 32)[None])
    text = conditioning.encode_prompts("tiny-wan-i2v", str(pipe), ["a red car"])
    noise = torch.randn((1, 16, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    want = Teacher(m, info["grid"], 1.0).sample(noise, {**text, **keys}, progress=False)
    assert torch.equal(got["latents"], want)
    Image.fromarray(torch.zeros(24, 32, 3).byte().numpy()).save(tmp_path / "small.png")
    capsys.readouterr()
    err = one_error(capsys, sample.cli, [*argv, "--image", str(tmp_path / "small.png")])
    assert "is 32x24 (width x height), the video 32x32" in err
    t2v = tmp_path / "t2v"
    checkpoint.save_transformer(models.build_transformer("tiny-wan"), t2v / "transformer")
    err = one_error(capsys, sample.cli, [*argv[:1], str(t2v), *argv[2:], "--image", str(img), "--weights", str(pipe)])
    assert "--image:" in err and "is a text-to-video model" in err
