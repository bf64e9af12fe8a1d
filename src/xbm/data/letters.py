"""Synthetic ``letters`` task: the 26 capital letters rendered from matplotlib's bundled fonts.

A notMNIST-like task that needs no download: every matplotlib install ships the same TrueType
fonts. Each glyph is rendered once per font as a clean prototype (fitted into a 20x20 box centred in
28x28, like MNIST digits), then every sample is a prototype under a random affine transform
(rotation, scale, shear, translation, applied to whole batches with ``grid_sample``)
plus Gaussian pixel noise. This makes generation take well under a second, and the result is
cached anyway so every run of a study trains on byte-identical data.

Train and test use all fonts but disjoint random streams (``seed*2`` and ``seed*2+1``), so test
images are new random renderings of the same font styles, not copies of training images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import string
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from xbm.data.registry import cache_dir, register_dataset
from xbm.data.splits import generator
from xbm.data.task import TaskData
from xbm.errors import DatasetNotFoundError, XbmWarning, user_stacklevel
from xbm.io import atomic_path

#: Bump when the generation procedure changes so stale caches are not reused.
LETTERS_VERSION = "letters-v2"
LETTERS_CLASSES = list(string.ascii_uppercase)

#: Fonts used, in this order (file names under ``matplotlib.get_data_path()/fonts/ttf``): every
#: bundled family with ordinary Latin capitals at their ASCII code points: DejaVu Sans, Sans Mono
#: and Serif in 4 styles each, STIX General in 4 styles, and 5 Computer Modern text fonts. Left
#: out: the *Display variants (no Latin glyphs), LastResort, STIX size/NonUni symbol fonts and the
#: cmmi/cmsy/cmex math fonts, whose code points hold symbols instead of letters.
LETTERS_FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
]

# Augmentation ranges (documented in the module docstring of the task).
ROTATION_DEG = 15.0
SCALE_RANGE = (0.8, 1.1)
SHEAR_RANGE = 0.2  # x-shear factor, uniform in [-0.2, 0.2]
TRANSLATE_PX = 2.0
NOISE_STD_RANGE = (0.02, 0.10)  # per-image std of additive Gaussian noise, on the [0, 1] scale


def font_paths() -> list[Path]:
    """The :data:`LETTERS_FONTS` files present in this matplotlib install.

    Raises:
        DatasetNotFoundError: matplotlib or all its fonts are missing.
    """
    try:
        import matplotlib
    except ImportError:
        raise DatasetNotFoundError("letters: matplotlib is not installed; install it with "
                                   "`pip install matplotlib`") from None
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / f for f in LETTERS_FONTS if (folder / f).is_file()]
    if not paths:
        raise DatasetNotFoundError(f"letters: no bundled fonts found in {folder}; reinstall "
                                   "matplotlib with `pip install --force-reinstall matplotlib`")
    return paths


def render_prototypes(paths: list[Path], image_size: int = 28) -> torch.Tensor:
    """Clean glyphs as float (fonts, 26, size, size) in [0, 1], fitted in a 20/28 box, centred.

    Memoised per process (rendering ~550 glyphs takes ~0.4 s and they never change); a copy is
    returned so callers may modify it.
    """
    return _render_prototypes(tuple(str(p) for p in paths), image_size).clone()


@functools.lru_cache(maxsize=4)
def _render_prototypes(paths: tuple[str, ...], image_size: int) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    box = max(1, round(image_size * 20 / 28))
    out = torch.zeros(len(paths), len(LETTERS_CLASSES), image_size, image_size)
    for fi, path in enumerate(paths):
        font = ImageFont.truetype(str(path), 96)
        for ci, ch in enumerate(LETTERS_CLASSES):
            canvas = Image.new("L", (192, 192), 0)
            ImageDraw.Draw(canvas).text((48, 24), ch, font=font, fill=255)
            bbox = canvas.getbbox()
            if bbox is None:  # font lacks the glyph: leave the prototype blank
                continue
            glyph = canvas.crop(bbox)
            w, h = glyph.size
            scale = box / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            glyph = glyph.resize((nw, nh), Image.Resampling.LANCZOS)
            tile = Image.new("L", (image_size, image_size), 0)
            tile.paste(glyph, ((image_size - nw) // 2, (image_size - nh) // 2))
            out[fi, ci] = torch.frombuffer(bytearray(tile.tobytes()), dtype=torch.uint8).view(
                image_size, image_size).float() / 255.0
    return out


def _augment(protos: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``per_class`` random affine + noise renderings of every letter, as uint8."""
    n_fonts, n_cls, size, _ = protos.shape
    n = per_class * n_cls
    g = generator(seed)
    y = torch.arange(n_cls).repeat_interleave(per_class)
    font = torch.randint(n_fonts, (n,), generator=g)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    angle = uniform(-ROTATION_DEG, ROTATION_DEG) * (math.pi / 180.0)
    scale = uniform(*SCALE_RANGE)
    shear = uniform(-SHEAR_RANGE, SHEAR_RANGE)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (TRANSLATE_PX * 2.0 / size)  # normalised
    noise_std = uniform(*NOISE_STD_RANGE)
    noise = torch.randn(n, 1, size, size, generator=g)

    # Forward map of the glyph: M = R @ Shear @ S, then shift; grid_sample needs the inverse map
    # (output pixel -> input pixel): p_in = M^-1 @ p_out - M^-1 @ shift. letters-v1 (float32
    # torch.cos/sin, batched matmuls, affine_grid) rendered other bytes for the same seed in 1
    # of 10 fresh processes here. A float64 version without matmuls or affine_grid still did
    # in 1 of 26, and the hashes of its steps put the difference in torch.cos of the 13,000
    # angles (the cause inside the kernel was not pinned down). So the angles go through
    # Python's math.cos/sin, and everything after is elementwise +, -, *, / in float64, which
    # IEEE rounding fixes whatever way a kernel splits its work (118 of 118 processes agreed).
    f64 = torch.float64
    angles = angle.tolist()
    cos = torch.tensor([math.cos(a) for a in angles], dtype=f64)
    sin = torch.tensor([math.sin(a) for a in angles], dtype=f64)
    scale, shear, shift = scale.to(f64), shear.to(f64), shift.to(f64)
    m00, m01 = cos * scale, (cos * shear - sin) * scale
    m10, m11 = sin * scale, (sin * shear + cos) * scale
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    t0 = -(i00 * shift[:, 0] + i01 * shift[:, 1])
    t1 = -(i10 * shift[:, 0] + i11 * shift[:, 1])
    # Pixel centres in normalised coordinates (align_corners=False): (2j + 1) / size - 1.
    lin = (torch.arange(size, dtype=f64) * 2 + 1) / size - 1
    px, py = lin.view(1, 1, size), lin.view(1, size, 1)

    def per(v: torch.Tensor) -> torch.Tensor:
        return v.view(n, 1, 1)

    grid = torch.stack([per(i00) * px + per(i01) * py + per(t0),
                        per(i10) * px + per(i11) * py + per(t1)], dim=-1)
    src = protos[font, y].unsqueeze(1).to(f64)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + noise.to(f64) * per(noise_std.to(f64)).unsqueeze(1)
    return (x.clamp_(0, 1) * 255).round_().to(torch.uint8), y


