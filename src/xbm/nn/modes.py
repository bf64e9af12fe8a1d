"""Train/eval flags that survive inference helpers.

``module.train(was)`` after an evaluation sets every submodule to one flag, which loses a mix
the user chose (a backbone kept in eval while a head trains, say) and, on a wrapper whose own
flag never matched its children's, turns an eval-mode backbone back into training mode: its
Dropout on, its per-task BatchNorm statistics updated by the next plain forward. So the
helpers here record each submodule's own flag and restore exactly that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``with eval_mode(model):`` runs the block in eval mode, then gives every submodule back
    its own training flag (also when the block raises)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
