"""Every example of docs/guide.md runs, in order, in one folder where runs/add-wd1 is the shipped run."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from pathlib import Path

import click
import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES

import spectral_analyzer as sa
from spectral_analyzer.cli import main

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.md"

# Examples that do not run here, each found by a piece of its text, with the reason.
CALLBACKS = "tests/test_callbacks.py runs the callback in small Trainers"
S3 = ("an S3 bucket: against the tests' S3 server (moto) the guide's examples take ~45 s on 2 cores, and "
      "tests/test_object_storage.py runs them: ingest and spectra through the CLI with storage options, "
      "sa.ingest, open_run with a cluster client and a Recorder on S3")
HUB = ("the Hugging Face hub, which the sandbox cannot reach; tests/test_hub.py ingests Pythia-style revisions "
       "from a hub on loopback through the same huggingface_hub calls, with the CLI and sa.ingest")
TENSORBOARD = ("a training's own TensorBoard log folder, which the sandbox has none of; tests/test_tensorboard.py "
               "ingests event files written by torch's SummaryWriter, through the CLI and sa.ingest")
SKIPPED = {
    "spectral-analyze demo": "tests/test_report.py runs it at its full cost",
    "spectral-analyze train-example runs/add-wd1": "6000 training steps (~18 min); tests/test_examples.py trains "
                                                   "the same models for a few steps, and runs/add-wd1 is the "
                                                   "shipped run here, as the guide offers",
    "from transformers import Trainer": f"5000 steps of a transformers Trainer on the reader's data; {CALLBACKS}",
    "import lightning.pytorch as L": f"5000 steps of a Lightning Trainer on the reader's module; {CALLBACKS}",
    "ingest runs/add-wd1 -o s3://bucket/run.zarr": S3,
    "spectra s3://bucket/run.zarr": S3,  # twice: options from the environment, then given
    'sa.ingest("runs/add-wd1", "s3://bucket/run.zarr"': S3,
    "ingest s3://bucket/run-42/": ("an S3 bucket of checkpoints; tests/test_remote_sources.py ingests folders "
                                   "from S3 (moto) and memory:// with the CLI's storage and source options"),
    "ingest hf://EleutherAI/pythia-160m": HUB,  # three commands
    'sa.ingest("hf://EleutherAI/pythia-160m"': HUB,
    "--metrics runs/": TENSORBOARD,  # both lines of the block
    'metrics="lightning_logs/version_0"': TENSORBOARD,
    "ingest ~/.cache/huggingface/hub/models--EleutherAI--pythia-70m": (
        "pythia-70m's revisions in the reader's hub cache (downloads); tests/test_hub_cache.py ingests a cache laid "
        "out as huggingface_hub writes it, through the CLI and sa.ingest"),
}


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w+)\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def _skip_reason(code: str) -> str | None:
    return next((why for text, why in SKIPPED.items() if text in code), None)


def _lines(code: str) -> list[list[str]]:
    """Each command of a shell block as arguments, continuation lines (indented) joined to theirs."""
    joined: list[str] = []
    for line in code.splitlines():
        if line[:1].isspace() and joined:
            joined[-1] += " " + line.strip()
        else:
            joined.append(line)
    return [args for args in (shlex.split(line, comments=True) for line in joined) if args]


def _is_synopsis(args: list[str]) -> bool:
    """A usage line: optional parts in brackets, placeholders in capitals, or `...`."""
    return any(a.startswith("[") or a == "..." or re.fullmatch(r"[A-Z_]+", a) for a in args)


def _check_synopsis(args: list[str]) -> None:
    """Every option a usage line names is an option of its command."""
    command = main.commands[args[1]]
    known = {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    named = {m for a in args[2:] for m in re.findall(r"(?<![\w-])--?[a-z][\w-]*", a)}
    assert named, args
    assert named <= known, f"{' '.join(args)}: {sorted(named - known)} not options of {args[1]}"


def _training_loop() -> dict:
    """The names the guide's recording loop takes from the training code around it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def train_step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return {"model": model, "steps": 201, "train_step": train_step}


def _run_python(code: str, namespace: dict) -> None:
    """Each statement as a notebook cell of its own: its figures are closed after it."""
    for statement in ast.parse(code).body:
        exec(compile(ast.Module([statement], type_ignores=[]), str(GUIDE), "exec"), namespace)
        plt.close("all")


def _check_shown_reprs(code: str, namespace: dict) -> int:
    """A `name  # <Run ...>` line shows the repr of that name after its block."""
    shown = re.findall(r"^(\w+)\s+# (<Run [^>]*>)", code, flags=re.M)
    for name, text in shown:
        assert repr(namespace[name]) == text
    return len(shown)


def test_every_guide_example_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECTRAL_ANALYZER_STORE", raising=False)
    (tmp_path / "runs").mkdir()
    shutil.copytree(FIXTURES / "grokking" / "wd1", tmp_path / "runs" / "add-wd1")
    namespace = _training_loop()
    runner = CliRunner()
    ran = {"command": 0, "synopsis": 0, "python": 0, "repr": 0, "skipped": 0}
    for lang, code in _blocks():
        if lang == "python":
            if _skip_reason(code):
                ran["skipped"] += 1
                continue
            _run_python(code, namespace)
            ran["python"] += 1
            ran["repr"] += _check_shown_reprs(code, namespace)
            continue
        assert lang in ("sh", "bash"), lang
        for args in _lines(code):
            line = " ".join(args)
            if args[0] != "spectral-analyze":  # pip, export: the reader's shell
                continue
            if _skip_reason(line):
                ran["skipped"] += 1
            elif _is_synopsis(args):
                _check_synopsis(args)
                ran["synopsis"] += 1
            else:
                quiet = ["--no-progress"] if args[1] in ("ingest", "spectra", "dynamics") else []
                result = runner.invoke(main, [*args[1:], *quiet])
                assert result.exit_code == 0, f"{line}\n{result.output}"
                ran["command"] += 1
    # the parsing found the examples: the skipped S3 spectra line is there twice, the TensorBoard log folder
    # twice, the hub's ingest three times
    assert ran == {"command": 6, "synopsis": 12, "python": 10, "repr": 1, "skipped": len(SKIPPED) + 4}, ran
    assert (tmp_path / "add-wd1.html").is_file() and (tmp_path / "spectra.nc").is_file()
    recorded = sa.open_run("live.zarr")  # the recording loop's store
    assert list(recorded.checkpoint_steps) == [0, 100, 200]
    assert recorded.metrics["loss"].sizes["step"] == 201
    tensors = list(namespace["run"].tensors["tensor"].values)  # run.zarr, ingested with include=["*attn*"]
    assert "layers.0.attn.in_proj_weight" in tensors and all(".attn." in name for name in tensors)


@pytest.mark.parametrize("text", SKIPPED)
def test_skipped_examples_are_in_the_guide(text):
    assert sum(text in code for _, code in _blocks()) == 1, text
