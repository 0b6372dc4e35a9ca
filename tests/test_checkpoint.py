"""Checkpoint IO: diffusers layout round trips, strict key checks, atomic directories."""

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from storage import checkpoint, resume
import model as M



def tiny(preset="tiny-cogvideox-rope", seed=0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    m = M.build_transformer(preset, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + 0.5)
    return m.eval()


def assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", ["5GB", "50KB"])
def test_save_load_bit_exact(tmp_path, shard):
    m = tiny(dtype=torch.bfloat16)
    checkpoint.save_transformer(m, tmp_path / "transformer", max_shard_size=shard)
    files = sorted(os.listdir(tmp_path / "transformer"))
    if shard == "5GB":
        assert files == ["config.json", checkpoint.WEIGHTS]
    else:
        shards = [f for f in files if f.startswith("diffusion_pytorch_model-")]
        assert len(shards) > 2 and checkpoint.INDEX in files
        assert all(os.path.getsize(tmp_path / "transformer" / f) < 50_000 + 20_000 for f in shards)
    cfg = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "CogVideoXTransformer3DModel" and "_diffusers_version" in cfg
    back = checkpoint.load_transformer(tmp_path)  # parent folder accepted
    assert back.config == m.config
    assert_same_tensors(back, m)
    assert all(p.requires_grad for p in back.parameters())
    f32 = checkpoint.load_transformer(tmp_path / "transformer", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in f32.parameters())
    assert torch.equal(f32.proj_out.weight, m.proj_out.weight.float())


def test_saved_folder_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    m = tiny("tiny-cogvideox")
    checkpoint.save_transformer(m, tmp_path / "t", max_shard_size="50KB")
    ref = diffusers.CogVideoXTransformer3DModel.from_pretrained(tmp_path / "t").eval()
    sd = ref.state_dict()
    assert sd.keys() == m.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    x, t, text = torch.randn(2, 4, 3, 6, 8), torch.tensor([3, 700]), torch.randn(2, 8, 32)
    with torch.no_grad():
        want = ref(x.transpose(1, 2), text, t, return_dict=False)[0].transpose(1, 2)
        got = m(x, t, text=text)
    err = (got - want).abs().max().item()
    print(f"save_transformer -> diffusers from_pretrained: max abs err {err:.3e}")
    assert err <= 1e-5 * want.abs().max()


def test_strict_key_error_lists_everything(tmp_path):
    m = tiny()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    del sd["proj_out.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["norm_final.weight"] = torch.zeros(7)
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(M.config_to_dict(m.config)))
    save_file(sd, folder / checkpoint.WEIGHTS)
    with pytest.raises(ValueError) as e:
        checkpoint.load_transformer(folder)
    msg = str(e.value)
    assert "missing keys: ['proj_out.bias']" in msg
    assert "unexpected keys: ['extra.weight']" in msg
    assert "norm_final.weight: stored (7,) vs model (32,)" in msg


def test_index_problems_are_named(tmp_path):
    m = tiny()
    folder = tmp_path / "t"
    checkpoint.save_transformer(m, folder, max_shard_size="50KB")
    index = json.loads((folder / checkpoint.INDEX).read_text())
    shard = index["weight_map"]["proj_out.weight"]
    index["weight_map"]["proj_out.weight"] = "nowhere.safetensors"
    (folder / checkpoint.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing: \\['nowhere.safetensors'\\]"):
        checkpoint.load_transformer(folder)
    index["weight_map"]["proj_out.weight"] = shard
    del index["weight_map"]["proj_out.bias"]
    (folder / checkpoint.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not in index: \\['proj_out.bias'\\]"):
        checkpoint.load_transformer(folder)
    with pytest.raises(ValueError, match="nothing does not exist"):
        checkpoint.load_transformer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a checkpoint: no step_\\* folders, train.py config.json or "
                                         "transformer config.json"):
        checkpoint.load_transformer(tmp_path / "empty")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no converter for 'weights.pt'"):
        checkpoint.load_transformer(tmp_path / "weights.pt")


def test_meta_build_then_load_keeps_meta_free(tmp_path):
    m = tiny("tiny-cogvideox")
    checkpoint.save_transformer(m, tmp_path / "t")
    back = checkpoint.load_transformer(tmp_path / "t", device="cpu")
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])
    x, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([10]), torch.randn(1, 8, 32)
    with torch.no_grad():
        assert torch.equal(back(x, t, text=text), m(x, t, text=text))


