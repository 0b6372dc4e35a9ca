"""Preemption (DESIGN sec. 9): SIGTERM (a scheduler taking the GPUs back) or SIGINT (Ctrl-C) turns into a checkpoint.

    with preempt.Preemption() as pre:    # handlers installed; a signal during start-up raises Interrupted at once
        ...                              # loading, resuming
        pre.arm()                        # from here a signal only sets pre.signum
        while ...:
            ...one optimizer step; the step's all-reduce carries pre.pending() so every rank stops at the same step
            if stop: save, then raise Interrupted(pre.signum, "interrupted at step N: saved ...")

A second signal aborts at once (exit 143 / 130, nothing saved; an unfinished save leaves only a temp folder that the
next start removes). A repeat of the first signal within REPEAT_S counts as the same request: a scheduler may signal
every process of a job while torchrun also forwards what it got to its workers.
Slurm and Kubernetes send SIGTERM, then SIGKILL after a grace period (Slurm's KillWait, 30 s by default; Kubernetes'
terminationGracePeriodSeconds, 30 s; torchrun waits 30 s for its workers): finishing a step and saving must fit in it.
"""
import os
import shlex
import signal
import sys
import threading
import time

EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number, as a shell reports a killed process
REPEAT_S = 1.0


class Interrupted(Exception):
    """A run stopped by a signal; .code is its exit status, str() the one line the command line prints (empty: none,
    as on ranks other than 0)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.code = EXIT.get(signum, 143)


class Preemption:
    """SIGTERM/SIGINT handlers for one training run (main thread only; the previous handlers come back on exit)."""

    def __init__(self, argv=None):
        self.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command it prints
        self.signum, self.at, self.armed, self.old = 0, 0.0, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self.old = {s: signal.signal(s, self._handle) for s in EXIT}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum and signum == self.signum and now - self.at < REPEAT_S:
            return  # the same request delivered twice (scheduler + torchrun)
        name = signal.Signals(signum).name
        if self.signum:
            print(f"\nsecond signal ({name}): aborting now without saving", file=sys.stderr, flush=True)
            os._exit(EXIT[signum])  # no cleanup: that is what "at once" means; an unfinished save stays a temp folder
        self.signum, self.at = signum, now
        if not self.armed:
            raise Interrupted(signum, f"interrupted by {name} before the first step: nothing trained, nothing saved")
        if os.environ.get("RANK", "0") == "0":  # one note per run, not one per process
            print(f"\n{name}: finishing this step, then saving (a second signal aborts without saving)", file=sys.stderr,
                  flush=True)

    def arm(self):
        """From now on a signal asks the loop to stop (pending) instead of raising."""
        self.armed = True

    def pending(self):
        """1.0 when this process was signalled (summed over ranks by the step's all-reduce), else 0.0."""
        return float(self.signum != 0)

    def resume_command(self):
        """The command to go on with: this one plus --resume (under torchrun its own flags are not known here)."""
        launcher = "torchrun --nproc_per_node=... " if "LOCAL_RANK" in os.environ else "python "
        return launcher + shlex.join(["train.py", *self.argv] + ([] if "--resume" in self.argv else ["--resume"]))
