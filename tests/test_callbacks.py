from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import spectral_analyzer as sa


def _points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(3, (n,), generator=g)


def _network() -> torch.nn.Module:
    # BatchNorm: its running statistics are float buffers that change in every forward pass.
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def _assert_same_run(live: sa.Run, saved: sa.Run, window: int = 3) -> None:
    assert list(live.checkpoint_steps) == list(saved.checkpoint_steps)
    assert live.tensors.equals(saved.tensors)
    assert np.array_equal(live.base.values.view(np.uint32), saved.base.values.view(np.uint32))
    assert np.array_equal(live.deltas.values.view(np.uint32), saved.deltas.values.view(np.uint32))
    # the Trainer's last save at max_steps makes a short last interval: the mixed-interval warning is not asked about
    a, b = (r.spectra(window=window, interval_factor=None) for r in (live, saved))
    np.testing.assert_array_equal(a["sigma"].values, b["sigma"].values)


# -- transformers ---------------------------------------------------------------


class _Classifier(torch.nn.Module):
    """A model as the Trainer expects one: keyword inputs in, a dict with ``loss`` out."""

    def __init__(self):
        super().__init__()
        self.body = _network()

    def forward(self, x, labels):
        logits = self.body(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _hf_args(out, **options):
    from transformers import TrainingArguments

    defaults = {
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "save_only_model": True,
        "use_cpu": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "remove_unused_columns": False,
    }
    return TrainingArguments(output_dir=str(out), **{**defaults, **options})


def test_hf_callback_matches_the_trainers_checkpoints(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    x, y = _points(64, seed=0)
    train = [{"x": x[i], "labels": y[i]} for i in range(64)]
    x, y = _points(16, seed=1)
    held_out = [{"x": x[i], "labels": y[i]} for i in range(16)]
    args = _hf_args(
        tmp_path / "out",
        max_steps=22,
        save_steps=5,
        gradient_accumulation_steps=2,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=10,
    )
    callback = sa.HFRecorderCallback(tmp_path / "live.zarr", every=5, chunk_size=100)
    trainer = transformers.Trainer(
        model=_Classifier(), args=args, train_dataset=train, eval_dataset=held_out, callbacks=[callback]
    )
    trainer.save_model(str(tmp_path / "out" / "checkpoint-0"))  # the Trainer itself never saves step 0
    trainer.train()

    live = sa.open_run(tmp_path / "live.zarr")
    saved = sa.ingest(tmp_path / "out", tmp_path / "saved.zarr", chunk_size=100)
    assert list(live.checkpoint_steps) == [0, 5, 10, 15, 20, 22]  # and the last step, as the Trainer saves
    _assert_same_run(live, saved)
    # Everything logged, at its step: the newest trainer_state.json has it all but the final summary.
    steps = saved.metrics["step"].values
    assert list(steps) == [4, 8, 10, 12, 16, 20, 22]
    for name in ("loss", "learning_rate", "grad_norm", "epoch", "eval_loss"):
        np.testing.assert_array_equal(live.metrics[name].sel(step=steps).values, saved.metrics[name].values)
    assert np.isfinite(live.metrics["train_loss"].sel(step=22).item())


def test_hf_callback_skips_tied_weights_as_save_pretrained_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)  # lm_head.weight is transformer.wte.weight
    ids = torch.randint(32, (32, 8), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": row, "labels": row} for row in ids]
    callback = sa.HFRecorderCallback(tmp_path / "live.zarr", every=3, initial=False, chunk_size=500)
    trainer = transformers.Trainer(
        model=model, args=_hf_args(tmp_path / "out", max_steps=12, save_steps=3), train_dataset=train,
        callbacks=[callback],
    )
    trainer.train()

    live = sa.open_run(tmp_path / "live.zarr")
    saved = sa.ingest(tmp_path / "out", tmp_path / "saved.zarr", chunk_size=500)
    assert list(live.checkpoint_steps) == [3, 6, 9, 12]
    assert "lm_head.weight" not in live.tensors["tensor"]
    _assert_same_run(live, saved, window=2)


def test_hf_callback_records_on_the_main_process_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    callback = sa.HFRecorderCallback(tmp_path / "r.zarr", every=1)
    state = transformers.TrainerState(is_world_process_zero=False, max_steps=2)
    control = transformers.TrainerControl()
    callback.on_train_begin(None, state, control, model=torch.nn.Linear(2, 2))
    for step in (1, 2):
        state.global_step = step
        callback.on_step_end(None, state, control)
        callback.on_log(None, state, control, logs={"loss": 1.0})
    callback.on_train_end(None, state, control)
    assert callback.recorder is None
    assert not (tmp_path / "r.zarr").exists()


# -- lightning ------------------------------------------------------------------


def _lightning():
    L = pytest.importorskip("lightning.pytorch")

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _network()  # saved as model.* in a .ckpt

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.model(x), y))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class SaveFirstAndLast(L.Callback):
        """The checkpoints ModelCheckpoint(every_n_train_steps) does not write: step 0 and the last step."""

        def __init__(self, folder):
            self.folder = folder

        def on_train_start(self, trainer, pl_module):
            trainer.save_checkpoint(self.folder / f"first-step={trainer.global_step}.ckpt")

        def on_train_end(self, trainer, pl_module):
            trainer.save_checkpoint(self.folder / f"last-step={trainer.global_step}.ckpt")

    return L, Classifier, SaveFirstAndLast


