"""Loading a user's torchvision ResNet weights into an xbm backbone.

``nn.Module.load_state_dict`` reports mismatches as a multi-line RuntimeError listing every key,
which the CLI cannot show as one line and which does not say how to fix it. Here the comparison is
done first, and a mismatch becomes one short :class:`~xbm.errors.XbmError`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from xbm.errors import ArchitectureMismatchError, XbmError

_SHOWN = 3  # keys named per category; enough to spot a prefix or num_classes problem


def _read(path: Path) -> Mapping[str, object]:
    path = path.expanduser()
    from xbm.io import input_problem

    problem = input_problem(path)
    if problem:
        raise XbmError(f"checkpoint {str(path)!r} {problem}; pass the path of a .pth, .pt "
                       f"or .safetensors state dict")
    safetensors = path.suffix.lower() == ".safetensors"
    if not safetensors:
        with open(path, "rb") as f:
            head = f.read(9)
        if not head:
            raise XbmError(f"checkpoint {str(path)!r} is empty; pass the .pth that torch.save "
                           "wrote, or a .safetensors file")
        # safetensors under another name: an 8-byte little-endian header size, then its JSON
        safetensors = len(head) == 9 and head[8:9] == b"{" and \
            0 < int.from_bytes(head[:8], "little") < path.stat().st_size
        # torch.save writes a zip archive (PK..); before PyTorch 1.6, a bare pickle (0x80 ..)
        if not (safetensors or head.startswith(b"PK") or head[:1] == b"\x80"):
            raise XbmError(f"checkpoint {str(path)!r} is not a torch checkpoint (torch.save "
                           "writes a zip archive) nor a .safetensors file; pass the weights "
                           "file itself")
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # weights_only: a .pth is a pickle, and an untrusted pickle can run arbitrary code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a Python object in it
        raise XbmError(
            f"checkpoint {str(path)!r} holds Python objects besides tensors (torchvision's "
            "reference scripts save their argparse args with the weights), which are not "
            "loaded unasked: a pickle can run code. If you trust the file, load it yourself "
            f"with torch.load(path, weights_only=False) and pass its state dict (e.g. "
            f"ckpt['model'])") from exc
    except Exception as exc:  # corrupt, truncated, or a pickle of something other than tensors
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # no terminal colour codes
        first = text.splitlines()[0] if text else type(exc).__name__
        raise XbmError(f"cannot read checkpoint {str(path)!r}: {first} (a truncated or "
                       "corrupt file? copy it again)") from exc


def _unwrap(obj: Mapping[str, object]) -> Mapping[str, object]:
    # Training scripts often save {"state_dict": ..., "epoch": ...} or {"model": ...}; accepting
    # those saves the user a conversion step.
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _task_names(keys) -> list[str]:
    """The task names a converted model's state-dict keys hold (``<layer>.xbm_tasks.<task>.``)."""
    return sorted({k.split("xbm_tasks.", 1)[1].split(".", 1)[0] for k in keys
                   if isinstance(k, str) and ".xbm_tasks." in f".{k}"})


