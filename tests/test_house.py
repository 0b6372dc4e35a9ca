"""The shape of the house (DESIGN sec. 10): no import circle among the project's modules, scripts import the library
and never the reverse, sample.py is the command line only, and a checkpoint path is resolved in one place."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("backbones", "scale", "storage", "tools", "toy")
# command lines only (`python X.py` / `torchrun X.py`); tools/plot.py is a library module that also has one (its
# functions are imported, its main never is)
SCRIPTS = {"train", "sample", "data", "eval", "export", "tools.bench", "toy.run"}


def project_modules():
    """{dotted module name: path} of every project .py file outside tests/ (the root's and the packages')."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for p in PACKAGES:
        mods |= {f"{p}.{f[:-3]}": os.path.join(ROOT, p, f) for f in os.listdir(os.path.join(ROOT, p))
                 if f.endswith(".py") and f != "__init__.py"}
    return mods


def imports(path, mods):
    """The project modules a file imports anywhere in it (function-level imports too): `import a`, `from p import m`,
    `from p.m import x`, `from a import x`."""
    out = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name in mods}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            if n.module in mods:
                out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods}
    return out


def graph():
    mods = project_modules()
    return {m: imports(p, mods) - {m} for m, p in mods.items()}


def cycles(g):
    """Every strongly connected component of more than one module (Tarjan), each a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_project_modules():
    g = graph()
    assert len(g) >= 30 and "storage.checkpoint" in g["sampling"]  # the walk sees the packages' modules
    assert cycles(g) == []


def test_the_library_never_imports_a_command_line():
    """Scripts import the library, never the reverse, and no module calls another's main; the one exception is the
    toy study's driver (toy/jobs.py), which runs train.py's command line in-process: that is what it exists for."""
    g, mods = graph(), project_modules()
    drivers = {m for m in g if m.startswith("toy.")}
    assert {m: sorted(g[m] & SCRIPTS) for m in g if m not in SCRIPTS | drivers and g[m] & SCRIPTS} == {}
    mains = {m: sorted({f"{n.value.id}.main" for n in ast.walk(ast.parse(open(p).read())) if isinstance(n, ast.Attribute)
                        and n.attr == "main" and isinstance(n.value, ast.Name)}) for m, p in mods.items()}
    assert {m: v for m, v in mains.items() if v} == {"toy.jobs": ["train.main"]}


def test_sample_py_is_the_command_line_only():
    src = open(os.path.join(ROOT, "sample.py")).read()
    assert len(src.splitlines()) <= 200
    defs = {n.name for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defs == {"decode", "parse_args", "main", "cli"}


@pytest.mark.parametrize("module", ["sampling", "train", "eval", "export", "storage.released", "scale.fsdp"])
def test_checkpoint_paths_are_resolved_by_checkpoint_resolve_only(module):
    """No entry point tells run / step / transformer folders apart itself: none lists step folders or picks the
    newest one (checkpoint.resolve does)."""
    path = project_modules()[module]
    names = {n.attr for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "checkpoint"}
    assert not names & {"step_folders", "latest_step", "step_missing", "is_run_config"} - ALLOWED.get(module, set())


ALLOWED = {"train": {"latest_step", "is_run_config"}}  # its own --out (the save it just wrote); a step's transformer/ as --init
