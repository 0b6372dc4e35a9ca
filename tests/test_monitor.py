"""monitor.py (validation sampling + TensorBoard during training) and plot.py, on the tiny presets and the toy."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tools import plot
import sampling
from test_train import LORA, SMALL, make_dataset, read_jsonl, run, tensors

VAL = ["--sample-every", 1, "--sample-steps", "1,2", "--sample-num", 3]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """tiny-hunyuan data, a 2-step teacher and a 1-step semantic expert."""
    root = tmp_path_factory.mktemp("mon")
    d = make_dataset(root / "data", "tiny-hunyuan")
    t = run("--config", "tiny-hunyuan", "--stage", "teacher", "--data", d, "--out", root / "teacher",
            "--max-steps", 2, "--batch-size", 2, "--probe-every", 0, *SMALL)
    s = run("--stage", "semantic", "--teacher", t["checkpoint"], "--data", d, "--out", root / "sem",
            "--max-steps", 1, "--batch-size", 2, "--probe-every", 0, *SMALL)
    return {"data": d, "teacher": t["checkpoint"], "semantic": s["checkpoint"]}


def rng_of(ckpt):
    """Every rank's saved RNG states (python, numpy, torch) as comparable plain values."""
    states = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)["rng"]
    return [(s["python"], [x.tolist() if hasattr(x, "tolist") else x for x in s["numpy"]], s["torch"].tolist())
            for s in states]


