from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa


def _train(recorder, ckpt_dir, steps=60, every=5, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    if recorder is not None:
        recorder.model = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(64, 12), torch.randint(4, (64,))
    for step in range(steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step % every == 0:
            save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(ckpt_dir / f"s_{step}.safetensors"))
        if recorder is not None:
            recorder.step(step, loss=loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_recorder_matches_ingesting_saved_checkpoints(tmp_path):
    (tmp_path / "ckpts").mkdir()
    rec = sa.Recorder(tmp_path / "live.zarr", torch.nn.Linear(1, 1), every=5, chunk_size=100)
    _train(rec, tmp_path / "ckpts")
    live = sa.open_run(tmp_path / "live.zarr")
    saved = sa.ingest(tmp_path / "ckpts", tmp_path / "saved.zarr", chunk_size=100)
    assert list(live.checkpoint_steps) == list(saved.checkpoint_steps) == list(range(0, 61, 5))
    assert np.array_equal(live.deltas.values.view(np.uint32), saved.deltas.values.view(np.uint32))
    assert np.array_equal(live.base.values, saved.base.values)
    assert list(live.metrics["step"].values) == list(range(61))  # logged at every call
    a = live.spectra(window=5)
    b = saved.spectra(window=5)
    np.testing.assert_allclose(a["sigma"].values, b["sigma"].values, rtol=1e-12)


def test_recording_extends_the_band_incrementally(tmp_path, monkeypatch):
    (tmp_path / "ckpts").mkdir()
    torch.manual_seed(1)
    model = torch.nn.Linear(30, 30)
    rec = sa.Recorder(tmp_path / "live.zarr", model, chunk_size=200)
    for step in range(12):
        with torch.no_grad():
            model.weight.add_(0.01 * torch.randn_like(model.weight))
        rec.step(step)
    run = sa.open_run(tmp_path / "live.zarr")
    run.band(max_lag=4)
    for step in range(12, 14):
        with torch.no_grad():
            model.weight.add_(0.01 * torch.randn_like(model.weight))
        rec.step(step)
    from spectral_analyzer.gram import build

    computed = []
    real = build.band_products
    monkeypatch.setattr(build, "band_products", lambda ring, new, *a, **k: computed.append(len(new)) or real(ring, new, *a, **k))
    band = sa.open_run(tmp_path / "live.zarr").band(max_lag=4)
    assert band.sizes["step"] == 13
    n_chunks = -(-(30 * 30 + 30) // 200)
    # rows 11 and 12 are new: computed from the start of their block of 8 (row 8), as a fresh build
    # groups them, so the band is bit-identical to one; rows 0..7 are not recomputed
    assert sum(computed) == 5 * n_chunks


def test_recorder_refuses_going_back_and_other_models(tmp_path):
    model = torch.nn.Linear(3, 3)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    rec.record(10)
    with torch.no_grad():
        model.bias.add_(0.5)
    rec.record(20)
    with pytest.raises(sa.StepError, match="step 15 is not after the store's last step 20"):
        rec.record(15)
    other = sa.Recorder(tmp_path / "r.zarr", torch.nn.Linear(3, 4))
    with pytest.raises(sa.InconsistentCheckpointsError, match=r"'bias' has shape \(3,\) in .*r.zarr but \(4,\)"):
        other.record(30)
    # a new process appends to the same store from the store's own last theta
    again = sa.Recorder(tmp_path / "r.zarr", model)
    with torch.no_grad():
        model.weight.add_(1.0)
    again.record(30)
    run = sa.open_run(tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [10, 20, 30]
    assert np.allclose(run.deltas.values[-1][3:], 1.0) and not run.deltas.values[-1][:3].any()  # bias, then weight


def _resumed_between_rows(tmp_path, replay: float):
    """Rows at 0..20 (weights += 0.5 a row), the model put back to its step-12 weights and resumed at 12, then
    moved by *replay* a row (0.5: the training redone alike)."""
    model = torch.nn.Linear(3, 2)
    rec = sa.Recorder(tmp_path / "r.zarr", model, every=5, chunk_size=4)
    at_10 = None
    for step in range(0, 21, 5):
        with torch.no_grad():
            model.weight += 0.5
        if step == 10:
            at_10 = {k: v.clone() for k, v in model.state_dict().items()}
        rec.step(step, loss=float(step))
    before = sa.open_run(tmp_path / "r.zarr").deltas.values
    model.load_state_dict(at_10)  # the checkpoint at 12: the weights of 10, no row between
    again = sa.Recorder(tmp_path / "r.zarr", model, every=5, chunk_size=4)
    with pytest.warns(sa.RecordingWarning, match=r"resumed at step 12, before the store's last step 20, which holds no row"):
        again.resume(12)
    for step in (15, 20):
        with torch.no_grad():
            model.weight += replay
        again.step(step, loss=-float(step))
    return model, again, before


def test_resuming_between_recorded_steps_goes_on_after_the_store_when_the_training_is_redone_alike(tmp_path):
    model, again, before = _resumed_between_rows(tmp_path, 0.5)
    with torch.no_grad():
        model.weight += 0.25
    again.step(25, loss=-25.0)
    run = sa.open_run(tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [0, 5, 10, 15, 20, 25]
    assert np.array_equal(run.deltas.values[:4], before)
    assert np.allclose(np.sort(run.deltas.values[4]), [0, 0, *[0.25] * 6])  # the weight's 6, not the bias
    assert list(run.metrics["step"].values) == [0, 5, 10, 15, 20, 25]
    assert run.metrics["loss"].sel(step=[10, 25]).values.tolist() == [10.0, -25.0]


def test_resuming_between_recorded_steps_is_refused_where_the_training_is_not_redone_alike(tmp_path):
    """The next delta after the store's last step came from the abandoned training's weights there: resumed
    training that did not replay them (Lightning's mid-epoch resume, a checkpoint of another run) got a row
    mixing two trajectories (30% off in a review's Lightning run), told only that steps were not recorded."""
    with pytest.raises(sa.StepError, match=r"resumed before step 20 does not redo the one recorded"):
        _resumed_between_rows(tmp_path, 0.25)
    assert list(sa.open_run(tmp_path / "r.zarr").checkpoint_steps) == [0, 5, 10, 15, 20]


def test_recorded_metrics_are_appended_and_late_ones_merged(tmp_path, monkeypatch):
    """Each record appends its new metric rows (O(new rows)); a series first logged late is missing
    before; a value logged for an earlier step is merged; a killed append leaves the committed series."""
    from spectral_analyzer.store import metrics as stored_metrics

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "m.zarr"
    rec = sa.Recorder(path, model, every=2, chunk_size=4)
    replaced = []
    original = stored_metrics.write_metrics
    monkeypatch.setattr(stored_metrics, "write_metrics", lambda *a: (replaced.append(a[1]), original(*a)))
    monkeypatch.setattr(sa.store.Store, "write_metrics", lambda self, *a: stored_metrics.write_metrics(self, *a))
    for step in range(10):
        with torch.no_grad():
            model.weight += 0.1
        rec.step(step, loss=float(step), **({"acc": step / 10} if step >= 5 else {}))
    assert len(replaced) == 1  # the first write; every later one appended
    run = sa.open_run(path)
    assert run.metrics["step"].values.tolist() == list(range(9))  # step 9 is logged, not yet written
    np.testing.assert_array_equal(run.metrics["loss"].values, np.arange(9.0))
    np.testing.assert_array_equal(run.metrics["acc"].values[:5], np.full(5, np.nan))
    np.testing.assert_array_equal(run.metrics["acc"].values[5:], np.arange(5, 9) / 10)
    rec.log(3, eval_loss=0.5)  # a late evaluation of an earlier step
    rec.flush()
    assert len(replaced) == 2
    run = sa.open_run(path)
    assert run.metrics["step"].values.tolist() == list(range(10))
    assert run.metrics["eval_loss"].sel(step=3).item() == 0.5 and run.metrics["loss"].sel(step=9).item() == 9.0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the rows are written past n, before the commit
    monkeypatch.setattr(stored_metrics, "_commit", killed)
    rec.log(10, loss=10.0)
    with pytest.raises(KeyboardInterrupt):
        rec.flush()
    again = sa.open_run(path)
    assert again.metrics["step"].values.tolist() == list(range(10))
    monkeypatch.undo()
    rec.flush()
    assert sa.open_run(path).metrics["loss"].sel(step=10).item() == 10.0


def test_a_metric_named_step_is_the_index_not_a_series(tmp_path):
    model = torch.nn.Linear(3, 2)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    rec.step(0, loss=1.0, step=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    rec.log(1, step=1, loss=0.5)
    rec.record(1)
    metrics = sa.open_run(tmp_path / "r.zarr").metrics
    assert list(metrics.data_vars) == ["loss"] and list(metrics["step"].values) == [0, 1]


def _moved(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by * torch.linspace(-1, 1, p.numel()).reshape(p.shape))


def _flat(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([v.detach().double().reshape(-1).numpy() for _, v in sorted(model.state_dict().items())])


def test_a_recorder_reused_for_a_training_resumed_earlier_drops_the_abandoned_rows(tmp_path):
    """A callback's recorder goes on recording when training restarts from an older checkpoint: the rows after
    it are dropped (with a warning) and the next delta is taken from the checkpoint the training resumed
    from, not from the abandoned training's last snapshot; what it logged after that checkpoint goes too."""
    model = torch.nn.Linear(4, 3)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    saved = {}
    for step in (0, 4, 8, 12, 14):
        rec.log(step, loss=float(step))
        rec.record(step)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        _moved(model, 0.1)
    rec.log(15, loss=99.0)  # logged by the abandoned training, not yet written
    model.load_state_dict(saved[12])  # the training resumes from checkpoint 12, on another path
    with pytest.warns(sa.RecordingWarning, match="dropping the 1 rows"):
        rec.resume(12)
    at12 = _flat(model)
    _moved(model, -0.05)
    rec.log(16, loss=16.0)
    rec.record(16)
    run = sa.open_run(tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [0, 4, 8, 12, 16]
    want = (_flat(model) - at12).astype(np.float32)
    np.testing.assert_array_equal(run.deltas.values[-1].view(np.uint32), want.view(np.uint32))
    assert list(run.metrics["step"].values) == [0, 4, 8, 12, 16]


def test_a_refused_record_changes_nothing_a_later_write_keeps(tmp_path):
    model = torch.nn.Linear(3, 2)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    for step in range(0, 21, 5):
        rec.log(step, loss=float(step))
        rec.record(step)
        _moved(model, 0.1)
    again = sa.Recorder(tmp_path / "r.zarr", model)
    with pytest.raises(sa.StepError, match="not after the store's last step 20"):
        again.record(15)
    again.log(21, lr=0.5)
    again.flush()
    metrics = sa.open_run(tmp_path / "r.zarr").metrics
    assert list(metrics["step"].values) == [0, 5, 10, 15, 20, 21]
    assert list(metrics["loss"].values[:5]) == [0.0, 5.0, 10.0, 15.0, 20.0]


def test_the_metrics_logged_before_a_record_are_committed_before_its_row(tmp_path, monkeypatch):
    """Killed between the two commits, the store holds the metrics and not the row: a training resumed at
    the last row logs the steps after it again, and nothing logged is lost."""
    from spectral_analyzer.ingest import recorder as recorder_module

    model = torch.nn.Linear(3, 2)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    rec.step(0, loss=0.0)
    _moved(model, 0.1)
    rec.log(1, loss=1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the row of step 2 never committed

    monkeypatch.setattr(recorder_module, "write_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        rec.step(2, loss=2.0)
    monkeypatch.undo()
    metrics = sa.open_run(tmp_path / "r.zarr").metrics
    assert list(metrics["step"].values) == [0, 1, 2] and list(sa.open_run(tmp_path / "r.zarr").checkpoint_steps) == [0]


def test_a_change_of_precision_while_recording_is_warned_as_ingest_warns(tmp_path):
    model = torch.nn.Linear(3, 2)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    rec.record(0)
    _moved(model, 0.1)
    rec.record(1)
    model.half()
    with pytest.warns(sa.PrecisionChangeWarning, match=r"is float32 at step 1 .* but float16 at step 2"):
        rec.record(2)
    assert any("float16 at step 2" in w for w in sa.open_run(tmp_path / "r.zarr").warnings)


def test_recorder_patterns_that_match_nothing_are_refused(tmp_path):
    """As at ingest: a typo in include / exclude would narrow (or not narrow) the recording in silence."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    for option in ({"include": ["0.*", "2.*"]}, {"exclude": ["*.bais"]}):
        recorder = sa.Recorder(tmp_path / "r.zarr", model, every=1, **option)
        with pytest.raises(sa.SelectionError, match=r"pattern '(2\.\*|\*\.bais)' matches no tensor of the model"):
            recorder.record(0)
        assert not (tmp_path / "r.zarr").exists()
    sa.Recorder(tmp_path / "r.zarr", model, every=1, exclude=["*num_batches_tracked"]).record(0)  # a buffer: found


def test_resumed_between_rows_and_past_the_store_s_last_step_without_a_row_there_is_refused(tmp_path):
    """Resumed at 12 with every=7 (rows at 0..20 every 5): the training never records at 20, where its
    weights would be checked against the store's, and its row at 21 took its delta from the abandoned
    training's weights at 20, unchecked."""
    model = torch.nn.Linear(3, 2)
    rec = sa.Recorder(tmp_path / "r.zarr", model, every=5, chunk_size=4)
    for step in range(0, 21, 5):
        with torch.no_grad():
            model.weight += 0.5
        rec.step(step)
    again = sa.Recorder(tmp_path / "r.zarr", model, every=7, chunk_size=4)
    with pytest.warns(sa.RecordingWarning, match="resumed at step 12"):
        again.resume(12)
    again.step(14)  # before the store's last step: not recorded again
    with pytest.raises(sa.StepError, match=r"recorded no row there to check its weights"):
        again.step(21)
    with pytest.raises(sa.StepError, match=r"recorded no row there"):
        again.step(28)
    assert list(sa.open_run(tmp_path / "r.zarr").checkpoint_steps) == [0, 5, 10, 15, 20]
