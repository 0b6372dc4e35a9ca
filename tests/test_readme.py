"""Every command the README shows works as written.

The "Try it on a tiny model" block is run command by command, verbatim (its small step counts are written
in the README itself), through each script's own command-line entry point in this process; every other
`python ...` / `torchrun ...` command of the README's bash blocks must at least parse with its script's
argument parser (they need real weights). A README command that stops working fails here.
"""
import argparse
import os
import re
import shlex
import sys

import pytest
import torch
from safetensors.torch import load_file

from tools import bench
import data
import eval as evaluate
from tools import plot
from storage import released
import sample
import train
from toy import run as toy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRY = "## Try it on a tiny model"
ENTRY = {"train.py": train.main, "sample.py": sample.main, "data.py": data.main, "bench.py": bench.main,
         "toy/run.py": toy_run.main, "eval.py": evaluate.main, "plot.py": plot.main, "released.py": released.main}


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def commands(block):
    """Shell commands of a bash block: continuation lines joined, comments dropped, `a && b` split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


def blocks():
    """(is the tiny block, bash block text) of every ```bash block of the README."""
    text, out = readme(), []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        heading = text.rfind("\n## ", 0, m.start())
        out.append((text.startswith(TRY, heading + 1), m.group(1)))
    return out


def script_and_args(words):
    """(script, its argv) of a python/torchrun command, else None (pip, bash, pytest, tensorboard)."""
    if words[0] == "torchrun":  # torchrun's own parser: its flags, the script, the script's (a leading -- dropped)
        from torch.distributed.run import get_args_parser
        a, unknown = get_args_parser().parse_known_args(words[1:])  # parse_args is stopped in the test below
        assert not unknown, (words, unknown)
        return a.training_script, a.training_script_args
    i = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    return None if words[0] != "python" or i is None else (words[i], words[i + 1:])


def call(fn, argv):
    """fn(argv) -> exit status: 0 on return, SystemExit's code otherwise (a message string counts as 1)."""
    try:
        fn(argv)
    except SystemExit as e:
        return 0 if e.code in (None, 0) else e.code
    return 0


def test_the_tiny_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    (tiny,) = [b for is_tiny, b in blocks() if is_tiny]
    cmds = [script_and_args(c) for c in commands(tiny)]
    assert cmds and all(cmds), "the tiny block must hold only python commands of this repo"
    monkeypatch.chdir(tmp_path)
    cli = {"train.py": lambda a: (monkeypatch.setattr(sys, "argv", ["train.py", *a]), train._cli()),
           "sample.py": sample.cli, "data.py": data.main}
    for script, argv in cmds:
        status = call(cli[script], argv)
        assert status == 0, (script, argv, status, capsys.readouterr().err[-2000:])
    # what the block promises: a dataset, a resumed semantic run, a detail run, latents from both samplers
    outs = [a[a.index("--out") + 1] for s, a in cmds if s == "sample.py"]
    assert outs and all(torch.isfinite(load_file(os.path.join(o, "latents.safetensors"))["latents"]).all()
                        for o in outs)
    err = capsys.readouterr()
    assert "resuming from" in err.out + err.err and "Traceback" not in err.err
    # progress and a compact run config on the console, the full config in the run folder
    assert "steps: 100%" in err.err and "full config -> runs/tiny/det/config.json" in err.out
    assert len(err.out) < 20_000 and os.path.getsize("runs/tiny/det/config.json") > 1000


class Parsed(Exception):
    pass


def test_every_other_readme_command_parses(monkeypatch):
    """Commands that need real weights or GPUs: their flags must parse with the script's own parser."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    checked = 0
    for is_tiny, block in blocks():
        for words in commands(block) if not is_tiny else []:
            if (sa := script_and_args(words)) is None:
                continue
            script, argv = sa
            assert script in ENTRY, f"README runs {script}, which this test does not know"
            with pytest.raises(Parsed):  # argparse errors exit with status 2 instead
                ENTRY[script](argv)
            checked += 1
    assert checked >= 12  # the Training, Sampling, Data, Speed and set-up blocks
