"""Checkpoints in (a folder, a folder at an fsspec URL, hub revisions), a store of float32 parameter deltas out."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StepError
from ..store import DEFAULT_CHUNK_SIZE
from ..store.layout import check_chunk_size
from .pipeline import ingest_store

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["ingest"]


def ingest(
    src: str | os.PathLike,
    store: str | os.PathLike = "spectral.zarr",
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strip_prefix: Sequence[str] = ("module.", "_orig_mod."),
    lightning_prefix: str | None = "model.",
    metrics: str | os.PathLike | None = None,
    steps: Sequence[int] | None = None,
    select: str | Sequence[int] | None = None,
    every: int | None = None,
    weights: str | Sequence[str] | None = None,
    overwrite: bool = False,
    wait: bool | float = False,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    revisions: str | Sequence[str] | None = None,
    source_options: Mapping[str, Any] | None = None,
) -> Run:
    """Ingest a folder of checkpoints, or the revisions of a hub repository, into a Zarr store of parameter deltas.

    Row i of ``deltas`` is ``d_i = float32(theta_i - theta_{i-1})``, labelled
    by the end step ``s_i``; ``base`` holds ``theta_0``. Into an existing store
    of the same run, only checkpoints after its last step are appended (cost
    O(k p) for k new checkpoints); an interrupted ingest run again resumes.

    Parameters
    ----------
    src : path or URL
        Folder of checkpoints (any layout listed in
        :mod:`spectral_analyzer.ingest.discover`), local or at an fsspec URL
        (``s3://bucket/ckpts``, with *source_options*); one model's folder of
        the Hugging Face hub cache (``~/.cache/huggingface/hub/models--org--name``:
        every cached revision with a step in its name, see
        :mod:`spectral_analyzer.ingest.hub_cache`); or ``hf://org/name``, the
        revisions of a hub model repository (with *revisions*). Remote
        safetensors are read by byte range: only the selected tensors are
        fetched, each once; remote pickles are downloaded into a temporary
        folder, two checkpoints' at a time (see
        :mod:`spectral_analyzer.ingest.sources`).
    store : path or URL
        The store to create or append to: a folder, or an fsspec URL such
        as ``s3://bucket/run.zarr`` (with *storage_options*).
    chunk_size : int
        Elements per chunk of a delta row (default 4M: 16 MiB).
    include, exclude : sequence of str
        Globs on canonical tensor names.
    strip_prefix : sequence of str
        Name prefixes removed, repeatedly, from every tensor name.
    lightning_prefix : str or None
        Prefix removed from Lightning ``.ckpt`` keys when all keys have it.
    metrics : path, optional
        A CSV / JSONL file with a ``step`` column, or a ``trainer_state.json``;
        by default the newest ``trainer_state.json`` of an HF Trainer run.
    steps : sequence of int, optional
        Steps of the checkpoints in natural name order, when names hold none.
    select : str or sequence of int, optional
        Only the checkpoints at these steps: ``"A..B"`` (both ends included,
        either may be left out), ``"A..B:K"`` (every K-th step from A),
        single steps, or a mix (``"0,1000..143000:1000"``); a sequence of steps.
        Each single step must be a checkpoint's.
    every : int, optional
        Only the checkpoints whose step is a multiple of *every* (with
        *select*: those it selects). ``every=1000`` takes Pythia's uniform
        grid, step 0 included, without its log-spaced early steps.
    weights : glob or sequence of globs, optional
        Record the singular values of the matching 2-D weights (packed
        ``in_proj_weight`` split into q, k, v) from the source tensors while
        they are read, for runs too large to reconstruct later;
        :meth:`Run.weight_spectra` then reads them from the store. Chosen
        when the store is created.
    wait : bool or seconds
        While another process writes the store: fail at once with
        :class:`StoreBusyError` (False), wait (True) or wait that long.
    overwrite : bool
        Replace a store of a different run (or any other content) at *store*.
    progress : bool
        Show a progress bar.
    storage_options : dict, optional
        Options of the fsspec filesystem of a URL *store* (``key``,
        ``secret``, ``endpoint_url``, ...), and of a URL *src* unless
        *source_options* are given.
    revisions : str or sequence of str, optional
        For ``hf://`` sources: the revisions to ingest, comma-separated
        items (a string) or a sequence of items, each a name
        (``step1000``), a glob (``'step*'``), a range of steps ``A..B`` or a
        grid ``A..B:K`` (``step1000..step143000:1000``); by default every
        revision named by a step. Steps come from the names
        (``stage1-step1000-tokens4B``: 1000); checkpoints go in step order.
    source_options : dict, optional
        Options of the fsspec filesystem of a URL *src*, when they differ
        from *storage_options*.

    Returns
    -------
    Run

    Memory: about two copies of the largest tensor plus four chunk buffers;
    from a remote source, also up to 128 MiB of tensors kept for the next
    delta (beyond that they are kept in a temporary folder: local disk up to
    one checkpoint's selected tensors).

    Examples
    --------
    >>> import spectral_analyzer as sa
    >>> run = sa.ingest("fixtures/layouts/hf_trainer", "/tmp/hf.zarr", overwrite=True)
    >>> run.n_params
    1051
    >>> sa.ingest("fixtures/layouts/hf_trainer", "/tmp/hf.zarr", select="10..30", overwrite=True).checkpoint_steps
    array([10, 20, 30])
    """
    from ..run import open_run

    chunk_size = check_chunk_size(chunk_size)
    for step in steps or ():
        if not -(2**63) <= step < 2**63:  # steps are stored as int64
            raise StepError(f"{src}: step {step} is out of range; steps must fit in a signed 64-bit integer")
    path = ingest_store(
        src,
        store,
        chunk_size=chunk_size,
        include=include,
        exclude=exclude,
        strip_prefix=strip_prefix,
        lightning_prefix=lightning_prefix,
        metrics=metrics,
        steps=steps,
        select=select,
        every=every,
        weights=weights,
        overwrite=overwrite,
        wait=wait,
        progress=progress,
        storage_options=storage_options,
        revisions=revisions,
        source_options=source_options,
    )
    return open_run(path, storage_options=storage_options)
