"""The README's quickstart runs as written, from a clean checkout: the bash block between its
``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` lines, run whole in a copy of the
repository's tracked (and not ignored) files, with this checkout's ``.venv`` in place of the
set-up line (CI's run of ``scripts/run_tests.sh`` makes that ``.venv`` from nothing)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch import ROOT

pytestmark = pytest.mark.slow

BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"
SETUP = "scripts/setup_env.sh"


def quickstart_script(readme: str) -> str:
    """The quickstart's bash, without its code fence."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md must hold one {BEGIN} ... {END} block")
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    match = re.fullmatch(r"```bash\n(.*)\n```", block, re.S)
    if match is None:
        raise ValueError("the quickstart block must be one ```bash code fence")
    return match.group(1)


def clean_checkout(root: Path, into: Path) -> None:
    """The files a fresh clone of this working tree has: tracked ones and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = root / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def test_the_quickstart_block_is_found():
    script = quickstart_script((Path(ROOT) / "README.md").read_text())
    assert script.splitlines()[0].startswith(SETUP)
    with pytest.raises(ValueError, match="one <!-- quickstart:begin -->"):
        quickstart_script("no block here")


@pytest.mark.skipif(not (Path(ROOT) / ".git").exists(), reason="needs the git checkout to copy")
def test_the_quickstart_runs_as_written(tmp_path):
    script = quickstart_script((Path(ROOT) / "README.md").read_text())
    lines = script.splitlines()
    # The set-up line, made here by the suite's own set-up: the copy uses this checkout's .venv.
    script = "\n".join([f"true  # {lines[0]}", *lines[1:]])
    checkout = tmp_path / "checkout"
    clean_checkout(Path(ROOT), checkout)
    (checkout / ".venv").symlink_to(Path(ROOT) / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GPT_FORCE_CPU="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    # Trained to 60, rolled back to 40, trained 41-60 again, exported, generated.
    assert out.count("iteration       60/      60") == 2, out[-6000:]
    assert "> loaded iteration 40 from runs/quickstart/ckpt/iter_0000040" in out, out[-6000:]
    assert (checkout / "runs/quickstart/ckpt/branches").is_dir()
    assert (checkout / "runs/quickstart/hf/config.json").is_file()
    # transformers loaded the export and generated from "def " (a minute's model: mostly punctuation)
    assert re.search(r"^def .{10,}$", done.stdout, re.M), done.stdout[-2000:]
