"""The repository's layout: the method's six files on top, one support package beneath them that
never imports them, no import cycle anywhere, and a wheel that installs exactly these and works
from another folder."""

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, tiny_hf

METHOD = {"model", "probe", "robustness", "train", "evaluation", "swat_min"}
PACKAGE = "swatkit"


def local_modules():
    """{module name: path} of the method files and the package's modules."""
    found = {name: os.path.join(ROOT, name + ".py") for name in METHOD}
    folder = os.path.join(ROOT, PACKAGE)
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".py"):
            name = PACKAGE if entry == "__init__.py" else f"{PACKAGE}.{entry[:-3]}"
            found[name] = os.path.join(folder, entry)
    return found


def imports(name, path, known):
    """The local modules that module `name` imports, anywhere in its text (functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y
                base = PACKAGE + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_top_level_is_the_method_and_one_package():
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert top == METHOD
    packages = {d for d in os.listdir(ROOT) if os.path.exists(os.path.join(ROOT, d, "__init__.py"))}
    assert packages == {PACKAGE, "golden"}  # the support package, and the porting kit


def test_no_import_cycle_and_the_package_never_imports_the_method():
    modules = local_modules()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    for name, targets in graph.items():
        if name.startswith(PACKAGE):
            assert not targets & METHOD, (name, sorted(targets & METHOD))
    # a depth-first search for a cycle; the path is reported when one is found
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", " -> ".join(path + [name, target])
            if target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    # the check can fail: a cycle made by hand is found
    graph["swatkit.files"] = graph["swatkit.files"] | {"swatkit.checkpoint"}
    state.clear()
    with pytest.raises(AssertionError):
        for name in sorted(graph):
            if name not in state:
                visit(name, [])


@pytest.mark.skipif(sys.platform == "win32", reason="the console script's path is POSIX's")
def test_wheel_installs_the_method_and_runs_from_another_folder(tmp_path):
    """pip wheel, pip install --target (no editable path), then from an empty folder with only the
    target on the path: `swat-min demo` and the README's Python block on a local model folder."""
    pip = [sys.executable, "-m", "pip", "-q"]
    wheels = tmp_path / "wheels"
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info beside the sources
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "tests")
    shutil.copytree(ROOT, source, ignore=skip)
    # the venv's own setuptools when it has one (no download); else pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = pip + ["wheel", "--no-deps", *isolation, str(source), "-w", str(wheels)]
    built = subprocess.run(build, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("swat_min-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0].removesuffix(".py") for n in names if ".dist-info" not in n}
    assert top == METHOD | {PACKAGE, "golden"}
    assert f"{PACKAGE}/prompts/harmful.tsv" in names  # the built-in prompts travel as package data
    target = tmp_path / "target"
    installed = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                               capture_output=True, text=True)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    demo = [sys.executable, str(target / "bin" / "swat-min"), "demo", "--out", "demo_out"]
    demo += ["--toy-steps", "2", "--steps", "1", "--n", "2", "--n-task", "4", "--n-acc", "0"]
    demo += ["--strategies", "ift", "swat", "--k", "2", "--n-eval", "2", "--max-new-tokens", "2"]
    ran = subprocess.run(demo, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (elsewhere / "demo_out" / "results.json").exists()
    # the README's Python block, against a local model folder, from the same empty folder
    tiny_hf(str(tmp_path / "tiny"))
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tmp_path / "tiny")))
    script = elsewhere / "block.py"
    script.write_text(code)
    block = subprocess.run([sys.executable, str(script)], cwd=elsewhere, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert block.returncode == 0, block.stderr[-2000:]
    for module in ("model", "swatkit"):  # imported from the target, not from the repository
        where = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"],
                               cwd=elsewhere, env=env, capture_output=True, text=True)  # fmt: skip
        assert where.stdout.startswith(str(target)), where.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_commands_leave_a_clone_clean(tmp_path):
    """In a git clone holding this working tree's files: the build (what `pip install -e .`
    writes), `demo --out demo_out`, a scan and a probe cache without an output folder, and a test
    run leave `git status` empty: every output is under a folder .gitignore names."""
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):  # the working tree's files, edits included
        if name and os.path.isfile(os.path.join(ROOT, name)):
            shutil.copyfile(os.path.join(ROOT, name), clone / name)
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tree",
                    "--allow-empty"], cwd=clone, check=True)  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # __pycache__ is made, as on a user's machine
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    commands = [
        [sys.executable, "-m", "pip", "-q", "wheel", "--no-deps", *isolation, ".", "-w", "dist"],
        [sys.executable, "swat_min.py", "demo", "--out", "demo_out", "--toy-steps", "2",
         "--steps", "1", "--n", "2", "--n-task", "4", "--n-acc", "0", "--strategies", "ift",
         "--n-eval", "2", "--max-new-tokens", "2"],
        [sys.executable, "swat_min.py", "scan", "--model", "demo_out/toy-model", "--n", "2",
         "--modules", "q", "--k", "1"],
        [sys.executable, "swat_min.py", "probe", "--model", "demo_out/toy-model", "--cache",
         "swat-min-out/cache"],
        [sys.executable, "-m", "pytest", "-q", "tests/test_layout.py",
         "-k", "top_level"],
    ]  # fmt: skip
    for command in commands:
        ran = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        assert ran.returncode == 0, (command, ran.stdout[-1000:], ran.stderr[-2000:])
    assert (clone / "swat-min-out" / "scan.json").exists()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert status.stdout == ""
