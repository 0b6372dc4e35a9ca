"""Preemption trials: real train.py processes signalled at random moments, resumed to the end, compared bit for bit.
Under torchrun the launcher is signalled (it forwards the signal to its workers) and its own exit status and
SignalException traceback are torch's: the check is on the workers' line, their checkpoint and the resumed run.

    python tests/preempt_trials.py [--trials 8] [--seed 0] [--torchrun 2] [--out DIR]   # the table in docs/training.md

A trial is one run chained through interruptions: start, wait for a moment (a random time into training, inside a
save slowed by the DCM_TEST_SAVE_SLEEP hook, or during start-up), send SIGTERM or SIGINT, check the exit status, the
one line and that the step folder it names is complete and intact, resume, repeat; then finish with --resume and
compare every weight and every logged loss with an uninterrupted run. tests/test_preempt.py runs a few of these.
"""
import argparse
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from storage import checkpoint, integrity  # noqa: E402
from storage.preempt import EXIT as CODE  # noqa: E402 - the exit status of each signal

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def command(argv, nproc=1):
    """python train.py ARGV, or torchrun with nproc gloo processes."""
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train.py"), *argv]


def logged_steps(out):
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def wait_for(moment, out, proc, start_step, rng, last=None):
    """Block until `moment` in a running process: 'train' = a random step before `last` has been logged, 'save' = a
    step folder being written, 'startup' = before its first step. -> False when the process ended first."""
    t0, at = time.time(), rng.randint(start_step + 1, max(start_step + 1, (last or start_step + 1) - 5))
    while proc.poll() is None:
        if moment == "startup" and time.time() - t0 > rng.uniform(0.2, 1.5):
            return True
        if moment == "save" and glob.glob(os.path.join(out, ".step_*.tmp-*")):
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the (slowed) save
            return True
        if moment == "train" and any(s >= at for s in logged_steps(out)):
            return True  # the signal lands somewhere in the next step
        time.sleep(0.005)
    return False


def interrupt(argv, out, sig, moment, rng, nproc=1, env=None):
    """One interrupted launch -> a table row {signal, moment, rc, line, step, ok}."""
    start = max(logged_steps(out), default=0)
    proc = subprocess.Popen(command(argv, nproc), env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    sent = wait_for(moment, out, proc, start, rng, int(argv[argv.index("--max-steps") + 1]))
    if sent:
        os.kill(proc.pid, sig)  # torchrun forwards it to its workers, as it does a scheduler's or a terminal's
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith(("interrupted", "error:"))]
    # ours: no traceback; torchrun's launcher prints its own (a SignalException) when it is the one signalled
    ours = "Traceback" not in err if nproc == 1 else 'train.py", line' not in err
    row = {"signal": sig.name, "moment": moment, "nproc": nproc, "rc": proc.returncode, "line": lines[-1] if lines else "",
           "start": start, "sent": sent}
    m = re.match(r"interrupted at step (\d+): saved (\S+);", row["line"])
    if m:
        folder = m.group(2) if os.path.isabs(m.group(2)) else os.path.join(os.path.dirname(out), m.group(2))
        intact = not checkpoint.step_missing(folder, checkpoint.RESUMABLE) and not integrity.verify(folder)
        row |= {"step": int(m.group(1)), "ok": (proc.returncode == CODE[sig] or nproc > 1) and intact and ours
                and len(lines) == 1
                and max(logged_steps(out)) == int(m.group(1)) and folder.endswith(f"step_{int(m.group(1)):07d}")}
    elif "before the first step" in row["line"] or proc.returncode == -sig:  # start-up: nothing to save yet
        row |= {"step": None, "ok": (proc.returncode in (CODE[sig], -sig) or nproc > 1) and ours
                and max(logged_steps(out), default=0) == start}
    else:  # ended before the signal: a finished run is fine, anything else is not
        row |= {"step": None, "ok": not sent and proc.returncode == 0}
    if not row["ok"]:
        row["stderr"] = err[-3000:]
    return row


