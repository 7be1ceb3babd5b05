"""Training runs to analyse: the paper's grokking setups, scaled to a laptop CPU.

* Modular arithmetic: ``c = op(a, b) mod p`` for every pair, a random half of
  them for training; a pre-norm transformer (``nn.MultiheadAttention``, so
  its packed ``in_proj_weight`` is W_Q, W_K, W_V) reads ``[a, b, =]`` and
  predicts c; AdamW with weight decay 1.0 groks, without it does not.
* Dyck-1 depth: for random sequences of ``(`` and ``)``, predict the nesting
  depth after every token (a causal transformer, one label per position).

Checkpoints are written in the HF Trainer layout, ``checkpoint-<step>/model.safetensors``
with a cumulative ``trainer_state.json`` (``log_history``: loss, accuracies,
learning rate), so ``spectral-analyze ingest`` reads them as it reads real runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .progress import progress_bar

__all__ = ["OPERATIONS", "DyckConfig", "ModularConfig", "train_dyck", "train_modular"]

OPERATIONS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "sq": lambda a, b, p: (a * a + b * b) % p,
}


@dataclass
class ModularConfig:
    p: int = 97
    operation: str = "add"
    d_model: int = 128
    heads: int = 4
    d_ff: int = 256
    layers: int = 2
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1.0
    batch: int = 512
    train_fraction: float = 0.5
    steps: int = 6000
    every: int = 100
    seed: int = 0


@dataclass
class DyckConfig:
    length: int = 24
    samples: int = 4000
    d_model: int = 64
    heads: int = 4
    d_ff: int = 128
    layers: int = 2
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1.0
    batch: int = 256
    train_fraction: float = 0.5
    steps: int = 3000
    every: int = 100
    seed: int = 0


class Block(torch.nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, heads: int, d_ff: int):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.attn = torch.nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, d_ff), torch.nn.ReLU(), torch.nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.ln1(x)
        x = x + self.attn(z, z, z, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(torch.nn.Module):
    def __init__(self, vocab: int, n_out: int, length: int, d_model: int, heads: int, d_ff: int, layers: int,
                 causal: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.layers = torch.nn.ModuleList([Block(d_model, heads, d_ff) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(d_model)
        self.unembed = torch.nn.Linear(d_model, n_out, bias=False)
        mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1) if causal else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, self.mask)
        return self.unembed(self.norm(x))


def _save(out: Path, step: int, model: torch.nn.Module, history: list[dict], config) -> None:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"), metadata={"step": str(step)})
    (d / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "log_history": history, "config": asdict(config)}, indent=0)
    )
    # as transformers' save_pretrained writes it: the head count the attention-circuit spectra read at ingest
    (d / "config.json").write_text(json.dumps(
        {"num_attention_heads": config.heads, "hidden_size": config.d_model, "num_hidden_layers": config.layers}
    ))


def _prepare(output: str | os.PathLike) -> Path:
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        from .errors import StoreExistsError

        raise StoreExistsError(f"{out}: exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _evaluate(model, x, y, index):
    with torch.no_grad():
        logits = model(x[index])
        target = y[index]
        if logits.dim() == 3:  # per position
            logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits, target).item()
        acc = (logits.argmax(-1) == target).float().mean().item()
    return round(loss, 6), round(acc, 6)


SMALL_MODEL = 10_000_000  # parameters: below this, one torch thread trains faster than many on a shared CPU


def _threads(model, threads: int | None) -> int:
    """*threads*, or 1 for a small model (its kernels are too small to share; extra threads only contend)."""
    if threads is not None:
        return threads
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL else torch.get_num_threads()


def _train(out: Path, model, x, y, train, test, config, last_position: bool, progress: bool,
           threads: int | None) -> Path:
    previous = torch.get_num_threads()
    torch.set_num_threads(_threads(model, threads))
    try:
        return _train_loop(out, model, x, y, train, test, config, last_position, progress)
    finally:
        torch.set_num_threads(previous)


def _train_loop(out: Path, model, x, y, train, test, config, last_position: bool, progress: bool) -> Path:
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict] = []
    bar = None
    if progress:
        bar = progress_bar(total=config.steps, desc="train", unit="step", leave=False)
    for step in range(config.steps + 1):
        if step % config.every == 0:
            model.eval()
            train_loss, train_acc = _evaluate(_Last(model) if last_position else model, x, y, train)
            test_loss, test_acc = _evaluate(_Last(model) if last_position else model, x, y, test)
            history.append({"step": step, "loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                            "test_acc": test_acc, "learning_rate": config.lr})
            _save(out, step, model, history, config)
            model.train()
        if step == config.steps:
            break
        idx = train[torch.randint(len(train), (config.batch,), generator=gen)]
        logits = model(x[idx])
        target = y[idx]
        if last_position:
            logits = logits[:, -1]
        else:
            logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


class _Last(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens)[:, -1]


def train_modular(output: str | os.PathLike, config: ModularConfig | None = None, progress: bool = False,
                  threads: int | None = None) -> Path:
    """Train a transformer on ``op(a, b) mod p``; checkpoints every ``config.every`` steps.

    *threads*: torch threads while training (default 1: the model is small).

    Examples
    --------
    >>> train_modular("runs/add-wd1", ModularConfig(weight_decay=1.0))   # doctest: +SKIP
    """
    config = config or ModularConfig()
    if config.operation not in OPERATIONS:
        raise ValueError(f"unknown operation {config.operation!r}; choose one of {', '.join(OPERATIONS)}")
    out = _prepare(output)
    torch.manual_seed(config.seed)
    p = config.p
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = OPERATIONS[config.operation](a, b, p)
    perm = torch.randperm(p * p)
    n_train = int(config.train_fraction * p * p)
    model = Transformer(p + 1, p, 3, config.d_model, config.heads, config.d_ff, config.layers)
    return _train(out, model, x, y, perm[:n_train], perm[n_train:], config, True, progress, threads)


def dyck_depths(tokens: torch.Tensor) -> torch.Tensor:
    """Nesting depth after each token (0 = ``(``, 1 = ``)``), clipped at 0."""
    steps = torch.where(tokens == 0, 1, -1)
    return torch.cumsum(steps, dim=1).clamp(min=0)


def train_dyck(output: str | os.PathLike, config: DyckConfig | None = None, progress: bool = False,
               threads: int | None = None) -> Path:
    """Train a causal transformer to predict the Dyck-1 depth after every token (*threads* as for train_modular)."""
    config = config or DyckConfig()
    out = _prepare(output)
    torch.manual_seed(config.seed)
    n, length = config.samples, config.length
    # random walks that never go below zero: a prefix of a Dyck word
    tokens = torch.zeros((n, length), dtype=torch.long)
    depth = torch.zeros(n, dtype=torch.long)
    for t in range(length):
        close = (torch.rand(n) < 0.5) & (depth > 0)
        tokens[:, t] = close.long()
        depth = depth + torch.where(close, -1, 1)
    y = dyck_depths(tokens)
    perm = torch.randperm(n)
    n_train = int(config.train_fraction * n)
    model = Transformer(2, length + 1, length, config.d_model, config.heads, config.d_ff, config.layers,
                        causal=True)
    return _train(out, model, tokens, y, perm[:n_train], perm[n_train:], config, False, progress, threads)
