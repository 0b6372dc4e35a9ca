"""The toy study: synthetic data, the toy bench metrics, and (slow part) the end-to-end quick run."""
import os

import pytest
import torch

from toy import data as toy_data
from toy import metrics as tm

from storage import latents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_batch_is_deterministic_and_well_formed():
    spec = toy_data.ToySpec()
    a, b = toy_data.make_batch(16, seed=3), toy_data.make_batch(16, seed=3)
    c = toy_data.make_batch(16, seed=4)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["latents"], c["latents"])
    x = a["latents"]
    assert x.shape == (16, *spec.latent_shape) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert a["text"].shape == (16, spec.text_len, spec.text_dim) and a["pooled"].shape == (16, spec.pooled_dim)
    # the conditioning is a fixed function of the class: same class -> same embedding, across batches
    cond = toy_data.cond_for_labels(c["label"])
    assert torch.equal(cond["text"], c["text"]) and torch.equal(cond["pooled"], c["pooled"])
    assert not torch.equal(toy_data.cond_for_labels(torch.tensor([0]))["text"],
                           toy_data.cond_for_labels(torch.tensor([1]))["text"])


def test_shapes_move_at_the_known_velocity():
    b = toy_data.make_batch(64, seed=0)
    c, found = tm.centroids(b["latents"])
    assert found.all()
    disp = c[:, 1:] - c[:, :-1]  # [n, F-1, 2]
    torch.testing.assert_close(disp, b["velocity"][:, None].expand_as(disp), atol=1e-4, rtol=0)
    assert set(map(tuple, b["velocity"].tolist())) <= {(0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (-1.0, 0.0)}
    torch.testing.assert_close(b["velocity"], toy_data.velocity_of(b["label"]))


def test_labels_round_trip_and_bad_labels_are_rejected():
    labels = torch.arange(toy_data.NUM_CLASSES)
    assert torch.equal(toy_data.join_label(*toy_data.split_label(labels)), labels)
    with pytest.raises(ValueError, match="class indices"):
        toy_data.cond_for_labels(torch.tensor([toy_data.NUM_CLASSES]))
    with pytest.raises(ValueError, match="does not fit"):
        toy_data.make_batch(2, 0, toy_data.ToySpec(frames=12))


def test_write_dataset_reads_back(tmp_path):
    manifest = toy_data.write_dataset(str(tmp_path), n=10, seed=1, shard_size=4)
    assert manifest["num_samples"] == 10 and len(manifest["shards"]) == 3
    ds = latents.LatentDataset(str(tmp_path))
    assert len(ds) == 10
    item = ds[7]
    assert item["latents"].shape == toy_data.ToySpec().latent_shape
    assert {"text", "pooled", "label", "velocity"} <= set(item)
    assert torch.equal(ds.uncond["text"], torch.zeros(1, 4, 32))
    again = toy_data.write_dataset(str(tmp_path / "again"), n=10, seed=1, shard_size=4)
    assert again == manifest
    assert torch.equal(latents.LatentDataset(str(tmp_path / "again")).tensors["latents"][:], ds.tensors["latents"][:])


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return tm.train_classifier(seed=0)


@pytest.fixture(scope="module")
def real():
    return toy_data.make_batch(256, seed=11), toy_data.make_batch(256, seed=12)


def test_the_evaluator_is_the_same_at_any_thread_count():
    """The bench classifier (FD features and class accuracy) trained under 1 and under 2 caller threads: bit-identical
    weights and metrics (issue 27: trained multi-threaded, FD moved 56 -> 66 between two machines), the caller's
    thread count restored and its global RNG untouched. At 6 steps of batch 16 the old multi-threaded training already
    differed (weights by ~7e-6)."""
    spec = toy_data.ToySpec()
    real = toy_data.make_batch(96, seed=5, spec=spec)
    noise = torch.randn(real["latents"].shape, generator=torch.Generator().manual_seed(1))
    fake = (real["latents"].roll(1, 0) + 0.3 * noise).clamp(-1, 1)  # other videos, noisier: a nonzero FD
    runs, before = [], torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(123)
        clf = tm.train_classifier(spec, steps=6, batch=16, seed=3)
        assert torch.get_num_threads() == threads and torch.equal(torch.rand(3), expected)  # as if it drew nothing
        runs.append((clf.state_dict(), tm.evaluate(fake, real["label"], real["velocity"], real["latents"], clf)))
    torch.set_num_threads(before)
    (w1, m1), (w2, m2) = runs
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1 == m2


def test_classifier_recognises_real_videos(clf, real):
    feats, logits = tm.classifier_features(clf, real[0]["latents"])
    assert feats.shape == (256, 64)
    assert tm.condition_accuracy(logits, real[0]["label"]) > 0.85
    # a wrong conditioning label must score near chance
    wrong = (real[0]["label"] + 1) % toy_data.NUM_CLASSES
    assert tm.condition_accuracy(logits, wrong) < 0.2


def test_frechet_distance_separates_real_from_noise(clf, real):
    fa, _ = tm.classifier_features(clf, real[0]["latents"])
    fb, _ = tm.classifier_features(clf, real[1]["latents"])
    noise = torch.randn_like(real[0]["latents"]).clamp(-1, 1)
    fn, _ = tm.classifier_features(clf, noise)
    same, far = tm.frechet_distance(fa, fb), tm.frechet_distance(fa, fn)
    assert same < 0.05 * far, (same, far)
    assert tm.frechet_distance(fa, fa) < 1e-6 * far
    # closed form for Gaussians with diagonal covariances: |mu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0]) + 1.0
    expect = 3 * 1.0 + (2.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2
    assert abs(tm.frechet_distance(a, b) - expect) < 0.1


def test_motion_error_zero_on_real_and_large_when_frames_are_shuffled(real):
    x, v = real[0]["latents"], real[0]["velocity"]
    assert tm.motion_error(x, v) < 1e-4
    shuffled = x[:, :, torch.tensor([3, 0, 5, 1, 4, 2])]
    assert tm.motion_error(shuffled, v) > 1.0
    assert tm.motion_error(x[:, :, :1].expand_as(x), v) == pytest.approx(1.0, abs=1e-4)  # frozen video
    assert tm.motion_error(x, -v) == pytest.approx(2.0, abs=1e-4)  # wrong direction
    empty = torch.full_like(x, -0.7)  # background only: no shape found, penalised by |v| = 1
    assert tm.motion_error(empty, v) == pytest.approx(1.0, abs=1e-4)


def test_hf_ratio_is_one_on_real_and_low_when_blurred(real):
    a, b = real[0]["latents"], real[1]["latents"]
    assert tm.hf_ratio(b, a) == pytest.approx(1.0, abs=0.05)
    blurred = torch.nn.functional.avg_pool3d(a, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)
    assert tm.hf_ratio(blurred, a) < 0.3
    assert tm.hf_ratio(torch.randn_like(a), a) > 2.0  # white noise puts most energy at high frequency


def test_evaluate_and_aggregate(clf, real):
    r = real[0]
    m = tm.evaluate(r["latents"], r["label"], r["velocity"], real[1]["latents"], clf, x_ref=r["latents"])
    assert m["traj_mse"] == 0 and m["traj_l1"] == 0 and m["motion_err"] < 1e-4 and m["cond_acc"] > 0.85
    off = tm.evaluate(r["latents"], r["label"], r["velocity"], real[1]["latents"], clf, x_ref=r["latents"] + 0.1)
    assert off["traj_mse"] == pytest.approx(0.01, rel=1e-4) and off["traj_l1"] == pytest.approx(0.1, rel=1e-4)
    agg = tm.aggregate([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert agg == {"a": {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}}
    assert tm.mean_std([5.0]) == (5.0, 0.0)


def test_choose_kappa_reads_the_fig10_curve():
    from toy.run import choose_kappa
    N = 50
    l1 = [0.05, 0.06, 0.05, 0.04, 0.02, 0.01] + [0.005] * (N - 7)  # change between sampling steps i, i+1
    kappa, info = choose_kappa(l1, q=0.5, N=N)
    total = sum(l1)
    assert sum(l1[:info["cross_step"]]) < 0.5 * total <= sum(l1[:info["cross_step"] + 1])
    assert kappa == N - 2 - info["cross_step"] == N - 2 - 5  # 0.2225 (half of 0.445) is passed by the 6th step's change
    # a cumulative share barely moves with noise on the curve, where a threshold crossing would jump
    noisy = [v * (1 + 0.1 * ((-1) ** i)) for i, v in enumerate(l1)]
    assert abs(choose_kappa(noisy, 0.5, N)[0] - kappa) <= 1
    # degenerate curves keep both phases valid for 8-step sampling (4 grid points each)
    assert choose_kappa([1.0] * (N - 1), 0.999, N)[0] == 3
    assert choose_kappa([1.0] + [0.0] * (N - 2), 0.5, N)[0] == N - 5


def test_guidance_and_target_rules():
    from toy.run import choose_guidance, choose_target
    rows = {1.0: {"cond_acc": 0.5, "fd": 300}, 3.0: {"cond_acc": 0.9, "fd": 200}, 6.0: {"cond_acc": 0.94, "fd": 450}}
    assert choose_guidance(rows) == 3.0 and choose_guidance(rows, fd_factor=3.0) == 6.0
    curves = {(0.95, 3e-5): [{"traj_mse": 0.01}, {"traj_mse": 0.03}], (0.99, 1e-4): [{"traj_mse": 0.02}, {"traj_mse": 0.015}]}
    assert choose_target(curves) == (0.99, 1e-4)  # the end of the run decides: the drifting candidate loses


def test_spread_marker():
    from toy import bench
    a = {"fd": {"mean": 100.0, "std": 10.0, "n": 3}}
    assert bench.exceeds(a, {"fd": {"mean": 125.0, "std": 10.0, "n": 3}}, "fd")
    assert not bench.exceeds(a, {"fd": {"mean": 115.0, "std": 10.0, "n": 3}}, "fd")
    assert not bench.exceeds({"fd": {"mean": 1.0, "std": 0.0, "n": 1}}, {"fd": {"mean": 2.0, "std": 0.0, "n": 1}}, "fd")


def doc_command(doc, marker="# run by tests/test_toy.py"):
    """argv (after `python sample.py`) of the one sample.py command of doc marked as run here."""
    import shlex
    with open(os.path.join(ROOT, doc)) as f:
        found = [shlex.split(ln.split(marker)[0]) for ln in f if ln.startswith("python sample.py") and marker in ln]
    assert len(found) == 1, found
    return found[0][2:]


def test_quick_run_end_to_end(tmp_path, capsys, monkeypatch):
    """`python toy/run.py --quick`: every artefact written, every model scored at every step count with spreads
    over training seeds for the headline rows, and the report states the TC/CD gradient ratio it calibrated; then
    docs/sampling.md's toy sample.py command, as written, on its DCM student (GIF + MP4)."""
    import json
    import math
    import re
    import sample
    from toy import run
    out = str(tmp_path / "out" / "toy-quick")  # the quick run's default folder, under tmp_path
    summary = run.main(["--quick", "--out", out, "--workers", "2"])
    console = capsys.readouterr()  # progress reaches the console: bars of this process, a line per worker's run
    assert "teacher: 100%" in console.err and "[toy] distil dcm_s0: " in console.out
    assert "detail: 100%" in open(os.path.join(out, "logs", "dcm_s0.log")).read()
    assert summary["workers"] == [2, 1] and set(summary["run_s"]) >= {"dcm_s0", "pe_gf_s0", "vcm_s1"}
    dc = summary["d_control"]  # the discriminator control ran with both real sides
    assert set(dc) == {"target as real", "data as real"} and dc["target as real"]["start"] > 0
    for f in ("report.md", "metrics.json", "fig10_x0_change.png", "fig2_probes.png", "fig5_expert_difference.png",
              "curves_validation.png", "train_signals.png", "samples.gif", "classifier.pt", "train_losses.png",
              "runs/dcm_s0/samples/step_0000000/grid_4step.gif"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["kappa"] == summary["kappa"] and 3 <= saved["kappa"] <= 45
    l1 = summary["fig10_l1"]
    assert len(l1) == 49 and all(v >= 0 for v in l1)
    res, S = summary["results"], run.QUICK
    for name, (_, _, head) in run.MODELS.items():
        for steps in S.eval_steps:
            row = res[name]["own schedule" if name.startswith(("VCM", "PCM")) else "even points"][steps]
            assert all(math.isfinite(row["agg"][k]["mean"]) for k in ("traj_mse", "fd", "cond_acc")), name
            assert row["over"] == ("training seeds" if head else "sampling seeds")
            if head:
                assert len(row["per_train_seed"]) == S.train_seeds
    assert set(res[run.TEACHER]) >= {"VCM schedule", "PCM (4 phases) schedule", "DCM schedule"}
    p = summary["param_counts"]
    assert p["OD"] == 2 * p["VCM"] and p["VCM"] < p["DCM (OD+PE+TC+GF)"] < 1.5 * p["VCM"]
    # the TC weight was calibrated from the gradient ratio the training log measured, and the report says so
    ratio = summary["tc_ratio_at_w1"]
    assert 0 < ratio and summary["w_tc"] == pytest.approx(1 / ratio, rel=0.05)
    log = [json.loads(x) for x in open(os.path.join(out, summary["runs"]["tc_calibration"], "log.jsonl"))]
    assert any("gn_tc" in r and "gn_cd" in r for r in log)
    report = open(os.path.join(out, "report.md")).read()
    m = re.search(r"gradient norm at the\s+student's output is \*\*([0-9.e+-]+) x\*\* CD's", report)
    assert m and float(m.group(1)) == pytest.approx(ratio, rel=0.01)
    assert "samples.gif" in report and "kappa" in report and "train_losses.png" in report
    assert "validation_step_0000003_4step.gif" in report  # the validation grids of train.py, next to the report
    assert os.path.getsize(os.path.join(out, "validation_step_0000003_4step.gif")) > 0
    monkeypatch.chdir(tmp_path)  # the documented command's relative paths: out/toy-quick/runs/dcm_s0 -> samples/...
    argv = doc_command("docs/sampling.md")
    s = sample.main(argv)
    assert argv[argv.index("--ckpt") + 1] == "out/toy-quick/runs/dcm_s0" and s["mode"] == "dual"
    n, folder = int(argv[argv.index("--num") + 1]), argv[argv.index("--out") + 1]
    assert sorted(os.path.relpath(v, folder) for v in s["videos"]) == sorted(
        f"sample_{i:03d}{ext}" for i in range(n) for ext in (".gif", ".mp4"))
    assert all(os.path.getsize(v) > 0 for v in s["videos"])


def test_the_committed_teacher_is_verified_trained_and_of_the_recipe_in_the_code(clf):
    """toy/teacher/ (what the full run distils): both step folders pass their checksums and load as toy teachers of
    this toy's spec; the provenance records the stages run.FULL.teacher trains (--train-teacher reproduces it); the
    final teacher's guided 8-step samples are recognised by the bench classifier (it is trained, not a stub)."""
    import json
    from dataclasses import asdict
    from storage import integrity
    import sampling
    import solver
    from teacher import Teacher
    from toy import bench, run
    with open(os.path.join(run.TEACHER_DIR, "provenance.json")) as f:
        prov = json.load(f)
    assert [tuple(s) for s in prov["stages"]] == [tuple(s) for s in run.FULL.teacher]
    assert prov["batch"] == run.FULL.batch and prov["cond_drop"] == run.FULL.cond_drop
    for name in ("before_decay", "final"):
        folder = os.path.join(run.TEACHER_DIR, name)
        assert os.path.isfile(os.path.join(folder, integrity.CHECKSUMS)) and integrity.verify(folder) == []
        model, info = sampling.load_student(folder)
        assert info["mode"] == "teacher" and info["run"]["data_manifest"]["toy_spec"] == asdict(toy_data.ToySpec())
    labels, cond, _, noise = bench.eval_batch(7, 48, toy_data.ToySpec())
    teach = Teacher(model, info["grid"], 2.0, toy_data.uncond(toy_data.ToySpec()))
    x = bench.teacher_fn(teach)(noise, cond, solver.student_schedule(info["grid"], [], 8))
    assert tm.condition_accuracy(tm.classifier_features(clf, x.clamp(-1, 1))[1], labels) > 0.7


def test_per_seed_evaluations_merge_into_the_all_seeds_result():
    """bench.merge_seeds (one test sampling seed per worker) equals scoring every sampling seed in one process: the
    per-seed metric lists joined, spreads over training seeds (or over sampling seeds for one run) recomputed."""
    from toy import bench
    g = torch.Generator().manual_seed(0)
    m = lambda: {"fd": float(torch.rand(1, generator=g)) * 100, "cond_acc": float(torch.rand(1, generator=g))}  # noqa
    per_train = [[[m()] for _ in range(3)] for _ in range(2)]  # [sampling seed][training seed] -> [metrics of 1 seed]
    single = [[m()] for _ in range(2)]
    parts = [({"DCM": {"even points": {4: {"per_train_seed": per_train[i], "over": "training seeds", "ks": (49, 1),
                                           "agg": bench.combine([bench.seed_mean(p) for p in per_train[i]])}}},
               "teacher": {"50 steps": {50: bench.agg_over(single[i])}}}, {"gif": i}) for i in range(2)]
    merged, gif = bench.merge_seeds(parts)
    joined = [per_train[0][j] + per_train[1][j] for j in range(3)]
    row = merged["DCM"]["even points"][4]
    assert row["per_train_seed"] == joined and row["ks"] == (49, 1) and row["over"] == "training seeds"
    assert row["agg"] == bench.combine([bench.seed_mean(p) for p in joined])
    assert merged["teacher"]["50 steps"][50] == bench.agg_over(single[0] + single[1]) and gif == {"gif": 0}


def test_figures_label_every_panel_and_leave_none_empty(tmp_path, monkeypatch):
    """The report's train_signals.png (toy/figures.py) as a quick run (no probe step) and a full run log it, and
    tools/plot.py's figures of one and of two runs: every panel drawn has curves and a y label, its step axis integer
    ticks, and no two curves of a panel share colour, line style and marker (issue 27: the quick run's grad-norm
    panel was empty, and of two discriminators at hinge 2.000 one curve hid the other)."""
    import json
    import matplotlib.pyplot as plt
    from tools import plot
    from toy import figures
    figs = []
    monkeypatch.setattr(figures, "savefig", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plot, "_save", lambda fig, path, dpi=90: figs.append(fig) or path)
    steps = (1, 2, 3)
    d = lambda s: {"step": s, "d": 2.0, "d_acc_real": 0.07, "d_acc_fake": 0.93, "cd": 0.01}  # noqa: E731
    quick = {"sem_tc_s0": [{"step": s, "cd": 0.01, "tc": 0.001} for s in steps], "pe_gf_s0": [d(s) for s in steps],
             "dcm_s0": [d(s) for s in steps]}
    gn = {"gn_cd": 1.0, "gn_gan_g": 0.7, "gn_fm": 0.03}
    full = {"sem_tc_s0": [{"step": s, "gn_cd": 1.0, "gn_tc": 0.8} for s in steps]} | {
        n: [d(s) | gn for s in steps] for n in ("pe_gf_s0", "dcm_s0", "dcm_data_s0")}
    figures.fig_train("quick.png", quick)
    figures.fig_train("full.png", full)
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            f.writelines(json.dumps({"step": s, "loss": 1 / s, "cd": 0.5 / s, "lr": 1e-4, "grad_norm": 0.3,
                                     "time": 0.1}) + "\n" for s in steps)
        with open(tmp_path / name / "probes.jsonl", "w") as f:
            f.writelines(json.dumps({"step": s, "high_loss": 0.02, "low_loss": 0.004, "high_grad_norm": 0.6,
                                     "low_grad_norm": 0.4}) + "\n" for s in steps)
    plot.plot_runs([str(tmp_path / "a")], str(tmp_path / "one"))
    plot.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "two"))
    assert [sum(ax.axison for ax in f.axes) for f in figs] == [3, 4, 2, 2, 3, 2, 2, 3]
    for fig in figs:
        fig.canvas.draw()  # places the ticks
        for ax in (ax for ax in fig.axes if ax.axison):
            curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]  # the faint raw lines: "_"
            assert curves and ax.get_ylabel() and ax.get_xlabel() == "training step"
            styles = [(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in curves]
            assert len(set(styles)) == len(styles), styles
            assert all(float(t).is_integer() for t in ax.get_xticks())
        plt.close(fig)
