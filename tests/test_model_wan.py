"""Wan2.1 transformer: parity with diffusers' WanTransformer3DModel at tiny sizes, exact preset sizes, errors."""

from dataclasses import asdict, replace

import pytest
import torch

from storage import checkpoint
import model
from _random_weights import randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

TINY = model.PRESETS["tiny-wan"]
# other branches: temporal patch 2, no cross-attention norm, out_channels != in_channels (in < out: in > out is an
# image-to-video model, tested below), head dim not a multiple of 6
TINY_ALT = replace(TINY, patch_size=(2, 2, 2), cross_attn_norm=False, in_channels=8, attention_head_dim=10)


def random_reference(cfg, seed=0):
    """diffusers model with every parameter random (zero-inits and unit norms would hide bugs)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**asdict(cfg)).eval()
    return randomize_(ref)


def make_inputs(cfg, B=2, F=3, H=4, W=6, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, cfg.in_channels, F, H, W, generator=g), t=torch.tensor([900.0, 250.5, 17.0][:B]),
                text=torch.randn(B, L, cfg.text_dim, generator=g))


def reference_out(ref, inp):
    with torch.no_grad():
        return ref(inp["x"], inp["t"], inp["text"], return_dict=False)[0]


@pytest.mark.parametrize("cfg,F", [(TINY, 3), (TINY_ALT, 4)], ids=["tiny", "pt2-nonorm"])
def test_parity_with_diffusers_via_sharded_folder(cfg, F, tmp_path):
    ref = random_reference(cfg)
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / checkpoint.INDEX).is_file()  # really sharded
    ours = checkpoint.load_transformer(tmp_path).eval()
    assert isinstance(ours, model.WanTransformer) and ours.config == cfg
    inp = make_inputs(cfg, F=F)  # batch 2, non-square H x W, a latent size the config does not name
    with torch.no_grad():
        out, want = ours(**inp), reference_out(ref, inp)
    err = (out - want).abs().max().item()
    print(f"wan parity {cfg.patch_size} max abs err {err:.3g} (output scale {want.abs().max().item():.3g})")
    assert out.shape == want.shape and err <= 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # training's mixed precision: the same ops
        assert torch.equal(ours(**inp), reference_out(ref, inp))


def test_taps_and_head_reproduce_output():
    ours = model.WanTransformer(TINY).eval()
    ours.load_state_dict(random_reference(TINY).state_dict())
    inp = make_inputs(TINY)
    with torch.no_grad():
        v, feats = ours(**inp, taps=[0, 1])
        head = ours.head(feats[-1], ours.time_embed(inp["t"]), inp["x"].shape[2:])
    assert torch.equal(v, ours(**inp).detach()) and torch.equal(head, v)
    assert [f.shape for f in feats] == [(2, 3 * 2 * 3, 32)] * 2  # [B, L_video, D]
    assert not torch.equal(feats[0], feats[1])


# counts: WanTransformer3DModel of the Wan-AI config.json (diffusers layout) on the meta device, issue 23's table
@pytest.mark.parametrize("preset,count,taps", [
    ("wan2.1-t2v-1.3b", 1_418_996_800, 15), ("wan2.1-t2v-14b", 14_288_491_584, 20),
    ("wan2.1-i2v-14b-480p", 16_394_878_784, 20), ("wan2.1-i2v-14b-720p", 16_394_878_784, 20),
    ("wan2.2-t2v-a14b", 14_288_491_584, 20), ("wan2.2-i2v-a14b", 14_288_901_184, 20), ("wan2.2-ti2v-5b", 4_999_787_712, 15)])
def test_full_presets_on_meta(preset, count, taps):
    m = model.build_transformer(preset, device="meta")
    assert sum(p.numel() for p in m.parameters()) == count
    assert len(m.default_taps()) == taps and m.prediction == "flow"
    with torch.device("meta"):
        ref = WanTransformer3DModel(**asdict(model.PRESETS[preset]))
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_bad_inputs_and_configs():
    m = model.build_transformer("tiny-wan")
    inp = make_inputs(TINY)
    for bad, msg in [(dict(x=inp["x"][:, :3]), "x must be"), (dict(x=inp["x"][..., :5]), "divisible"),
                     (dict(t=inp["t"][:1]), "t must be"), (dict(text=inp["text"][..., :5]), "text must be"),
                     (dict(text=None), "text must be"), (dict(pooled=inp["text"][:, 0]), "unsupported conditioning")]:
        with pytest.raises(ValueError, match=msg):
            m(**{**inp, **bad})
    for bad, msg in [(dict(image_dim=1280), "added_kv_proj_dim"), (dict(pos_embed_seq_len=514), "FLF2V"),
                     (dict(qk_norm="rms_norm"), "qk_norm"), (dict(attention_head_dim=15), "even")]:
        with pytest.raises(ValueError, match=msg):
            replace(TINY, **bad)



# the Wan-AI config.json files (diffusers layout) of the new releases, written from their repositories
# (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, Wan2.2-T2V-A14B-Diffusers, Wan2.2-I2V-A14B-Diffusers, Wan2.2-TI2V-5B-Diffusers:
# transformer/config.json; the A14B repositories' transformer_2/config.json is the same)
RELEASE_CONFIGS = {
    "wan2.1-i2v-14b-480p": dict(added_kv_proj_dim=5120, attention_head_dim=128, cross_attn_norm=True, eps=1e-06,
                                ffn_dim=13824, freq_dim=256, image_dim=1280, in_channels=36, num_attention_heads=40,
                                num_layers=40, out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
                                rope_max_seq_len=1024, text_dim=4096),
    "wan2.2-t2v-a14b": dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06,
                            ffn_dim=13824, freq_dim=256, image_dim=None, in_channels=16, num_attention_heads=40,
                            num_layers=40, out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
                            rope_max_seq_len=1024, text_dim=4096),
    "wan2.2-i2v-a14b": dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06,
                            ffn_dim=13824, freq_dim=256, image_dim=None, in_channels=36, num_attention_heads=40,
                            num_layers=40, out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
                            rope_max_seq_len=1024, text_dim=4096),
    "wan2.2-ti2v-5b": dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06,
                           ffn_dim=14336, freq_dim=256, image_dim=None, in_channels=48, num_attention_heads=24,
                           num_layers=30, out_channels=48, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
                           rope_max_seq_len=1024, text_dim=4096),
}


@pytest.mark.parametrize("preset", sorted(RELEASE_CONFIGS))
def test_release_configs_equal_presets(preset):
    cfg = model.config_from_dict({"_class_name": "WanTransformer3DModel", **RELEASE_CONFIGS[preset]})
    assert cfg == model.PRESETS[preset]


def i2v_inputs(cfg, kind, B=2, F=3, H=4, W=6, seed=3):
    """Our call's inputs and diffusers' transformer call for one image-conditioning kind (the pipelines' forms)."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 16 if kind != "ti2v" else 48, F, H, W, generator=g), torch.tensor([900.0, 250.5][:B])
    text = torch.randn(B, 512, cfg.text_dim, generator=g)  # diffusers cuts the image tokens off at length - 512
    if kind == "ti2v":  # WanImageToVideoPipeline with expand_timesteps: the first frame replaced, its tokens at t = 0
        cond = torch.randn(B, 48, 1, H, W, generator=g)
        mask = torch.ones(1, 1, F, H, W)
        mask[:, :, 0] = 0
        ts = torch.stack([(mask[0][0][:, ::2, ::2] * ti).flatten() for ti in t])  # [B, L]
        ours = dict(x=x, t=t, text=text, image_latents=cond)
        ref = dict(hidden_states=(1 - mask) * cond + mask * x, timestep=ts, encoder_hidden_states=text)
        return ours, ref
    cond = torch.randn(B, 20, F, H, W, generator=g)  # mask channels + encoded first frame
    ours = dict(x=x, t=t, text=text, image_latents=cond)
    ref = dict(hidden_states=torch.cat([x, cond], 1), timestep=t, encoder_hidden_states=text)
    if cfg.image_dim:
        ours["image_embeds"] = ref["encoder_hidden_states_image"] = torch.randn(B, 5, cfg.image_dim, generator=g)
    return ours, ref


@pytest.mark.parametrize("preset,kind", [("tiny-wan-i2v", "embeds"), ("tiny-wan2.2-i2v", "concat"),
                                         ("tiny-wan2.2-ti2v", "ti2v")])
def test_image_conditioning_equals_diffusers(preset, kind, tmp_path):
    """model(x, t, text, image_latents, image_embeds) = diffusers' transformer on the pipeline's concatenated /
    first-frame input (and per-token timesteps for TI2V); the head from taps + time_embed too."""
    cfg = model.PRESETS[preset]
    ref = random_reference(cfg)
    ref.save_pretrained(tmp_path)
    ours = checkpoint.load_transformer(tmp_path).eval()
    inp, ref_inp = i2v_inputs(cfg, kind)
    with torch.no_grad():
        want = ref(**ref_inp, return_dict=False)[0]
        out, feats = ours(**inp, taps=[1])
        cond = {k: v for k, v in inp.items() if k not in ("x", "t")}
        temb = ours.time_embed(inp["t"], grid=tuple(inp["x"].shape[2:]), **cond)
        head = ours.head(feats[0], temb, inp["x"].shape[2:])
    err = (out - want).abs().max().item()
    print(f"{preset} parity max abs err {err:.3g} (scale {want.abs().max().item():.3g})")
    assert out.shape == want.shape and err <= 1e-5
    assert torch.equal(head, out)
    if kind == "ti2v":  # the first frame is read from image_latents, never from x
        x2 = inp["x"].clone()
        x2[:, :, 0] = 7.0
        with torch.no_grad():
            assert torch.equal(ours(**{**inp, "x": x2}), out)


def test_image_conditioning_bad_inputs():
    m = model.build_transformer("tiny-wan-i2v")
    inp, _ = i2v_inputs(m.config, "embeds")
    for bad, msg in [(dict(image_latents=None), "needs image_latents"), (dict(image_embeds=None), "image_embeds must"),
                     (dict(image_latents=inp["image_latents"][..., :4]), "image_latents must"),
                     (dict(image_embeds=inp["image_embeds"][..., :3]), "image_embeds must")]:
        with pytest.raises(ValueError, match=msg):
            m(**{**inp, **bad})
    t2v = model.build_transformer("tiny-wan")
    with pytest.raises(ValueError, match="image_latents must"):
        t2v(inp["x"], inp["t"], inp["text"], image_latents=inp["image_latents"])
