"""Every example of the README runs, in order, on the shipped run (copied to ckpts/ as the README says)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import matplotlib
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES

from spectral_analyzer.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Tested elsewhere at their full cost: the demo (test_report) and training (test_examples).
ELSEWHERE = ("demo", "train-example")


def _blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M)
    return blocks[1:]  # the first block is the two commands for a fresh machine, which CI runs itself


def test_every_readme_example_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECTRAL_ANALYZER_STORE", raising=False)
    shutil.copytree(FIXTURES / "grokking" / "wd1", tmp_path / "ckpts")
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    namespace = {"model": torch.nn.Linear(3, 2), "step": 0, "loss": torch.tensor(1.0)}  # a training loop's names
    runner = CliRunner()
    ran = 0
    for lang, code in _blocks():
        if lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)
            ran += 1
            continue
        for line in code.splitlines():
            args = shlex.split(line, comments=True)
            if not args or args[1] in ELSEWHERE:
                continue
            assert args[0] == "spectral-analyze", line
            result = runner.invoke(main, [*args[1:], "--no-progress"] if args[1] in (
                "ingest", "spectra", "dynamics") else args[1:])
            assert result.exit_code == 0, f"{line}\n{result.output}"
            ran += 1
    assert ran >= 12  # the parsing found the examples
    assert (tmp_path / "report.html").is_file() and (tmp_path / "dyn.nc").is_file()


@pytest.mark.parametrize("command", ELSEWHERE)
def test_commands_left_to_other_tests_are_in_the_readme(command):
    assert any(f"spectral-analyze {command}" in code for _, code in _blocks())
