"""Bad input and faults (issue 14): every case ends in one `error:` line naming the flag or file (or a loud
warning where the input is legal), before anything is written; checkpoints prove their integrity.

Cases run in this process through the scripts' command-line entry points (train.cli, sample.cli, bench.main,
data.main); a real subprocess shows that tools/bench.py's command line prints no traceback (train.py's and
sample.py's are shown in their own test files).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tools import bench
from storage import checkpoint, resume
from tools import checks
import data
from storage import integrity, latents
import model as models
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
QUIET = ["--device", "cpu", "--probe-every", "0"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny-hunyuan dataset, teacher (1 step), semantic run (2 steps, both saved), detail run, a CogVideoX backbone."""
    r = tmp_path_factory.mktemp("robust")
    p = {k: str(r / k) for k in ("data", "teacher", "sem", "det", "cog")}
    data.synthetic_dataset("tiny-hunyuan", p["data"], num=4)
    common = ["--data", p["data"], *QUIET]
    train.main(["--config", "tiny-hunyuan", "--stage", "teacher", "--out", p["teacher"], "--max-steps", "1", *common])
    train.main(["--stage", "semantic", "--teacher", p["teacher"], "--out", p["sem"], "--max-steps", "2",
                "--save-every", "1", *common])
    train.main(["--stage", "detail", "--teacher", p["teacher"], "--init", p["sem"], "--out", p["det"], "--max-steps", "1",
                "--lora-rank", "4", "--disc-hidden", "32", "--w-gan", "0", "--w-fm", "0", *common])
    checkpoint.save_transformer(models.build_transformer("tiny-cogvideox"), p["cog"])
    p["root"] = r
    return p


def damaged(fx, name, fn):
    """A copy of the dataset or a checkpoint folder, changed by fn(folder)."""
    src = fx[name.split("-")[0]]
    dst = str(fx["root"] / "cases" / name)
    if not os.path.exists(dst):
        shutil.copytree(src, dst)
        fn(dst)
    return dst


def flip(path, at=-16):
    """Invert 8 bytes in place: a same-size corruption every structural check misses."""
    with open(path, "r+b") as f:
        f.seek(at if at >= 0 else os.path.getsize(path) + at)
        b = f.read(8)
        f.seek(-len(b), 1)
        f.write(bytes(x ^ 0xFF for x in b))


def edit_json(path, **kw):
    with open(path) as f:
        d = json.load(f)
    d.update(kw)
    for k in [k for k, v in kw.items() if v is None]:
        d.pop(k)
    with open(path, "w") as f:
        json.dump(d, f)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def nan_weights(folder):
    w = os.path.join(folder, "transformer", checkpoint.WEIGHTS)
    sd = load_file(w)
    next(iter(sd.values()))[...] = float("nan")
    save_file(sd, w)
    integrity.write_checksums(folder)  # intact bytes, bad numbers: NaN must be caught by value


