"""The recorder under a third review: what a refused record, a fractional step, a resumption from the wrong
weights, a second rank or a value that is no number does to the store and to the metrics logged."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import spectral_analyzer as sa
from spectral_analyzer.store import Store


def _model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(dtype)


def _move(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def _losses(path) -> dict[int, float]:
    ds = sa.open_run(path).metrics
    return {int(s): float(v) for s, v in zip(ds.step.values, ds.loss.values) if not np.isnan(v)}


def test_a_refused_record_keeps_the_metrics_logged_and_the_resume_cut(tmp_path):
    """A record refused after its metrics were committed (weights gone NaN, a full disk) rolled that commit
    back, but the recorder had forgotten them: the redone training's losses were lost, and the abandoned
    training's losses of those steps came back."""
    path = tmp_path / "r.zarr"
    model = _model()
    rec = sa.Recorder(path, model, every=10)
    for s in range(0, 31):
        _move(model, 0.01)
        rec.step(s, loss=float(s))
    model = _model()
    for _ in range(11):  # the weights of step 10, as its checkpoint holds them
        _move(model, 0.01)
    with pytest.warns(sa.RecordingWarning, match="dropping the 2 rows"):
        resumed = sa.Recorder(path, model, every=10)
        resumed.resume(10)
    for s in range(11, 21):
        _move(model, 0.01)
        if s == 20:
            with torch.no_grad():
                model.weight[0, 0] = float("nan")  # diverged
            with pytest.raises(sa.NonFiniteError):
                resumed.step(s, loss=100.0 + s)
        else:
            resumed.step(s, loss=100.0 + s)
    resumed.flush()
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 10]
    losses = _losses(path)
    assert {s: losses[s] for s in range(11, 21)} == {s: 100.0 + s for s in range(11, 21)}
    assert max(losses) == 20  # the abandoned training's steps 21..29 dropped


@pytest.mark.parametrize("step", [10.5, "10", True, np.float32(2.25), torch.tensor(1.5)])
def test_a_step_that_is_no_whole_number_is_refused(tmp_path, step):
    """step(10.5) filed its loss under step 10, replacing the one logged there; log(12.7) under 12."""
    rec = sa.Recorder(tmp_path / "r.zarr", _model(), every=1)
    rec.step(10, loss=2.0)
    for call in (lambda: rec.step(step, loss=5.0), lambda: rec.log(step, loss=5.0), lambda: rec.record(step)):
        with pytest.raises(sa.StepError, match=r"r\.zarr: step .* is not a whole number") as exc:
            call()
        assert "\n" not in str(exc.value)
    rec.flush()
    assert _losses(tmp_path / "r.zarr") == {10: 2.0}


def test_whole_steps_of_other_types_are_taken(tmp_path):
    rec = sa.Recorder(tmp_path / "r.zarr", _model(), every=2)
    model = rec.model
    for step in (np.int64(0), 2.0, torch.tensor(4)):
        _move(model, 0.1)
        assert rec.step(step, loss=1.0)
    assert sa.open_run(tmp_path / "r.zarr").checkpoint_steps.tolist() == [0, 2, 4]


def test_resuming_with_weights_other_than_the_stores_is_refused(tmp_path):
    """Resumed at the store's last step from another run's checkpoint, the recorder took the next delta
    from weights the store's rows do not sum to (8.7e-4 off, no word)."""
    path = tmp_path / "r.zarr"
    model = _model()
    rec = sa.Recorder(path, model, every=1)
    for s in range(3):
        _move(model, 0.01)
        rec.record(s)
    before = Store.open(path).commit_record
    other = _model(seed=1)
    with pytest.raises(sa.StepError, match=r"r\.zarr: training resumed at step 2, but the model's weights are not "
                                           "the ones the store recorded at that step"):
        sa.Recorder(path, other, every=1).resume(2)
    assert Store.open(path).commit_record == before
    again = sa.Recorder(path, model, every=1)
    again.resume(2)  # the right weights: taken
    _move(model, 0.01)
    again.record(3)
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 1, 2, 3]


def test_a_float64_model_appended_without_its_snapshot_is_told_what_to_do(tmp_path):
    """The refusal spoke of a checkpoint folder, which a recorder has none of."""
    path = tmp_path / "r.zarr"
    model = _model(dtype=torch.float64)
    rec = sa.Recorder(path, model)
    for s in range(2):
        _move(model, 1e-9 / 3)
        rec.record(s)
    with pytest.raises(sa.StepError, match=r"this recorder holds no snapshot of the model at the store's last step "
                                           r"1, .* call resume\(1\) while the model holds that step's weights"):
        sa.Recorder(path, model).record(2)
    sa.Recorder(path, model).resume(1)