@pytest.mark.parametrize("stage,extra", [("semantic", []), ("detail", []), ("detail", ["--fsdp"]), ("teacher", ["--fsdp"])])
def test_validation_sampling_leaves_training_bit_identical(base, tmp_path, stage, extra):
    """Weights, EMA, optimizer, discriminator, RNG states and losses after 2 steps: equal with and without sampling.
    (teacher + FSDP: FSDP2 decides at its first forward, the step-0 validation, which parameters train.)"""
    argv = ["--stage", stage, "--init", base["semantic"], "--data", base["data"], "--max-steps", 2, "--batch-size", 2,
            "--lr", 1e-3, *SMALL, *extra] + ([] if stage == "teacher" else ["--teacher", base["teacher"], "--target-ema", 0.5])
    argv += LORA if stage == "detail" else []
    plain = run(*argv, "--out", tmp_path / "plain")
    watched = run(*argv, "--out", tmp_path / "watched", *VAL)
    a, b = tensors(plain["checkpoint"]), tensors(watched["checkpoint"])
    assert a.keys() == b.keys() and len(a) > 50 and (stage == "teacher" or any("ema" in k for k in a))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert rng_of(plain["checkpoint"]) == rng_of(watched["checkpoint"])
    logs = [[{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(tmp_path / x / "log.jsonl")]
            for x in ("plain", "watched")]
    assert len(logs[0]) == 2 and logs[0] == logs[1]
    # step 0 (the init), every step and the last, each step count; the samples are the student's own
    folder = tmp_path / "watched" / "samples"
    assert sorted(os.listdir(folder)) == ["step_0000000", "step_0000001", "step_0000002"]
    for step in os.listdir(folder):  # (the teacher stage: its guided sampler with N = 1 and 2 steps)
        assert sorted(os.listdir(folder / step)) == ["latents_1step.safetensors", "latents_2step.safetensors"]
    with safe_open(str(folder / "step_0000002" / "latents_2step.safetensors"), "pt") as f:
        x, meta = f.get_tensor("latents"), f.metadata()
    assert x.shape == (3, 16, 4, 4, 4) and x.isfinite().all() and meta["steps"] == "2"
    if stage != "teacher" and not extra:  # the same latents as sample.py's sampler on the saved checkpoint, from the same noise and prompts
        model, info = sampling.load_student(watched["checkpoint"])
        from storage import latents
        ds = latents.LatentDataset(base["data"])
        idx = torch.linspace(0, len(ds) - 1, 3).round().long()
        cond = {k: ds.tensors[k][idx] for k in ("pooled", "text", "text_mask")}
        noise = torch.randn(3, 16, 4, 4, 4, generator=torch.Generator().manual_seed(0 + 7_000_003))
        ref = sampling.student_sample(model, noise, cond, info["grid"], info["boundaries"], 2, 6.0)
        assert torch.allclose(x, ref, atol=1e-5), (x - ref).abs().max()


def test_bad_monitor_flags_fail_before_training(base, tmp_path, monkeypatch, capsys):
    import train
    argv = ["train.py", "--stage", "semantic", "--teacher", base["teacher"], "--data", base["data"], "--max-steps", "1",
            "--batch-size", "2", "--out", str(tmp_path / "x"), "--device", "cpu"]
    for flags, msg in ((["--sample-every", "1", "--sample-steps", "40"], "--sample-steps 40"),
                       (["--sample-every", "1", "--sample-cond", str(tmp_path / "nope.safetensors")], "nope.safetensors"),
                       (["--sample-every", "1", "--sample-decode", str(tmp_path / "nope")], "nope")):
        monkeypatch.setattr(sys, "argv", argv + flags)
        with pytest.raises(SystemExit) as e:
            train.cli()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err
        assert not os.path.exists(tmp_path / "x" / "log.jsonl")
    monkeypatch.setattr(sys, "argv", argv + ["--sample-steps", "2,x"])
    with pytest.raises(SystemExit):
        train.cli()
    assert "--sample-steps" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy (pixel-space) VCM run with validation grids and TensorBoard: the teacher 4 steps, the student 3."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from toy import data as toy_data
    from toy import run as toy
    root = tmp_path_factory.mktemp("toy")
    toy_data.write_dataset(str(root / "data"), 16, 0, toy_data.ToySpec())
    common = ["--data", root / "data", "--batch-size", 4, "--device", "cpu", "--shift", 3, "--save-every", 0]
    t = run("--config", toy.CONFIG, "--stage", "teacher", "--out", root / "teacher", "--max-steps", 4, "--lr", 1e-3,
            "--probe-every", 0, *common)
    tb = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []  # an optional package
    v = run("--stage", "vcm", "--teacher", t["checkpoint"], "--out", root / "vcm", "--max-steps", 3, "--lr", 1e-4,
            "--probe-every", 1, "--sample-every", 2, "--sample-num", 3, *tb, *common)
    return v


def test_toy_grids_and_tensorboard_events(toy_run):
    from PIL import Image
    out = toy_run["out"]
    folder = os.path.join(out, "samples")
    assert sorted(os.listdir(folder)) == ["step_0000000", "step_0000002", "step_0000003"]
    want = sorted([f"grid_{s}step{e}" for s in (2, 4, 8) for e in (".gif", ".mp4")]
                  + [f"latents_{s}step.safetensors" for s in (2, 4, 8)])
    assert sorted(os.listdir(os.path.join(folder, "step_0000003"))) == want
    data_row = ["grid_data.gif", "grid_data.mp4"]  # the K prompts' training clips, at the first validation
    assert sorted(os.listdir(os.path.join(folder, "step_0000000"))) == sorted(want + data_row)
    gif = Image.open(os.path.join(folder, "step_0000003", "grid_4step.gif"))
    assert gif.n_frames == 6 and gif.size == (3 * 16 + 2, 16)  # 3 samples of 6 frames 16x16, 1-px gaps
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    EventAccumulator = event_accumulator.EventAccumulator
    files = os.listdir(os.path.join(out, "tb"))
    assert len(files) == 1 and files[0].startswith("events.out.tfevents")
    acc = EventAccumulator(os.path.join(out, "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/cd", "train/lr", "train/grad_norm", "train/step_time_s", "probe/high_loss",
            "probe/low_loss", "probe/high_grad_norm", "probe/low_grad_norm"} <= scalars
    log = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert set(acc.Tags()["images"]) == {"samples/2step", "samples/4step", "samples/8step", "samples/data"}
    events = acc.Images("samples/4step")
    assert [e.step for e in events] == [0, 2, 3] and [e.step for e in acc.Images("samples/data")] == [0]
    import io
    frames = Image.open(io.BytesIO(events[-1].encoded_image_string))
    assert frames.format == "GIF" and frames.n_frames == 6 and (events[-1].width, events[-1].height) == frames.size


def test_plot_writes_every_figure_for_one_and_two_runs(toy_run, base, tmp_path, capsys):
    from PIL import Image
    paths = plot.main([toy_run["out"], "--out", str(tmp_path / "one")])
    assert [os.path.basename(p) for p in paths] == ["losses.png", "probes.png", "optim.png"]
    for p in paths:
        im = Image.open(p)
        assert os.path.getsize(p) > 5000 and im.size[0] > 300 and len(np.unique(np.asarray(im.convert("L")))) > 10
    sem = os.path.join(os.path.dirname(base["semantic"]))
    two = plot.main([toy_run["out"], sem, "--out", str(tmp_path / "two")])
    assert len(two) == 3  # the semantic run has no probes, the toy's has
    with pytest.raises(SystemExit):
        plot.cli([str(tmp_path / "missing")])
    assert capsys.readouterr().err.startswith("error: ")


def test_tile_places_each_video():
    from tools.monitor import tile
    v = torch.rand(5, 3, 2, 4, 6) * 2 - 1
    g = tile(v, cols=3)
    assert g.shape == (3, 2, 2 * 5 - 1 + 1, 3 * 7 - 1)  # 9 rows rounded up to even, 20 columns already are
    assert torch.equal(g[:, :, 5:9, 7:13], v[4]) and (g[:, :, 4] == 1).all()