def train_err(monkeypatch, capsys, argv):
    """train.cli on argv -> its one-line message (exit status 2: bad input)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        train.cli()
    *warnings, err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and all(w.startswith("warning: ") for w in warnings), (e.value.code, warnings, err)
    return err


TRAIN_CASES = {  # name -> (argv builder(fx, out), expected part of the message)
    "manifest without shards": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", damaged(
        fx, "data-noshards", lambda d: edit_json(f"{d}/manifest.json", shards=None)), "--out", o], "malformed shards"),
    "manifest not JSON": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", damaged(
        fx, "data-badjson", lambda d: write(f"{d}/manifest.json", "{oops")), "--out", o], "manifest.json is not valid JSON"),
    "truncated shard": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", damaged(
        fx, "data-trunc", lambda d: os.truncate(f"{d}/shard_00000.safetensors", 300)), "--out", o],
        "shard_00000.safetensors is not a readable safetensors file"),
    "config num_layers 'one'": (lambda fx, o: ["--config", damaged(fx, "cog-str", lambda d: edit_json(
        f"{d}/config.json", num_layers="one")), "--data", fx["data"], "--out", o], "config.json: CogVideoXConfig: bad config values num_layers='one' (want int >= 1)"),
    "config patch_size 0": (lambda fx, o: ["--config", damaged(fx, "cog-p0", lambda d: edit_json(
        f"{d}/config.json", patch_size=0)), "--data", fx["data"], "--out", o], "config.json: CogVideoXConfig: bad config values patch_size=0 (want int >= 1)"),
    "--config not JSON": (lambda fx, o: ["--config", write(f"{o}.json", "layers: 1"), "--data", fx["data"], "--out", o],
                          ".json is not valid JSON"),
    "--grad-accum 0": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--grad-accum", 0, "--out", o],
                       "--grad-accum 0 must be >= 1"),
    "--max-steps 0": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--max-steps", 0, "--out", o],
                      "--max-steps 0 must be >= 1"),
    "--max-steps -3": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--max-steps", -3, "--out", o],
                       "--max-steps -3 must be >= 1"),
    "--target-ema 1.5": (lambda fx, o: ["--stage", "vcm", "--teacher", fx["teacher"], "--data", fx["data"], "--target-ema",
                                        1.5, "--out", o], "--target-ema 1.5 must lie in [0.0, 1.0)"),
    # a flag the stage would ignore, and flags that go with another one (issue 24: nothing passes silently)
    "teacher stage --teacher": (lambda fx, o: ["--teacher", fx["teacher"], "--data", fx["data"], "--out", o],
                                "--teacher means nothing to --stage teacher: the teacher stage trains the teacher "
                                "itself; start it from weights with --init"),
    "semantic --lora-rank": (lambda fx, o: ["--stage", "semantic", "--teacher", fx["teacher"], "--data", fx["data"],
                                            "--lora-rank", 4, "--out", o], "--lora-rank means nothing to --stage semantic"),
    "vcm --kappa": (lambda fx, o: ["--stage", "vcm", "--teacher", fx["teacher"], "--data", fx["data"], "--kappa", 3,
                                   "--out", o], "--kappa means nothing to --stage vcm (used by --stage semantic / detail)"),
    "teacher --w-tc": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--w-tc", 1, "--out", o],
                       "--w-tc means nothing to --stage teacher"),
    "--detail-full --lora-rank": (lambda fx, o: ["--stage", "detail", "--detail-full", "--lora-rank", 8, "--teacher",
                                                 fx["teacher"], "--init", fx["sem"], "--data", fx["data"], "--out", o],
                                  "--lora-rank: --detail-full trains no LoRA"),
    "--frames without --dry-run": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--frames", 4,
                                                  "--out", o], "--frames plans a run: it goes with --dry-run"),
    "--resume-anyway alone": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--resume-anyway",
                                             "--out", o], "--resume-anyway goes with --resume"),
    "--disc-hidden 33": (lambda fx, o: ["--stage", "detail", "--teacher", fx["teacher"], "--init", fx["sem"],
                                        "--data", fx["data"], "--disc-hidden", 33, "--out", o], "must be a multiple of 32"),
    "--out an existing file": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--out", write(o, "x")],
                               "is an existing file, not a folder"),
    "--out under a file": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--out",
                                          os.path.join(write(o, "x"), "sub")], "cannot make a folder there"),
    "--device cuda without CUDA": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--out", o,
                                                  "--device", "cuda"], "--device cuda: this torch"),
    "--device bogus": (lambda fx, o: ["--config", "tiny-hunyuan", "--data", fx["data"], "--out", o, "--device", "bogus"],
                       "--device 'bogus' is not a device"),
    "pcm --phases 0": (lambda fx, o: ["--stage", "pcm", "--phases", 0, "--teacher", fx["teacher"], "--data", fx["data"],
                                      "--out", o], "--phases 0: pcm needs 2..N"),
    "pcm --phases 1": (lambda fx, o: ["--stage", "pcm", "--phases", 1, "--teacher", fx["teacher"], "--data", fx["data"],
                                      "--out", o], "--stage vcm is the one-phase model"),
    "--grid-steps 1 --kappa 0": (lambda fx, o: ["--stage", "semantic", "--teacher", fx["teacher"], "--data", fx["data"],
                                                "--grid-steps", 1, "--kappa", 0, "--out", o], "--grid-steps 1: "),
    "detail --init a teacher": (lambda fx, o: ["--stage", "detail", "--teacher", fx["teacher"], "--init", fx["teacher"],
                                               "--data", fx["data"], "--out", o], "is a teacher-stage checkpoint"),
    "--init another architecture": (lambda fx, o: ["--stage", "semantic", "--teacher", fx["teacher"], "--init", fx["cog"],
                                                   "--data", fx["data"], "--out", o],
                                    "another architecture than the model (" ),
    "--teacher with NaN weights": (lambda fx, o: ["--stage", "semantic", "--teacher", damaged(
        fx, "teacher-nan", lambda d: nan_weights(os.path.join(d, "step_0000001"))), "--data", fx["data"], "--out", o],
        "non-finite values (NaN/inf)"),
    "--teacher same-size corrupted step": (lambda fx, o: ["--stage", "semantic", "--teacher", os.path.join(damaged(
        fx, "teacher-flip", lambda d: flip(f"{d}/step_0000001/transformer/{checkpoint.WEIGHTS}")), "step_0000001"),
        "--data", fx["data"], "--out", o], "sha256 mismatch: corrupted"),
}
RESUME_CASES = {"--data": "data2", "--batch-size": 2, "--grad-accum": 2, "--seed": 5, "--w-tc": 0.5, "--teacher": "t2"}


def other_data(d):
    """The dataset in `d` rewritten by `data.py synthetic --overwrite` with other content (another seed)."""
    data.main(["synthetic", "--model", "tiny-hunyuan", "--out", d, "--num", "4", "--seed", "1", "--overwrite"])


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_input_is_one_line_before_anything_is_written(fx, case, tmp_path, monkeypatch, capsys):
    build, want = TRAIN_CASES[case]
    out = str(tmp_path / "out")
    argv = build(fx, out)
    msg = train_err(monkeypatch, capsys, argv if "--stage" in argv else ["--stage", "teacher", *argv])
    assert msg.startswith("error: ") and want in msg and "\n" not in msg, msg
    assert not os.path.isdir(out) or not os.listdir(out)  # refused before the run folder was filled


@pytest.mark.parametrize("flag", sorted(RESUME_CASES))
def test_resume_refuses_another_run_unless_told(fx, flag, tmp_path, monkeypatch, capsys):
    value = RESUME_CASES[flag]
    if value == "data2":  # the data is compared by content: a copy rewritten with other samples
        value = damaged(fx, "data-other", other_data)
    if value == "t2":  # an identical copy elsewhere is still another path: the user must say so
        value = damaged(fx, "teacher-copy", lambda d: None)
    out = damaged(fx, f"sem-resume{flag}", lambda d: None)
    argv = ["--stage", "semantic", "--teacher", fx["teacher"], "--data", fx["data"], "--out", out, "--max-steps", 3,
            "--resume", *QUIET, flag, value]
    msg = train_err(monkeypatch, capsys, argv)
    assert "--resume-anyway" in msg and flag.lstrip("-").replace("-", "_") in msg, msg
    assert checkpoint.step_folders(out) == ["step_0000001", "step_0000002"]
    if flag in ("--seed", "--data"):  # the override goes on, loudly
        assert train.main(list(map(str, argv)) + ["--resume-anyway"])["step"] == 3
        assert "warning: --resume-anyway" in capsys.readouterr().err


def test_resume_follows_the_data_by_content(fx, tmp_path, capsys):
    """A copy of the dataset in another folder resumes, as if never moved; one changed in place stops the run."""
    moved = shutil.copytree(fx["data"], tmp_path / "moved")
    out = damaged(fx, "sem-moved", lambda d: None)
    argv = ["--stage", "semantic", "--teacher", fx["teacher"], "--max-steps", "3", *QUIET]
    assert train.main(argv + ["--data", str(moved), "--out", out, "--resume"])["step"] == 3
    assert "resuming from" in capsys.readouterr().out
    straight = train.main(argv + ["--data", fx["data"], "--out", str(tmp_path / "straight")])
    a, b = (load_file(os.path.join(o, "step_0000003", "transformer", checkpoint.WEIGHTS))
            for o in (out, straight["out"]))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    # a shard rewritten in place (other tensors, same name): the real command line, one line, no traceback
    changed = damaged(fx, "data-inplace", lambda d: save_file(
        {k: v + 1 if v.is_floating_point() else v for k, v in load_file(f"{d}/shard_00000.safetensors").items()},
        f"{d}/shard_00000.safetensors"))
    out = damaged(fx, "sem-inplace", lambda d: None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--data", changed, "--out", out,
                        "--resume"], env=ENV, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"error: {changed}/shard_00000.safetensors changed since its manifest was written")
    assert checkpoint.step_folders(out) == ["step_0000001", "step_0000002"]


def test_a_checkpoint_saved_before_data_digests_is_compared_by_the_data_path():
    now = {"data": "/new", "data_digest": "ab", "seed": 0}
    resume.same_run("ckpt", {"data": "/old", "data_digest": "ab", "seed": 0}, now)  # moved, same content: goes on
    with pytest.raises(ValueError, match=r"data_digest=cd\.\.\. \(now ab\.\.\.\).*--resume-anyway"):
        resume.same_run("ckpt", {"data": "/new", "data_digest": "cd", "seed": 0}, now)
    resume.same_run("ckpt", {"data": "/new", "seed": 0}, now)  # no digest recorded: the path decides
    with pytest.raises(ValueError, match="data='/old' .*--resume-anyway"):
        resume.same_run("ckpt", {"data": "/old", "seed": 0}, now)


def test_resume_on_an_empty_out_says_it_starts_at_step_0(fx, tmp_path, capsys):
    train.main(["--config", "tiny-hunyuan", "--stage", "teacher", "--data", fx["data"], "--out", str(tmp_path),
                "--max-steps", "1", "--resume", *QUIET])
    assert "no checkpoint in" in capsys.readouterr().out


def test_corrupted_newest_checkpoint_is_skipped_leftovers_removed_keep_last(fx, capsys):
    out = damaged(fx, "sem-corrupt", lambda d: flip(f"{d}/step_0000002/transformer/{checkpoint.WEIGHTS}"))
    leftover = os.path.join(out, ".step_0000003.tmp-x1y2")
    os.makedirs(leftover)
    # the intact older step is what sampling and resuming use; the damaged one is named
    assert checkpoint.resolve(out).folder == os.path.join(out, "step_0000001")
    assert "step_0000002" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match="sha256 mismatch"):
        checkpoint.resolve(os.path.join(out, "step_0000002"))
    r = train.main(["--stage", "semantic", "--teacher", fx["teacher"], "--data", fx["data"], "--out", out,
                    "--max-steps", "3", "--save-every", "1", "--keep-last", "1", "--resume", *QUIET])
    err = capsys.readouterr()
    assert "resuming from" in err.out and "step_0000001" in err.out and "sha256 mismatch" in err.err
    assert not os.path.exists(leftover) and "interrupted save" in err.err
    assert r["step"] == 3 and checkpoint.step_folders(out) == ["step_0000003"]  # --keep-last 1
    # garbage bytes inside train_state.pt (same size): the step before is used
    out2 = damaged(fx, "sem-state", lambda d: flip(f"{d}/step_0000002/train_state.pt", at=600))
    ckpt, _ = resume.resume_from(out2, {})
    assert ckpt.endswith("step_0000001") and "train_state.pt" in capsys.readouterr().err
    checkpoint.verify_checksums = False  # --verify none: the caller takes the risk
    try:
        assert resume.resume_from(out2, {})[0].endswith("step_0000001")  # the unpickler still fails on garbage
    finally:
        checkpoint.verify_checksums = True
    # files are written with the user's umask, like other tools (safetensors alone writes 0600)
    mode = os.stat(os.path.join(out, "step_0000003", "transformer", checkpoint.WEIGHTS)).st_mode & 0o777
    assert mode == 0o666 & ~integrity.umask()


def sample_err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        sample.cli([*map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


SAMPLE_CASES = {
    "--out an existing file": (lambda fx, o: ["--ckpt", fx["det"], "--out", write(o, "x")], "is an existing file"),
    "--out under a file": (lambda fx, o: ["--ckpt", fx["det"], "--out", os.path.join(write(o, "x"), "d")],
                           "cannot make a folder there"),
    "--device cuda without CUDA": (lambda fx, o: ["--ckpt", fx["det"], "--out", o, "--device", "cuda"], "sees no CUDA"),
    "--device bogus": (lambda fx, o: ["--ckpt", fx["det"], "--out", o, "--device", "bogus"], "is not a device"),
    "--ckpt garbage weights": (lambda fx, o: ["--teacher", "--ckpt", damaged(fx, "cog-garbage", lambda d: write(
        f"{d}/{checkpoint.WEIGHTS}", "garbage" * 40)), "--out", o], "cannot load"),
    "--ckpt same-size corrupted": (lambda fx, o: ["--ckpt", os.path.join(damaged(fx, "det-flip", lambda d: flip(
        f"{d}/step_0000001/detail.safetensors")), "step_0000001"), "--out", o], "detail.safetensors (sha256 mismatch"),
    "--ckpt NaN weights": (lambda fx, o: ["--ckpt", damaged(fx, "det-nan", lambda d: nan_weights(
        f"{d}/step_0000001")), "--out", o], "non-finite values (NaN/inf)"),
    "--detail garbage": (lambda fx, o: ["--ckpt", f"{fx['sem']}/step_0000002/transformer", "--detail",
                                        write(f"{o}.safetensors", "x" * 300), "--out", o], "cannot load detail adapter"),
    "--cond garbage": (lambda fx, o: ["--ckpt", fx["det"], "--cond", write(f"{o}.safetensors", "x" * 300), "--out", o],
                       "not a readable safetensors file"),
    "--cond with inf": (lambda fx, o: ["--ckpt", fx["det"], "--cond", inf_cond(fx, o), "--out", o], "non-finite"),
    "--latents garbage": (lambda fx, o: ["--latents", write(f"{o}.safetensors", "x" * 300), "--out", o],
                          "cannot load --latents"),
    "--latents without latents": (lambda fx, o: ["--latents", f"{fx['data']}/uncond.safetensors", "--out", o],
                                  "holds no 'latents' tensor"),
    "--num 10**9": (lambda fx, o: ["--ckpt", fx["det"], "--num", 10**9, "--out", o], "GiB, only"),
    "--height/--width 10**5": (lambda fx, o: ["--ckpt", fx["det"], "--height", 10**5, "--width", 10**5, "--out", o],
                               "GiB, only"),
    "--fps 0": (lambda fx, o: ["--ckpt", fx["det"], "--fps", 0, "--out", o], "--fps must be >= 1"),
}


def inf_cond(fx, o):
    c = load_file(f"{fx['data']}/uncond.safetensors")
    c["text"][0, 0, 0] = float("inf")
    save_file(c, f"{o}.safetensors")
    return f"{o}.safetensors"


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sample_bad_input_fails_before_sampling(fx, case, tmp_path, capsys):
    build, want = SAMPLE_CASES[case]
    out = str(tmp_path / "out")
    argv = build(fx, out)
    line = sample_err(capsys, argv + ["--device", "cpu"] * ("--device" not in argv))
    assert line.startswith("error: ") and want in line, line
    assert not os.path.isfile(os.path.join(out, "latents.safetensors"))


def test_one_step_on_a_dual_expert_names_the_expert_that_runs(fx, tmp_path, capsys):
    r = sample.main(["--ckpt", fx["det"], "--steps", "1", "--out", str(tmp_path), "--device", "cpu"])
    assert r["experts"] == ["semantic"] and "only the semantic expert runs" in capsys.readouterr().err


@pytest.mark.parametrize("argv, want", [
    (["--table", "/nonexistent/b.json"], "does not exist"),
    (["--table", "NOTJSON"], "is not valid JSON"),
    (["--table", "LIST"], "expected a JSON dict"),
    (["--rows", "bogus"], "--rows 'bogus': choose from"),
    (["--device", "bogus"], "is not a device"),
])
def test_bench_bad_input(argv, want, tmp_path):
    files = {"NOTJSON": write(str(tmp_path / "a.json"), "{x"), "LIST": write(str(tmp_path / "b.json"), "[1]")}
    with pytest.raises(checks.InputError, match=want):
        bench.main([files.get(a, a) for a in argv] + ["--out", str(tmp_path / "bench.json")])


def test_synthetic_dataset_and_its_bad_input(tmp_path, capsys):
    data.main(["synthetic", "--model", "tiny-cogvideox", "--out", str(tmp_path / "c"), "--num", "3"])
    ds = latents.LatentDataset(str(tmp_path / "c"))
    assert len(ds) == 3 and latents.check_fits(models.PRESETS["tiny-cogvideox"], ds.tensors,
                                               ds.manifest["latent_shape"], ds.uncond) == ["text"]
    capsys.readouterr()
    for argv, want in ((["--model", "bogus"], "is not a preset"), (["--model", "tiny-hunyuan", "--num", "0"], ">= 1"),
                       (["--model", "tiny-hunyuan", "--height", "3"], "divisible by the patch"),
                       (["--model", "tiny-hunyuan", "--out", str(tmp_path / "c")], "already holds a dataset")):
        with pytest.raises(SystemExit) as e:
            data.main(["synthetic", "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and want in err, err
    assert not os.path.exists(tmp_path / "x")  # refused before anything was written


def test_command_line_prints_no_traceback(fx):
    """tools/bench.py's own entry point (train.py's and sample.py's are run in test_train.py / test_sample.py)."""
    bad = damaged(fx, "data-noshards2", lambda d: edit_json(f"{d}/manifest.json", shards=None))
    for argv in (["tools/bench.py", "--table", f"{bad}/manifest.json"],):
        p = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], env=ENV, capture_output=True,
                           text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr


