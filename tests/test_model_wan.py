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
# other branches: temporal patch 2, no cross-attention norm, out_channels != in_channels, head dim not a multiple of 6
TINY_ALT = replace(TINY, patch_size=(2, 2, 2), cross_attn_norm=False, out_channels=8, attention_head_dim=10)


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


@pytest.mark.parametrize("preset,count,taps", [("wan2.1-t2v-1.3b", 1_418_996_800, 15), ("wan2.1-t2v-14b", 14_288_491_584, 20)])
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
    for bad, msg in [(dict(image_dim=1280), "I2V"), (dict(qk_norm="rms_norm"), "qk_norm"), (dict(attention_head_dim=15), "even")]:
        with pytest.raises(ValueError, match=msg):
            replace(TINY, **bad)

