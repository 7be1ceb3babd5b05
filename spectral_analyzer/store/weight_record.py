"""Singular values of selected weight matrices, recorded at ingest from the source tensors.

``weights/``: ``sigma`` float64 (checkpoint, matrix, rank), ``row_crc``
uint32 (checkpoint,) the crc32c of each row and ``chain`` uint64
(checkpoint,) the generation (generations.py) each row belongs to, written
before the checkpoint's commit; attributes ``match`` (the globs),
``matrices`` (the name of each column of ``sigma``) and ``packing`` (the
tensors whose q, k and v were split per head, with their head count; absent
from records made before it was kept, which split none). A row of another
generation is not this snapshot's (None: the caller rebuilds the matrices
from the rows); damage to the record (its metadata, a chunk, a row that
fails its crc32c, names that do not describe its columns) is an error naming it.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
from zarr.codecs import Crc32cCodec

from .layout import damaged

__all__ = ["WeightRecord"]


def _crc(values: np.ndarray) -> int:
    return int(google_crc32c.value(np.ascontiguousarray(values).tobytes()))


class WeightRecord:
    """Singular values of the selected weight matrices at every checkpoint, recorded at ingest."""

    def __init__(self, store):
        self.store = store

    def create(self, match: list[str], matrices: list[str], rank: int, packing: dict[str, int]) -> None:
        weights = self.store.group.create_group("weights")
        weights.create_array(
            "sigma", shape=(0, len(matrices), rank), chunks=(1, len(matrices), rank), dtype="float64",
            fill_value=np.nan, compressors=[Crc32cCodec()], dimension_names=("checkpoint", "matrix", "rank"),
        )
        weights.create_array("row_crc", shape=(0,), chunks=(4096,), dtype="uint32", fill_value=0,
                             compressors=[Crc32cCodec()], dimension_names=("checkpoint",))
        _chain_array(weights)
        weights.attrs.put({"match": list(match), "matrices": list(matrices), "packing": dict(packing)})

    def info(self) -> tuple[list[str], list[str], int] | None:
        """``(match, matrices, rank)`` of the record, or None; unreadable metadata, or ``matrices`` that do not
        name the columns of ``sigma``, is a damaged store."""
        try:
            if "weights" not in self.store.group:
                return None
            weights = self.store.group["weights"]
            match, matrices = list(weights.attrs["match"]), [str(m) for m in weights.attrs["matrices"]]
            shape = weights["sigma"].shape
        except (KeyError, TypeError, ValueError) as exc:  # zarr's errors for unreadable or invalid metadata
            raise self._damaged(f"its metadata is unreadable ({' '.join(str(exc).split())})") from None
        if len(shape) != 3 or shape[1] != len(matrices):
            raise self._damaged(f"it names {len(matrices)} matrices and holds {shape}")
        return match, matrices, int(shape[-1])

    def packing(self) -> dict[str, int]:
        """The tensors the record split per head, with their head count ({} for a record made before it kept
        them, which split none); unreadable, a damaged store."""
        packing = self.store.group["weights"].attrs.get("packing", {})
        if not isinstance(packing, dict) or not all(
                isinstance(n, str) and isinstance(h, int) and not isinstance(h, bool) and h > 0
                for n, h in packing.items()):
            raise self._damaged(f"its packing is unreadable ({packing!r:.80})")
        return dict(packing)

    def checksums(self) -> list[int] | None:
        """The crc32c of each committed checkpoint's recorded row (what the record holds, for a cache key), or None."""
        if self.info() is None:
            return None
        try:
            return [int(c) for c in self.store.group["weights"]["row_crc"][: self.store.n_deltas + 1]]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._damaged(f"its checksums are unreadable ({' '.join(str(exc).split())})") from None

    def _damaged(self, what: str):
        return damaged(self.store.path, f"the weight record: {what}")

    def write_row(self, index: int, sigma: np.ndarray, link: int) -> None:
        """Singular values of checkpoint *index* (0 = base), before its commit; *link* is the generation
        chain's value at that checkpoint (c_0 for the base), which the commit will record."""
        weights = self.store.group["weights"]
        if "chain" not in weights:  # a record made before rows carried their generation
            _chain_array(weights)
        for name in ("sigma", "row_crc", "chain"):
            array = weights[name]
            if array.shape[0] <= index:
                array.resize((index + 1, *array.shape[1:]))
        weights["sigma"][index] = sigma
        weights["row_crc"][index] = _crc(np.asarray(sigma, dtype=np.float64))
        weights["chain"][index] = np.uint64(link)

    def read(self) -> np.ndarray | None:
        """Recorded singular values of the committed checkpoints (checkpoint, matrix, rank), checked; None
        where a row is not of this snapshot's generation (rewritten since it was opened, by an overwrite
        or a recorder's resume, or recorded before rows carried their generation)."""
        n = self.store.n_deltas + 1
        try:
            weights = self.store.group["weights"]
            chain = np.asarray(weights["chain"][:n]) if "chain" in weights else np.zeros(0, dtype=np.uint64)
            sigma = np.asarray(weights["sigma"][:n])
            crcs = np.asarray(weights["row_crc"][:n])
        except (KeyError, TypeError, ValueError) as exc:  # the crc32c codec, or metadata Zarr cannot read
            raise self._damaged(f"it fails its checksum or its metadata is unreadable "
                                f"({' '.join(str(exc).split())})") from None
        record = self.store.commit_record
        want = np.concatenate([[np.uint64(int(record["base"], 16))], self.store.chain[: n - 1]]).astype(np.uint64)
        if chain.shape != want.shape or not np.array_equal(chain, want):
            return None
        for i in range(n):
            if sigma.shape[0] <= i or _crc(sigma[i]) != int(crcs[i]):
                raise self._damaged(f"the row of checkpoint {i} is missing or holds other values than were written")
        return sigma


def _chain_array(weights) -> None:
    weights.create_array("chain", shape=(weights["sigma"].shape[0],), chunks=(4096,), dtype="uint64", fill_value=0,
                         compressors=[Crc32cCodec()], dimension_names=("checkpoint",))
