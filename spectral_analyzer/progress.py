"""Progress bars: tqdm's notebook widget where ipywidgets can draw it, its text bar elsewhere."""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["progress_bar"]


def progress_bar(**options):
    """A ``tqdm`` bar (*options* as tqdm's); in Jupyter without ipywidgets the text bar, with no IProgress warning.
    With no standard error to draw on (closed, as under some daemons), no bar is drawn."""
    if sys.stderr is None and "file" not in options:
        options["disable"] = True
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(**options)
