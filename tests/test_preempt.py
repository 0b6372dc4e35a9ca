"""Preemption (storage/preempt.py): a signalled train.py saves the step it finishes, says so in one line, exits 143/130,
and the run resumed from there ends bit-identical to one never interrupted (tests/preempt_trials.py: many more)."""
import os
import random
import signal
import subprocess

import pytest

import preempt_trials as trials
import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    data, teacher = str(root / "data"), str(root / "teacher")
    import data as dataset
    dataset.synthetic_dataset("tiny-cogvideox", data, num=8)
    train.main(["--config", "tiny-cogvideox", "--stage", "teacher", "--data", data, "--out", teacher, "--max-steps", "2",
                "--probe-every", "0", "--device", "cpu"])
    base = ["--stage", "semantic", "--teacher", os.path.join(teacher, "step_0000002"), "--data", data, "--max-steps",
            "40", "--save-every", "20", "--target-ema", "0.9", "--batch-size", "2", "--probe-every", "0", "--device", "cpu"]
    train.main(base + ["--out", str(root / "ref")])
    return root, base, trials.final_state(str(root / "ref"), 40)


def test_signals_save_and_resume_exactly(setup):
    """One run interrupted three times: SIGTERM mid-training and SIGINT inside a (slowed) save each save the step
    they name (complete, intact, the signal's exit status); then a second signal inside a save aborts at once
    (no new step folder, only its temp folder, removed by the next start). Finished with --resume, the run equals
    the uninterrupted one bit for bit (a signal during start-up: preempt_trials.py)."""
    root, base, ref = setup
    rng, out = random.Random(1), str(root / "run")
    rows = trials.chain(base, out, [(signal.SIGTERM, "train"), (signal.SIGINT, "save")], rng,
                        env={**trials.ENV, "DCM_TEST_SAVE_SLEEP": "0.5"}, finish=False)
    assert all(r["ok"] for r in rows), rows
    assert [r["rc"] for r in rows] == [143, 130] and all(r["step"] for r in rows), rows
    assert rows[0]["line"].endswith(f"--out {out} --resume"), rows[0]["line"]  # the command to go on with
    # the next save hangs (30 s) until the second signal, 1.5 s after the first (past REPEAT_S: a second request)
    saved = sorted(n for n in os.listdir(out) if n.startswith("step_"))
    proc = subprocess.Popen(trials.command(base + ["--out", out, "--resume"]), stderr=subprocess.PIPE, text=True,
                            env={**trials.ENV, "DCM_TEST_SAVE_SLEEP": "30"}, start_new_session=True)
    assert trials.wait_for("save", out, proc, rows[-1]["step"], rng)
    os.kill(proc.pid, signal.SIGTERM)
    trials.time.sleep(1.5)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "second signal (SIGTERM): aborting now without saving" in err, err
    assert "Traceback" not in err and sorted(n for n in os.listdir(out) if n.startswith("step_")) == saved
    assert [n for n in os.listdir(out) if n.startswith(".step_")]  # the unfinished save, left as a temp folder
    train.main(base + ["--out", out, "--resume"])
    assert not [n for n in os.listdir(out) if n.startswith(".step_")]
    assert trials.same(trials.final_state(out, 40), ref)


def test_torchrun_ranks_stop_at_one_step(setup):
    """2 gloo processes under torchrun, SIGTERM to the launcher (as a scheduler sends it, torchrun forwards it): every
    rank stops after the same step and one intact checkpoint names it, with both ranks' RNG states (the resumed
    2-process run is compared bit for bit with an uninterrupted one in preempt_trials.py: 6 signals, all equal)."""
    root, base, _ = setup
    out = str(root / "tr")
    (row,) = trials.chain(base, out, [(signal.SIGTERM, "train")], random.Random(2), nproc=2, finish=False)
    assert row["ok"] and row["step"], row
    state = trials.torch.load(os.path.join(out, f"step_{row['step']:07d}", "train_state.pt"), weights_only=False)
    assert state["step"] == row["step"] and state["world_size"] == 2 and len(state["rng"]) == 2
