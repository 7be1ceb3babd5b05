"""Progress bars: tqdm's notebook widget where ipywidgets can draw it, its text bar elsewhere."""

from __future__ import annotations

import importlib.util

__all__ = ["progress_bar"]


def progress_bar(**options):
    """A ``tqdm`` bar (*options* as tqdm's); in Jupyter without ipywidgets the text bar, with no IProgress warning."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(**options)