def _shorten(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_torchvision_state_dict(
    model: nn.Module, path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor]
) -> nn.Module:
    """Load a torchvision-style state dict into ``model`` (strictly) and return ``model``.

    A leading ``module.`` prefix (left by ``DataParallel``/DDP) or ``_orig_mod.`` (left by
    ``torch.compile``) is stripped, and a
    ``{"state_dict": ...}`` or ``{"model": ...}`` training checkpoint is unwrapped. Loading is
    strict because a silently skipped key would leave random weights in a "pretrained" backbone;
    the only tolerated gap is BN ``num_batches_tracked``, which old checkpoints lack.

    Args:
        model: the backbone to fill, e.g. ``create_model("resnet50")``.
        path_or_dict: a state dict, or a ``.pth``/``.pt`` (torch.save) or ``.safetensors`` file.

    Raises:
        XbmError: the file cannot be read, its keys/shapes do not match ``model``, or
            ``model`` already holds learned tasks and the weights differ from its own
            (converted models take new weights only before their first ``add_task``).
    """
    if isinstance(path_or_dict, Mapping):
        raw: Mapping[str, object] = path_or_dict
        source = "state dict"
    else:
        path = Path(path_or_dict)
        raw = _read(path)
        source = f"checkpoint {str(path)!r}"
    if not isinstance(raw, Mapping):
        raise XbmError(f"{source} holds a {type(raw).__name__}, not a state dict")
    raw = _unwrap(raw)
    tasks = _task_names(raw)
    if tasks:  # a converted model's state_dict(): its backbone is there, by the same names
        import warnings

        from xbm.errors import XbmWarning, user_stacklevel

        warnings.warn(f"{source} is a converted xbm model's state dict: its backbone weights "
                      f"load, the state of its task(s) {', '.join(tasks)} is left out (tasks "
                      "travel in bundles: save_bundle / load_bundle)", XbmWarning,
                      stacklevel=user_stacklevel())
        raw = {k: v for k, v in raw.items()
               if not (isinstance(k, str) and ".xbm_tasks." in f".{k}")}
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise XbmError(f"{source} is not a state dict: key {key!r} is a "
                           f"{type(key).__name__}, not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise XbmError(f"{source} is not a state dict: entry {key!r} is a "
                           f"{type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_complex() or value.dtype == torch.bool:
            what = "a sparse" if value.layout != torch.strided else f"a {value.dtype}"
            raise XbmError(f"{source}: entry {key!r} is {what} tensor; a backbone's weights are "
                           "dense real numbers: save them with .to_dense() / a float dtype")
        if value.is_meta:  # load_state_dict failed on every entry, a traceback of hundreds
            raise XbmError(f"{source}: entry {key!r} is a meta tensor (a shape without data, "
                           "as a model built on the meta device saves); save the state dict "
                           "after its weights are loaded")
        # DataParallel/DDP's "module.", torch.compile's "_orig_mod." (either order)
        for prefix in ("module.", "_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        state[key] = value

    # a converted model's task state (scores, per-task BN and heads) is not the backbone's:
    # a torchvision checkpoint has none of it, and loading weights leaves it as it is
    full = model.state_dict()
    expected = {k: v for k, v in full.items() if "xbm_tasks." not in k}
    floats = [k for k, v in expected.items()
              if v.is_floating_point() and k in state and not state[k].is_floating_point()]
    if floats:  # int weights would be cast silently by load_state_dict
        raise XbmError(f"{source}: {floats[0]} is {state[floats[0]].dtype}, the model's is a "
                       "floating-point tensor; save the float weights (quantised checkpoints "
                       "are not read)")
    for key, value in expected.items():
        # Checkpoints saved before PyTorch 0.4.1 (including early torchvision downloads) have no
        # BN step counter; it only matters for momentum=None, so start it at zero like torch does.
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_shorten(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_shorten(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es): {_shorten(wrong_shape)}")
        raise ArchitectureMismatchError(
            f"{source} does not match {type(model).__name__}: " + "; ".join(parts)
            + "; build the model with the checkpoint's architecture, num_classes, in_channels "
            "and width" + ("" if missing or unexpected else _head_hint(state, expected))
        )
    tasks = _task_names(full)
    if tasks and any(not torch.equal(state[k].to(v.dtype), v.cpu()) for k, v in expected.items()):
        # the same weights again are harmless; others would run the tasks on weights they
        # were not learned on, unsaid (and a bundle saved then records the new hash)
        raise XbmError(f"the model holds learned task(s) {', '.join(tasks)}, whose masks, "
                       "norms and heads fit the weights it has now, and these weights differ; "
                       "load the backbone's weights before the first add_task (or into a "
                       "fresh model)")
    result = model.load_state_dict(state, strict=False)
    # strict above, on the backbone's keys; only task keys may be left out here
    assert not result.unexpected_keys and all("xbm_tasks." in k for k in result.missing_keys)
    return model


def _head_hint(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """The checkpoint's own class count where only the classifier's shape differs (a
    10-class checkpoint for a 1000-class model), as Python's ``num_classes=`` and xbm
    import-backbone's --num-classes take it."""
    diff = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    heads = [k for k in diff if k.endswith(".weight") and state[k].dim() == 2]
    if len(heads) != 1 or any(not k.startswith(heads[0].rsplit(".", 1)[0] + ".") for k in diff):
        return ""
    got, want = state[heads[0]].shape, expected[heads[0]].shape
    if got[1] != want[1] or got[0] == want[0]:  # not (only) the class count that differs
        return ""
    n = state[heads[0]].shape[0]
    return f" (its classifier {heads[0]} has {n} classes: build the model with " \
        f"num_classes={n}, or xbm import-backbone --num-classes {n})"

