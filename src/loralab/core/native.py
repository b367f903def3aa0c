"""Optional native kernels, built on first use with the system C compiler: ``dequant4bit.c`` (4-bit decode)
and ``dropout.c`` (LoRA dropout masks rebuilt from a seed).

Why the decode: QLoRA rebuilds every frozen weight from 4 bits twice per training step (forward and backward).
In pure torch that decode is a 1-D gather that runs on one core at ~0.3 ns per value plus a handful
of op launches, ~4x slower than bitsandbytes' C++ kernel at the sizes of a 135M model (576 x 576:
~180 us vs ~55 us), which made a loralab QLoRA step slower than PEFT + bitsandbytes. The C kernel
decodes 16 values per AVX2 step (scalar elsewhere) at ~0.1 ns per value.

Why dropout: torch's CPU generator (mt19937) is serial, ~3.8 ns per 64-bit draw, and a masked input
takes three more passes (draw, compare, multiply) and a saved mask. The kernel computes each element's
16 random bits from a counter (SplitMix64) in the same pass that applies them, so nothing is saved and
backward recomputes the mask (lora_fused.py has the torch twin, which gives the same bits).

How: the source ships in the package. It is compiled once (``cc -O3 -ffp-contract=off -shared``, about a
second) into ``$LORALAB_CACHE/native`` (default ``~/.cache/loralab/native``) under a name hashing the
source, the compiler and the machine, written to a temporary name and renamed (two processes may race
safely), then loaded with ctypes, whose calls release the GIL. Nothing is downloaded.

Fallback: no compiler, a failed build, a non-CPU tensor, an unsupported dtype, or ``LORALAB_NATIVE=0``
all take the pure-torch paths (:mod:`loralab.core.dequant`, :mod:`loralab.core.lora_fused`), which are the
reference: each pair gives bit-identical values (tested). A build failure warns once, naming the reason.
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

SOURCES = tuple(Path(__file__).with_name(n) for n in ("dequant4bit.c", "dropout.c"))
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
    parts = (*(src.read_text() for src in SOURCES), cc, version, platform.machine(), *FLAGS)
    key = hashlib.sha256(b"\0".join(part.encode() for part in parts)).hexdigest()[:16]
    target = cache_dir() / f"libloralab_native-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed on {', '.join(src.name for src in SOURCES)}: "
                                   f"{proc.stderr.strip()[-800:]}")
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
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    for name in ("loralab_dropout_mul", "loralab_dropout_addmul"):
        getattr(lib, name).argtypes = [ptr, ptr, i64, i64, u64, u32]
        getattr(lib, name).restype = None
    lib.loralab_dropout_keep.argtypes = [ptr, i64, i64, u64, u32]
    lib.loralab_dropout_keep.restype = None
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
    """Use the pure-torch paths inside the block (tests compare the two; benchmarks time both)."""
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


def _flat_cpu_fp32(*tensors: torch.Tensor) -> bool:
    n = tensors[0].numel()
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n
               for t in tensors)


def dropout(x: torch.Tensor | None, out: torch.Tensor, seed: int, drop: int, accumulate: bool = False) -> bool:
    """``out = x * keep`` (``out += x * keep`` with ``accumulate``; ``out = keep`` when x is None) with the keep
    mask of ``seed`` and ``drop`` (dropout.c); False (nothing written) unless every tensor is a contiguous
    fp32 CPU tensor of one size and the kernel is available. One thread: splitting a pass over two made
    an encoder layer's training step 4-5% slower (paired A/B; the pass sits between MKL matmuls)."""
    if not _flat_cpu_fp32(*(t for t in (x, out) if t is not None)) or not 1 <= drop <= 65535:  # 0 and 65536: torch
        return False
    lib = library()
    if lib is None:
        return False
    args = (0, out.numel(), seed & (2**64 - 1), drop)
    if x is None:
        lib.loralab_dropout_keep(out.data_ptr(), *args)
    else:
        kernel = lib.loralab_dropout_addmul if accumulate else lib.loralab_dropout_mul
        kernel(x.data_ptr(), out.data_ptr(), *args)
    return True