def test_parse_size():
    assert checkpoint.parse_size("5GB") == 5 * 10**9
    assert checkpoint.parse_size("200KB") == 200_000
    assert checkpoint.parse_size("1GiB") == 2**30
    assert checkpoint.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        checkpoint.parse_size("lots")


def test_atomic_dir(tmp_path):
    final = tmp_path / "out"
    with checkpoint.atomic_dir(final) as d:
        (open(os.path.join(d, "a"), "w")).write("1")
        assert not final.exists()
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(final) as d:
            (open(os.path.join(d, "b"), "w")).write("2")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # temp dir removed, old result intact
    assert sorted(os.listdir(final)) == ["a"]
    with checkpoint.atomic_dir(final) as d:  # replacing an existing result
        (open(os.path.join(d, "c"), "w")).write("3")
    assert sorted(os.listdir(final)) == ["c"] and sorted(os.listdir(tmp_path)) == ["out"]
    # saving over an old sharded folder leaves no stale shards behind
    checkpoint.save_transformer(tiny(), final, max_shard_size="50KB")
    checkpoint.save_transformer(tiny(), final)
    assert sorted(os.listdir(final)) == ["config.json", checkpoint.WEIGHTS]
    assert set(load_file(final / checkpoint.WEIGHTS)) == set(tiny().state_dict())


def test_step_folder_loads_its_transformer_not_its_run_config(tmp_path):
    """A train.py step folder's own config.json is the run config; the model's is in transformer/."""
    m = tiny("tiny-cogvideox")
    step = tmp_path / "step_0000003"
    checkpoint.save_transformer(m, step / "transformer")
    (step / "config.json").write_text(json.dumps({"stage": "semantic", "model_config": M.config_to_dict(m.config)}))
    assert checkpoint.transformer_folder(step) == str(step / "transformer")
    assert_same_tensors(checkpoint.load_transformer(step), m)
    assert checkpoint.read_config(step) == m.config  # the folder, its transformer/, or the run's config.json
    assert checkpoint.read_config(str(step / "config.json")) == m.config
    assert checkpoint.read_config("tiny-hunyuan") == M.PRESETS["tiny-hunyuan"]
    # a run folder: the newest complete step's transformer (a newer, incomplete step is skipped)
    (tmp_path / "step_0000009").mkdir()
    assert checkpoint.transformer_folder(tmp_path) == str(step / "transformer")
    assert_same_tensors(checkpoint.load_transformer(tmp_path), m)
    with pytest.raises(ValueError, match="neither a preset"):
        checkpoint.read_config("no-such-model")


