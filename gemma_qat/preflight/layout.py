"""Argument bytes of a compiled program from the layouts its compiler chose.

The TPU compiler stores arrays in tiles (`f32[512,16]{0,1:T(8,128)}`: dimension 0 is the minor one,
tiled 8 × 128 over the two most minor dimensions), so a [512, 16] shard occupies 512 × 128 floats. The
preflight's exact rows count logical bytes; this module gives both the logical and the tiled size of
every entry parameter, so the report can show that the compiler's argument buffers are exactly the
rows plus tile padding (on GPU and CPU there is no tiling and both sizes agree).
"""

from __future__ import annotations

import math
import re

from gemma_qat.preflight import hlo

_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](?:\{([^}]*)\})?")


def _entry_parameters(hlo_text: str) -> str:
    start = hlo_text.find("entry_computation_layout={(")
    if start < 0:
        raise ValueError("no entry_computation_layout in this HLO text (is it a compiled module?)")
    start += len("entry_computation_layout={(")
    return hlo_text[start:hlo_text.index(")->", start)]


def _tiled_elements(dims: list[int], layout: str) -> int:
    """Elements stored for `dims` under `minor_to_major:T(a,b)...` (the first tile pads the most minor dims)."""
    minor_to_major, _, tiling = layout.partition(":")
    order = [int(x) for x in minor_to_major.split(",") if x] or [0]
    padded = list(dims) or [1]  # a scalar is stored as one element of its tile
    tile = re.match(r"T\(([\d,]+)\)", tiling)
    for k, size in enumerate(reversed([int(x) for x in tile.group(1).split(",")] if tile else [])):
        if k < len(order):
            padded[order[k]] = math.ceil(padded[order[k]] / size) * size
    return math.prod(padded)


def argument_arrays(hlo_text: str) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(HLO dtype, dims, logical bytes, bytes as laid out) of every entry parameter, per device."""
    out = []
    for dtype, dims_text, layout in _ARRAY.findall(_entry_parameters(hlo_text)):
        itemsize = hlo.dtype_bytes(dtype)  # an unknown element type raises
        dims = tuple(int(d) for d in dims_text.split(",") if d)
        out.append((dtype, dims, math.ceil(math.prod(dims) * itemsize),
                     math.ceil(_tiled_elements(list(dims), layout or "") * itemsize)))
    return out


def argument_bytes(hlo_text: str) -> tuple[int, int]:
    """(logical bytes, bytes as laid out) over the entry computation's parameters, per device."""
    arrays = argument_arrays(hlo_text)
    return sum(a[2] for a in arrays), sum(a[3] for a in arrays)
