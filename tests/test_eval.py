"""eval.py: VBench prompt-suite generation on a tiny student with the tiny text encoders / VAE of test_data.py
(file names, resume, the printed VBench command), latency against the teacher, and the Table 1 scoring."""
import dataclasses
import json
import os

import pytest
import torch

from storage import checkpoint
import data
import eval as ev
import model as models
import sampling
import train
from test_data import hy_weights, read_back  # noqa: F401 - the tiny HunyuanVideo hub folder (vae/, text encoders)

PROMPTS = ["a cat walks on the grass", "waves crash on a rocky shore, at dusk", "a red car"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 1-step semantic expert of a tiny HunyuanVideo whose text width / latent channels fit the tiny encoders."""
    root = tmp_path_factory.mktemp("evalrun")
    cfg = dataclasses.replace(models.PRESETS["tiny-hunyuan"], text_embed_dim=16, in_channels=4, out_channels=4)
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer(cfg), str(root / "teacher"))
    g, n, L = torch.Generator().manual_seed(0), 4, 6
    data.write_shard(str(root / "data"), 0, {"latents": torch.randn(n, 4, 2, 4, 4, generator=g),
                                             "text": torch.randn(n, L, 16, generator=g),
                                             "text_mask": torch.ones(n, L, dtype=torch.long),
                                             "pooled": torch.randn(n, 16, generator=g)})
    data.write_manifest(str(root / "data"), model="hunyuan-video", latent_shape=[4, 2, 4, 4], vae_scaling_factor=1.0,
                        shards=[{"file": data.shard_name(0), "num": n}],
                        uncond={"text": torch.zeros(1, L, 16), "text_mask": torch.ones(1, L, dtype=torch.long),
                                "pooled": torch.zeros(1, 16)})
    train.main(["--stage", "semantic", "--teacher", str(root / "teacher"), "--data", str(root / "data"), "--out",
                str(root / "sem"), "--max-steps", "1", "--device", "cpu", "--probe-every", "0"])
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def test_vbench_suite_names_resume_and_the_printed_command(student, hy_weights, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(ev, "vbench_info", lambda: None)  # vbench absent (it is not installed here anyway)
    out = tmp_path / "eval"
    argv = ["vbench", "--ckpt", str(student / "sem"), "--weights", hy_weights, "--out", str(out),
            "--prompts", str(student / "prompts.txt"), "--per-prompt", "2", "--device", "cpu"]
    calls = []
    real = sampling.student_sample
    monkeypatch.setattr(sampling, "student_sample", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    res = ev.main(argv)
    want = sorted(f"{p}-{i}.mp4" for p in PROMPTS for i in range(2))
    assert sorted(os.listdir(out / "videos")) == want and sorted(res["files"]) == want
    frames = read_back(str(out / "videos" / want[0]))
    assert frames.shape == (5, 16, 16, 3)  # latent [4, 2, 4, 4] through the 4x temporal / 4x spatial tiny VAE
    # the videos of one prompt differ (their seeds do), the noise of a video depends only on (seed, prompt, index)
    assert len(calls) == 6 and not torch.equal(calls[0], calls[1])
    printed = capsys.readouterr().out
    assert f'vbench evaluate --videos_path "{out / "videos"}" --dimension subject_consistency' in printed
    assert f'python eval.py table --results "{out / "vbench_results"}"' in printed
    lat = json.load(open(out / "latency.json"))
    assert set(lat["per_video"]) == set(want) and lat["seconds_per_video"] > 0
    assert lat["teacher_steps"] == 50 and lat["speedup"] == pytest.approx(lat["teacher_seconds"] / lat["seconds_per_video"])
    # a rerun redoes nothing; with one video missing it makes exactly that one, from the same noise
    stamps = {f: os.path.getmtime(out / "videos" / f) for f in want}
    ev.main(argv)
    assert len(calls) == 6 and {f: os.path.getmtime(out / "videos" / f) for f in want} == stamps
    os.remove(out / "videos" / f"{PROMPTS[1]}-1.mp4")  # the 4th video made (prompts in order, then the index)
    ev.main(argv)
    assert len(calls) == 7 and torch.equal(calls[6], calls[3]) and sorted(os.listdir(out / "videos")) == want
    # the command line: bad input is one line
    with pytest.raises(SystemExit):
        ev.cli(argv[:-2] + ["--dimensions", "beauty"])
    assert "error: --dimensions: unknown ['beauty']" in capsys.readouterr().err


def test_scores_follow_vbench_normalisation(tmp_path, capsys):
    lo = {d: ev.NORM.get(d, (0.0, 1.0))[0] for d in ev.DIMENSIONS}
    hi = {d: ev.NORM.get(d, (0.0, 1.0))[1] for d in ev.DIMENSIONS}
    assert ev.scores(hi)["total"] == pytest.approx(100) and ev.scores(lo)["total"] == pytest.approx(0)
    # quality at its best, semantic at its worst: total = 4 : 1 weighted = 80
    mix = {**{d: hi[d] for d in ev.QUALITY}, **{d: lo[d] for d in ev.SEMANTIC}}
    s = ev.scores(mix)
    assert (s["quality"], s["semantic"], s["total"]) == (pytest.approx(100), pytest.approx(0), pytest.approx(80))
    # dynamic degree weighs half inside quality
    dd = {**{d: lo[d] for d in ev.QUALITY}, "dynamic_degree": 1.0}
    assert ev.scores(dd)["quality"] == pytest.approx(100 * 0.5 / 6.5) and ev.scores(dd)["missing"] == list(ev.SEMANTIC)
    # `eval.py table` reads VBench's result JSONs and writes the Table 1 row
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "a_eval_results.json").write_text(json.dumps({d: [hi[d], []] for d in ev.QUALITY}))
    (tmp_path / "res" / "b_eval_results.json").write_text(json.dumps({d: [lo[d], []] for d in ev.SEMANTIC}))
    md = ev.main(["table", "--results", str(tmp_path / "res"), "--out", str(tmp_path)])
    assert "| student | ? | – | 80.00 | 100.00 | 0.00 |" in md and (tmp_path / "table.md").read_text().strip() == md
    assert json.load(open(tmp_path / "vbench_scores.json"))["total"] == pytest.approx(80)


def test_validation_during_training_decodes_through_the_vae(student, hy_weights, tmp_path):  # noqa: F811
    """train.py --sample-decode: rank 0 writes each validation sample as an MP4 of the VAE's decode of its latents."""
    from storage import video_io
    from safetensors.torch import load_file
    train.main(["--stage", "semantic", "--teacher", str(student / "teacher"), "--data", str(student / "data"),
                "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu", "--probe-every", "0",
                "--sample-every", "1", "--sample-steps", "2", "--sample-num", "2", "--sample-decode", hy_weights])
    folder = tmp_path / "run" / "samples" / "step_0000001"
    assert sorted(os.listdir(folder)) == ["latents_2step.safetensors", "sample_2step_0.mp4", "sample_2step_1.mp4"]
    lat = load_file(str(folder / "latents_2step.safetensors"))["latents"]
    vae = video_io.load_vae("hunyuan-video", hy_weights, tiling=True)
    want = video_io.to_uint8(video_io.decode_latents(vae, lat[1:2])[0]).astype(float)
    got = read_back(str(folder / "sample_2step_1.mp4")).astype(float)
    other = video_io.to_uint8(video_io.decode_latents(vae, lat[0:1])[0]).astype(float)
    assert got.shape == (5, 16, 16, 3) and abs(got - want).mean() < 0.5 * abs(got - other).mean()  # H.264 is lossy
