"""Atomic file writing and safetensors files with metadata.

Files are written to a temporary sibling and renamed into place, so an interrupted or failed run
never leaves a half-written results file, backbone or bundle behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from xbm.errors import BundleError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A ``path`` that is a symbolic link is written through (the file it points to is replaced,
    the link stays; renaming onto the link itself replaced it by a plain file and left the
    target stale). A file being replaced keeps its permissions (a private ``chmod 600`` bundle
    stayed private); a new one gets the usual ``0666 & ~umask``. The data is flushed to disk
    before the rename, so a crash leaves the old file or the new one, never an empty one.
    """
    path = Path(path)
    target = Path(os.path.realpath(path))  # the file a link points to, or path itself
    if _is_stream(path):  # /dev/null, /dev/stdout, a named pipe: written into, not replaced
        # opened by the name given: a shell's `>(cmd)` is /dev/fd/N, a link whose real path
        # (/proc/PID/fd/pipe:[...]) cannot be opened, though the link itself can
        yield from _through_stream(path, path)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # name the file the user asked for, not a temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            mode = target.stat().st_mode & 0o7777  # an existing file keeps its permissions
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600; give the usual permissions
        os.chmod(tmp_path, mode)
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync(target.parent)  # the rename itself
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) == tmp_path:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _is_stream(path: Path) -> bool:
    """A character device or a named pipe: an output that is written into. Renaming a file
    onto it replaced the device (as root, ``--json-out /dev/null`` left a regular file at
    /dev/null that every later program then wrote into)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _through_stream(path: Path, target: Path) -> Iterator[Path]:
    """``atomic_path`` for a stream: the content is written to a temporary file elsewhere,
    then copied into the stream once complete (a stream cannot be replaced atomically; a
    failed write sends nothing)."""
    fd, tmp = tempfile.mkstemp(prefix=".xbm-out.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            with open(tmp_path, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk; where the system refuses (a folder on some
    file systems, Windows), it is skipped: the rename stays atomic for running processes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the folder that holds ``path`` while the block runs.

    A read-modify-write of a file (a task bundle that several ``xbm adapt --bundle`` runs add to
    at once) must not interleave: each run would write the bundle it read plus its own task,
    and the last write would silently drop the others' tasks. Atomic renames alone keep each
    file whole, not the updates. The lock is ``flock`` on the folder itself, so no lock file is
    left behind. Where it cannot be taken (no ``fcntl`` on Windows, a folder that cannot be
    opened for reading, a file system without locks) the block runs unlocked, as before: a
    missing lock must not cost the minutes of training that precede the write.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    # the folder of the file a link points to: that is where atomic_path writes
    folder = os.path.dirname(os.path.realpath(os.fspath(path)))
    try:
        os.makedirs(folder, exist_ok=True)  # the write would create it: lock it from the start
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder one may write but not list: the write itself says what fails
        fd = None
    try:
        if fd is not None:  # a file system without locks (some network mounts): unlocked
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sync_generated_file(path: str | os.PathLike, new: str, current: str | None, *,
                        check: bool, command: str) -> int:
    """Write or check a file generated from the code (docs/cli.md, docs/methods.md).

    The docs generators share this so that ``--check`` (what the tests run) and a rewrite
    agree on what "up to date" means.

    Returns:
        0 when the file is (now) up to date, 1 when ``check`` found it stale.
    """
    if check:
        if new != current:
            print(f"{path} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    write_text_atomic(path, new)
    return 0


def input_problem(path: str | os.PathLike) -> str | None:
    """What stops ``path`` being read as an input file, or ``None``: a folder, a dangling
    symbolic link or nothing there. Anything else that exists is read: ``/dev/null`` is the
    empty file by the Unix convention, and a pipe (``--config <(...)``) is a file's text."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "is a folder"
    if not p.exists():
        if not p.is_symlink():
            return "does not exist"
        try:  # a chain of links ends in a missing file; a loop never ends
            end = Path(p).resolve(strict=False)
            return f"is a symbolic link to {end}, which does not exist"
        except RuntimeError:  # Python < 3.13 raises it for a loop
            return "is a loop of symbolic links"
    return None


