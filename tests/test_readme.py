"""Every command the README and docs/*.md show works as written.

The convention (docs/tests.md explains it to readers). Every command of a ```bash block of README.md or docs/*.md
(continuation lines joined, `a && b` split; comment-only lines are prose) is exactly one of:

- unmarked: RUN here, in this process through its script's command-line entry point, in one temporary folder:
  first the README's "## Try it on a tiny model" block verbatim (its small step counts are written in the README
  itself), then every other unmarked command of README.md, then those of docs/*.md (files in alphabetical order,
  commands in document order). A command may use the tiny runs (runs/tiny/...) and what an earlier command of its
  own file wrote; the repository files in REPO_INPUTS are linked into the folder.
- `# needs WHAT` as the command's comment (the comment starts with "needs"; with `\\` continuations it is on the
  last line), e.g. `# needs weights`, `# needs 8 GPUs + weights`: not run (real weights, GPUs, many processes,
  another long run); a python/torchrun command must still parse with its script's own argument parser.
- `# run by PATH`, e.g. `# run by tests/test_toy.py`: run elsewhere (PATH must exist); parse-checked too.

A command that is neither run nor marked (a pip/tensorboard/pytest line, a script this test does not know) fails
here, as does a relative link of these documents to a missing file or heading, a code-block line wider than
120 characters, or a README file table that names a missing file or leaves a module out.
"""
import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

import data
import eval as evaluate
import export
import sample
import train
from tools import bench, plot
from toy import run as toy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TRY = "## Try it on a tiny model"
REPO_INPUTS = ("bench_h100.json", "toy")  # repository files the run commands read, linked into their folder
WIDTH = 120
# the scripts the documents may run: argv -> return value or SystemExit (the parse check stops at parse_args)
ENTRY = {"train.py": train.main, "sample.py": sample.main, "data.py": data.main, "eval.py": evaluate.main,
         "export.py": export.main, "tools/bench.py": bench.main, "tools/plot.py": plot.main,
         "toy/run.py": toy_run.main}


