"""The repository stands alone: no file points outside it (the design notes beside a clone are not
part of it), the README stays a front page, and the documents' links lead somewhere."""

import os
import re
from pathlib import Path

from tests.launch import ROOT

OUTSIDE = "/".join(("..", "shared"))  # spelled so that this file does not match itself
README_MAX_LINES = 250


NOT_THE_REPOSITORY = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", "build", "dist", "gpt_ckpt.egg-info"}
"""What a checkout holds that is not its files (git's own, the environment, a run's outputs)."""


def tracked_files() -> list[Path]:
    found = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if d not in NOT_THE_REPOSITORY]
        found += [Path(directory) / name for name in files]
    return found


def test_no_file_points_outside_the_repository():
    found = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (the TensorBoard screenshot)
        found += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE in line]
    assert found == []


def test_the_readme_is_a_front_page():
    lines = (Path(ROOT) / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_every_relative_link_of_the_documents_leads_to_a_file():
    broken = []
    for page in [Path(ROOT) / "README.md", *sorted((Path(ROOT) / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