def test_save_step_latest_step_and_resume(tmp_path, capsys):
    m = tiny("tiny-cogvideox")
    opt = torch.optim.AdamW(m.parameters())
    run = {"stage": "semantic", "boundaries": [37]}
    for step in (2, 4):
        resume.save_step(tmp_path, step, m, opt, {"epoch": 0, "pos": step}, run)
    s2, s4 = (checkpoint.step_dir(tmp_path, s) for s in (2, 4))
    assert checkpoint.step_folders(tmp_path) == ["step_0000002", "step_0000004"]
    assert sorted(os.listdir(s4)) == ["checksums.json", "config.json", "optimizer.safetensors", "train_state.pt",
                                      "transformer"]
    assert json.loads((tmp_path / "step_0000004" / "config.json").read_text()) == {**run, "step": 4}
    ckpt, state = resume.resume_from(tmp_path, run)
    assert ckpt == s4 and (state["step"], state["pos"], len(state["rng"])) == (4, 4, 1)
    assert_same_tensors(checkpoint.load_transformer(s4), m)
    with pytest.raises(ValueError, match=r"saved with stage='semantic' \(now 'detail'\)"):
        resume.resume_from(tmp_path, {"stage": "detail"})
    # truncated files count as missing; the newest complete step wins, naming the ones it skips
    with open(os.path.join(s4, "train_state.pt"), "r+b") as f:
        f.truncate(1000)
    assert checkpoint.step_missing(s4, checkpoint.RESUMABLE) == ["train_state.pt (unreadable)"]
    assert checkpoint.step_missing(s4) == []  # sampling needs no train state
    capsys.readouterr()
    assert checkpoint.latest_step(tmp_path, checkpoint.RESUMABLE) == s2
    err = capsys.readouterr().err
    assert "skipping incomplete or damaged checkpoint" in err and "step_0000004" in err
    with open(os.path.join(s2, "transformer", checkpoint.WEIGHTS), "r+b") as f:
        f.truncate(100)
    assert checkpoint.step_missing(s2) == [f"transformer/{checkpoint.WEIGHTS} (unreadable)"]
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resume.resume_from(tmp_path, run)
    assert checkpoint.latest_step(tmp_path, quiet=True) == s4
    # a LoRA detail step also needs its adapter; a run without step folders starts fresh
    (tmp_path / "step_0000004" / "config.json").write_text(json.dumps({"stage": "detail", "detail_full": False}))
    assert checkpoint.step_missing(s4) == ["detail.safetensors"]
    shutil.rmtree(os.path.join(s4, "transformer"))
    assert checkpoint.step_missing(s4) == ["transformer/config.json", "detail.safetensors", "transformer weights"]
    assert resume.resume_from(tmp_path / "fresh", run) == (None, None)


def test_rng_state_round_trip():
    s = resume.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    resume.set_rng_state(s)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_resolve_tells_every_kind_of_path_apart(tmp_path):
    """checkpoint.resolve: run folder -> its newest complete step; step folder (its run config and adapter);
    transformer and pipeline folders; the authors' layout (by its PEFT keys); original files; and what is none."""
    m = tiny("tiny-cogvideox")
    run = {"stage": "detail", "model_config": M.config_to_dict(m.config)}
    for step in ("step_0000001", "step_0000002"):
        checkpoint.save_transformer(m, tmp_path / "run" / step / "transformer")
        (tmp_path / "run" / step / "config.json").write_text(json.dumps(run))
        save_file({"x": torch.zeros(1)}, tmp_path / "run" / step / "detail.safetensors")
    (tmp_path / "run" / "config.json").write_text(json.dumps(run))
    (tmp_path / "run" / "step_0000003").mkdir()  # newer and incomplete: skipped
    src = checkpoint.resolve(tmp_path / "run")
    assert (src.kind, src.folder, src.weights, src.run["stage"], src.detail) == (
        "step", str(tmp_path / "run" / "step_0000002"), str(tmp_path / "run" / "step_0000002" / "transformer"),
        "detail", str(tmp_path / "run" / "step_0000002" / "detail.safetensors"))
    assert checkpoint.resolve(tmp_path / "run" / "step_0000001").folder == str(tmp_path / "run" / "step_0000001")
    pipe = tmp_path / "pipe"
    checkpoint.save_transformer(m, pipe / "transformer")
    assert [(s.kind, s.weights) for s in map(checkpoint.resolve, (pipe, pipe / "transformer"))] == [
        ("transformer", str(pipe / "transformer")), ("transformer", str(pipe / "transformer"))]
    sd = {k.replace("to_q.weight", "to_q.lora_A.lora1.weight") if "to_q.weight" in k else k: v
          for k, v in m.state_dict().items()}  # the authors' adapter keys (storage/released.py reads the rest)
    (tmp_path / "authors" / "transformer").mkdir(parents=True)
    save_file(sd, tmp_path / "authors" / "transformer" / checkpoint.WEIGHTS)
    shutil.copy(pipe / "transformer" / "config.json", tmp_path / "authors" / "transformer" / "config.json")
    assert checkpoint.resolve(tmp_path / "authors").kind == "authors"
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint.resolve(tmp_path / "mp_rank_00_model_states.pt").kind == "original"
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text(json.dumps(run))  # a run before its first save
    for path, want in ((tmp_path / "fresh", "no checkpoint yet in this run folder"), (tmp_path / "nope", "does not exist"),
                       (tmp_path / "run" / "step_0000003", "damaged or incomplete"),
                       (tmp_path / "w.bin", "no known checkpoint format")):
        if path.name == "w.bin":
            path.write_bytes(b"")
        with pytest.raises(checkpoint.CheckpointError, match=want):
            checkpoint.resolve(path)