def final_state(out, max_steps):
    """The finished run's weights and logged losses (the wall-clock column dropped)."""
    w = load_file(os.path.join(checkpoint.step_dir(out, max_steps), "transformer", checkpoint.WEIGHTS))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f if line.strip()]
    return w, log


def same(a, b):
    (wa, la), (wb, lb) = a, b
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and la == lb


def chain(argv, out, plan, rng, nproc=1, env=None, finish=True):
    """Interrupt a run once per (signal, moment) of `plan`, each time resuming, then finish it -> rows."""
    rows = []
    for i, (sig, moment) in enumerate(plan):
        rows.append(interrupt(argv + ["--out", out] + (["--resume"] if i else []), out, sig, moment, rng, nproc, env))
    if not finish:
        return rows
    p = subprocess.run(command(argv + ["--out", out, "--resume"], nproc), env=env or ENV, capture_output=True,
                       text=True, timeout=600)
    if p.returncode:
        raise RuntimeError(f"the final resume failed:\n{p.stderr[-3000:]}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="single-process trials, 3 signals each")
    p.add_argument("--torchrun", type=int, default=2, help="2-process torchrun trials, 2 signals each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/preempt")
    args = p.parse_args(argv)
    rng, root = random.Random(args.seed), os.path.abspath(args.out)
    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "data")
    if not os.path.isdir(data):
        subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "synthetic", "--model", "tiny-cogvideox", "--out",
                        data, "--num", "8"], env=ENV, check=True, capture_output=True)
    teacher = os.path.join(root, "teacher")
    if not os.path.isdir(teacher):
        subprocess.run(command(["--config", "tiny-cogvideox", "--stage", "teacher", "--data", data, "--out", teacher,
                                "--max-steps", "2", "--device", "cpu"]), env=ENV, check=True, capture_output=True)
    base = ["--stage", "semantic", "--teacher", checkpoint.step_dir(teacher, 2), "--data", data, "--max-steps", "120",
            "--save-every", "40", "--target-ema", "0.9", "--batch-size", "2", "--probe-every", "0", "--device", "cpu"]
    slow = {**ENV, "DCM_TEST_SAVE_SLEEP": "1.0"}
    refs, rows = {}, []
    for t in range(args.trials + args.torchrun):
        nproc = 1 if t < args.trials else 2
        if nproc not in refs:
            subprocess.run(command(base + ["--out", os.path.join(root, f"ref{nproc}")], nproc), env=ENV, check=True,
                           capture_output=True, timeout=600)
            refs[nproc] = final_state(os.path.join(root, f"ref{nproc}"), 120)
        out = os.path.join(root, f"trial{t}")
        plan = [(rng.choice([signal.SIGTERM, signal.SIGINT]), rng.choice(["train", "train", "save", "startup"]))
                for _ in range(3 if nproc == 1 else 2)]
        trial = chain(base, out, plan, rng, nproc, slow)
        equal = same(final_state(out, 120), refs[nproc])
        for r in trial:
            r |= {"trial": t, "equal": equal}
            print(json.dumps({k: v for k, v in r.items() if k != "stderr"}), flush=True)
            if "stderr" in r:
                print(r["stderr"], file=sys.stderr)
        rows += trial
    print("\n| trial | processes | signal | moment | exit | saved step | intact, line right | resumed run bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trial']} | {r['nproc']} | {r['signal']} | {r['moment']} | {r['rc']} | {r['step'] or '-'} | "
              f"{'yes' if r['ok'] else 'NO'} | {'yes' if r['equal'] else 'NO'} |")
    bad = [r for r in rows if not (r["ok"] and r["equal"])]
    print(f"\n{len(rows)} signals in {args.trials + args.torchrun} trials: {len(rows) - len(bad)} saved and resumed exactly")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
