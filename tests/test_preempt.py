"""Preemption (storage/preempt.py): a signalled train.py saves the step it finishes, says so in one line, exits 143/130,
and the run resumed from there ends bit-identical to one never interrupted (tests/preempt_trials.py: many more)."""
import os
import random
import signal
import subprocess

import pytest

import data as dataset
import preempt_trials as trials
import train
from storage import checkpoint, integrity, latents, preempt, resume


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    data, teacher = str(root / "data"), str(root / "teacher")
    dataset.synthetic_dataset("tiny-cogvideox", data, num=8)
    train.main(["--config", "tiny-cogvideox", "--stage", "teacher", "--data", data, "--out", teacher, "--max-steps", "2",
                "--probe-every", "0", "--device", "cpu"])
    base = ["--stage", "semantic", "--teacher", os.path.join(teacher, "step_0000002"), "--data", data, "--max-steps",
            "40", "--save-every", "20", "--target-ema", "0.9", "--batch-size", "2", "--probe-every", "0", "--device", "cpu"]
    train.main(base + ["--out", str(root / "ref")])
    return root, base, trials.final_state(str(root / "ref"), 40)


def test_signals_save_and_resume_exactly(setup, monkeypatch):
    """Real signals to this process: SIGTERM during a step saves the step it finishes (143), SIGINT inside a save
    saves the next step (130), each named in the one line and complete; the run finished with --resume equals the
    uninterrupted one bit for bit (real train.py processes, start-up included: preempt_trials.py)."""
    root, base, ref = setup
    out = str(root / "run")
    draws, save_step = latents.draws, resume.save_step

    def draws_and_signal(index, step, *a, **k):  # the signal lands inside step 13's micro-step
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return draws(index, step, *a, **k)

    def save_and_signal(out, step, *a, **k):  # inside the step-20 save
        if step == 20:
            os.kill(os.getpid(), signal.SIGINT)
        return save_step(out, step, *a, **k)
    for patch, sig, code, step in ((("storage.latents.draws", draws_and_signal), signal.SIGTERM, 143, 13),
                                   (("storage.resume.save_step", save_and_signal), signal.SIGINT, 130, 21)):
        monkeypatch.setattr(*patch)
        with pytest.raises(preempt.Interrupted) as e:
            train.main(base + ["--out", out] + ["--resume"] * (sig == signal.SIGINT))
        monkeypatch.undo()
        saved = os.path.join(out, f"step_{step:07d}")
        assert e.value.code == code and str(e.value).startswith(f"interrupted at step {step}: saved {saved}; resume "
                                                                 "with: python train.py "), str(e.value)
        assert not checkpoint.step_missing(saved, checkpoint.RESUMABLE) and not integrity.verify(saved)
        assert trials.logged_steps(out)[-1] == step
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    train.main(base + ["--out", out, "--resume"])
    assert trials.same(trials.final_state(out, 40), ref)


def test_second_signal_aborts_at_once(setup):
    """A real train.py process: a second signal (later than a repeat) inside a save exits at once, 143, no new step
    folder, only its temp folder (removed by the next start); resuming still ends bit-identical."""
    root, base, ref = setup
    out, rng = str(root / "abort"), random.Random(0)
    proc = subprocess.Popen(trials.command(base + ["--out", out]), stderr=subprocess.PIPE, text=True,
                            env={**trials.ENV, "DCM_TEST_SAVE_SLEEP": "30"}, start_new_session=True)
    assert trials.wait_for("save", out, proc, 0, rng)  # the step-20 save hangs until the second signal
    os.kill(proc.pid, signal.SIGTERM)
    trials.time.sleep(1.5)  # past REPEAT_S: a second request, not the same one delivered twice
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "second signal (SIGTERM): aborting now without saving" in err, err
    assert "Traceback" not in err and not [n for n in os.listdir(out) if n.startswith("step_")]
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