def check_output(path: str | os.PathLike, kind: str = "file", flag: str = "--out",
                 suffix: str = "", fix: str | None = None) -> Path:
    """Fail now, not after minutes of work, if ``path`` cannot be written.

    ``kind`` is ``"file"`` (written atomically next to itself, so its folder must be writable
    and it must not be a folder; ``suffix`` is the one the file path suggested for a folder
    should have) or ``"dir"`` (created if missing; must not be a file). ``fix`` replaces the
    advice to pass another path where the path is not a flag's (a cache's, say). Nothing
    is left behind: a missing folder only has to be creatable, and the nearest existing folder is
    probed with an empty temporary file, removed at once.

    Raises:
        XbmError: naming the path, the problem and the flag to change.
    """
    from xbm.errors import XbmError

    p = Path(path).expanduser()
    if kind == "dir":
        if p.exists() and not p.is_dir():
            raise XbmError(f"{flag} {p} is an existing file, not a folder; "
                           f"{fix or 'pass a folder'}")
        target = p
    else:
        if p.is_dir():
            raise XbmError(f"{flag} {p} is a folder; "
                           f"{fix or 'pass a file path such as ' + str(p / ('out' + suffix))}")
        if _is_stream(p):  # /dev/null, a pipe, a shell's >(cmd): written into (stat follows
            if not os.access(p, os.W_OK):  # links, /dev/fd/N's too)
                raise XbmError(f"{flag} {p} is not writable; {fix or 'pass a writable path'}")
            return p
        # a link is written through (atomic_path): the folder of the file it points to
        target = Path(os.path.realpath(p)).parent if p.is_symlink() else p.parent
    probe = target
    while not probe.exists():  # the nearest existing ancestor must let us create the rest
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise XbmError(f"{flag} {p}: {probe} is a file, so the folder cannot be created; "
                       f"{fix or 'pass another path'}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise XbmError(f"{flag} {p}: {probe} is not writable; {fix or 'pass a writable path'}")
    try:  # access() answers for the permission bits only: root passes it even on /proc
        fd, tmp = tempfile.mkstemp(prefix=".xbm-probe.", suffix=".tmp", dir=probe)
    except OSError as exc:
        raise XbmError(f"{flag} {p}: cannot create files in {probe} "
                       f"({exc.strerror or exc}); {fix or 'pass a writable path'}") from None
    os.close(fd)
    os.unlink(tmp)
    return p


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes), order-independent."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def metadata_hash(meta: Mapping[str, object]) -> str:
    """A hash of a file's JSON metadata (every field but ``meta_hash`` itself), in canonical
    form: a changed task record, spec or architecture is caught as the tensors' hash catches a
    changed tensor."""
    # hashed as a reader sees it: JSON makes every key a string (so {9: .., 10: ..} sorts
    # otherwise once read back), and keys of mixed types could not be sorted at all
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "meta_hash"}))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_metadata_hash(path: str | os.PathLike, meta: Mapping[str, object], what: str,
                        fix: str, holds: str = "") -> None:
    """A file's header against the ``meta_hash`` it records: a flipped byte in a recorded
    field (an architecture's width, a fault map's rates) still parses and would change what
    is built or simulated, unsaid. Files written before a format recorded it have none and
    are not checked.

    Raises:
        BundleError: the header was edited or is corrupt; ``fix`` says how to make it again
            (``holds``: what the header records, for the message).
    """
    want = meta.get("meta_hash")
    if want is not None and metadata_hash(meta) != want:
        raise BundleError(f"{path}: metadata hash mismatch; the {what}'s header"
                          f"{f' ({holds})' if holds else ''} was changed or is corrupt; {fix}")


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, object]) -> None:
    """Save tensors plus JSON-encoded metadata as one safetensors file, atomically."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in metadata.items()}
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)


def header_field(path: str | os.PathLike, key: str) -> object:
    """One JSON field of a safetensors file's header (an xbm backbone's or bundle's metadata),
    read without its tensors; None for a missing or unreadable file or field (loading the file
    says what is wrong with it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(key, "null"))
    except Exception:  # missing, a folder, not safetensors, a field that is no JSON
        return None


#: What each xbm file format is called in messages (the ``format`` field of its header).
_KINDS = {"xbm-backbone": "backbone", "xbm-task-bundle": "task bundle",
          "xbm-fault-map": "fault map"}


def xbm_file_kind(path: str | os.PathLike) -> str | None:
    """"backbone", "task bundle" or "fault map" for a file xbm wrote, by its header; None for
    anything else (a missing file included). Outputs use it so that no command writes over
    another command's file of another kind."""
    fmt = header_field(path, "format")
    return _KINDS.get(fmt.split("/")[0]) if isinstance(fmt, str) else None


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Load a safetensors file written by :func:`save_safetensors`.

    Raises:
        BundleError: the file is missing, truncated or corrupt (metadata that is not JSON, as
            another tool writes, is returned as its strings: the caller's format check names
            what the file is not).
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    problem = input_problem(path)
    if problem == "is a folder":
        raise BundleError(f"{path}: is a folder; pass the .safetensors file in it")
    if problem:  # a dangling link or a loop of links is said as such, not "no such file"
        raise BundleError(f"{path}: {'no such file' if problem == 'does not exist' else problem}"
                          "; check the path")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                tensors[key] = f.get_tensor(key)
    except BundleError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise BundleError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated, re-create it"
        ) from None
    # xbm writes JSON values; another tool's file (torch's {"format": "pt"}) is readable but not
    # xbm's, which the caller's format check then says, rather than "corrupt"
    meta: dict[str, object] = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return tensors, meta
