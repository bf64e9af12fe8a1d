"""User-facing errors.

Every error a user can cause (bad names, bad configs, corrupt files, missing datasets) is raised as
an :class:`XbmError`. The CLI prints its message as one line and exits non-zero, so the message must
name the problem *and* the fix.
"""

from __future__ import annotations

import sys


class XbmError(Exception):
    """An error caused by user input; its message is shown to the user as one line."""


class ConfigError(XbmError, ValueError):
    """A configuration field holds an impossible value."""


class UnknownNameError(XbmError, KeyError):
    """A registry lookup failed (method, model, dataset, preset)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(XbmError, FileNotFoundError):
    """A dataset is not installed; the message names the command that installs it."""


class BundleError(XbmError):
    """A saved backbone or task bundle is corrupt, truncated or belongs to another backbone/spec."""


class ArchitectureMismatchError(XbmError):
    """A state dict's keys or shapes do not fit the model built for it: the caller knows which
    of its own arguments (or CLI flags) choose the architecture, so it can name them."""


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    """Build the standard 'unknown X' error listing valid choices."""
    listed = ", ".join(sorted(choices))
    return UnknownNameError(f"unknown {kind} {name!r}; choose one of: {listed}")


class XbmWarning(UserWarning):
    """A warning xbm itself gives (a recipe that is known to fail, a layer left digital, an
    assumption made for a missing input): ``warnings.filterwarnings("ignore",
    category=xbm.XbmWarning)`` silences them all, and the CLI prints them as its own words."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the calling function point at the
    first frame outside the xbm package: the user's line, not xbm's internals."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("xbm."):
        frame, level = frame.f_back, level + 1
    return level
