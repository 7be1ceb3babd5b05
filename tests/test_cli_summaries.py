"""What the command line prints around the numbers: the dynamics summary of every window, the deltas a stride
leaves out, ratios near 1 that differ, and a refusal that names the selected range."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.formatting import ratio


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Deltas along the axes: windows of 3 have k* = 1, 2, 2, 2 and R = 100, 10, 10, 10."""
    root = tmp_path_factory.mktemp("planted")
    e = torch.eye(6, dtype=torch.float64)
    theta = torch.zeros(6, dtype=torch.float64)
    save_file({"w": theta.clone()}, str(root / "step_0.safetensors"))
    for i, d in enumerate([1000 * e[0], e[1], 10 * e[2], 10 * e[3], e[4], 10 * e[5]], 1):
        theta = theta + d
        save_file({"w": theta.clone()}, str(root / f"step_{10 * i}.safetensors"))
    sa.ingest(root, root / "r.zarr")
    return root / "r.zarr"


def test_the_dynamics_summary_is_of_every_window_as_its_events_are(planted):
    """The table starts at the second window; the summary took only the table's, and said 'peak R 10' and
    'k* changes 0 times' under an event of the k* shift its first window made."""
    out = CliRunner().invoke(main, ["dynamics", str(planted), "-w", "3", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "k_star_shift" in out.output
    assert "the first window, ending at step 30, has none before it" in out.output
    assert "peak R 100 at step 30 (k*=1)" in out.output
    assert "k* changes 1 time (first at step 40: 1 -> 2)" in out.output


def test_deltas_a_stride_leaves_out_are_told(planted):
    out = CliRunner().invoke(main, ["spectra", str(planted), "-w", "2", "--stride", "2", "--steps", "10..60",
                                    "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "stride 2: the last window ends at step 50; the deltas after it, to step 60, are in no window" in out.output
    whole = CliRunner().invoke(main, ["spectra", str(planted), "-w", "2", "--stride", "2", "--steps", "20..60",
                                      "--no-progress"])
    assert "in no window" not in whole.output


@pytest.mark.parametrize(("below", "at"), [(1.00019996, 1.0002), (1.0001699, 1.00017), (0.99980004, 0.9998)])
def test_ratios_near_1_that_differ_print_differently(below, at):
    """R just under its noise floor printed as the floor: 'peak R 1.000200; never above the noise floor 1.000200'."""
    assert ratio(below) != ratio(at)
    assert float(ratio(below)) == below and float(ratio(at)) == at
    assert ratio(1.0002) == "1.000200" and ratio(0.9995) == "0.999500"


def test_a_range_too_short_for_the_window_names_its_checkpoints(planted):
    with pytest.raises(sa.WindowError, match=r"the step range holds 1 \(between steps 20 and 30\)"):
        sa.open_run(planted).spectra(window=2, steps="20..30")
