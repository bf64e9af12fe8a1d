"""Reader for IDX files (the MNIST / Fashion-MNIST container format).

An IDX file is a 4-byte magic ``00 00 <type> <ndim>`` followed by ``ndim`` big-endian int32
dimensions and the raw data, row-major. Image files (ndim 3) therefore have a 16-byte header and
label files (ndim 1) an 8-byte one. Reading the header instead of hard-coding the offsets lets the
same function check both kinds and reject truncated or swapped files with a clear message.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from xbm.errors import XbmError
from xbm.io import atomic_path

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an (uncompressed) IDX file into a tensor.

    Args:
        data: the whole file content.
        source: file name used in error messages.

    Raises:
        XbmError: bad magic, unknown type code, or a size that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise XbmError(f"{source}: not an IDX file (bad magic bytes); re-download or reinstall it")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise XbmError(f"{source}: truncated IDX header; re-download or reinstall it")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if any(d < 0 for d in dims):  # two negatives multiply to a plausible size
        raise XbmError(f"{source}: IDX header has negative dimensions {dims}; the file is "
                       "corrupt, re-download or reinstall it")
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise XbmError(f"{source}: IDX size {len(data)} bytes does not match its header "
                       f"(dims {dims}, expected {expected}); the file is truncated or corrupt, "
                       "re-download or reinstall it")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file, gzipped (by ``.gz`` suffix or gzip magic) or plain.

    Raises:
        XbmError: the file is not a valid IDX file or a corrupt gzip stream.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # zlib: damaged deflate data
            raise XbmError(f"{path}: corrupt gzip data ({exc}); re-download or reinstall it"
                           ) from None
    return parse_idx(raw, str(path))


def write_idx(path: str | os.PathLike, array: torch.Tensor | np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped if ``path`` ends in ``.gz``); used for test fixtures."""
    arr = np.ascontiguousarray(np.asarray(array, dtype=np.uint8))
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
