"""Optional fused Triton kernel for the faithful simulator (``SimConfig(backend='triton')``).

Triton is an optional extra (``pip install xbm[triton]``); nothing imports it unless that backend
is asked for. Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``),
which is how it is tested on CPU.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when Triton is importable."""
    return importlib.util.find_spec("triton") is not None


__all__ = ["triton_available"]