def test_ranks_other_than_0_record_nothing(tmp_path, monkeypatch):
    """A plain Recorder on every rank of a DDP training: whichever rank took the lock wrote the rows, the
    other was refused at every record, and its metrics replaced the first's at flush."""
    path = tmp_path / "r.zarr"
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    rec = sa.Recorder(path, _model(), every=1)
    for s in range(3):
        rec.step(s, loss=float(s))
    rec.resume(1)
    rec.flush()
    assert not path.exists()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    rec = sa.Recorder(path, _model(), every=1)
    rec.step(0, loss=1.0)
    assert _losses(path) == {0: 1.0}


@pytest.mark.parametrize("value", ["fast", None, [1.0, 2.0]])
def test_a_metric_that_is_no_number_is_named(tmp_path, value):
    rec = sa.Recorder(tmp_path / "r.zarr", _model())
    with pytest.raises(sa.MetricsError, match=r"r\.zarr: metric 'lr' logged at step 3 is .*, not a number") as exc:
        rec.log(3, loss=1.0, lr=value)
    assert "\n" not in str(exc.value)


def test_resuming_between_rows_replaces_the_abandoned_metrics(tmp_path):
    """Resumed at a step with no row, before the store's last: the rows are kept (the model cannot redo
    them), and the metrics after the step, the abandoned training's, give way to the ones logged again."""
    path = tmp_path / "r.zarr"
    model = _model()
    rec = sa.Recorder(path, model, every=10)
    for s in range(0, 31):
        _move(model, 0.01)
        rec.step(s, loss=float(s), **({"eval": 1.0} if s == 25 else {}))
    rec.flush()
    resumed = sa.Recorder(path, model, every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.RecordingWarning)
        resumed.resume(15)
    for s in range(16, 31):
        resumed.step(s, loss=100.0 + s)
    resumed.flush()
    losses = _losses(path)
    assert {s: losses[s] for s in range(16, 31)} == {s: 100.0 + s for s in range(16, 31)}
    assert "eval" not in sa.open_run(path).metrics  # the abandoned training's evaluation at step 25
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 10, 20, 30]


def test_a_refused_record_does_not_take_another_writers_row_for_its_own(tmp_path):
    """A record refused (weights gone NaN) left the recorder believing a row at that step with that row
    count would be its own: another writer's row there was then taken as the base of the next delta."""
    path = tmp_path / "r.zarr"
    model = _model(0)
    rec = sa.Recorder(path, model, every=10)
    rec.record(0)
    _move(model, 0.1)
    rec.record(10)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(sa.NonFiniteError):
        rec.record(20)
    other = _model(1)  # another training writing into the same store
    sa.Recorder(path, other, every=10).record(20)
    with torch.no_grad():
        model.weight[0, 0] = 0.5
    with pytest.raises(sa.StoreError, match=r"another writer changed the rows since this recorder's row at step 10 "
                                            r"\(the store now ends at step 20\)"):
        rec.record(30)
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 10, 20]


@pytest.mark.parametrize("at", [0, 10])
def test_resumed_into_the_store_of_another_training_nothing_is_dropped(tmp_path, at):
    """A training resumed from its own checkpoint at step 10 with the callback pointed at another run's store
    (rows at 0..20): the store's rows after 10 were dropped and the other training's appended, the check
    against the weights coming only after the truncation, when there was nothing left to check against."""
    path = tmp_path / "r.zarr"
    model = _model(0)
    rec = sa.Recorder(path, model, every=10)
    for s in range(0, 21):
        _move(model, 0.01)
        rec.step(s, loss=float(s))
    rec.flush()
    before = sa.open_run(path).deltas.values.copy()
    other = _model(1)  # another training's weights at that step
    with pytest.raises(sa.StepError, match=rf"resumed at step {at}, but the model's weights are not the ones"):
        sa.Recorder(path, other, every=10).resume(at)
    run = sa.open_run(path)
    assert run.checkpoint_steps.tolist() == [0, 10, 20]
    assert np.array_equal(run.deltas.values, before)
    assert _losses(path) == {s: float(s) for s in range(0, 21)}


