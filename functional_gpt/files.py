"""Writing files so that nothing on disk is lost: a temp file beside the target, renamed
over it only when complete; every OS error on the way is one line naming the path."""

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .checks import check_path
from .errors import UserError


def os_error(path: str | os.PathLike, e: OSError, doing: str = "cannot write") -> UserError:
    """A one-line UserError for an OSError met while working on `path`, e.g.
    "runs/x/model.safetensors: cannot write (No space left on device)"."""
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"{path}: {doing} ({reason})")


def make_dir(path: str | os.PathLike) -> Path:
    """Create directory `path` (and its parents) if needed, and check that a file can be
    created in it; -> the Path. A path under a file, an existing file, a read-only or full
    place: one-line UserError naming `path`."""
    path = check_path("path", path, "a directory")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise os_error(path, e, "cannot write into this directory") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on a clean exit rename it over `path`.

    On any error the temp file is removed and whatever was at `path` stays untouched, so
    a crash or kill mid-write never leaves a half-written file under the real name. An
    OSError (disk full, permission denied, a parent that is a file) becomes a one-line
    UserError naming `path`. Only a regular file is ever replaced: a symbolic link is
    followed (its target is replaced, the link stays), a character device (/dev/null,
    /dev/stdout, a terminal) gets the finished file's bytes written into it, and anything
    else that is not a regular file (a FIFO, a socket, a block device) is refused.
    """
    path = check_path("path", path, "a file to write")
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a file")
    kind = _special_kind(path)
    if kind is not None and kind != "character device":
        raise UserError(f"{path}: is a {kind}, not a regular file; refusing to replace it")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{path}: cannot write ({above} is a file, not a directory)")
    if kind == "character device":  # written whole into a temp file, then copied in: writers may replace a path
        fd, name = tempfile.mkstemp(prefix="fgpt-", suffix=path.suffix)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if kind == "character device":
            with open(tmp, "rb") as source, open(path, "wb") as device:
                shutil.copyfileobj(source, device)
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        raise os_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _special_kind(path: Path) -> str | None:
    """What `path` is when it exists and is neither a regular file nor a directory."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return None


def save_png(fig, path: str | os.PathLike) -> None:
    """Write matplotlib figure `fig` to `path` as a PNG (100 dpi), atomically, and close
    it, also when the write fails (a figure left open is memory held until exit)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
