"""The house's import rules, read from the source: arrows one way, no cycle, entry points imported by nothing, and
every entry point's --help answering without loading torch."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["sample.py", "train.py", "data/precompute.py", "data/make_toy.py"]
# What each core module may import from mmdit (the brief's "house"): anything else is a wrong-way arrow.
ALLOWED = {
    "mmdit.config": set(),
    "mmdit.flow": set(),
    "mmdit.model": {"mmdit.config"},
    "mmdit.text": {"mmdit.config"},
    "mmdit.vae": {"mmdit.config"},
    "mmdit.shards": {"mmdit.config"},
    "mmdit.sources": {"mmdit.shards", "mmdit.config"},   # reading shards from anywhere: the format, then webdataset
    "mmdit.loader": {"mmdit.sources", "mmdit.shards", "mmdit.config"},
    "mmdit.checkpoint": {"mmdit.config", "mmdit.model"},
    "mmdit.align": {"mmdit.checkpoint"},   # REPA: a training loss beside the model, never inside it
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node) -> bool:
    """`if __name__ == "__main__":`: what runs only when the file is a script is not an import of the module."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The mmdit modules a file imports anywhere (top level or inside functions), outside its __main__ guard."""
    tree = ast.parse(path.read_text())
    inside = path.is_relative_to(ROOT)
    package = "" if not inside else module_name(path) if path.name == "__init__.py" else \
        module_name(path).rpartition(".")[0]
    found = set()

    def visit(node):
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)   # `from mmdit import flow`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "mmdit").rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) - {module_name(f)} for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_walker_sees_imports_and_cycles(tmp_path):
    """The checks below can fail: the walker finds a lazy import inside a function and a two-module cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from mmdit import flow\n")
    assert imports_of(tmp_path / "a.py", {"mmdit.flow"}) == {"mmdit.flow"}
    (tmp_path / "b.py").write_text("if __name__ == '__main__':\n    import mmdit.flow\n")
    assert imports_of(tmp_path / "b.py", {"mmdit.flow"}) == set()
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle_in_mmdit():
    assert cycles(import_graph()) == []


def test_core_modules_import_only_what_the_house_allows():
    graph = import_graph()
    wrong = {m: sorted(graph[m] - allowed) for m, allowed in ALLOWED.items() if graph[m] - allowed}
    assert wrong == {}


def test_nothing_in_mmdit_imports_an_entry_point():
    names = {"train", "sample", "data", "data.precompute", "data.make_toy"}
    for path in (ROOT / "mmdit").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not names & {a.name for a in node.names}, path
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert node.module not in names, path
        assert "spec_from_file_location" not in path.read_text(), f"{path} loads a file as a module"


def test_ranks_and_launchers_live_in_train_py_only():
    for path in (ROOT / "mmdit").rglob("*.py"):
        text = path.read_text()
        assert "import deepspeed" not in text and "from accelerate" not in text, path


@pytest.mark.parametrize("command", [[e] for e in ENTRY_POINTS] + [["-m", "mmdit.eval.geneval"]])
def test_help_answers_quickly_without_torch(command):
    """--help parses arguments only: torch (seconds to import) is loaded where work starts. The bound is generous
    so a loaded machine does not fail it; the README reports the real figures."""
    probe = ("import runpy, sys, time; sys.argv = {argv!r}; start = time.perf_counter()\n"
             "try:\n    runpy.{run}({target!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, time.perf_counter() - start)")
    if command[0] == "-m":
        code = probe.format(argv=[command[1], "--help"], run="run_module", target=command[1])
    else:
        code = probe.format(argv=[command[0], "--help"], run="run_path", target=str(ROOT / command[0]))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    wall = time.perf_counter() - started
    loaded_torch = done.stdout.split()[-2]
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert loaded_torch == "False"
    assert wall < 3.0
