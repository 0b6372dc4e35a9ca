"""storage/latents.py: the dataset format's reader (checked by content, memory-mapped), check_fits and the training
order (batches, draws), on tiny synthetic datasets (data.py's encoders are tests/test_data.py's)."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
from storage import integrity, latents


def synthetic(out, num=4, seed=0):
    """A tiny-cogvideox synthetic dataset in `out` -> its folder as a string."""
    data.synthetic_dataset("tiny-cogvideox", str(out), num=num, seed=seed)
    return str(out)


def test_a_file_changed_since_its_manifest_is_refused_by_name(tmp_path):
    ds = synthetic(tmp_path / "ds")
    shard, uncond = os.path.join(ds, latents.shard_name(0)), os.path.join(ds, "uncond.safetensors")
    m = latents.read_manifest(ds)
    assert m["shards"][0]["sha256"] == integrity.digest(shard) and m["shards"][0]["bytes"] == os.path.getsize(shard)
    assert m["uncond_sha256"] == integrity.digest(uncond)
    for path in (shard, uncond):  # rewritten in place with other tensors of the same shapes
        keep = open(path, "rb").read()
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
        with pytest.raises(latents.DataError, match=re.escape(path) + r" changed since its manifest was written "
                                                     r"\(sha256 [0-9a-f]{12}\.\.\. != recorded [0-9a-f]{12}\.\.\.\)"):
            latents.LatentDataset(ds)
        open(path, "wb").write(keep)
    assert len(latents.LatentDataset(ds)) == 4


def test_digest_is_the_content_not_the_folder_and_old_manifests_still_load(tmp_path):
    a = synthetic(tmp_path / "a")
    digest = latents.LatentDataset(a).digest
    moved = shutil.copytree(a, tmp_path / "moved")
    assert re.fullmatch("[0-9a-f]{64}", digest) and latents.LatentDataset(moved).digest == digest
    assert latents.LatentDataset(synthetic(tmp_path / "b", seed=1)).digest != digest  # other content
    assert latents.LatentDataset(synthetic(tmp_path / "c", num=3)).digest != digest
    # a manifest written before the digests: loads, its digest computed from the files
    path = os.path.join(moved, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m["shards"] = [{"file": s["file"], "num": s["num"]} for s in m["shards"]]
    del m["uncond_sha256"]
    with open(path, "w") as f:
        json.dump(m, f)
    old = latents.LatentDataset(moved)
    assert old.digest == digest and torch.equal(old.tensors["latents"][:],
                                                latents.LatentDataset(a).tensors["latents"][:])



def test_check_fits_names_every_mismatch():
    import model
    cfg, cog = model.PRESETS["tiny-hunyuan"], model.PRESETS["tiny-cogvideox"]
    D, P = cfg.text_embed_dim, cfg.pooled_projection_dim
    good = {"text": torch.zeros(2, 5, D), "text_mask": torch.ones(2, 5, dtype=torch.long), "pooled": torch.zeros(2, P),
            "latents": torch.zeros(2, cfg.in_channels, 2, 4, 4), "label": torch.zeros(2)}  # other keys are ignored
    uncond = {k: v[:1] for k, v in good.items() if k in latents.COND_KEYS}
    assert latents.check_fits(cfg, good, [cfg.in_channels, 2, 4, 4], uncond) == ["pooled", "text", "text_mask"]
    bad = {"text": torch.zeros(2, 5, D + 1), "text_mask": torch.ones(2, 4, dtype=torch.long), "pooled": torch.zeros(3, P)}
    with pytest.raises(latents.DataError) as e:
        latents.check_fits(cfg, bad, [cfg.in_channels + 1, 2, 3, 4], {"text": uncond["text"]}, where="DIR")
    msg = str(e.value)
    for want in ("DIR does not fit model HunyuanVideoConfig", f"latents have {cfg.in_channels + 1} channels",
                 "divisible by the patch", f"text is [2, 5, {D + 1}]", "text_mask is [2, 4]", "batch sizes differ",
                 "uncond keys ['text'] differ"):
        assert want in msg, (want, msg)
    with pytest.raises(latents.DataError, match=r"keys \['text', 'text_mask'\], the model takes \['text'\]"):
        latents.check_fits(cog, {k: good[k] for k in ("text", "text_mask")})  # CogVideoX takes no text mask


def test_draws_belong_to_the_sample_not_to_the_batch_split():
    idx, shape = torch.tensor([5, 1, 7]), (2, 3, 2, 2)
    eps, u, n = latents.draws(idx, 3, 0, shape, gan=True)
    alone = latents.draws(idx[1:2], 3, 0, shape, gan=True)
    assert all(torch.equal(a[1:2], b) for a, b in zip((eps, u, n), alone))
    assert not torch.equal(eps[0], eps[2]) and not torch.equal(eps, latents.draws(idx, 4, 0, shape, gan=False)[0])
    no_gan = latents.draws(idx, 3, 0, shape, gan=False)
    assert no_gan[2] is None and torch.equal(no_gan[0], eps) and torch.equal(no_gan[1], u)


def test_batches_resume_exactly_mid_epoch():
    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"x": torch.tensor(i)}

    def sampler():
        return torch.utils.data.DistributedSampler(Numbers(), 1, 0, shuffle=True, seed=3, drop_last=True)
    stream = latents.batches(Numbers(), sampler(), 2)
    straight = [next(stream) for _ in range(7)]  # 3 batches an epoch: wraps twice
    assert [e for _, e, _ in straight] == [0, 0, 0, 1, 1, 1, 2] and all(torch.equal(b["x"], b["index"]) for b, _, _ in straight)
    _, epoch, pos = straight[1]
    resumed = latents.batches(Numbers(), sampler(), 2, epoch, pos)
    for (b, e, p), (b2, e2, p2) in zip(straight[2:], resumed):
        assert torch.equal(b["index"], b2["index"]) and (e, p) == (e2, p2)


def test_dataset_is_memory_mapped_and_indexes_like_a_tensor(tmp_path):
    """LatentDataset keeps no copy of the shards (issue 28: 8 processes a node each held the whole dataset): opening a
    64 MiB dataset grows the process by far less than it; its columns index like the concatenated tensor would, across
    shard boundaries, in any index form."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(64, 4, 8, 64, 128, generator=g)  # 64 samples x 1 MiB, in 3 shards of unequal size
    text = torch.randn(64, 3, 16, generator=g)
    for i, (a, b) in enumerate(((0, 20), (20, 21), (21, 64))):
        latents.write_shard(tmp_path, i, {"latents": lat[a:b], "text": text[a:b]})
    latents.write_manifest(tmp_path, model="custom", latent_shape=list(lat.shape[1:]), vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(i), "num": n} for i, n in enumerate((20, 1, 43))],
                           uncond={"text": text[:1]})

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    ds = latents.LatentDataset(str(tmp_path))
    grown = rss() - before
    assert grown < lat.numel() * 4 / 8, grown  # < 1/8 of the dataset (a concatenated copy would be all of it)
    col = ds.tensors["latents"]
    assert col.shape == lat.shape and col.dtype == torch.float32 and len(col) == 64 and col.dim() == 5
    for idx in (5, -1, slice(18, 23), slice(None), torch.tensor([63, 0, 20, 21, 19]), [2, 2, 40], (slice(1, 3), 0)):
        assert torch.equal(col[idx], lat[idx]), idx
    assert torch.equal(ds[20]["text"], text[20]) and len(ds) == 64
