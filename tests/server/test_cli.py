"""The `specserve` command on a base install: training-only packages are imported only by the
command that needs them, and that command names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What only the `train`, `dev` or `bench` extras bring: blocked as if they were not installed.
EXTRAS_ONLY = ("easy_vqa", "matplotlib", "scipy", "pytest", "openai", "hypothesis")


def cli(*argv: str) -> subprocess.CompletedProcess:
    """Run `specserve ARGV` in a fresh interpreter where the extras' modules cannot be imported."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in EXTRAS_ONLY)
    code = f"import sys; {blocked}; from specserve.server.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["generate", "--help"],
                                  ["models", "--help"], ["train-draft", "--help"]])
def test_commands_work_without_the_extras(argv):
    proc = cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "usage: specserve" in proc.stdout


def test_train_draft_without_its_extra_names_it_in_one_line(tmp_path):
    proc = cli("train-draft", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "specserve: error: train-draft needs the 'train' extra: pip install 'specserve[train]' "
        "(from a checkout: pip install -e '.[train]')"
    ]
    assert not (tmp_path / "run").exists()
