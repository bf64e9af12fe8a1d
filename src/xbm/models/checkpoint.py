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
            f"ckpt['model']); a whole model saved with torch.save(model) is saved again as "
            f"torch.save(model.state_dict(), path)") from exc
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
    ``torch.compile``) is stripped, as is any prefix of every key (a training wrapper's, such
    as Lightning's ``model.``) where the keys under it are exactly the model's, and a
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
    if isinstance(path_or_dict, nn.Module):  # Path() raised a bare TypeError
        raise XbmError(f"pass the {type(path_or_dict).__name__}'s weights, "
                       "net.state_dict(), or a file of them, not the model itself")
    if isinstance(path_or_dict, Mapping):
        raw: Mapping[str, object] = path_or_dict
        source = "state dict"
    elif not isinstance(path_or_dict, (str, os.PathLike)):
        raise XbmError(f"expected a state dict or the path of a checkpoint, got a "
                       f"{type(path_or_dict).__name__}")
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
    state, prefix_hint, stripped = _strip_wrapper_prefix(state, expected)
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
        # not the architecture's fault: no "build the model with ..." (nor the CLI's flags)
        if prefix_hint:
            raise XbmError(f"{source}: {prefix_hint}")
        no_head = _no_head_hint(missing, unexpected, wrong_shape, expected, stripped)
        if no_head:
            raise XbmError(f"{source} {no_head}")
        raise ArchitectureMismatchError(
            f"{source} does not match {type(model).__name__}: " + "; ".join(parts)
            + "; build the model with the checkpoint's architecture, num_classes, in_channels "
            "and width" + ("" if missing or unexpected else
                           _head_hint(state, expected) + _channels_hint(state, expected))
            + (_other_model_hint(state, expected) if missing or unexpected else "")
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


def _strip_wrapper_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """The model's keys under a training wrapper's prefix (Lightning's ``model.``, a
    ``backbone.`` or ``net.`` attribute), found by what the model expects rather than by a list
    of names: where every key shares a dotted prefix and the keys without it are exactly the
    model's, the prefix is stripped. Where only some keys carry such a prefix (an EMA copy or a
    loss module beside the model), nothing is guessed: the second value is a message that names
    the prefix and what else the checkpoint holds.

    Returns:
        (the state dict, stripped where that helps; a message, or None; the prefix stripped,
        or "").
    """
    want = set(expected)
    optional = {k for k in want if k.endswith(".num_batches_tracked")}  # filled in later

    def fits(keys: set[str]) -> bool:
        return not keys - want and not (want - keys) - optional

    if not state or fits(set(state)):
        return state, None, ""
    prefixes: dict[str, int] = {}
    for k in state:
        parts = k.split(".")
        for i in range(1, len(parts)):
            prefixes[".".join(parts[:i]) + "."] = prefixes.get(".".join(parts[:i]) + ".", 0) + 1
    for p in sorted(prefixes, key=len):  # a prefix of every key: stripped where it helps
        if prefixes[p] != len(state):
            continue
        under = {k[len(p):]: v for k, v in state.items()}
        if not set(under) - want:
            return under, None, p  # keys still missing (a head) are said as for any other
    whole = [p for p in sorted(prefixes, key=len) if prefixes[p] >= len(want - optional)
             and fits({k[len(p):] for k in state if k.startswith(p)})]
    if whole:  # a model's worth of keys under a prefix, beside other entries
        others = sorted({k.split(".", 1)[0] + "." for k in state
                         if not any(k.startswith(p) for p in whole)})
        p = whole[0]
        named = " and ".join(repr(q) for q in whole)
        return state, ("the keys under " + f"{named} {'are' if len(whole) == 1 else 'are each'} "
                       "this model's, but the checkpoint holds "
                       + (f"other entries beside them ({_shorten(others)})" if others else
                          "more than one copy")
                       + f"; save only the copy you mean, e.g. {{k[{len(p)}:]: v for k, v "
                       f"in sd.items() if k.startswith({p!r})}}"), ""
    return state, None, ""


def _no_head_hint(missing: list[str], unexpected: list[str], wrong_shape: list[str],
                  expected: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """A checkpoint whose only gap is the classifier (a feature extractor, as self-supervised
    checkpoints are): say so and how to import it, rather than "build the model with the
    checkpoint's architecture", which is right already."""
    heads = {k.rsplit(".", 1)[0] for k in missing}
    if unexpected or wrong_shape or len(heads) != 1:
        return ""
    head = heads.pop()
    w = expected.get(f"{head}.weight")
    if w is None or w.dim() != 2 or set(missing) != {k for k in expected
                                                     if k.rsplit(".", 1)[0] == head}:
        return ""
    bias = f" and sd['{prefix}{head}.bias'] = torch.zeros(N)" if f"{head}.bias" in expected \
        else ""
    return (f"has no classifier ({', '.join(missing)}): a feature extractor. Every xbm task "
            "learns its own head; the backbone's serves only its own base task. Add a "
            f"placeholder to the state dict, sd['{prefix}{head}.weight'] = torch.zeros(N, "
            f"{w.shape[1]}){bias}, and import it with num_classes=N (xbm import-backbone "
            "--num-classes N); its base task then scores nothing")


def _channels_hint(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """The checkpoint's input channels where its first convolution alone differs in them (a
    grayscale checkpoint for an RGB model), as the classifier's class count is named."""
    diff = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    convs = [k for k in diff if state[k].dim() == 4]
    if len(convs) != 1 or convs[0] != next((k for k, v in expected.items() if v.dim() == 4), None):
        return ""
    got, want = state[convs[0]].shape, expected[convs[0]].shape
    if got[1] == want[1] or (got[0], *got[2:]) != (want[0], *want[2:]):
        return ""
    c = got[1]
    return f" (its first convolution {convs[0]} takes {c} input channel(s): build the model " \
        f"with in_channels={c}, or xbm import-backbone --in-channels {c})"


def _other_model_hint(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """The registered model whose parameter names the checkpoint's are, where it is not the
    model given (a ResNet-50 checkpoint for resnet18 listed hundreds of keys, not the cause).
    Models are built on the meta device: names only, no memory, a few milliseconds."""
    from xbm.models.registry import create_model, list_models

    have = {k for k in state if not k.endswith(".num_batches_tracked")}
    mine = {k for k in expected if not k.endswith(".num_batches_tracked")}
    found = []
    for name in list_models():
        try:
            with torch.device("meta"):
                keys = {k for k in create_model(name).state_dict()
                        if not k.endswith(".num_batches_tracked")}
        except Exception:  # a user's model that cannot be built so: not a candidate
            continue
        if keys == have and keys != mine:
            found.append(name)
    if len(found) != 1:
        return ""
    return f" (its parameter names are those of the registered model {found[0]!r}: " \
        f"create_model({found[0]!r}), or xbm import-backbone --model {found[0]})"


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