def _cache_key(paths: list[Path], n_train: int, n_test: int, seed: int, image_size: int) -> dict:
    import matplotlib
    import PIL

    # Font files and the FreeType/Pillow rasteriser can change between versions; keying on them
    # regenerates the data rather than silently mixing renderings.
    return {"version": LETTERS_VERSION, "n_train": n_train, "n_test": n_test, "seed": seed,
            "image_size": image_size, "fonts": [p.name for p in paths],
            "matplotlib": matplotlib.__version__, "pillow": PIL.__version__,
            "torch": torch.__version__.split("+")[0]}


def _cache_file(cache: str | os.PathLike | None, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache if cache is not None else cache_dir()) / "letters" / \
        f"{LETTERS_VERSION}-{digest}.pt"


#: The registered task's sizes (``make_letters``' defaults, read when it is called).
TRAIN_PER_CLASS, TEST_PER_CLASS, IMAGE_SIZE = 500, 100, 28
_FIELDS = ("train_x", "train_y", "test_x", "test_y")


def _load_rendering(path: Path) -> tuple[dict, TaskData] | None:
    """(recorded key, task) of the rendering stored in ``path``; None for a missing, corrupt
    or foreign file."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - corrupt or foreign: not a rendering
        return None
    if not isinstance(blob, dict) or not isinstance(blob.get("key"), dict) or \
            any(k not in blob for k in _FIELDS):
        return None
    return blob["key"], TaskData("letters", *(blob[k] for k in _FIELDS),
                                 list(LETTERS_CLASSES))


def _read_cache(cache_file: Path, key: dict) -> TaskData | None:
    """The rendering stored in ``cache_file`` if it is one of ``key``'s parameters; None for a
    missing, corrupt or foreign file."""
    found = _load_rendering(cache_file)
    return found[1] if found is not None and found[0] == key else None


def make_letters(n_train_per_class: int | None = None, n_test_per_class: int | None = None,
                 seed: int = 0, image_size: int | None = None,
                 cache: str | os.PathLike | None = None, use_cache: bool = True) -> TaskData:
    """Generate (or load from cache) the letters task.

    Args:
        n_train_per_class: training images per letter (default :data:`TRAIN_PER_CLASS`, 500:
            13,000 in all).
        n_test_per_class: test images per letter (default :data:`TEST_PER_CLASS`, 100: 2,600 in
            all).
        seed: generation seed; the same seed gives byte-identical data.
        image_size: image side (default :data:`IMAGE_SIZE`, 28).
        cache: cache directory; defaults to :func:`~xbm.data.registry.cache_dir`. Files go to
            ``<cache>/letters/<version>-<hash of parameters>.pt``; a corrupt one is rendered anew
            and replaced.
        use_cache: read and write the cache; ``False`` always regenerates and writes nothing.
    """
    n_train = TRAIN_PER_CLASS if n_train_per_class is None else n_train_per_class
    n_test = TEST_PER_CLASS if n_test_per_class is None else n_test_per_class
    size = IMAGE_SIZE if image_size is None else image_size
    paths = font_paths()
    key = _cache_key(paths, n_train, n_test, seed, size)
    cache_file = _cache_file(cache, key)
    if use_cache and (task := _read_cache(cache_file, key)) is not None:
        return task
    protos = render_prototypes(paths, size)
    train_x, train_y = _augment(protos, n_train, seed * 2)
    test_x, test_y = _augment(protos, n_test, seed * 2 + 1)
    task = TaskData("letters", train_x, train_y, test_x, test_y, list(LETTERS_CLASSES))
    if use_cache:
        blob = {"key": key, **{k: getattr(task, k) for k in _FIELDS}}
        try:
            with atomic_path(cache_file) as tmp:
                torch.save(blob, tmp)
        except OSError as exc:  # a read-only cache must not stop training
            warnings.warn(f"letters: could not write cache {cache_file} ({exc}); set XBM_CACHE "
                          "to a writable directory to avoid regenerating", XbmWarning, stacklevel=2)
    return task


@register_dataset("letters")
def load_letters(root: str | None = None, seed: int = 0) -> TaskData:
    """The letters task with default sizes.

    A data root is read, never written: a rendering found in ``<root>/letters`` (copied from
    another machine's cache, say) is used; otherwise (none there, or a corrupt one) the task
    is rendered and cached in :func:`~xbm.data.registry.cache_dir`, as without a root. A data
    root holds the user's copies of the packaged datasets, and may be shared or read-only.
    """
    if root is not None:  # a corrupt copy there is left alone
        key = _cache_key(font_paths(), TRAIN_PER_CLASS, TEST_PER_CLASS, seed, IMAGE_SIZE)
        task = _copied_rendering(_cache_file(root, key), key)
        if task is not None:
            return task
    return make_letters(seed=seed)


#: Key fields that make a rendering another one; the rest name the libraries that drew it.
_RENDERING_FIELDS = ("version", "n_train", "n_test", "seed", "image_size", "fonts")


def _copied_rendering(exact: Path, key: dict) -> TaskData | None:
    """A rendering copied into a data root (``exact``: the name this machine's key gives it):
    that one first, else one from a machine with other library versions, whose file name
    hashes those versions too, found by its recorded parameters. Copying it is how a user asks
    for those very images; one drawn with other parameters (another seed) is not used, and the
    user is told why their copy was passed over."""
    folder = exact.parent
    files = sorted(sorted(folder.glob("*.pt")), key=lambda f: f != exact) if folder.is_dir() else []
    want = {k: key[k] for k in _RENDERING_FIELDS}
    seen = []
    for f in files:
        found = _load_rendering(f)
        if found is None:
            continue
        got, task = found
        if {k: got.get(k) for k in _RENDERING_FIELDS} == want:
            return task
        older = got.get("version") != key["version"]  # an older renderer's images
        seen.append(f"{f.name} (" + (f"{got.get('version')}, another renderer's images: "
                                     "copy a rendering made with this version, " if older
                                     else "") +
                    f"seed {got.get('seed')}, {got.get('n_train')}/{got.get('n_test')} per "
                    f"class, side {got.get('image_size')}" +
                    ("" if older or got.get("fonts") == key["fonts"] else ", other fonts") + ")")
    if files:
        warnings.warn(
            f"letters: {folder} holds no rendering of this task's parameters (seed {key['seed']}, "
            f"{key['n_train']}/{key['n_test']} per class, side {key['image_size']}, fonts "
            f"{', '.join(key['fonts'])}, letters {key['version']}); found "
            f"{'; '.join(seen) if seen else 'only unreadable files'}: using the cache's "
            "rendering (rendered now if it has none)",
            XbmWarning, stacklevel=user_stacklevel())
    return None

