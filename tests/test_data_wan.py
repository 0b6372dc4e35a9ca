"""Wan2.1 data: umT5 text as WanPipeline.encode_prompt gives it, the Wan VAE's per-channel latent normalisation
(encode as the authors' normalize_dit_input, decode as WanPipeline), on tiny random models in the hub layout."""
import os

import pytest
import torch

import data
from storage import latents, video_io
from test_data import CAPTIONS, LONG, t5_tokenizer, videos  # noqa: F401  (videos: the shared clip fixture)

MEAN, STD = [0.5, -0.25, 1.0, 0.0], [2.0, 0.5, 1.5, 3.0]


@pytest.fixture(scope="module")
def wan_weights(tmp_path_factory):
    """tiny Wan hub folder: vae/ (AutoencoderKLWan, 4x temporal / 4x spatial, 4 channels), text_encoder/ (umT5),
    tokenizer/ (sentencepiece T5 tokenizer, like the real umT5 one)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=MEAN, latents_std=STD).save_pretrained(root / "vae")
    n_vocab = t5_tokenizer(root / "tokenizer", 512)
    UMT5EncoderModel(UMT5Config(vocab_size=n_vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                pad_token_id=0, eos_token_id=1)).save_pretrained(root / "text_encoder")
    return str(root)


def test_wan_text_matches_diffusers(wan_weights):
    from diffusers import WanPipeline
    enc = video_io.TextEncoder("wan2.1-t2v-1.3b", wan_weights)
    pipe = WanPipeline(tokenizer=enc.tokenizer, text_encoder=enc.encoder, transformer=None, vae=None, scheduler=None)
    prompts = [CAPTIONS[0], "  a dog &amp;amp; a   cat\n", "", LONG]  # cleaning: HTML twice, whitespace
    with pytest.warns(UserWarning, match=r"umT5 \(512\)'s token limit, truncated"):
        ours = enc(prompts)
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    assert set(ours) == {"text"} and ours["text"].shape == (4, 512, 16)
    torch.testing.assert_close(ours["text"], ref, rtol=0, atol=0)
    n_real = len(enc.tokenizer(CAPTIONS[0]).input_ids)  # the prompt's tokens + EOS keep their states, zeros after
    assert ours["text"][0, n_real:].abs().max() == 0 and ours["text"][0, :n_real].abs().min() > 0


def test_encode_wan_dataset_and_decode(wan_weights, videos, tmp_path):  # noqa: F811
    from diffusers import AutoencoderKLWan
    out = str(tmp_path / "ds")
    data.main(["encode", "--videos", videos, "--captions", os.path.join(videos, "captions.txt"), "--model",
               "tiny-wan", "--weights", wan_weights, "--out", out, "--frames", "9", "--height", "32", "--width", "32",
               "--posterior", "mode"])
    ds = latents.LatentDataset(out)
    m = ds.manifest
    assert m["latent_shape"] == [4, 3, 8, 8] and ds.tensors["text"].shape == (3, 512, 16)
    assert m["vae_scaling_factor"] == 1.0 and m["vae_latents_mean"] == MEAN and m["vae_latents_std"] == STD
    vae = AutoencoderKLWan.from_pretrained(os.path.join(wan_weights, "vae"))
    clip = video_io.read_clip(os.path.join(videos, "clip1.mp4"), 9, 32, 32)
    mean, std = torch.tensor(MEAN).view(4, 1, 1, 1), torch.tensor(STD).view(4, 1, 1, 1)
    with torch.no_grad():
        ref = (vae.encode(clip[None]).latent_dist.mode()[0] - mean) * (1 / std)  # authors' normalize_dit_input
    torch.testing.assert_close(ds[1]["latents"], ref, rtol=1e-4, atol=1e-5)
    # decode: WanPipeline's latents / (1 / std) + mean, then the VAE
    z = ds.tensors["latents"][:1]
    with torch.no_grad():
        want = vae.decode(z / (1 / std[None]) + mean[None]).sample.clamp(-1, 1)
    ours = video_io.decode_latents(vae, z)
    assert ours.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    paths = video_io.decode_to_video(z, "tiny-wan", wan_weights, str(tmp_path / "v.mp4"), fps=16)
    assert paths == [str(tmp_path / "v.mp4")] and os.path.getsize(paths[0]) > 0


def test_wan_sizes_and_vae_check(wan_weights):
    cfg = video_io.vae_config("wan2.1-t2v-1.3b", wan_weights)
    assert video_io.vae_ratios(cfg) == (4, 4)
    # the release: 4x temporal / 8x spatial; 81 x 480 x 832 -> 16 x 21 x 60 x 104 latents (DESIGN.md section 6)
    real = {"temperal_downsample": [False, True, True], "dim_mult": [1, 2, 4, 4], "z_dim": 16}
    assert video_io.latent_shape(real, *video_io.clip_size("wan2.1-t2v-1.3b", real)) == [16, 21, 60, 104]
    with pytest.raises(ValueError, match="AutoencoderKLWan.*needs AutoencoderKLCogVideoX"):
        video_io.vae_config("cogvideox-2b", wan_weights)


def test_wan_encode_prompts_cli(wan_weights, tmp_path):
    (tmp_path / "p.txt").write_text("a cat walks on the grass\n\na red car\n")
    data.main(["encode-prompts", "--prompts", str(tmp_path / "p.txt"), "--model", "wan2.1-t2v-1.3b",
               "--weights", wan_weights, "--out", str(tmp_path / "c.safetensors")])
    cond = latents.load_cond(str(tmp_path / "c.safetensors"))
    assert set(cond) == {"text"} and cond["text"].shape == (3, 512, 16)  # the empty line: the unconditional prompt
    want = video_io.TextEncoder("tiny-wan", wan_weights)(["a cat walks on the grass", "", "a red car"])["text"]
    torch.testing.assert_close(cond["text"], want)
