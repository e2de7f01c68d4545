"""The repository's shape: commands apart from library code, every command answers --help from any folder,
no import path edited by hand, no import circle, no command importing another, and pyproject.toml naming
every module (what `pip install -e .` makes importable)."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT
from helpers import SUBPROCESS_ENV

# The one place that sets sys.path: a command forked from the launcher's server gets the sys.path[0] that
# `python script` would give it (the script's folder), which is the interpreter's rule, not an import hack.
SYS_PATH_ALLOWED = {("pipelines/launcher.py", "_run_script"), ("tests/conftest.py", None)}


def python_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "build" not in p.parts)


def is_command(path: Path) -> bool:
    """A file with a main guard at its top level: a command, run as `python path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def commands() -> list[Path]:
    return [p for p in python_files() if p.parent.name in ("scripts", "bench") or p.parent == ROOT if is_command(p)]


def test_scripts_holds_commands_only():
    not_commands = [p.name for p in (ROOT / "scripts").glob("*.py") if not is_command(p)]
    assert not not_commands, f"library modules in scripts/ (move them to a module or to pipelines/): {not_commands}"


def test_every_command_answers_help_from_any_folder(tmp_path):
    """Run from a folder outside the repository, so that nothing leans on the working directory."""
    procs = {p: subprocess.Popen([sys.executable, str(p), "--help"], cwd=tmp_path, env=SUBPROCESS_ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in commands()}
    assert len(procs) >= 20
    failed = {}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage:" not in out or "Traceback" in err:
            failed[str(path.relative_to(ROOT))] = (proc.returncode, err[-800:])
    assert not failed, failed


def _sys_path_edits(tree: ast.AST) -> list[tuple[int, str | None]]:
    """(line, enclosing function) of every assignment to sys.path or its items and every mutating call on it."""
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            base = target.value if isinstance(target, ast.Subscript) else target
            if ast.unparse(base) == "sys.path":
                found.append((node.lineno, function))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                ast.unparse(node.func.value) == "sys.path" and \
                node.func.attr in ("insert", "append", "extend", "remove", "pop", "clear"):
            found.append((node.lineno, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_no_module_edits_sys_path():
    edits = []
    for path in python_files():
        rel = str(path.relative_to(ROOT))
        for line, function in _sys_path_edits(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, function) not in SYS_PATH_ALLOWED:
                edits.append(f"{rel}:{line}")
    assert not edits, f"sys.path edited by hand (install the repository instead: pip install -e .): {edits}"


def test_the_sys_path_check_sees_every_form_of_edit():
    code = ("import sys\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\nsys.path = ['z']\nsys.path += ['w']\n"
            "def f():\n    sys.path.append('v')\nprint(sys.path[0])\n")
    assert _sys_path_edits(ast.parse(code)) == [(2, None), (3, None), (4, None), (5, None), (7, "f")]


def module_name(path: Path) -> str:
    """The name a file is imported by: dotted inside a package, its stem elsewhere (the commands of scripts/ and
    bench/ are found by their stem when their folder is the script's)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "pipelines":
        return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
    return path.stem


def import_graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    """Module -> the repository's modules it imports (anywhere in it, function bodies included), outside tests/."""
    files = {module_name(p): p for p in python_files() if p.relative_to(ROOT).parts[0] != "tests"}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from pipelines.x import module`
        graph[name] = {d for d in deps if d in files and d != name}
    return graph, files


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_circle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_command_imports_another_command():
    graph, files = import_graph()
    names = {module_name(p) for p in commands()}
    found = [f"{files[a].relative_to(ROOT)} imports {b}" for a in sorted(names) for b in sorted(graph[a]) if b in names]
    assert not found, found


def test_pyproject_names_every_module_and_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(config["py-modules"]) == sorted(p.stem for p in ROOT.glob("*.py"))
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pipelines").rglob("__init__.py"))
    assert sorted(config["packages"]) == packages
    assert (ROOT / "requirements.txt").read_text().splitlines()[-1] == "-e ."


def test_the_readmes_layout_names_every_module_and_folder():
    import re

    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    names = set(re.findall(r"[\w.]+", block))
    for stem, choices in re.findall(r"(\w+)_\{([\w,]+)\}", block):  # run_{mlm,clm}.py
        names.update(f"{stem}_{c}.py" for c in choices.split(","))
    missing = [p.name for p in ROOT.glob("*.py") if p.name not in names]
    missing += [d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in names
                and (d / "__init__.py").exists() | any(d.glob("*.py"))]
    assert not missing, f"README's Layout misses {missing}"
