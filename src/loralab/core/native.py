"""Optional native decode of 4-bit weights: ``dequant4bit.c``, built on first use with the system C compiler.

Why: QLoRA rebuilds every frozen weight from 4 bits twice per training step (forward and backward).
In pure torch that decode is a 1-D gather that runs on one core at ~0.3 ns per value plus a handful
of op launches, ~4x slower than bitsandbytes' C++ kernel at the sizes of a 135M model (576 x 576:
~180 us vs ~55 us), which made a loralab QLoRA step slower than PEFT + bitsandbytes. The C kernel
decodes 16 values per AVX2 step (scalar elsewhere) at ~0.1 ns per value.

How: the source ships in the package. It is compiled once (``cc -O3 -ffp-contract=off -shared``, about a
second) into ``$LORALAB_CACHE/native`` (default ``~/.cache/loralab/native``) under a name hashing the
source, the compiler and the machine, written to a temporary name and renamed (two processes may race
safely), then loaded with ctypes, whose calls release the GIL. Nothing is downloaded.

Fallback: no compiler, a failed build, a non-CPU tensor, an fp16 output, or ``LORALAB_NATIVE=0``
all take the pure-torch path in :mod:`loralab.core.quant`, which is the reference: the two give
bit-identical values (tested). A build failure warns once, naming the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

SOURCE = Path(__file__).with_name("dequant4bit.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
SIMD = True  # False forces the kernel's scalar loop (tests check it against the torch decode too)
_LOCK = threading.Lock()
_STATE: dict = {"lib": None, "tried": False, "reason": "not built yet", "off": 0}


def cache_dir() -> Path:
    """``$LORALAB_CACHE/native`` or ``~/.cache/loralab/native`` (the same root as the model zoo's cache)."""
    return Path(os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab").expanduser() / "native"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    key = hashlib.sha256(b"\0".join(s.encode() for s in (SOURCE.read_text(), cc, version, platform.machine(),
                                                         *FLAGS))).hexdigest()[:16]
    target = cache_dir() / f"libloralab_dequant4bit-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[-800:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.loralab_dequantize_4bit.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, i64, i64, i64, i64, i64,
                                            ctypes.c_int, ctypes.c_int, ptr]
    lib.loralab_dequantize_4bit.restype = None
    lib.loralab_dequantize_kind.restype = ctypes.c_int
    return lib


def _switched_off() -> bool:
    return bool(_STATE["off"]) or os.environ.get("LORALAB_NATIVE", "1") == "0"


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (disabled, or it could not be built: see :func:`status`)."""
    if _switched_off():
        return None
    if not _STATE["tried"]:
        with _LOCK:
            if not _STATE["tried"]:
                try:
                    _STATE["lib"] = _build()
                    _STATE["reason"] = "avx2" if _STATE["lib"].loralab_dequantize_kind() == 2 else "scalar"
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _STATE["reason"] = f"unavailable: {exc}"
                    warnings.warn(f"loralab: native 4-bit decode {_STATE['reason']}; using the pure-torch decode "
                                  "(same values, slower). Set LORALAB_NATIVE=0 to silence this.", stacklevel=2)
                _STATE["tried"] = True
    return _STATE["lib"]


def status() -> str:
    """'avx2' / 'scalar' (native kernel in use), 'disabled', or 'unavailable: <reason>'."""
    if _switched_off():
        return "disabled"
    library()
    return _STATE["reason"]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the pure-torch decode inside the block (tests compare the two; benchmarks time both)."""
    with _LOCK:
        _STATE["off"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["off"] -= 1


def dequantize_4bit(packed: torch.Tensor, state, out: torch.Tensor, over_ranges) -> bool:
    """Decode ``packed`` (uint8, flat) with ``state`` into the flat fp32 or bf16 ``out``; False (nothing written)
    when the kernel is off or unavailable or a tensor is not a contiguous CPU tensor of the expected dtype.
    ``over_ranges(n_blocks, work)`` runs ``work(first, last)`` over block ranges (threads for large tensors)."""
    dq = state.nested_absmax is not None
    n, block = out.numel(), state.block_size
    n_blocks = -(-n // block)  # the last block may be partial
    # (tensor, dtype, elements the kernel reads): anything else takes the torch path -- never a read past the end
    if out.dtype not in (torch.float32, torch.bfloat16):
        return False
    needs = [(packed, torch.uint8, (n + 1) // 2), (state.code, torch.float32, 16), (out, out.dtype, n)]
    if dq:
        needs += [(state.absmax, torch.uint8, n_blocks), (state.nested_code, torch.float32, 256),
                  (state.nested_absmax, torch.float32, -(-n_blocks // state.nested_block_size))]
    else:
        needs.append((state.absmax, torch.float32, n_blocks))
    if not all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype and t.numel() >= count
               for t, dtype, count in needs):
        return False
    lib = library()
    if lib is None:
        return False
    absmax = state.absmax.data_ptr()
    scales = (None, absmax, state.nested_code.data_ptr(), state.nested_absmax.data_ptr(), float(state.offset),
              state.nested_block_size) if dq else (absmax, None, None, None, 0.0, 1)
    args = (packed.data_ptr(), state.code.data_ptr()) + scales
    out_ptr = out.data_ptr()
    flags = (int(SIMD), int(out.dtype == torch.bfloat16))
    over_ranges(n_blocks, lambda first, last: lib.loralab_dequantize_4bit(*args, first, last, block, n, *flags, out_ptr))
    return True
