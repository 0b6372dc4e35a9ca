"""The toy study's training runs, in parallel worker processes (issue 17 item 6: the budget on 2 cores).

A toy run is small (batch 16 of ~100 tokens), so one torch thread does most of the work two would: measured on 2 cores,
80 VCM steps took 12.4 s as one run on 2 threads and 9.2 s each as two runs side by side on 1 thread (docs/toy.md, the
toy). A run that names another's checkpoint as "@name" in its argv waits for it.
"""
import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import sys
import time


class Tee:
    """A stream writing to several (stderr: train.py's progress bar on the console and in the run's log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def train_run(out, name, argv, console=True):
    """train.main(argv) into out/runs/name, its output in out/logs/name.log (its progress bar also on the console
    when `console`) -> train.main's summary."""
    import train
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(Tee(log, sys.stderr) if console else log):
        return train.main(argv + ["--out", os.path.join(out, "runs", name)])


def _init(threads):
    import torch
    torch.set_num_threads(threads)


def pool(workers, threads):
    """`workers` spawned processes of `threads` torch threads (spawn: no fork of a process whose OpenMP threads ran)."""
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(threads,))


class Workers:
    """The worker processes of a whole study, `n` of one torch thread each, started once for all its phases (a spawn
    imports torch and the project anew: 2-4 s a phase when each started its own); n <= 1: none, every job runs here.

    Every job runs on one thread, here as in a worker: a backward pass sums in another order on another thread count
    (the toy's gradients differ in the last bits between 1 and 2 threads), so training on `--threads` here would make
    the tables depend on the worker layout. Forward passes gave the same bits on 1 and 2 threads."""

    def __init__(self, n):
        self.n, self.ex = n, pool(n, 1) if n > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.ex is not None:  # after an error, the jobs not yet started are dropped rather than run
            self.ex.shutdown(cancel_futures=True)


def here(fn, *args, **kw):
    """fn(*args, **kw) in this process on one torch thread, as a worker would run it."""
    from toy.metrics import torch_threads
    with torch_threads(1):
        return fn(*args, **kw)


def _job(out, name, argv):
    t0 = time.time()
    return train_run(out, name, argv, console=False), time.time() - t0


def deps(argv):
    return [a[1:] for a in argv if a.startswith("@")]


class Runs:
    """add(name, argv) training runs, then wait() -> {name: summary}: in the study's `workers` (jobs.Workers; none:
    here, in order, one thread, the progress bars on the console); seconds per run in .seconds."""

    def __init__(self, out, workers, done=None):
        self.out, self.workers = out, workers
        self.pending, self.done, self.seconds = {}, dict(done or {}), {}

    def add(self, name, argv):
        self.pending[name] = argv

    def resolve(self, argv):
        return [self.done[a[1:]]["checkpoint"] if a.startswith("@") else a for a in argv]

    def wait(self):
        unknown = {d for a in self.pending.values() for d in deps(a)} - set(self.pending) - set(self.done)
        if unknown:
            raise ValueError(f"runs name unknown runs: {sorted(unknown)}")
        if self.workers.ex is None:
            while self.pending:
                name = next(n for n, a in self.pending.items() if all(d in self.done for d in deps(a)))
                t0 = time.time()
                self.done[name] = here(train_run, self.out, name, self.resolve(self.pending.pop(name)))
                self.report(name, time.time() - t0)
            return self.done
        running = {}
        while self.pending or running:
            # a free worker takes the first ready run in the order added (a chain's second stage before later runs)
            for name in [n for n, a in self.pending.items() if all(d in self.done for d in deps(a))]:
                if len(running) == self.workers.n:
                    break
                print(f"[toy] distil {name} ...", flush=True)
                running[self.workers.ex.submit(_job, self.out, name, self.resolve(self.pending.pop(name)))] = name
            if not running:
                raise ValueError(f"runs wait for each other: {sorted(self.pending)}")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                name = running.pop(f)
                self.done[name], secs = f.result()
                self.report(name, secs)
        return self.done

    def report(self, name, secs):
        self.seconds[name] = secs
        print(f"[toy] distil {name}: {secs:.1f} s", flush=True)


def parallel(calls, workers):
    """[fn(**kwargs) for fn, kwargs in calls], in the study's `workers` (jobs.Workers; none: here, in order, one
    thread each); fn must be importable (a module-level function)."""
    if workers.ex is None:
        return [here(fn, **kw) for fn, kw in calls]
    return [f.result() for f in [workers.ex.submit(fn, **kw) for fn, kw in calls]]


def machine():
    """The machine a toy run ran on, for its report (the load average only recorded, never used to size the run)."""
    import platform

    import torch
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor(),
            "loadavg_at_end": load}
