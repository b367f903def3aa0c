"""bitsandbytes' serialized quant state of one 4-bit tensor, both ways, validated on the way in.

A Linear4bit's weight ``<m>.weight`` (packed uint8, shape (ceil(n/2), 1)) travels with companions keyed
``<m>.weight.<key>``: ``absmax``, ``quant_map`` and, double-quantized, ``nested_absmax`` and
``nested_quant_map``; plus ``quant_state.bitsandbytes__<nf4|fp4>``, a JSON blob stored as a uint8 tensor
with quant_type, blocksize, dtype, shape (and nested_blocksize, nested_dtype, nested_offset).
transformers + bitsandbytes write and read exactly this layout ("*-bnb-4bit" repos).

Used by Linear4bit's state-dict hooks (linear4bit.py) and the checkpoint loaders (quant_io.py).
"""

from __future__ import annotations

import json

import torch

from loralab.core.quant_state import NESTED_BLOCK_SIZE, QuantState, validate_state

_BLOB = "quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_to_bnb_dict(state: QuantState) -> dict[str, torch.Tensor]:
    """bnb's packed serialized layout, keys relative to ``<module>.weight.``."""
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes has no {state.quant_type!r} format; only nf4 and fp4 can be saved")
    meta: dict = {"quant_type": state.quant_type, "blocksize": state.block_size,
                  "dtype": _dtype_name(state.dtype), "shape": list(state.shape)}
    tensors = {"absmax": state.absmax, "quant_map": state.code.clone()}
    if state.double_quant:
        tensors["nested_absmax"] = state.nested_absmax
        tensors["nested_quant_map"] = state.nested_code.clone()
        meta.update(nested_blocksize=state.nested_block_size, nested_dtype="float32",
                    nested_offset=float(state.offset.item()))
    blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    tensors[_BLOB + state.quant_type] = blob
    return tensors


def _read_meta(entries: dict[str, torch.Tensor], name: str) -> tuple[str, dict]:
    blobs = [k for k in entries if k.startswith(_BLOB)]
    if len(blobs) != 1:
        raise ValueError(f"{name}: expected exactly one '{_BLOB}nf4|fp4' entry, found {blobs}")
    try:
        meta = json.loads(bytes(entries[blobs[0]].to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}.{blobs[0]}: not a valid JSON quant-state blob ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{name}.{blobs[0]}: the quant-state blob is not a JSON object")
    for key in ("quant_type", "blocksize", "dtype", "shape"):
        if key not in meta:
            raise ValueError(f"{name}.{blobs[0]}: quant state lacks {key!r}")
    if meta["quant_type"] not in ("nf4", "fp4") or blobs[0] != _BLOB + str(meta["quant_type"]):
        raise ValueError(f"{name}: quant_type {meta['quant_type']!r} inconsistent with entry {blobs[0]!r}")
    return blobs[0], meta


def state_from_bnb_dict(entries: dict[str, torch.Tensor], name: str) -> QuantState:
    """Inverse of ``state_to_bnb_dict``; ``entries`` keyed relative to ``<name>.``.

    Every tensor is checked for the dtype and shape the decoders need (``validate_state``); errors name
    the tensor and give what was expected and found. Tensors are taken as stored, never cast: a cast
    (say of a bf16 absmax) would decode to other numbers than bitsandbytes' and hide a corrupt file.
    """
    blob, meta = _read_meta(entries, name)
    for key in ("absmax", "quant_map"):
        if key not in entries:
            raise ValueError(f"{name}.{key} is missing from the checkpoint (4-bit weight without its scales)")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name}.{blob}: dtype {meta['dtype']!r} is not a torch dtype")
    try:
        shape = tuple(int(d) for d in meta["shape"])
        block_size = int(meta["blocksize"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}.{blob}: shape {meta['shape']!r} / blocksize {meta['blocksize']!r} "
                         "are not integers") from err
    state = QuantState(meta["quant_type"], block_size, shape, dtype, entries["absmax"], entries["quant_map"])
    if "nested_absmax" in entries or "nested_offset" in meta:
        for key in ("nested_absmax", "nested_quant_map"):
            if key not in entries:
                raise ValueError(f"{name}.{key} is missing but the quant state is double-quantized")
        if "nested_offset" not in meta:
            raise ValueError(f"{name}.{blob}: nested_offset missing from a double-quantized state")
        state.nested_absmax = entries["nested_absmax"]
        state.nested_code = entries["nested_quant_map"]
        state.nested_block_size = int(meta.get("nested_blocksize", NESTED_BLOCK_SIZE))
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    validate_state(state, name)
    return state
