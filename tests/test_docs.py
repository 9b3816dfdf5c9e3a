"""Every code block of the README and of docs/ runs as written.

A page's ```python blocks run in order as one script (later blocks may use what earlier ones
defined), in a fresh folder that looks like the repository root after ``make demo``:
``examples/`` (the bundled photos) and ``.cache/flux-tokenizers/`` are there, anything a
block writes lands in that folder. Lines of ```bash blocks that call one of our commands
(``bucket-report``, ``bucket-cache``, ...) run the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = ("bucket-report", "bucket-cache", "bucket-caption")


def blocks(page: Path, language: str) -> list[str]:
    """The ```language blocks of ``page``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def command_lines(page: Path) -> list[str]:
    """The lines of ```bash blocks that run one of our commands."""
    return [line.split(" #")[0].strip() for block in blocks(page, "bash")
            for line in block.splitlines() if line.strip().startswith(COMMANDS)]


@pytest.fixture()
def user_dir(tmp_path: Path, flux_tokenizer_dir: Path, tokenizer_dirs: dict) -> Path:
    (tmp_path / "examples").symlink_to(REPO / "examples")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "flux-tokenizers").symlink_to(flux_tokenizer_dir)
    for folder in tokenizer_dirs.values():  # sd15-, sdxl-, sd3-tokenizers next to it
        if not (tmp_path / ".cache" / folder.name).exists():
            (tmp_path / ".cache" / folder.name).symlink_to(folder)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
@pytest.mark.slow
def test_page_runs(page: Path, user_dir: Path) -> None:
    script = "\n\n".join(blocks(page, "python"))
    commands = command_lines(page)
    if not script and not commands:
        pytest.skip(f"{page.name} has no code to run")
    if script:
        (user_dir / "page.py").write_text(script)
        proc = subprocess.run([sys.executable, "page.py"], cwd=user_dir, env=_env(),
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"{page.name}:\n{proc.stdout}\n{proc.stderr}"
    for line in commands:
        proc = subprocess.run(shlex.split(line), cwd=user_dir, env=_env(),
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"{page.name}: $ {line}\n{proc.stdout}\n{proc.stderr}"


def test_every_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