def test_lightning_callback_matches_the_saved_checkpoints(tmp_path):
    L, Classifier, SaveFirstAndLast = _lightning()
    torch.manual_seed(0)
    ckpts = tmp_path / "ckpts"
    callbacks = [
        sa.LightningRecorderCallback(tmp_path / "live.zarr", every=5, chunk_size=100),
        L.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=5, save_top_k=-1),
        SaveFirstAndLast(ckpts),
    ]
    trainer = L.Trainer(
        max_steps=22,
        accumulate_grad_batches=2,  # on_train_batch_end runs twice a step
        log_every_n_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_points(64, seed=0)), batch_size=8)
    held_out = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_points(16, seed=1)), batch_size=8)
    trainer.fit(Classifier(), train, held_out)

    live = sa.open_run(tmp_path / "live.zarr")
    saved = sa.ingest(ckpts, tmp_path / "saved.zarr", chunk_size=100)
    assert list(live.checkpoint_steps) == [0, 5, 10, 15, 20, 22]
    assert {"0.weight", "1.running_mean"} <= set(live.tensors["tensor"].values)  # model. removed, as ingest does
    _assert_same_run(live, saved)
    metrics = live.metrics
    assert list(metrics["step"].values) == list(range(2, 23, 2))  # the sanity check's validation is left out
    assert np.isfinite(metrics["train_loss"].values).all()
    assert np.isnan(metrics["val_loss"].sel(step=2).item()) and np.isfinite(metrics["val_loss"].sel(step=4).item())


def test_lightning_callback_records_on_global_zero_only(tmp_path):
    pytest.importorskip("lightning.pytorch")
    callback = sa.LightningRecorderCallback(tmp_path / "r.zarr", every=1)
    trainer = SimpleNamespace(is_global_zero=False, global_step=0, log_every_n_steps=1, sanity_checking=False)
    module = torch.nn.Linear(2, 2)
    callback.on_train_start(trainer, module)
    for step in (1, 2):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
        callback.on_validation_end(trainer, module)
    callback.on_train_end(trainer, module)
    assert callback.recorder is None
    assert not (tmp_path / "r.zarr").exists()


# -- optional imports -------------------------------------------------------------


def test_importing_the_package_imports_no_training_library():
    code = "import sys, spectral_analyzer; print(sorted({'transformers', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "modules", "module"),
    [
        ("HFRecorderCallback", ["transformers"], "spectral_analyzer.ingest.hf_callback"),
        ("LightningRecorderCallback", ["lightning", "lightning.pytorch"], "spectral_analyzer.ingest.lightning_callback"),
    ],
)
def test_a_missing_training_library_is_named(monkeypatch, name, modules, module):
    for missing in modules:
        monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=f"{name} needs {modules[0]}"):
        getattr(sa, name)


def test_other_names_are_still_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        _ = sa.NoSuchThing


