"""The built wheel carries the whole library: installed (not editable) into a folder of its
own, every module of the three packages imports from there, outside the repository, and
every console script answers --help."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGES = ("bucketing", "samplers", "transforms")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _modules(root: Path) -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_repo(repo_root: Path, tmp_path: Path):
    # build from a copy, so the checkout gets no build/ or egg-info of its own
    source = tmp_path / "source"
    for name in (*PACKAGES, "pyproject.toml", "README.md"):
        copy = shutil.copytree if (repo_root / name).is_dir() else shutil.copy
        copy(repo_root / name, source / name,
             **({"ignore": shutil.ignore_patterns("__pycache__")}
                if (repo_root / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("aspect_bucketing-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_repo = {p.relative_to(repo_root).as_posix() for package in PACKAGES
               for p in (repo_root / package).rglob("*.py")}
    assert in_repo <= in_wheel, f"missing from the wheel: {sorted(in_repo - in_wheel)}"

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
          str(wheel)], cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    modules = _modules(site)
    assert set(modules) >= set(_modules(repo_root))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "import bucketing, samplers, transforms\n"
            "print('\\n'.join(m.__file__ for m in (bucketing, samplers, transforms)))\n")
    for path in _run([sys.executable, "-c", code], cwd=outside, env=env).split():
        assert Path(path).is_relative_to(site), path

    (info,) = site.glob("aspect_bucketing-*.dist-info")
    entry_points = configparser.ConfigParser()
    entry_points.read(info / "entry_points.txt")
    scripts = dict(entry_points["console_scripts"])
    assert set(scripts) == {"bucket-report", "bucket-cache", "bucket-caption"}
    for script, target in scripts.items():
        module, _, function = target.partition(":")
        usage = _run([sys.executable, "-c", f"import sys; from {module} import {function}; "
                      f"sys.exit({function}(['--help']))"], cwd=outside, env=env)
        assert usage.startswith(f"usage: {script}"), usage[:200]
