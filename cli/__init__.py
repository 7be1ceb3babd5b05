"""The ``spectral-analyze`` command line (installed as ``spectral_analyzer.cli``)."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
