"""eval.py: VBench prompt-suite generation on a tiny student with the tiny text encoders / VAE of test_data.py
(file names, resume, the printed VBench command), latency against the teacher, and the Table 1 scoring."""
import dataclasses
import json
import os

import pytest
import torch

from storage import checkpoint, latents
import data
import eval as ev
import model as models
import sampling
import train
from test_data import cog_weights, hy_weights, read_back  # noqa: F401 - tiny hub folders (vae/, text encoders)

PROMPTS = ["a cat walks on the grass", "waves crash on a rocky shore, at dusk", "a red car"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 1-step semantic expert of a tiny HunyuanVideo whose text width / latent channels fit the tiny encoders."""
    root = tmp_path_factory.mktemp("evalrun")
    cfg = dataclasses.replace(models.PRESETS["tiny-hunyuan"], text_embed_dim=16, in_channels=4, out_channels=4)
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer(cfg), str(root / "teacher"))
    g, n, L = torch.Generator().manual_seed(0), 4, 6
    latents.write_shard(str(root / "data"), 0, {"latents": torch.randn(n, 4, 2, 4, 4, generator=g),
                                                "text": torch.randn(n, L, 16, generator=g),
                                                "text_mask": torch.ones(n, L, dtype=torch.long),
                                                "pooled": torch.randn(n, 16, generator=g)})
    latents.write_manifest(str(root / "data"), model="hunyuan-video", latent_shape=[4, 2, 4, 4], vae_scaling_factor=1.0,
                           shards=[{"file": latents.shard_name(0), "num": n}],
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


def test_prompt_to_mp4_in_one_command(student, hy_weights, tmp_path, capsys):  # noqa: F811
    """sample.py --prompt on a student with a tiny pipeline folder: encoded there, one MP4 per prompt named after it,
    the same latents as the two-command route (data.py encode-prompts, then sample.py --cond)."""
    import sample
    argv = ["--ckpt", str(student / "sem"), "--device", "cpu", "--seed", "3", "--steps", "2"]
    res = sample.main(argv + ["--weights", hy_weights, "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--out",
                              str(tmp_path / "one")])
    assert sorted(os.listdir(tmp_path / "one")) == sorted([f"{PROMPTS[0]}.mp4", f"{PROMPTS[2]}.mp4", "latents.safetensors"])
    assert read_back(str(tmp_path / "one" / f"{PROMPTS[2]}.mp4")).shape == (5, 16, 16, 3)
    assert res["prompts"] == [PROMPTS[0], PROMPTS[2]] and "encoding 2 prompt(s) with" in capsys.readouterr().out
    (tmp_path / "p.txt").write_text(f"{PROMPTS[0]}\n{PROMPTS[2]}\n")
    data.main(["encode-prompts", "--model", "hunyuan-video", "--weights", hy_weights, "--prompts", str(tmp_path / "p.txt"),
               "--out", str(tmp_path / "p.safetensors")])
    two = sample.main(argv + ["--cond", str(tmp_path / "p.safetensors"), "--num", "2", "--out", str(tmp_path / "two")])
    assert torch.equal(res["latents"], two["latents"])


def test_prompt_cfg_teacher_with_a_negative_prompt(cog_weights, tmp_path, capsys):  # noqa: F811
    """--teacher of a CFG model (tiny CogVideoX against the tiny T5 + VAE): the negative prompt is the unconditional
    branch (equal to --uncond with it encoded), and it changes the video."""
    import sample
    weights = cog_weights
    cfg = dataclasses.replace(models.PRESETS["tiny-cogvideox"], text_embed_dim=16, in_channels=4, out_channels=4,
                              max_text_seq_length=226)
    torch.manual_seed(0)
    checkpoint.save_transformer(models.build_transformer(cfg), str(tmp_path / "t"))
    base = ["--ckpt", str(tmp_path / "t"), "--teacher", "--steps", "3", "--device", "cpu", "--frames", "2", "--height",
            "4", "--width", "4"]
    argv = base + ["--weights", weights, "--prompt", "a red car"]
    a = sample.main(argv + ["--negative-prompt", "blurry", "--out", str(tmp_path / "a")])
    b = sample.main(argv + ["--out", str(tmp_path / "b")])
    assert os.path.isfile(tmp_path / "a" / "a red car.mp4") and not torch.equal(a["latents"], b["latents"])
    (tmp_path / "neg.txt").write_text("blurry\n")
    data.main(["encode-prompts", "--model", "cogvideox-2b", "--weights", weights, "--prompts", str(tmp_path / "neg.txt"),
               "--out", str(tmp_path / "neg.safetensors")])
    (tmp_path / "pos.txt").write_text("a red car\n")
    data.main(["encode-prompts", "--model", "cogvideox-2b", "--weights", weights, "--prompts", str(tmp_path / "pos.txt"),
               "--out", str(tmp_path / "pos.safetensors")])
    c = sample.main(base + ["--cond", str(tmp_path / "pos.safetensors"), "--uncond", str(tmp_path / "neg.safetensors"),
                            "--out", str(tmp_path / "c")])
    assert torch.equal(a["latents"], c["latents"])
    capsys.readouterr()


def test_prompt_bad_input(student, tmp_path, monkeypatch, capsys):
    """--prompt without a text encoder, with --cond, a student with --negative-prompt: one error line each, before
    any model loads."""
    import sample
    (tmp_path / "vae_only" / "vae").mkdir(parents=True)
    for extra, want in ((["--weights", str(tmp_path / "vae_only")], "text_encoder is missing"),
                        ([], "--prompt needs the text encoder: --weights PIPELINE_FOLDER"),
                        (["--weights", str(tmp_path), "--cond", "x"], "--prompt and --cond exclude each other"),
                        (["--weights", str(tmp_path), "--negative-prompt", "x"], "a student has no unconditional")):
        monkeypatch.setattr("sys.argv", ["sample.py", "--ckpt", str(student / "sem"), "--prompt", "a cat", *extra])
        with pytest.raises(SystemExit) as e:
            sample.cli()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and want in err and "\n" not in err, err
