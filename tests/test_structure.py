"""Architecture rules that keep the code easy to see: checked, not just written down.

The package has floors, and imports only go down (or stay on the same floor):

    commands   train, evaluate, predict, plot, bench, launch   (never import one another)
    service    dpbp/service/    config, data, files, checkpoints, run directory, guard, start-up,
                                hostfiles, processes
    parallel   dpbp/parallel/   MPI verbs, sharding, threads, exact sums, the step, evaluation
    nn         dpbp/nn/         the learning math: numpy only, no MPI, files or config
    base       dpbp/errors.py, dpbp/entry.py, dpbp/__init__.py
"""

import ast
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "dpbp"
FLOORS = {"base": 0, "nn": 1, "parallel": 2, "service": 3, "commands": 4}
MAX_FUNCTION_LINES = 60


def floor_of(module):
    """The floor of a dpbp module given by its dotted name."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("nn", "parallel", "service"):
        return parts[1]
    if parts[1:] in ([], ["errors"], ["entry"]):
        return "base"
    return "commands"


def modules():
    """{dotted name: path} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:   # from dpbp.service import checkpoint: a module too
                yield f"{node.module}.{alias.name}"


def dpbp_imports(path):
    known = modules()
    return {m for m in imported_modules(path) if m in known and m != "dpbp"}


def test_only_comm_imports_mpi4py():
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if any(m.split(".")[0] == "mpi4py" for m in imported_modules(p)))
    assert importers == ["parallel/comm.py"]


def test_imports_only_go_down():
    upward = []
    for name, path in modules().items():
        for target in dpbp_imports(path):
            if FLOORS[floor_of(target)] > FLOORS[floor_of(name)]:
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_no_command_imports_another():
    commands = [name for name in modules() if floor_of(name) == "commands"]
    assert sorted(commands) == ["dpbp.bench", "dpbp.evaluate", "dpbp.launch", "dpbp.plot",
                                "dpbp.predict", "dpbp.train"]
    crossing = [f"{name} imports {target}" for name in commands
                for target in dpbp_imports(modules()[name]) if target in commands]
    assert crossing == []


def test_the_learning_math_knows_nothing_of_mpi_files_or_config():
    allowed = {"math", "numpy"}
    for name, path in modules().items():
        if floor_of(name) == "nn":
            outside = {m for m in imported_modules(path) if not m.startswith("dpbp.nn")
                       and m.split(".")[0] not in allowed and m != "dpbp"}
            assert outside == set(), f"{name} imports {sorted(outside)}"


def test_the_product_holds_no_test_machinery():
    """Faults come from tests/faults.py, which wraps dpbp from outside."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "DPBP_FAULT" not in text and "faults" not in set(imported_modules(path)), path


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert long == []


def test_importing_the_trainer_starts_no_mpi_and_no_torch():
    code = ("import sys, dpbp.train; print(sorted(m for m in "
            "('mpi4py.MPI', 'torch', 'threadpoolctl') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_the_readme_lists_every_module_with_its_true_line_count():
    """The README's code layout: one line per module, `name.py  COUNT  what it does`,
    indented by its folder; the counts are the files' own, so the front door stays true."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Code layout", 1)[1].split("```")[1]
    listed, folders = {}, []
    for line in block.splitlines()[1:]:
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        name = line.split()[0]
        if name.endswith("/"):
            folders[depth:] = [name.rstrip("/")]
        elif name.endswith(".py"):
            listed["/".join(folders[:depth] + [name])] = int(line.split()[1])
    modules_ = {str(p.relative_to(PACKAGE)): sum(1 for _ in open(p))
                for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert listed == modules_
    assert len(text.encode()) <= 15_000   # the front door; the rest lives in docs/
