"""docs/tour.ipynb runs top to bottom, so the Jupyter workflow it shows cannot silently break."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent


def test_the_tour_notebook_runs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    shutil.copy(ROOT / "docs" / "tour.ipynb", tmp_path / "docs")
    nb = nbformat.read(tmp_path / "docs" / "tour.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "docs")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 7  # every plot drawn
    assert any("spectral_analyzer.Run" in o.get("data", {}).get("text/html", "") for o in outputs)
