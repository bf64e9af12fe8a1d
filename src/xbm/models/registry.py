"""Name -> factory registry for backbones.

Configs, the CLI and saved bundles refer to a backbone by name only, so every backbone must be
reachable through :func:`create_model`. A factory is a plain function decorated with
:func:`register_model`; its docstring's first line doubles as the description shown in docs and CLI
tables, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from xbm.config import same_definition
from xbm.errors import ConfigError, unknown

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Register a model factory under ``name``.

    The same function registered again (a notebook cell or a reloaded module) replaces the
    earlier registration, as ``register_method`` does. Another function under a taken name is
    a programming error (two modules fighting over one name would make the backbone a config
    refers to depend on import order), so it raises immediately.
    """

    def decorator(fn: F) -> F:
        old = _REGISTRY.get(name)
        if old is not None and not same_definition(old, fn):
            raise ValueError(f"model {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _factory(name: str) -> Factory:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown("model", name, _REGISTRY) from None


def model_defaults(name: str) -> dict[str, Any]:
    """The sizes :func:`create_model` gives ``name`` when they are left out (``width``,
    ``in_channels``, ``num_classes``; ``None`` where the model takes no such argument): each
    family has its own, so a report can say which it used."""
    params = inspect.signature(_factory(name)).parameters
    return {k: params[k].default if k in params else None
            for k in ("width", "in_channels", "num_classes")}


def list_models() -> list[str]:
    """Names of all registered models, sorted so tables and error messages are stable."""
    return sorted(_REGISTRY)


def model_info(name: str) -> str:
    """One-line description of a model, taken from its factory's docstring."""
    doc = inspect.getdoc(_factory(name)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else name


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    width: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model.

    ``None`` means "the model's own default", because the defaults differ per family: the
    CIFAR-style models default to 10 classes and 1 channel (the project's 28x28 datasets) while
    ``resnet18``/``resnet50`` default to 1000 classes and 3 channels so that a torchvision ImageNet
    checkpoint loads without extra arguments.

    Args:
        name: a name from :func:`list_models`.
        num_classes: output size of the ``fc`` head.
        in_channels: channels of the input images.
        width: base channel count (embedding dim for ViT); scales the whole network.
        **kwargs: model-specific options (e.g. ``depth`` for ``vit_tiny``).

    Raises:
        UnknownNameError: ``name`` is not registered.
        ConfigError: a size is not positive or an option is not accepted by this model.
    """
    factory = _factory(name)
    params = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
        params[key] = value
    # Check the options up front: a TypeError from deep inside a constructor would not tell the
    # user which options *are* accepted.
    sig = inspect.signature(factory)
    try:
        sig.bind(**params)
    except TypeError as exc:
        accepted = ", ".join(p for p in sig.parameters if p != "kwargs")
        raise ConfigError(f"model {name!r}: {exc}; it accepts: {accepted}") from None
    try:
        return factory(**params)
    except (MemoryError, RuntimeError, TypeError, OverflowError) as exc:  # too wide to build
        text = str(exc).lower()
        if isinstance(exc, (RuntimeError, TypeError)) and not any(
                w in text for w in ("alloc", "overflow")):
            raise
        sizes = ", ".join(f"{k} {v}" for k, v in params.items())
        raise ConfigError(f"model {name!r} ({sizes}) does not fit in memory: its weights "
                          "cannot be allocated; use a smaller width") from None


#: The largest image side the CLI takes (``--image-size``): an ImageNet model runs at 224-512,
#: and a larger side only runs the machine out of memory, slowly (a batch of 32 RGB images at
#: 5000 px is 9.6 GB in float32 before any activation). Python callers have no limit.
MAX_IMAGE_SIDE = 1024

#: The smallest: a ResNet halves the side five times.
MIN_IMAGE_SIDE = 8


def check_side_range(side: int, what: str) -> None:
    """``side`` within [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE], the one range every command and the
    pretraining config take; ``what`` names the flag or field in the message."""
    if not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
        raise ConfigError(f"{what} must be an integer in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}], "
                          f"got {side} (a ResNet halves the side five times)")


#: Sides up to which :func:`check_input_side` judges: a model that runs at 256 pixels does at
#: any larger side, and forwards up to it are cheap on the CPU.
_JUDGED_SIDE = 256


def check_input_side(name: str, side: int, *, in_channels: int = 1, width: int | None = None,
                     flag: str = "--image-size") -> None:
    """Refuse an image side that model ``name`` cannot run on, naming the smallest it takes.

    Found by forwards of one image on the CPU (a tenth of a second or so; the meta device
    would import TorchDynamo first, a second per command): a VGG at 12 px fails inside a
    pooling layer with "Output size is too small", which would otherwise surface as a
    traceback after the data has loaded, or after minutes of pretraining. Only torch's
    too-small errors count: a model that fails for another reason (a head of fixed size) is
    left to its own run.

    Raises:
        ConfigError: ``side`` is not an integer in [1, MAX_IMAGE_SIDE], or the model cannot
            take it.
    """
    import torch

    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIDE:
        raise ConfigError(f"{flag} must be an integer in [1, {MAX_IMAGE_SIDE}], got {side!r}")
    if side > _JUDGED_SIDE:
        return
    try:
        model = create_model(name, in_channels=in_channels, width=width).eval()
    except Exception:  # a model that cannot be built here: its own run will tell
        return

    def too_small(s: int) -> bool:
        """Whether a layer's output would be empty at side ``s`` (monotone in ``s``)."""
        try:
            with torch.no_grad():
                model(torch.zeros(1, in_channels, s, s))
        except RuntimeError as exc:
            return any(m in str(exc) for m in _TOO_SMALL)
        except Exception:
            return False
        return False

    if not too_small(side):
        return
    fix = f"no side up to {_JUDGED_SIDE} works"
    if not too_small(_JUDGED_SIDE):  # the smallest side that is not too small, by bisection
        lo, hi = side, _JUDGED_SIDE
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if too_small(mid) else (lo, mid)
        fix = f"pass {flag} {hi} or more"
    raise ConfigError(f"{flag} {side}: {name} cannot take {side}x{side} images (a layer's "
                      f"output would be empty); {fix}")


#: What torch's shape checks say when an input is too small for a layer (pooling, convolution).
_TOO_SMALL = ("Output size is too small", "Kernel size can't be greater", "Given input size")