def test_digests_side_by_side_equal_each_file_read_alone(tmp_path):
    """integrity.digests hashes the shards of a save in threads (issue 28: rank 0's re-read of a 13B save): the same
    sha256 as hashlib over each file's bytes, in any order of completion."""
    import hashlib
    from storage import integrity
    blobs = {tmp_path / f"f{i}": os.urandom(n) for i, n in enumerate((0, 5, 3 << 20, 9 << 20))}
    for p, b in blobs.items():
        p.write_bytes(b)
    assert integrity.digests([str(p) for p in blobs]) == {str(p): hashlib.sha256(b).hexdigest() for p, b in blobs.items()}


def test_safetensors_writer_writes_the_reference_bytes(tmp_path):
    """storage/safetensors_io.save (every file a save writes, hashed on its way out) writes the bytes of
    safetensors.torch.save_file: every dtype, non-contiguous, 0-dim and empty tensors, metadata."""
    from storage import integrity, safetensors_io
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 4, dtype=torch.float64, generator=g), "b": torch.arange(5), "e": torch.tensor(3, dtype=torch.int32),
          "c": torch.randn(2, 3, generator=g).bfloat16(), "d": torch.randn(7, generator=g).half(), "z": torch.ones(2, 1),
          "f": torch.randn(2, 2, generator=g).t(), "g": torch.zeros(0, 3, dtype=torch.uint8), "h": torch.tensor([True, False]),
          "i": torch.ones(1, dtype=torch.int8), "j": torch.ones(1, dtype=torch.int16)}
    save_file({k: v.contiguous() for k, v in ts.items()}, tmp_path / "ref", metadata={"format": "pt"})
    safetensors_io.save(ts, str(tmp_path / "ours"), metadata={"format": "pt"})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ours", "ref"]  # the temp file renamed, nothing left beside it
    safetensors_io.save(ts, str(tmp_path / "meta"), metadata={"z": "1", "a": "2"})  # the reference orders these at random
    with safe_open(tmp_path / "meta", framework="pt") as f:
        assert f.metadata() == {"z": "1", "a": "2"} and all(torch.equal(f.get_tensor(k), v) for k, v in ts.items())
    os.remove(tmp_path / "meta")
    assert integrity.write_checksums(str(tmp_path))["ours"]["sha256"] == integrity.digest(str(tmp_path / "ref"))


def test_a_save_reads_none_of_its_files_back(tmp_path, monkeypatch):
    """Issue 28 item 4: a step folder's checksums are taken as its files are written (rank 0 re-read a 13B save
    for them while every other rank waited): only the small JSON files are hashed from disk, and the recorded
    digests are those of the bytes on disk (verify hashes them again)."""
    from storage import integrity
    m = tiny("tiny-cogvideox")
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), text=torch.randn(1, 8, 32)).sum().backward()
    opt.step()
    read, digest = [], integrity.digest
    monkeypatch.setattr(integrity, "digest", lambda p: read.append(os.path.basename(p)) or digest(p))
    resume.save_step(tmp_path, 3, m, opt, {"epoch": 0, "pos": 3}, {"stage": "semantic"})
    assert sorted(read) == ["config.json", "config.json"]  # the run's and transformer/'s
    monkeypatch.setattr(integrity, "digest", digest)
    assert integrity.verify(checkpoint.step_dir(tmp_path, 3)) == []
    with open(os.path.join(checkpoint.step_dir(tmp_path, 3), "train_state.pt"), "r+b") as f:  # a flipped byte is seen
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    assert integrity.verify(checkpoint.step_dir(tmp_path, 3)) == ["train_state.pt (sha256 mismatch: corrupted)"]