def test_a_packed_weight_registered_beside_its_slices_is_refused_as_ingest_refuses_it(tmp_path):
    """Views of one storage that overlap (in_proj_weight and its q, k, v slices kept as buffers) were all
    recorded: each value counted twice in every Gram, where ingest of the saved state dict refuses them."""

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj_weight = torch.nn.Parameter(torch.randn(12, 4))
            for name, part in zip("qkv", self.in_proj_weight.data.split(4)):
                self.register_buffer(f"{name}_proj_weight", part)

    with pytest.raises(sa.CheckpointError, match=r"'in_proj_weight' and 'q_proj_weight' are views of the same"):
        sa.Recorder(tmp_path / "r.zarr", Packed(), every=1).record(0)
    assert not (tmp_path / "r.zarr").exists()
    model = Packed()  # the slices left out: recorded
    sa.Recorder(tmp_path / "s.zarr", model, every=1, exclude=["q_*", "k_*", "v_*"]).record(0)
    assert sa.open_run(tmp_path / "s.zarr").tensors["tensor"].values.tolist() == ["in_proj_weight"]


def _four_rows(path, dtype=torch.float32):
    """Rows at 0, 10, 20, 30 of a model moved 0.01 a step; its weights at every step."""
    model = _model(0, dtype)
    rec = sa.Recorder(path, model, every=10)
    weights = {}
    for s in range(0, 31):
        _move(model, 0.01)
        weights[s] = {k: v.clone() for k, v in model.state_dict().items()}
        rec.step(s)
    return model, weights


def test_a_second_resume_into_a_store_cut_back_by_the_first_checks_the_weights_too(tmp_path):
    """resume(10) cut the store back to [0, 10]; killed before step 20 and resumed at 10 again from another
    run's checkpoint, the store's copy of step 10 no longer described its last row, and the resume was
    accepted unchecked: rows from the other run's weights followed."""
    path = tmp_path / "r.zarr"
    model, weights = _four_rows(path)
    model.load_state_dict(weights[10])
    with pytest.warns(sa.RecordingWarning, match="dropping the 2 rows"):
        sa.Recorder(path, model, every=10).resume(10)
    other = _model(5)
    with pytest.raises(sa.StepError, match=r"resumed at step 10, but the model's weights are not the ones"):
        sa.Recorder(path, other, every=10).resume(10)
    again = sa.Recorder(path, model, every=10)
    again.resume(10)  # the right weights: accepted
    _move(model, 0.01)
    again.record(20)
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 10, 20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_replay_checked_at_the_store_s_last_step_goes_on_from_those_weights(tmp_path, dtype):
    """A float64 model resumed between rows, its replay checked bit for bit at the store's last step, was
    refused at the next record ('holds no snapshot ... call resume(30)'): the checked weights were not kept."""
    path = tmp_path / "r.zarr"
    model, weights = _four_rows(path, dtype)
    model.load_state_dict(weights[15])
    rec = sa.Recorder(path, model, every=10)
    with pytest.warns(sa.RecordingWarning, match="resumed at step 15"):
        rec.resume(15)
    for s in range(16, 41):
        _move(model, 0.01)
        rec.step(s)
    run = sa.open_run(path)
    assert run.checkpoint_steps.tolist() == [0, 10, 20, 30, 40]
    reference = _model(0, dtype)  # the same training, uninterrupted
    rec = sa.Recorder(tmp_path / "ref.zarr", reference, every=10)
    for s in range(0, 41):
        _move(reference, 0.01)
        rec.step(s)
    assert np.array_equal(run.deltas.values, sa.open_run(tmp_path / "ref.zarr").deltas.values)


def test_a_resume_with_another_selection_or_shape_is_refused_on_one_line(tmp_path):
    """resume(10) with exclude='bias', or a model of another shape, ended in a KeyError or numpy's 'negative
    dimensions' from the weights check, where a record gives the one-line mismatch."""
    path = tmp_path / "r.zarr"
    model, weights = _four_rows(path)
    model.load_state_dict(weights[10])
    with pytest.raises(sa.InconsistentCheckpointsError, match=r"'bias' is in .* but missing"):
        sa.Recorder(path, model, every=10, exclude="bias").resume(10)
    with pytest.raises(sa.InconsistentCheckpointsError, match=r"has shape"):
        sa.Recorder(path, torch.nn.Linear(4, 2), every=10).resume(30)
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 10, 20, 30]
