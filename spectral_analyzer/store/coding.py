"""How analysis Datasets become Zarr groups and back, and their checksums.

Zarr v3 has no specified string dtype: string variables travel as an
attribute. Every variable is checksummed (crc32c over dtype, shape, dimension
names, attributes and bytes), and so are the Dataset's attributes, when a
result is cached; a read that does not give the same checksums (a missing
chunk read as the fill value, a flipped byte in a chunk or in metadata) is not
a result.
"""

from __future__ import annotations

import json

import google_crc32c
import numpy as np

__all__ = ["checksums", "decode", "encode"]

_STRINGS = "string_variables"


def encode(ds):
    """*ds* with its string variables moved into an attribute."""
    strings = {
        k: {"dims": list(ds[k].dims), "values": [str(x) for x in np.ravel(ds[k].values)],
            "shape": list(ds[k].shape), "coord": k in ds.coords, "attrs": dict(ds[k].attrs)}
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
            ds = ds.assign_coords({key: (v["dims"], values, v.get("attrs", {}))})
        else:
            ds[key] = (v["dims"], values, v.get("attrs", {}))
    return ds


_ATTRS = "/"  # the key of the Dataset's attributes: no variable stored in Zarr has this name


def _attrs_text(attrs) -> str:
    """Attributes as canonical JSON, numpy values as Zarr writes them (Python scalars and lists)."""

    def plain(value):
        return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)

    return json.dumps(dict(attrs), sort_keys=True, default=plain)


def checksums(ds) -> dict[str, int]:
    """crc32c of every variable (data and coordinates): dtype, shape, dims, attributes and values; and of ds.attrs."""
    out = {_ATTRS: int(google_crc32c.value(_attrs_text(ds.attrs).encode()))}
    for name in sorted(map(str, ds.variables)):
        var = ds.variables[name]
        values = np.asarray(var.values)
        if values.dtype.kind in "USO":
            raw = "\x00".join(str(x) for x in np.ravel(values)).encode()
            kind = "str"
        else:
            raw = np.ascontiguousarray(values).tobytes()
            kind = values.dtype.str
        head = f"{kind}{values.shape}{list(var.dims)}{_attrs_text(var.attrs)}"
        out[name] = int(google_crc32c.value(head.encode() + raw))
    return out