def read(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def split_comment(line):
    """(code, comment) of one shell line: the comment starts at a '#' outside quotes, at a word start."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


@dataclass
class Command:
    doc: str
    tiny: bool  # a command of the README's tiny block
    words: list
    comment: str

    @property
    def marker(self):
        """'run' (unmarked), 'needs' or 'run by'."""
        if re.match(r"needs\b", self.comment):
            return "needs"
        return "run by" if re.match(r"run by \S", self.comment) else "run"

    def __str__(self):
        return f"{self.doc}: {shlex.join(self.words)}" + (f"   # {self.comment}" if self.comment else "")


def commands(doc):
    """Every command of every ```bash block of doc, in order."""
    text, out = read(doc), []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        heading = text.rfind("\n## ", 0, m.start())
        tiny = doc == "README.md" and text.startswith(TRY, heading + 1)
        for line in m.group(1).replace("\\\n", " ").splitlines():
            code, comment = split_comment(line)
            words = shlex.split(code)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(Command(doc, tiny, words[:cut], comment))
                words = words[cut + 1:]
    return out


def all_commands():
    return [c for doc in DOCS for c in commands(doc)]


def script_and_args(words):
    """(script, its argv) of a python/torchrun command of this repo, else None (pip, bash, python -m, tensorboard)."""
    if words[0] == "torchrun":  # torchrun's own parser: its flags, the script, the script's (a leading -- dropped)
        from torch.distributed.run import get_args_parser
        a, unknown = get_args_parser().parse_known_args(words[1:])  # parse_args is stopped in the parse test
        assert not unknown, (words, unknown)
        return a.training_script, a.training_script_args
    if words[0] != "python" or len(words) < 2 or not words[1].endswith(".py"):
        return None
    return words[1], words[2:]


def call(fn, argv):
    """fn(argv) -> exit status: 0 on return, SystemExit's code otherwise (a message string counts as failure)."""
    try:
        fn(argv)
    except SystemExit as e:
        return 0 if e.code in (None, 0) else e.code
    return 0


def runners(mp):
    """script -> its command line in this process (error handling included, as `python SCRIPT` runs it)."""
    return {"train.py": lambda a: (mp.setattr(sys, "argv", ["train.py", *a]), train.cli()),
            "sample.py": sample.cli, "data.py": data.main, "eval.py": evaluate.cli, "export.py": export.main,
            "tools/bench.py": bench.main, "tools/plot.py": plot.cli, "toy/run.py": toy_run.main}


def test_every_command_is_run_or_marked():
    seen = {"run": 0, "needs": 0, "run by": 0}
    for c in all_commands():
        seen[c.marker] += 1
        if c.marker == "run by":
            path = c.comment.split()[2].rstrip(";:,")
            assert os.path.exists(os.path.join(ROOT, path)), f"{c}: {path} does not exist"
        sa = script_and_args(c.words)
        if c.marker == "run" or sa is not None:
            assert sa is not None, f"{c}: neither run by tests/test_readme.py nor marked `# needs ...`"
            assert sa[0] in ENTRY, f"{c}: {sa[0]} is a script this test does not know (ENTRY)"
        if c.marker == "run" and not c.tiny:
            assert c.words[0] == "python", f"{c}: only python commands run here; mark it `# needs ...`"
    assert seen["run"] >= 30 and seen["needs"] >= 35, seen  # the tiny block + the docs' CPU commands; the rest


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The README's tiny block run verbatim in a fresh folder -> (folder, its commands, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("readme")
    tiny = [c for c in commands("README.md") if c.tiny]
    cmds = [script_and_args(c.words) for c in tiny]
    assert cmds and all(cmds), "the tiny block must hold only python commands of this repo"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(folder)
        run = runners(mp)
        for script, argv in cmds:
            status = call(run[script], argv)
            assert status == 0, (script, argv, status, err.getvalue()[-2000:])
    return folder, cmds, out.getvalue(), err.getvalue()


def test_the_tiny_block_runs_verbatim(walkthrough, monkeypatch):
    folder, cmds, out, err = walkthrough
    monkeypatch.chdir(folder)
    # what the block promises: a dataset, a resumed semantic run, a detail run, latents from both samplers
    outs = [a[a.index("--out") + 1] for s, a in cmds if s == "sample.py"]
    assert outs and all(torch.isfinite(load_file(os.path.join(o, "latents.safetensors"))["latents"]).all()
                        for o in outs)
    assert "resuming from" in out + err and "Traceback" not in err
    # progress and a compact run config on the console, the full config in the run folder
    assert "steps: 100%" in err and "full config -> runs/tiny/det/config.json" in out
    assert len(out) < 20_000 and os.path.getsize("runs/tiny/det/config.json") > 1000


def test_every_cpu_command_runs(walkthrough, monkeypatch, capsys):
    """The unmarked commands outside the tiny block, after it, in its folder (README first, then docs/*.md)."""
    folder = walkthrough[0]
    monkeypatch.chdir(folder)
    for name in REPO_INPUTS:
        if not os.path.lexists(name):
            os.symlink(os.path.join(ROOT, name), name)
    run, ran = runners(monkeypatch), []
    for c in [c for c in all_commands() if c.marker == "run" and not c.tiny]:
        assert (sa := script_and_args(c.words)) and sa[0] in run, f"{c}: not a script this test runs; mark it"
        assert sa[0] != "toy/run.py" or "--quick" in sa[1], f"{c}: the full toy study (minutes) in the suite; mark it"
        status = call(run[sa[0]], sa[1])
        assert status == 0, f"{c}: exit status {status}\n{capsys.readouterr().err[-2000:]}"
        ran.append(sa[0])
    assert {"tools/plot.py", "tools/bench.py", "export.py", "sample.py", "train.py", "data.py"} <= set(ran), ran
    # a few outputs the documents promise
    assert os.path.isfile("runs/tiny/det/plots/losses.png") and os.path.isfile("runs/tiny/cmp/losses.png")
    assert os.path.isfile("runs/tiny/DCM_MINE/transformer/diffusion_pytorch_model.safetensors")
    assert "Traceback" not in capsys.readouterr().err


class Parsed(Exception):
    pass


def test_every_other_command_parses(monkeypatch):
    """Commands marked as needing weights, GPUs or another run: their flags parse with the script's own parser."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    checked = 0
    for c in all_commands():
        if c.marker == "run" or (sa := script_and_args(c.words)) is None:
            continue
        assert sa[0] in ENTRY, f"{c}: {sa[0]} is a script this test does not know (ENTRY)"
        try:
            ENTRY[sa[0]](sa[1])
        except Parsed:
            checked += 1
            continue
        except SystemExit as e:  # argparse's errors
            pytest.fail(f"{c}: its flags do not parse (exit status {e.code})")
        pytest.fail(f"{c}: ran without reaching an argument parser")
    assert checked >= 35  # README's real-model path, training, sampling, released, data, eval, speed, toy


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Relative links of the documents point at files inside the repository and at headings that exist."""
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", read(doc), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
            assert full.startswith(ROOT + os.sep) and os.path.exists(full), f"{doc}: link {target} -> no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", open(full).read(), flags=re.S), re.M)
                assert anchor in {slug(h) for h in headings}, f"{doc}: link {target} -> no such heading"


def test_code_blocks_fit_the_width():
    for doc in DOCS:
        for m in re.finditer(r"```[a-z]*\n(.*?)```", read(doc), re.S):
            wide = [ln for ln in m.group(1).splitlines() if len(ln) > WIDTH]
            assert not wide, f"{doc}: code lines wider than {WIDTH}: {wide}"


def test_the_file_table_is_the_tree():
    """The README's file table names existing files and every module of the root and the library folders."""
    text = read("README.md")
    table = text[text.index("## Files"):text.index("\n## ", text.index("## Files") + 1)]
    named = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    assert all(os.path.exists(os.path.join(ROOT, n)) for n in named), sorted(
        n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    modules = {os.path.relpath(p, ROOT) for d in ("", "backbones", "scale", "storage", "tools")
               for p in glob.glob(os.path.join(ROOT, d, "*.py")) if not p.endswith("__init__.py")}
    assert modules <= named, f"modules missing from the README's file table: {sorted(modules - named)}"