def test_real_processes_exit_status_and_lines(fx, tmp_path):
    """Real train.py processes: 2 for bad input (argparse's own here; ours: the cases above through train.cli), 1 for
    a run that failed while working, 0 with what is true said: a dry run without a size cannot tell whether it
    fits; data with fewer latent frames than TC's stride warns that TC is 0; a run ends on where the model is and
    how to sample it. No traceback, nothing written where nothing should be."""
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--device", "cpu"]
    data_ = ["--data", fx["data"]]
    cases = {  # name -> (argv, env, status, a line stderr (status != 0) or stdout starts with, stderr lines too)
        "no --stage": (["--config", "tiny-hunyuan", *data_, "--out", tmp_path / "a"], {}, 2,
                       "train.py: error: the following arguments are required: --stage", ()),
        "a dry run without a size": (["--stage", "semantic", "--config", "tiny-hunyuan", "--dry-run"], {}, 0,
                                     "total (without activations)", ()),
        "the loss turns NaN at step 1": (["--stage", "teacher", "--config", "tiny-hunyuan", *data_, "--out",
                                          tmp_path / "c", "--probe-every", "0"], {"DCM_TRAIN_NAN_AT_STEP": "1"}, 1,
                                         "error: non-finite ", ()),
        "TC on 2 frames, the summary": (["--stage", "semantic", "--teacher", fx["teacher"], *data_, "--out",
                                         tmp_path / "d", "--max-steps", "1", "--probe-every", "0"], {}, 0,
                                        f"  sample it: python sample.py --ckpt {tmp_path / 'd'} --steps 4 --out ",
                                        ("warning: TC loss is 0: 2 latent frames, its frame stride is 3",)),
    }
    procs = {k: subprocess.Popen(base + [str(a) for a in argv], env={**ENV, **env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (argv, env, *_) in cases.items()}
    said = {}
    for name, p in procs.items():  # side by side: each pays the torch import once
        out, err = said[name] = p.communicate(timeout=120)
        _, _, code, start, warnings = cases[name]
        assert p.returncode == code and "Traceback" not in err, (name, p.returncode, err)
        lines = (err if code else out).splitlines()
        assert any(ln.strip().startswith(start.strip()) for ln in lines), (name, out, err)
        assert all(any(ln.startswith(w) for ln in err.splitlines()) for w in warnings), (name, err)
    assert not os.path.exists(tmp_path / "a")  # refused before the run folder was made
    out = said["a dry run without a size"][0]
    assert "cannot tell whether it fits in 80 GiB without --frames/--height/--width" in out and ": fits in" not in out
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith("step_")]  # stopped before the update
    assert os.listdir(tmp_path / "d") and "step_0000001" in os.listdir(tmp_path / "d")
