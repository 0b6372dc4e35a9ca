"""Preemption (storage/preempt.py): a signalled train.py saves the step it finishes, says so in one line, exits 143/130,
and the run resumed from there ends bit-identical to one never interrupted (tests/preempt_trials.py: many more)."""
import json
import os
import random
import signal
import subprocess
import sys

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
    """SIGTERM mid-training, then SIGINT inside a (slowed) save: each named step is complete and intact, the exit
    status is the signal's; the run finished with --resume equals the uninterrupted one (a signal during start-up:
    preempt_trials.py)."""
    root, base, ref = setup
    rng, out = random.Random(1), str(root / "run")
    rows = trials.chain(base, out, [(signal.SIGTERM, "train"), (signal.SIGINT, "save")], rng,
                        env={**trials.ENV, "DCM_TEST_SAVE_SLEEP": "0.5"}, finish=False)
    train.main(base + ["--out", out, "--resume"])
    assert all(r["ok"] for r in rows), rows
    assert [r["rc"] for r in rows] == [143, 130] and all(r["step"] for r in rows), rows
    assert rows[0]["line"].endswith(f"--out {out} --resume"), rows[0]["line"]  # the command to go on with
    assert trials.same(trials.final_state(out, 40), ref)


def test_second_signal_aborts_at_once(setup):
    """A second signal (later than a repeat) inside the save: exit at once, no new step folder, only its temp folder
    (removed by the next start); resuming from the last complete step still ends bit-identical."""
    root, base, ref = setup
    out = str(root / "abort")
    env = {**trials.ENV, "DCM_TEST_SAVE_SLEEP": "30"}  # the first periodic save (step 20) hangs until the abort
    proc = subprocess.Popen(trials.command(base + ["--out", out]), env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert trials.wait_for("save", out, proc, 0, random.Random(0))
    os.kill(proc.pid, signal.SIGTERM)
    trials.time.sleep(1.5)  # past REPEAT_S: a second request, not the same one delivered twice
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "second signal (SIGTERM): aborting now without saving" in err, err
    assert "Traceback" not in err and not any(n.startswith("step_") for n in os.listdir(out)), os.listdir(out)
    assert [n for n in os.listdir(out) if n.startswith(".step_")]  # the unfinished save, left as a temp folder
    train.main(base + ["--out", out, "--resume"])
    assert not [n for n in os.listdir(out) if n.startswith(".step_")]
    assert trials.same(trials.final_state(out, 40), ref)


def test_torchrun_ranks_stop_at_one_step(setup):
    """2 gloo processes under torchrun: SIGTERM to the launcher (as a scheduler sends it) -> every rank stops after
    the same step, one checkpoint, and the resumed 2-process run equals an uninterrupted 2-process one."""
    root, base, _ = setup
    ref2, out = str(root / "ref2"), str(root / "tr")
    rows = trials.chain(base, out, [(signal.SIGTERM, "train")], random.Random(2), nproc=2, finish=False)
    assert all(r["ok"] and r["step"] for r in rows), rows
    with open(root / "runs.json", "w") as f:  # one more launch: the uninterrupted run, then the resume
        json.dump([["train", *base, "--out", ref2], ["train", *base, "--out", out, "--resume"]], f)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(trials.ROOT, "tests", "_torchrun_runs.py"), str(root / "runs.json")], env=trials.ENV,
                   check=True, capture_output=True, timeout=300)
    assert trials.same(trials.final_state(out, 40), trials.final_state(ref2, 40))