def test_an_fsdp_save_holds_one_gathered_tensor_at_a_time(tmp_path, monkeypatch):
    """Issue 28 item 4: under --fsdp rank 0 writes what the ranks gather. Each tensor is gathered when its turn to be
    written comes and written as it arrives: the weights (transformer/), then the AdamW moments and the EMA
    (optimizer.safetensors, ema.safetensors), never two gathered tensors alive at once and never the whole state
    (one process: the gathers are stood in for by copies). That the files hold the state: the FSDP runs compared with
    one process (tests/test_train.py::test_fsdp_grad_accum_holds_only_shards, tests/test_wan22.py) and exact resume."""
    import glob
    import weakref
    import torch.distributed.checkpoint.state_dict as dsd
    from safetensors.torch import load_file
    import train
    from test_train import SMALL, make_dataset
    torch.manual_seed(0)
    checkpoint.save_transformer(M.build_transformer("tiny-wan"), tmp_path / "t")
    d = make_dataset(tmp_path / "d", "tiny-wan")
    full, gathered, seen = resume._full, [], []

    def gathered_one(v):
        on_disk = glob.glob(str(tmp_path / "run" / ".step_*" / "transformer" / checkpoint.WEIGHTS))
        seen.append((sum(r() is not None for r in gathered), len(on_disk)))
        out = full(v).clone()
        if out.dim():  # AdamW's step counts (0-dim) stay in train_state.pt
            gathered.append(weakref.ref(out))
        return out
    monkeypatch.setattr(dsd, "get_model_state_dict", lambda *a, **k: pytest.fail("the whole state gathered at once"))
    monkeypatch.setattr(resume, "_full", gathered_one)
    train.main(["--stage", "semantic", "--teacher", str(tmp_path / "t"), "--data", d, "--out", str(tmp_path / "run"),
                "--max-steps", "1", "--fsdp", "--target-ema", "0.9", *SMALL])
    step = checkpoint.step_dir(tmp_path / "run", 1)
    weights, P = load_file(os.path.join(step, "transformer", checkpoint.WEIGHTS)), len(M.build_transformer("tiny-wan").state_dict())
    assert len(weights) == P and len(seen) >= 4 * P  # the weights, 2 moments + a step count per parameter, the EMA
    assert [n for _, n in seen] == [0] * P + [1] * (len(seen) - P)  # the weights first, on disk before the rest
    assert max(g for g, _ in seen) <= 1  # the one written last, at most
    assert sorted(os.listdir(step)) == ["checksums.json", "config.json", "ema.safetensors", "optimizer.safetensors",
                                        "train_state.pt", "transformer"]


def test_a_step_folder_from_before_the_moments_had_their_own_files_still_resumes(tmp_path):
    """Step folders written before this layout held the AdamW moments and the EMA inside train_state.pt: read_state
    gives the same train state from either layout, and resume_from goes on from the old one."""
    import copy
    from storage import integrity
    m = tiny("tiny-cogvideox")
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), text=torch.randn(1, 8, 32)).sum().backward()
    opt.step()
    ema, run = copy.deepcopy(m), {"stage": "semantic"}
    resume.save_step(tmp_path / "new", 2, m, opt, {"epoch": 0, "pos": 2}, run, ema)
    new = checkpoint.step_dir(tmp_path / "new", 2)
    assert {checkpoint.MOMENTS, checkpoint.EMA} <= set(os.listdir(new))
    state = resume.read_state(new)
    old = checkpoint.step_dir(tmp_path / "old", 2)
    shutil.copytree(new, old)
    for f in (checkpoint.MOMENTS, checkpoint.EMA, integrity.CHECKSUMS):
        os.remove(os.path.join(old, f))
    materialised = {**state, "opt": copy.deepcopy(state["opt"]), "ema": {k: v.clone() for k, v in state["ema"].items()}}
    torch.save(materialised, os.path.join(old, "train_state.pt"))
    integrity.write_checksums(old)
    ckpt, got = resume.resume_from(tmp_path / "old", run)
    assert ckpt == old and got["opt"]["param_groups"] == state["opt"]["param_groups"]
    for fqn, st in state["opt"]["state"].items():
        assert st.keys() == got["opt"]["state"][fqn].keys() and all(torch.equal(v, got["opt"]["state"][fqn][k]) for k, v in st.items())
    assert all(torch.equal(v, got["ema"][k]) for k, v in state["ema"].items()) and state["ema"].keys() == got["ema"].keys()
    assert set(state["opt"]["state"]) == {n for n, _ in m.named_parameters()}  # FQN-keyed, every trained parameter
