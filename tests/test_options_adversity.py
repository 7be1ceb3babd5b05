"""Options of the analyses, after a review that combined them: results derived from spectra say which spectra,
a weights result's ratios do not depend on how many values it keeps, and options that cannot work are refused
before the pass over the deltas, on one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import FIXTURES, write_run

import spectral_analyzer as sa
from spectral_analyzer.errors import SelectionError, WindowError


@pytest.fixture(scope="module")
def wd1(tmp_path_factory):
    return sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path_factory.mktemp("wd1") / "s.zarr", progress=False)


def test_correlations_and_the_grokking_summary_say_which_spectra_they_come_from(wd1):
    """Two correlations of other steps, stride, tensors and centring had the same attributes (gap ratio's best
    r 0.49 against -0.57), and so had two grokking summaries of other tensors: saved or exported, they could
    not be told apart."""
    whole = wd1.correlate("test_loss", window=5)
    part = wd1.correlate("test_loss", window=5, steps="400..1600", stride=2, params="*attn*", center=True)
    assert whole.attrs != part.attrs
    spectra = wd1.spectra(window=5, steps="400..1600", stride=2, params="*attn*", center=True)
    for key in ("window", "stride", "steps", "center", "params", "group_by"):
        assert part.attrs[key] == spectra.attrs[key], key
    assert part.attrs["max_lag"] == 10  # the correlation's own lags, not the band's
    assert (part.attrs["params"], part.attrs["stride"], part.attrs["center"]) == ("*attn*", 2, 1)
    g_all = wd1.grokking(metric="test_acc", window=5)
    g_attn = wd1.grokking(metric="test_acc", window=5, params="*attn*")
    assert (g_all.attrs["params"], g_attn.attrs["params"]) == ("", "*attn*")
    assert g_all.attrs["steps"] == wd1.spectra(window=5).attrs["steps"]


@pytest.mark.parametrize("top", [1, 2])
def test_ratios_and_gaps_of_a_top_k_result_are_those_of_the_whole_spectrum(tmp_path, top):
    """weights(top=1) rebuilt from the deltas gave NaN for sigma_1/sigma_2 and g12 (top=2: g23), where the same
    checkpoints recorded at ingest gave numbers: the summaries depended on how the store was made."""
    write_run(tmp_path / "ck", 5, {"q.weight": (12, 9), "b": (4,)})
    for recorded in (None, ["q.weight"]):
        run = sa.ingest(tmp_path / "ck", tmp_path / f"s{bool(recorded)}.zarr", progress=False, weights=recorded)
        full, cut = run.weight_spectra("q.weight"), run.weight_spectra("q.weight", top=top)
        assert cut.sizes["rank"] == top
        for name in ("sigma_ratio_12", "g12", "g23"):
            np.testing.assert_allclose(cut[name].values, full[name].values, rtol=1e-9, err_msg=name)
        assert np.isfinite(cut["g23"].values).all()


def test_a_grouping_that_cannot_work_is_refused_before_the_band_is_built(tmp_path):
    """dynamics refused group_by="layer" on tensors without layers only after a full pass over the deltas
    (the band was built and cached first); spectra refused it before."""
    write_run(tmp_path / "ck", 6, {"embed.weight": (8, 4), "head.weight": (3, 4)})
    run = sa.ingest(tmp_path / "ck", tmp_path / "s.zarr", progress=False)
    with pytest.raises(SelectionError):
        run.dynamics(window=3, params="embed*", group_by="layer")
    assert not (tmp_path / "s.zarr" / "gram").exists()
    with pytest.raises(SelectionError):
        run.spectra(window=3, params="embed*", group_by="layer")
    assert not (tmp_path / "s.zarr" / "gram").exists()


@pytest.mark.parametrize("options", [{"null_draws": 0}, {"null_draws": -3}, {"null_draws": 2.5},
                                     {"window": 3.0}, {"window": 2.5}, {"stride": 1.5}, {"stride": True}])
def test_counts_that_are_no_whole_numbers_are_refused_on_one_line(wd1, options):
    """null_draws=0 failed with a bare IndexError from np.quantile; window=5.0 and stride=1.5 with a TypeError
    or an IndexError from inside the band."""
    with pytest.raises((WindowError, SelectionError)) as err:
        wd1.spectra(**{"window": 3, **options})
    name = next(iter(options))
    assert name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("call, options", [
    ("weight_spectra", {"heads": -1}), ("weight_spectra", {"heads": 0}), ("weight_spectra", {"heads": True}),
    ("weight_spectra", {"top": -3}), ("weight_spectra", {"top": 0}), ("weight_spectra", {"top": 2.5}),
    ("attention_spectra", {"heads": -4}), ("attention_spectra", {"heads": 2.0}),
])
def test_head_and_value_counts_that_are_no_counts_are_refused_on_one_line(wd1, call, options):
    """weight_spectra(heads=-1) split no head, dropped every attention matrix and cached the rest as the
    answer; top=-3 kept no values; attention_spectra(heads=-4) failed inside numpy. (The CLI's options
    take whole numbers of at least 1.)"""
    with pytest.raises(SelectionError) as err:
        getattr(wd1, call)(cache=False, **options)
    name = next(iter(options))
    assert f"{name} must be a whole number" in str(err.value) and "\n" not in str(err.value)


def test_a_refusal_lists_whole_names_only():
    """The layers or matrices a refused pattern could have named were cut at 200 characters, mid-name
    ('layers.9.self_attn, )' with layers.10 and on gone, unsaid)."""
    from spectral_analyzer.groups import some_names

    names = [f"model.layers.{i}.self_attn" for i in range(12)]
    shown = some_names(names)
    assert len(shown) <= 200 + len(" and 12 more")
    listed, _, more = shown.partition(" and ")
    assert all(n in names for n in listed.split(", "))
    assert more == f"{12 - len(listed.split(', '))} more"
    assert some_names(names[:2]) == "model.layers.0.self_attn, model.layers.1.self_attn"
    assert some_names([]) == ""


def test_an_empty_list_of_patterns_is_refused_by_name(wd1):
    """params=[] said "no tensor matches  (tensors: ...)", naming nothing."""
    with pytest.raises(SelectionError, match="params is an empty list"):
        wd1.spectra(window=3, params=[])


@pytest.mark.parametrize("call, options", [("spectra", {"params": "nomatch"}),
                                           ("spectra", {"params": "w*", "group_by": "nothing"}),
                                           ("dynamics", {"params": "nomatch"})])
def test_a_refused_selection_tells_nothing_of_the_windows_first(tmp_path, call, options):
    """On unevenly spaced checkpoints, a selection refused in one line was preceded by a MixedIntervalsWarning
    about the windows of a result never computed."""
    src = tmp_path / "src"
    write_run(src, 4, {"w": (6, 5)}, every=10)
    write_run(src, 4, {"w": (6, 5)}, step0=100, every=100, seed=1)
    run = sa.ingest(src, tmp_path / "s.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SelectionError):
            getattr(run, call)(window=3, **options)
    with pytest.warns(sa.MixedIntervalsWarning):
        getattr(run, call)(window=3)


@pytest.mark.parametrize("operator, options", [("trajectory", {"steps": "0..200"}), ("trajectory", {"center": True}),
                                               ("qk", {"params": "*attn*"})])
def test_grokking_options_it_does_not_take_are_refused_before_any_work(wd1, operator, options):
    """run.grokking(steps=...) ended in a TypeError from inside, after the spectra had been built."""
    with pytest.raises(SelectionError, match=rf"unknown option '{next(iter(options))}' \(options: "):
        wd1.grokking(metric="test_acc", operator=operator, **options)


def test_a_stride_past_what_numpy_ranges_hold_is_refused_on_one_line(wd1):
    """spectra --stride 99999999999999999999 ended in an IndexError traceback."""
    with pytest.raises(WindowError, match="stride must be less than 2"):
        wd1.spectra(window=3, stride=10**20)


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_train_example_refuses_a_weight_decay_that_is_no_finite_number_at_least_0(tmp_path, value):
    """--weight-decay inf trained to NaN weights and reported success; nan and -5 gave torch's traceback."""
    from click.testing import CliRunner

    from spectral_analyzer.cli import main

    result = CliRunner().invoke(main, ["train-example", str(tmp_path / "out"), "--weight-decay", value])
    assert result.exit_code == 2 and "is not a finite number at least 0" in result.output
    assert not (tmp_path / "out").exists()


