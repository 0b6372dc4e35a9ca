"""data.py encode tools + video_io.py, on tiny random models saved in the hub layout (no downloads).

Text encoding is checked against the diffusers pipelines' own encode_prompt; latents against the
diffusers VAE; videos are read back with ffmpeg."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import imageio_ffmpeg as ffmpeg  # the test deps (requirements-dev.txt) include requirements-video.txt's

import data
from storage import latents, video_io
from test_latents import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = ["a cat walks on the grass", "a dog runs in the park at noon", "the camera pans over a city at night",
          "waves crash on a rocky shore", "a red car drives down a long empty road", "",
          "{}", video_io.HUNYUAN_TEMPLATE] * 8
CAPTIONS = ["a cat walks on the grass", "a dog runs in the park", "waves crash on a rocky shore", "a red car"]
LONG = " ".join(["the camera pans over a city at night"] * 60)  # > 226 / 256 / 77 tokens: truncated
# Llama-3's pre-tokenizer split (a fact of the real tokenizer: newlines form their own pre-token)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def t5_tokenizer(folder, max_length):
    """A tiny sentencepiece T5 tokenizer (like CogVideoX's T5 and Wan's umT5 ones) in `folder` -> its vocab size."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS[:5] * 20), model_writer=model, vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    os.makedirs(folder)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "model_max_length": max_length}))
    return len(AutoTokenizer.from_pretrained(folder))


