"""The package as a package: every module imports on its own, no import cycle, no module reaches into the repository,
and a non-editable install into a fresh virtual environment runs `mm-llama` outside the repository."""

from __future__ import annotations

import ast
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mm_llama"
# Top-level packages of optional extras: a module built on one (mm_llama.frontends.lmms_eval.model needs lmms_eval, the `eval`
# extra) may fail to import where the extra is not installed, and only with that ModuleNotFoundError.
OPTIONAL_EXTRAS = {"lmms_eval"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_on_its_own():
    """Each module is imported in a clean `mm_llama` state (every mm_llama module dropped from sys.modules first), so
    a module that only works when another was imported before it fails here."""
    script = textwrap.dedent(f"""
        import importlib, sys
        failures = []
        for name in {module_names()!r}:
            for loaded in [m for m in sys.modules if m == "mm_llama" or m.startswith("mm_llama.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as error:
                if (error.name or "").split(".")[0] not in {sorted(OPTIONAL_EXTRAS)!r}:
                    failures.append(f"{{name}}: {{type(error).__name__}}: {{error}}")
            except Exception as error:
                failures.append(f"{{name}}: {{type(error).__name__}}: {{error}}")
        print("\\n".join(failures) or "ALL_OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip().endswith("ALL_OK"), result.stdout[-3000:] + result.stderr[-3000:]


def imports_of(path: Path, module: str) -> set[str]:
    """The mm_llama modules that `module` imports anywhere: at module level and inside functions (a lazy import
    only hides a cycle from the interpreter, not from the reader)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith("mm_llama"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mm_llama"):
                # `from . import x` / `from .pkg import name`: name may be a submodule or an attribute.
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    imported.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                                 or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else target)
    return imported


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        # A module's package __init__ runs first anyway; importing the parent package is not an edge of a cycle.
        graph[module] = {target for target in imports_of(path, module)
                         if not module.startswith(target + ".") and target != module}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_library_never_reaches_into_the_repository():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "runpy" not in text and "REPO_ROOT" not in text, path


def see_this_environments_packages(python: Path) -> None:
    """Makes the virtual environment of `python` see the packages of the environment running the tests, after its
    own: a `.pth` file of plain paths in its site-packages (plain paths, so the `.pth` files found there, this
    checkout's editable install among them, are not run). `venv --system-site-packages` would not do: it shows the
    BASE interpreter's packages, which are these only where the tests run outside a virtual environment; after
    README's install (a venv) they are none of them."""
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (Path(own) / "_tested_environment.pth").write_text("".join(f"{path}\n" for path in ours if Path(path).is_dir()))


@pytest.mark.slow
def test_non_editable_install_runs_the_commands_outside_the_repository(tmp_path):
    """`pip install .` (not editable) into a fresh venv, then `mm-llama` from another folder: --help, and the demo at
    its tiny size for 2 steps (its recipes come from the installed package). The venv sees this environment's
    packages (the CPU torch wheel, transformers, ...; `see_this_environments_packages`), so only MM-LLaMA itself is
    installed, from a copy of the working tree: what is tested is that the installed package needs nothing from the
    repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    see_this_environments_packages(python)
    source = tmp_path / "src"  # the working tree without git data, build artefacts or demo outputs at its top

    def ignored(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {name for name in names if name in (".git", "build", "__pycache__", ".pytest_cache", "outputs")
                or name.endswith(".egg-info") or (top and name.startswith("demo"))}

    shutil.copytree(REPO, source, ignore=ignored)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", str(source)], check=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    location = subprocess.run([str(python), "-c", "import mm_llama; print(mm_llama.__file__)"], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert str(venv) in location and str(REPO) not in location  # the installed copy, not the checkout
    help_text = subprocess.run([str(venv / "bin" / "mm-llama"), "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=120, check=True).stdout
    assert "demo" in help_text
    demo = subprocess.run([str(venv / "bin" / "mm-llama"), "demo", "--size", "tiny", "--steps", "2", "--output",
                           "out", "--threads", "1", "--no_progress", "--device", "cpu"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert (elsewhere / "out" / "summary.json").is_file() and (elsewhere / "out" / "mm-llama-tiny").is_dir()


def test_no_source_file_is_git_ignored():
    """An ignore pattern meant for an output folder (`demo/`) once matched the package's own `mm_llama/demo/`: new
    modules there stayed out of commits while every local test passed. Every file of the package and the tests must
    be committable."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    sources = [str(path.relative_to(REPO)) for folder in ("mm_llama", "tests", "scripts", "recipes")
               for path in (REPO / folder).rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    result = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.stdout.split() == [], f"git-ignored source files: {result.stdout.split()}"