def test_one_pattern_given_as_a_string_is_one_pattern(tmp_path):
    """include / exclude / strip_prefix given as one string were taken letter by letter: exclude="b*" excluded
    everything by its '*', and strip_prefix="model." stripped m, o, d, e, l and dots from the front of every
    name ('model.layers.0.w' became 'ayers.0.w'), without a word."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    for step in (0, 1, 2):
        save_file({"model.layers.0.w": torch.full((4, 3), float(step)), "model.b": torch.ones(5) * step},
                  str(src / f"step_{step}.safetensors"))
    run = sa.ingest(src, tmp_path / "a.zarr", exclude="model.b")
    assert run.tensors["tensor"].values.tolist() == ["model.layers.0.w"]
    run = sa.ingest(src, tmp_path / "b.zarr", include="*layers*", strip_prefix="model.")
    assert run.tensors["tensor"].values.tolist() == ["layers.0.w"]
    model = torch.nn.Linear(3, 2)
    sa.Recorder(tmp_path / "r.zarr", model, exclude="bias").record(0)
    assert sa.open_run(tmp_path / "r.zarr").tensors["tensor"].values.tolist() == ["weight"]


@pytest.mark.parametrize("options", [{"lr": 1e-320}, {"constant": 1e308}])
def test_extreme_dynamics_options_give_their_values_without_numpy_s_warnings(wd1, options):
    """--lr 1e-320 and --constant 1e308 printed numpy's multi-line overflow warnings with the source line; the
    values themselves are inf (adiabatic) and 0 (alpha, clipped), as they are past float64's range."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ds = wd1.dynamics(window=5, **options)
    if "lr" in options:
        assert np.isposinf(ds["adiabatic"].values[np.isfinite(ds["gap"].values) & (ds["gap"].values > 0)]).all()
    else:
        assert (ds["alpha"].values[~np.isnan(ds["alpha"].values)] == 0).all()


def test_one_pattern_given_as_a_string_is_recorded_as_one(tmp_path):
    """The selection took exclude='embed.weight' whole, but provenance recorded it letter by letter."""
    run = sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path / "s.zarr", exclude="embed.weight", strip_prefix="m.")
    options = run.provenance["options"]
    assert (options["exclude"], options["strip_prefix"], options["include"]) == (["embed.weight"], ["m."], [])
