"""How analysis Datasets become Zarr groups and back, and their checksums.

Zarr v3 has no specified string dtype: string variables travel as an
attribute. Every variable's values are checksummed (crc32c over dtype, shape
and bytes) when a result is cached; a read whose values do not give the same
checksums (a missing chunk read as the fill value, a flipped byte) is not a
result.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

__all__ = ["checksums", "decode", "encode"]

_STRINGS = "string_variables"


def encode(ds):
    """*ds* with its string variables moved into an attribute."""
    strings = {
        k: {"dims": list(ds[k].dims), "values": [str(x) for x in np.ravel(ds[k].values)],
            "shape": list(ds[k].shape), "coord": k in ds.coords}
        for k in ds.variables
        if ds[k].dtype.kind in "USO"
    }
    out = ds.drop_vars(list(strings))
    out.attrs = {**ds.attrs, _STRINGS: strings}
    return out


def decode(ds):
    """The inverse of :func:`encode`."""
    strings = ds.attrs.pop(_STRINGS, {})
    for key, v in strings.items():
        values = np.array(v["values"], dtype=str).reshape(v.get("shape", [len(v["values"])]))
        if v["coord"]:
            ds = ds.assign_coords({key: (v["dims"], values)})
        else:
            ds[key] = (v["dims"], values)
    return ds


def checksums(ds) -> dict[str, int]:
    """crc32c of every variable (data and coordinates): dtype, shape and values."""
    out = {}
    for name in sorted(map(str, ds.variables)):
        values = np.asarray(ds[name].values)
        if values.dtype.kind in "USO":
            raw = "\x00".join(str(x) for x in np.ravel(values)).encode()
            kind = "str"
        else:
            raw = np.ascontiguousarray(values).tobytes()
            kind = values.dtype.str
        out[name] = int(google_crc32c.value(f"{kind}{values.shape}".encode() + raw))
    return out