def bpe_tokenizer(folder, specials, template, pad, split=None, vocab=320):
    """A byte-level BPE tokenizer trained here on CORPUS, saved as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in specials if t in template])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=pad)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def cog_weights(tmp_path_factory):
    """tiny CogVideoX hub folder: vae/, text_encoder/ (T5), tokenizer/ (sentencepiece, like the real one)."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel
    root = tmp_path_factory.mktemp("cogvideox")
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
                           up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                           norm_num_groups=4, scaling_factor=0.7).save_pretrained(root / "vae")
    n_vocab = t5_tokenizer(root / "tokenizer", 226)
    T5EncoderModel(T5Config(vocab_size=n_vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(root / "text_encoder")
    return str(root)


@pytest.fixture(scope="module")
def hy_weights(tmp_path_factory):
    """tiny HunyuanVideo hub folder: vae/, text_encoder/ (Llama), tokenizer/, text_encoder_2/ (CLIP), tokenizer_2/."""
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel
    root = tmp_path_factory.mktemp("hunyuan")
    torch.manual_seed(0)
    AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16), down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                              up_block_types=("HunyuanVideoUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                              norm_num_groups=4, spatial_compression_ratio=4).save_pretrained(root / "vae")
    llama = bpe_tokenizer(root / "tokenizer", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
                          "<|begin_of_text|> $A", pad="<|pad|>", split=LLAMA3_SPLIT, vocab=1000)
    LlamaModel(LlamaConfig(vocab_size=len(llama), hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                           pad_token_id=llama.pad_token_id)).save_pretrained(root / "text_encoder")
    clip = bpe_tokenizer(root / "tokenizer_2", ["<|startoftext|>", "<|endoftext|>"],
                         "<|startoftext|> $A <|endoftext|>", pad="<|endoftext|>")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(clip), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                 bos_token_id=clip.bos_token_id, eos_token_id=clip.eos_token_id,
                                 pad_token_id=clip.pad_token_id)).save_pretrained(root / "text_encoder_2")
    return str(root)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 good clips (non-square: exercises resize + crop), one unreadable file, one too short."""
    root = tmp_path_factory.mktemp("videos")
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate([9, 12, 10]):
        base = torch.rand(3, 1, 5, 7, generator=gen) * 2 - 1  # smooth content survives H.264 well
        clip = torch.nn.functional.interpolate(base, size=(40, 56), mode="bilinear").expand(3, n, 40, 56)
        video_io.write_video(clip + 0.1 * torch.arange(n).view(1, n, 1, 1) / n, str(root / f"clip{i}.mp4"), fps=8)
    (root / "clip3_broken.mp4").write_bytes(b"this is not a video")
    video_io.write_video(torch.zeros(3, 5, 32, 32), str(root / "clip4_short.mp4"))
    (root / "captions.txt").write_text("\n".join(CAPTIONS + ["too short"]) + "\n")
    return str(root)


def read_back(path):
    """Frames of a video file via ffmpeg -> uint8 [F, H, W, 3]."""
    gen = ffmpeg.read_frames(path)
    w, h = next(gen)["size"]
    return np.stack([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen])


def test_resize_center_crop_keeps_the_centre():
    x = torch.zeros(2, 4, 8, 3, dtype=torch.uint8)
    x[:, :, 4:] = 255  # left half black, right half white
    y = video_io.resize_center_crop(x, 4, 4)  # no scaling needed: crops columns 2..5
    assert y.shape == (3, 2, 4, 4)
    assert (y[..., :2] == -1).all() and (y[..., 2:] == 1).all()
    flat = video_io.resize_center_crop(torch.full((1, 30, 50, 3), 51, dtype=torch.uint8), 8, 16)
    assert flat.shape == (3, 1, 8, 16) and torch.allclose(flat, torch.tensor(51 / 127.5 - 1))


def test_read_frames_stride_and_fps(tmp_path):
    ramp = torch.linspace(-1, 1, 16).view(1, 16, 1, 1).expand(3, 16, 16, 16)  # frame i has brightness ~ i
    video_io.write_video(ramp, str(tmp_path / "r.mp4"), fps=8)
    full = video_io.read_frames(str(tmp_path / "r.mp4"), 16).float().mean((1, 2, 3))
    strided = video_io.read_frames(str(tmp_path / "r.mp4"), 5, stride=3).float().mean((1, 2, 3))
    torch.testing.assert_close(strided, full[::3][:5])
    assert len(video_io.read_frames(str(tmp_path / "r.mp4"), 8, fps=4)) == 8  # 2 s at 4 fps
    with pytest.raises(video_io.VideoError, match="too short: 8 usable frames .*4 fps.*needs 9"):
        video_io.read_frames(str(tmp_path / "r.mp4"), 9, fps=4)


def test_cogvideox_text_matches_diffusers(cog_weights):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline
    enc = video_io.TextEncoder("cogvideox-2b", cog_weights)
    pipe = CogVideoXPipeline(tokenizer=enc.tokenizer, text_encoder=enc.encoder, transformer=None, scheduler=None,
                             vae=AutoencoderKLCogVideoX.from_pretrained(os.path.join(cog_weights, "vae")))
    prompts = CAPTIONS[:2] + ["", LONG]
    with pytest.warns(UserWarning, match=r"T5 \(226\)'s token limit, truncated"):
        ours = enc(prompts)
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=226)
    assert set(ours) == {"text"} and ours["text"].shape == (4, 226, 16)
    torch.testing.assert_close(ours["text"], ref, rtol=0, atol=0)


def test_hunyuan_text_matches_diffusers(hy_weights):
    from diffusers import HunyuanVideoPipeline
    enc = video_io.TextEncoder("hunyuan-video", hy_weights)
    pipe = HunyuanVideoPipeline(text_encoder=enc.encoder, tokenizer=enc.tokenizer, transformer=None, vae=None,
                                scheduler=None, text_encoder_2=enc.encoder_2, tokenizer_2=enc.tokenizer_2)
    # the tiny tokenizer knows every template word and splits like Llama-3, so its prefix count is the real
    # tokenizer's: diffusers' hard-coded crop_start 95 (BOS + system turn + user header) ...
    assert enc.crop_start == 95
    # ... and what diffusers derives when not given one (template tokens minus "{}" and <|eot_id|>)
    assert len(enc.tokenizer(video_io.HUNYUAN_TEMPLATE).input_ids) - 2 == 95
    prompts = CAPTIONS[:2] + ["", LONG]
    with pytest.warns(UserWarning) as got:
        ours = enc(prompts)
    assert sorted(str(w.message).split("'")[0] for w in got) == [
        "prompt longer than CLIP (77)", "prompt longer than Llama (256)"]
    text, pooled, mask = pipe.encode_prompt(prompts, max_sequence_length=256)  # its default template
    assert ours["text"].shape == (4, 256, 16) and ours["text_mask"].shape == (4, 256)
    assert ours["pooled"].shape == (4, 16)
    torch.testing.assert_close(ours["text"], text, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=0)
    assert torch.equal(ours["text_mask"], mask)
    # after cropping, the first token is the prompt's own and the mask covers prompt + <|eot_id|> only
    n_prompt = len(enc.tokenizer(CAPTIONS[0], add_special_tokens=False).input_ids)
    assert ours["text_mask"][0].sum() == n_prompt + 1 and ours["text_mask"][2].sum() == 1
    assert ours["text_mask"][3].all()  # the long prompt fills all 256 slots (truncated)


def test_encode_cogvideox_dataset(cog_weights, videos, tmp_path):
    from diffusers import AutoencoderKLCogVideoX
    out = str(tmp_path / "ds")
    m = data.encode_dataset(videos, os.path.join(videos, "captions.txt"), "tiny-cogvideox", cog_weights, out,
                            frames=9, height=32, width=32, shard_size=2, posterior="mode", progress=False)
    ds = latents.LatentDataset(out)
    assert len(ds) == 3 and m["latent_shape"] == [4, 3, 8, 8] and m["vae_scaling_factor"] == 0.7
    assert ds.tensors["latents"].shape == (3, 4, 3, 8, 8) and ds.tensors["text"].shape == (3, 226, 16)
    assert set(ds.tensors) == {"latents", "text"} and ds.uncond["text"].shape == (1, 226, 16)
    assert [s["num"] for s in m["shards"]] == [2, 1, 0]  # shard 2 held only the two bad files
    assert {s["video"]: s["reason"] for s in m["skipped"]}.keys() == {"clip3_broken.mp4", "clip4_short.mp4"}
    assert "too short: 5 usable frames" in m["skipped"][1]["reason"]
    # the latents are the VAE posterior mean of the resized clip times scaling_factor; text as the encoder gives
    vae = AutoencoderKLCogVideoX.from_pretrained(os.path.join(cog_weights, "vae"))
    clip = video_io.read_clip(os.path.join(videos, "clip1.mp4"), 9, 32, 32)
    with torch.no_grad():
        ref = vae.encode(clip[None]).latent_dist.mode()[0] * 0.7
    torch.testing.assert_close(ds[1]["latents"], ref, rtol=1e-4, atol=1e-5)
    enc = video_io.TextEncoder("cogvideox-2b", cog_weights)
    torch.testing.assert_close(ds.tensors["text"][:], enc(CAPTIONS[:3])["text"])
    torch.testing.assert_close(ds.uncond["text"], enc([""])["text"])


def test_encode_hunyuan_dataset_cli(hy_weights, videos, tmp_path, capsys):
    out = str(tmp_path / "ds")
    data.main(["encode", "--videos", videos, "--captions", os.path.join(videos, "captions.txt"), "--model",
               "tiny-hunyuan", "--weights", hy_weights, "--out", out, "--frames", "9", "--height", "32",
               "--width", "32", "--shard-size", "8", "--save-dtype", "bfloat16"])
    assert "skipped clip3_broken.mp4: cannot be decoded" in capsys.readouterr().out
    ds = latents.LatentDataset(out)
    t = ds.tensors
    assert t["latents"].shape == (3, 4, 3, 8, 8) and t["latents"].dtype == torch.bfloat16
    assert t["text"].shape == (3, 256, 16) and t["text_mask"].shape == (3, 256) and t["pooled"].shape == (3, 16)
    assert ds.manifest["cond_keys"] == ["pooled", "text", "text_mask"] and ds.uncond["text_mask"].sum() == 1
    assert ds.manifest["vae_scaling_factor"] == pytest.approx(0.476986)
    # the default posterior is a sample (seeded per video): not the mean; the scale is HunyuanVideo's
    from diffusers import AutoencoderKLHunyuanVideo
    vae = AutoencoderKLHunyuanVideo.from_pretrained(os.path.join(hy_weights, "vae"))
    with torch.no_grad():
        dist = vae.encode(video_io.read_clip(os.path.join(videos, "clip0.mp4"), 9, 32, 32)[None]).latent_dist
    noise = (t["latents"][0].float() / 0.476986 - dist.mean[0]) / dist.std[0]  # the posterior's eps
    assert 0.7 < noise.std() < 1.3 and noise.mean().abs() < 0.2


def test_resume_skips_finished_shards(cog_weights, videos, tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    args = (videos, os.path.join(videos, "captions.txt"), "tiny-cogvideox", cog_weights, out)
    kw = dict(frames=9, height=32, width=32, shard_size=1, progress=False)
    data.encode_dataset(*args, **kw)
    first = latents.LatentDataset(out).tensors["latents"][:]
    shard = lambda i: os.path.join(out, latents.shard_name(i))  # noqa: E731
    mtimes = {i: os.stat(shard(i)).st_mtime_ns for i in range(5)}
    os.remove(shard(1))  # as if the run died while encoding video 1
    os.remove(os.path.join(out, "manifest.json"))
    calls = []
    encode = video_io.encode_latents
    monkeypatch.setattr(video_io, "encode_latents", lambda *a, **k: calls.append(1) or encode(*a, **k))
    m = data.encode_dataset(*args, **kw)
    assert len(calls) == 1 and m["num_samples"] == 3 and len(m["skipped"]) == 2
    assert all(os.stat(shard(i)).st_mtime_ns == mtimes[i] for i in (0, 2, 3, 4))
    torch.testing.assert_close(latents.LatentDataset(out).tensors["latents"][:], first)  # same seeded noise
    # nothing left to do: no model is loaded at all
    monkeypatch.setattr(video_io, "load_vae", lambda *a, **k: pytest.fail("VAE loaded"))
    monkeypatch.setattr(video_io, "TextEncoder", lambda *a, **k: pytest.fail("text encoder loaded"))
    data.encode_dataset(*args, **kw)
    with pytest.raises(latents.DataError, match="other settings .*frames.*pass --overwrite"):
        data.encode_dataset(*args, **{**kw, "frames": 5})
    # a folder holding another dataset (no encode.json of these settings) is refused before any model loads
    other = str(tmp_path / "synthetic")
    data.synthetic_dataset("tiny-cogvideox", other, num=2)
    with pytest.raises(latents.DataError, match=f"{re.escape(other)} already holds a dataset .*pass --overwrite"):
        data.encode_dataset(*args[:-1], other, **kw)
    assert sorted(os.listdir(other)) == ["manifest.json", latents.shard_name(0), "uncond.safetensors"]
    # --overwrite encodes again from scratch: the old shards go, none survives next to the new ones
    monkeypatch.undo()
    m = data.encode_dataset(*args, **{**kw, "shard_size": 5}, overwrite=True)
    assert [s["num"] for s in m["shards"]] == [3] and len(m["skipped"]) == 2
    assert sorted(os.listdir(out)) == ["encode.json", "manifest.json", latents.shard_name(0), "uncond.safetensors"]
    torch.testing.assert_close(latents.LatentDataset(out).tensors["latents"][:], first)


def test_bad_inputs_have_clear_errors(cog_weights, hy_weights, videos, tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("one\ntwo\n")
    args = dict(model="tiny-cogvideox", weights=cog_weights, out=str(tmp_path / "o"), progress=False)
    with pytest.raises(latents.DataError, match="2 captions .* for 5 videos"):
        data.encode_dataset(videos, str(caps), **args)
    (tmp_path / "caps.json").write_text(json.dumps({"clip0.mp4": "x"}))
    with pytest.raises(latents.DataError, match="no caption for 4 of the videos"):
        data.encode_dataset(videos, str(tmp_path / "caps.json"), **args)
    cap = os.path.join(videos, "captions.txt")
    with pytest.raises(FileNotFoundError, match="weights folder .*nowhere.* does not exist"):
        data.encode_dataset(videos, cap, **{**args, "weights": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="vae is missing: .* hub layout"):
        data.encode_dataset(videos, cap, **{**args, "weights": str(tmp_path)})
    with pytest.raises(ValueError, match="AutoencoderKLCogVideoX.*needs AutoencoderKLHunyuanVideo"):
        data.encode_dataset(videos, cap, **{**args, "model": "hunyuan-video"})
    with pytest.raises(ValueError, match="frames=8: the VAE needs 4k\\+1 frames, e.g. 5 or 9"):
        data.encode_dataset(videos, cap, **args, frames=8, height=32, width=32)
    with pytest.raises(ValueError, match="multiples of 8"):
        data.encode_dataset(videos, cap, **args, frames=9, height=36, width=32)
    with pytest.raises(ValueError, match="unknown model 'cogvideox'"):
        data.encode_dataset(videos, cap, **{**args, "model": "cogvideox"})
    with pytest.raises(SystemExit) as e:
        data.main(["encode-prompts", "--prompts", str(caps), "--model", "hunyuan-video", "--weights",
                   str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and re.match("error: .*does not exist", err), err


def test_synthetic_refuses_an_existing_dataset_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    g = torch.Generator().manual_seed(0)
    t = {"latents": torch.randn(4, 4, 2, 4, 4, generator=g), "text": torch.randn(4, 8, 32, generator=g)}
    latents.write_shard(str(out), 0, t)
    latents.write_shard(str(out), 1, t)
    latents.atomic_save_file(t, str(out / "extra.safetensors"))  # a shard the manifest names, not called shard_*
    names = (latents.shard_name(0), latents.shard_name(1), "extra.safetensors")
    latents.write_manifest(str(out), model="tiny-cogvideox", latent_shape=[4, 2, 4, 4], vae_scaling_factor=1.0,
                           shards=[{"file": n, "num": 4} for n in names], uncond={"text": torch.zeros(1, 8, 32)})
    (out / "notes.txt").write_text("not part of the dataset")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    argv = ["synthetic", "--model", "tiny-cogvideox", "--out", str(out), "--num", "3"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *argv], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"error: {out} already holds a dataset") and "--overwrite" in lines[0]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before  # nothing written
    data.main(argv + ["--overwrite", "--seed", "1"])
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", latents.shard_name(0), "uncond.safetensors"]
    ds = latents.LatentDataset(str(out))
    assert len(ds) == 3 and ds.manifest["synthetic"] and ds.manifest["num_samples"] == 3
    assert ds.digest == latents.LatentDataset(synthetic(tmp_path / "fresh", num=3, seed=1)).digest


def test_encode_prompts_cli(hy_weights, tmp_path):
    (tmp_path / "p.txt").write_text("a cat walks on the grass\n\na red car\n")
    data.main(["encode-prompts", "--prompts", str(tmp_path / "p.txt"), "--model", "tiny-hunyuan",
               "--weights", hy_weights, "--out", str(tmp_path / "c.safetensors")])
    cond = latents.load_cond(str(tmp_path / "c.safetensors"))
    assert cond["text"].shape == (3, 256, 16) and cond["pooled"].shape == (3, 16)
    assert cond["text_mask"][1].sum() == 1  # the empty line is the unconditional prompt


def test_decode_to_video(cog_weights, tmp_path):
    from diffusers import AutoencoderKLCogVideoX
    z = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    paths = video_io.decode_to_video(z, "tiny-cogvideox", cog_weights, str(tmp_path / "v.mp4"), fps=8)
    assert paths == [str(tmp_path / "v_0.mp4"), str(tmp_path / "v_1.mp4")]
    frames = read_back(paths[1])
    assert frames.shape == (9, 32, 32, 3)  # 3 latent frames -> 4*2+1, 8x8 -> 32x32 (tiny VAE ratio 4)
    vae = AutoencoderKLCogVideoX.from_pretrained(os.path.join(cog_weights, "vae"))
    with torch.no_grad():
        ref = vae.decode(z[1:] / 0.7).sample.clamp(-1, 1)  # the latents are divided by scaling_factor
        unscaled = vae.decode(z[1:]).sample.clamp(-1, 1)
    ours = video_io.decode_latents(vae, z[1:])
    torch.testing.assert_close(ours, ref)
    assert (ours - unscaled).abs().mean() > 0.05
    # the file holds those pixels up to H.264 loss (the random decoder's output is noise: a loose check)
    corr = np.corrcoef(frames.mean(-1).ravel(), video_io.to_uint8(ref[0]).mean(-1).ravel())[0, 1]
    assert corr > 0.8, corr


def test_write_video_mp4_and_gif(tmp_path):
    t = torch.linspace(-1, 1, 24)
    clip = (t.view(1, 1, 1, 24) * torch.linspace(0.2, 1, 6).view(1, 6, 1, 1)).expand(3, 6, 16, 24)
    video_io.write_video(clip, str(tmp_path / "a.mp4"), fps=4)
    back = read_back(str(tmp_path / "a.mp4"))
    assert back.shape == (6, 16, 24, 3)
    assert np.abs(back.astype(float) - video_io.to_uint8(clip).astype(float)).mean() < 3
    from PIL import Image
    u8 = torch.randint(0, 256, (5, 15, 17, 3), dtype=torch.uint8)
    video_io.write_video(u8, str(tmp_path / "b.gif"), fps=10)
    with Image.open(tmp_path / "b.gif") as im:
        assert (im.n_frames, im.size, im.info["duration"]) == (5, (17, 15), 100)
    gray = torch.zeros(1, 3, 8, 8)
    assert video_io.to_uint8(gray).shape == (3, 8, 8, 3) and (video_io.to_uint8(gray) == 128).all()
    with pytest.raises(ValueError, match="even sizes"):
        video_io.write_video(u8, str(tmp_path / "odd.mp4"))
    with pytest.raises(ValueError, match=r"\[C, F, H, W\]"):
        video_io.write_video(torch.zeros(6, 16, 24, 3), str(tmp_path / "c.mp4"))
    with pytest.raises(ValueError, match="unsupported video extension"):
        video_io.write_video(clip, str(tmp_path / "c.avi"))


def test_library_imports_without_optional_packages():
    code = ("import sys\nfor m in ('transformers', 'diffusers', 'imageio_ffmpeg', 'imageio', 'tqdm'):\n"
            "    sys.modules[m] = None\n"
            "import data\nfrom storage import latents, video_io\n"
            "try:\n    video_io.TextEncoder('cogvideox-2b', '.')\nexcept ImportError as e:\n    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "transformers is not installed" in r.stdout and "pip install -r requirements-video.txt" in r.stdout
