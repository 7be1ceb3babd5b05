from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LAYOUTS = ["hf_trainer", "hf_sharded", "hf_bin", "plain_pt", "lightning"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of wall time; skipped unless pytest is given --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def load_state(files: list[Path]) -> dict[str, torch.Tensor]:
    """An independent loader: whole files, plain prefix handling."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
            continue
        obj = torch.load(f, map_location="cpu", weights_only=True)
        if "state_dict" in obj:
            obj = {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}
        state.update({k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    return {k: v for k, v in state.items() if v.is_floating_point()}


def flat_theta(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [state[k].reshape(-1) for k in sorted(state, key=natural)]


def expected_deltas(checkpoints: list[list[Path]]) -> np.ndarray:
    """float32(theta_i - theta_{i-1}) computed tensor by tensor from the sources."""
    thetas = [flat_theta(load_state(files)) for files in checkpoints]
    rows = []
    for prev, cur in zip(thetas, thetas[1:]):
        rows.append(torch.cat([(c.float() - p.float()) for c, p in zip(cur, prev)]).numpy())
    return np.stack(rows)


def layout_checkpoints(name: str) -> list[list[Path]]:
    root = FIXTURES / "layouts" / name
    if name in ("plain_pt", "lightning"):
        files = sorted((f for f in root.iterdir()), key=lambda f: int(re.findall(r"\d+", f.stem)[-1]))
        return [[f] for f in files]
    out = []
    for d in sorted(root.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1])):
        shards = sorted(d.glob("model-*.safetensors"))
        out.append(shards or [p for p in (d / "model.safetensors", d / "pytorch_model.bin") if p.exists()][:1])
    return out


def snapshot(path: Path) -> dict[str, str]:
    """Every file under *path*, by content hash."""
    if not path.exists():
        return {}
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def save_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """*state* saved at *path*: safetensors by its suffix, else a torch pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def write_run(folder: Path, n: int, sizes: dict[str, tuple[int, ...]], seed: int = 0, step0: int = 0,
              every: int = 10, scale: float = 1e-2) -> list[Path]:
    """A synthetic run of *n* safetensors checkpoints: a random walk."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: torch.randn(s, generator=gen) for k, s in sizes.items()}
    paths = []
    for i in range(n):
        if i:
            state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        path = folder / f"step_{step0 + every * i}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return paths


@pytest.fixture
def hf_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(FIXTURES / "layouts" / "hf_trainer", dst)
    return dst


@pytest.fixture(scope="session")
def s3():
    """``(storage_options, s3fs filesystem)`` of an S3 server on loopback (moto) with a bucket ``runs``."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": f"http://{host}:{port}",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket="runs")  # a bucket in us-east-1 takes no location constraint
    yield options, fs
    server.stop()


# A GPT-NeoX-shaped model (Pythia's architecture) small enough for many checkpoints per test.
TINY_NEOX = {
    "gpt_neox.embed_in.weight": (32, 8),
    "gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
    "gpt_neox.layers.0.attention.query_key_value.bias": (24,),
    "gpt_neox.layers.0.attention.dense.weight": (8, 8),
    "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (16, 8),
    "gpt_neox.final_layer_norm.weight": (8,),
    "embed_out.weight": (32, 8),
}


def trajectory(steps, shapes=TINY_NEOX, seed: int = 0, scale: float = 1e-2,
               dtype: torch.dtype = torch.float32) -> dict[int, dict[str, torch.Tensor]]:
    """States of a random walk at *steps*: each move of size ~ scale * sqrt(its interval)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    out, prev = {}, None
    for step in steps:
        if prev is not None:
            move = scale * (step - prev) ** 0.5
            state = {k: v + move * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        out[step] = {k: v.to(dtype) for k, v in state.items()}
        prev = step
    return out


def write_safetensors_run(folder: Path, states: dict[int, dict[str, torch.Tensor]]) -> Path:
    """The same states as one safetensors file per step: the reference every other layout is compared with."""
    folder.mkdir(parents=True, exist_ok=True)
    for step, state in states.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"step_{step}.safetensors"))
    return folder


def assert_same_run(run, reference) -> None:
    """Bit-identical deltas, base, steps and manifest."""
    assert list(run.checkpoint_steps) == list(reference.checkpoint_steps)
    assert list(run.tensors["tensor"].values) == list(reference.tensors["tensor"].values)
    assert list(run.tensors["dtype"].values) == list(reference.tensors["dtype"].values)
    assert np.array_equal(run.base.values, reference.base.values)
    assert np.array_equal(run.deltas.values, reference.deltas.values)


_memory_folders = __import__("itertools").count()


@pytest.fixture
def memory():
    """``(filesystem, folder)``: an empty folder of fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/ckpts-{next(_memory_folders)}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)