def test_hf_callback_resumed_from_an_older_checkpoint_redoes_the_later_rows(tmp_path):
    """HF Trainer resumed from checkpoint-10 after recording up to 20: rows after 10 are dropped and redone."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = _points(64, seed=0)
    train = [{"x": x[i], "labels": y[i]} for i in range(64)]

    def trainer(steps, callback):
        torch.manual_seed(0)
        args = _hf_args(tmp_path / "out", max_steps=steps, save_steps=10, logging_steps=5, seed=0,
                        save_only_model=False)  # the optimizer and scheduler too, to resume from
        return transformers.Trainer(model=_Classifier(), args=args, train_dataset=train, callbacks=[callback])

    trainer(20, sa.HFRecorderCallback(tmp_path / "once.zarr", every=5, chunk_size=100)).train()
    trainer(20, sa.HFRecorderCallback(tmp_path / "live.zarr", every=5, chunk_size=100)).train()
    with pytest.warns(sa.RecordingWarning, match=r"resumed at step 10: dropping the 2 rows .*steps 15\.\.20"):
        trainer(20, sa.HFRecorderCallback(tmp_path / "live.zarr", every=5, chunk_size=100)).train(
            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10")
        )
    live, once = sa.open_run(tmp_path / "live.zarr"), sa.open_run(tmp_path / "once.zarr")
    assert list(live.checkpoint_steps) == [0, 5, 10, 15, 20]
    _assert_same_run(live, once)  # the resumed training replays the same steps, bit for bit
    assert list(live.metrics["step"].values) == list(once.metrics["step"].values)  # none lost, none doubled


def test_callbacks_refuse_sharded_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    hf = sa.HFRecorderCallback(tmp_path / "a.zarr", every=1)
    state = transformers.TrainerState(is_world_process_zero=True, max_steps=2)
    with pytest.raises(ValueError, match="sharded models"):
        hf.on_train_begin(SimpleNamespace(fsdp="full_shard"), state, None, model=torch.nn.Linear(2, 2))

    class FSDPStrategy:
        pass

    light = sa.LightningRecorderCallback(tmp_path / "b.zarr", every=1)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"sharded models \(FSDPStrategy\)"):
        light.on_train_start(trainer, torch.nn.Linear(2, 2))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_hf_callback_resumed_after_a_crash_keeps_what_the_checkpoint_logged(tmp_path):
    """A crash after checkpoint-10 and before the next record: the logs of step 10 (written after its row,
    pending when training died) come back from the checkpoint's log history when training resumes there."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = _points(64, seed=0)
    train = [{"x": x[i], "labels": y[i]} for i in range(64)]

    class Crash(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 12:
                raise RuntimeError("killed")

    def trainer(callbacks):
        torch.manual_seed(0)
        args = _hf_args(tmp_path / "out", max_steps=20, save_steps=10, logging_steps=5, seed=0, save_only_model=False)
        return transformers.Trainer(model=_Classifier(), args=args, train_dataset=train, callbacks=callbacks)

    trainer([sa.HFRecorderCallback(tmp_path / "once.zarr", every=5, chunk_size=100)]).train()
    with pytest.raises(RuntimeError, match="killed"):
        trainer([sa.HFRecorderCallback(tmp_path / "live.zarr", every=5, chunk_size=100), Crash()]).train()
    assert 10 not in sa.open_run(tmp_path / "live.zarr").metrics["step"].values  # pending when it died
    trainer([sa.HFRecorderCallback(tmp_path / "live.zarr", every=5, chunk_size=100)]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    live, once = sa.open_run(tmp_path / "live.zarr"), sa.open_run(tmp_path / "once.zarr")
    _assert_same_run(live, once)
    assert list(live.metrics["step"].values) == list(once.metrics["step"].values)
    np.testing.assert_allclose(live.metrics["loss"].values, once.metrics["loss"].values, rtol=1e-6, equal_nan=True)


def test_metrics_logged_after_training_reach_the_store(tmp_path):
    """trainer.evaluate() after train() (HF) and trainer.validate() / test() after fit() (Lightning) log after
    the train end that wrote the logs: their eval_loss / val_loss never reached the store."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x, y = _points(64, seed=0)
    train = [{"x": x[i], "labels": y[i]} for i in range(64)]
    x, y = _points(16, seed=1)
    held = [{"x": x[i], "labels": y[i]} for i in range(16)]
    args = _hf_args(tmp_path / "out", max_steps=10, save_steps=5, logging_steps=5, eval_strategy="no")
    callback = sa.HFRecorderCallback(tmp_path / "hf.zarr", every=5, chunk_size=100)
    trainer = transformers.Trainer(model=_Classifier(), args=args, train_dataset=train, eval_dataset=held,
                                   callbacks=[callback])
    trainer.train()
    evaluated = trainer.evaluate()
    assert sa.open_run(tmp_path / "hf.zarr").metrics["eval_loss"].sel(step=10).item() == evaluated["eval_loss"]

    L, Classifier, _ = _lightning()
    trainer = L.Trainer(max_steps=10, log_every_n_steps=2, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0,
                        callbacks=[sa.LightningRecorderCallback(tmp_path / "l.zarr", every=5, chunk_size=100)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_points(64, seed=0)), batch_size=8)
    held = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_points(16, seed=1)), batch_size=8)
    module = Classifier()
    trainer.fit(module, loader)
    assert "val_loss" not in sa.open_run(tmp_path / "l.zarr").metrics
    (validated,) = trainer.validate(module, held, verbose=False)
    assert sa.open_run(tmp_path / "l.zarr").metrics["val_loss"].sel(step=10).item() == pytest.approx(
        validated["val_loss"], rel=1e-7)
