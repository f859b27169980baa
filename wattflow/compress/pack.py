"""The deployable format, "wattflow packed" (.wfp): only what inference needs, stored as in Deep Compression
(Han et al. 2016): pruned zeros as relative positions, shared weights as short codes, then entropy coding
(lzma stands in for the paper's Huffman coding).

    size_bytes = pack_checkpoint("out/model.kmeans4.pt", "out/model.kmeans4.wfp")
    model, spec, meta = load_packed("out/model.kmeans4.wfp")  # same logits as the checkpoint

File: b"WFP\\x01" (magic and version) + lzma ("alone" container, preset 9 | extreme) of
    uint32 LE header length | header JSON {"spec", "meta", "tensors"} | tensor parts
Only what the spec cannot say is stored: the rows of "tensors" follow `build_model(spec).state_dict()`
(names and shapes come from there). Each row gives the dtype, the encoding and each part's byte length:
    raw       [values]                      every element at its dtype, byte planes split (see _planes)
    int8      [scales fp32, codes int8]     value = code * scale[output channel], in float32
    codebook  [table fp32, codes bit-packed]  dense: code 0 is zero, code i is table[i - 1];
                                            sparse: code i is table[i] ("bits" per code)
"sparse": true stores only the nonzero elements' values/codes plus a last part of uint8 gaps (zeros skipped
before each nonzero; 255 = skip 255 zeros, no value), the flat positions of Deep Compression's relative
indices with filler entries. "sparse": "2:4" (a tensor whose last dimension is a multiple of 4 with at most 2
nonzeros in each group of 4 along it, as 2:4 semi-structured sparsity leaves it) stores exactly 2 values/codes
per group (a zero where a group has fewer nonzeros) plus a last part naming, per group, which 2 of the 4
positions are kept: one of 6 patterns, three groups to a byte (base 6), so log2(6) ≈ 2.6 bits per group —
measured on a 512×512 2:4 weight, 21.5 KB of positions after lzma against 26.8 KB as gaps (the whole tensor
1.1% smaller: its values dominate). A codebook over a 2:4 tensor codes its kept zeros as 0 ("zero": true)
only where some group has fewer than 2 nonzeros.
Per tensor the smallest of the encodings that decode back to the same values wins; a grid claimed in
meta["weight_grid"] is only used when it reproduces every value (otherwise the tensor is stored raw and the
claim is kept as written). Lossless: values are equal (torch.equal), which
maps a pruned -0.0 to +0.0. No pickle: JSON and numpy buffers only.
"""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wattflow.models import atomic_write, build_model

MAGIC = b"WFP\x01"  # the last byte is the format version
SKIP = 255  # a gap entry that skips 255 zeros and carries no value
PAIRS = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])  # 2:4 pattern code -> the kept positions
_GRID_FIELD = {"int8": "scales", "codebook": "centroids"}  # the bulky field stored as a binary part
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}

Part = bytes
Encoded = tuple[dict[str, Any], list[Part]]


def pack_checkpoint(ckpt_path, out_path) -> int:
    """Write `ckpt_path` (a wattflow checkpoint) as a .wfp file at `out_path`, atomically; return its bytes."""
    payload = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    spec, state, meta = payload["spec"], payload["state_dict"], dict(payload.get("meta", {}))
    expected = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise ValueError(f"{ckpt_path}: state_dict does not match its spec (tensors {found} vs {expected})")
    claims = meta.get("weight_grid") if isinstance(meta.get("weight_grid"), dict) else {}
    rows, parts, kept_claims = [], [], dict(claims)
    for name in expected:  # the model's order, so the loader needs no names
        row, tensor_parts = _smallest(state[name].detach().cpu().contiguous(), claims.get(name))
        if row["enc"] != "raw":  # the grid itself lives in the binary part; keep only its small fields
            kept_claims[name] = {k: v for k, v in claims[name].items() if k != _GRID_FIELD[row["enc"]]}
        rows.append({**row, "parts": [len(p) for p in tensor_parts]})
        parts += tensor_parts
    if claims:
        meta["weight_grid"] = kept_claims
    header = {"spec": spec, "meta": meta, "tensors": rows}
    data = MAGIC + _compress(_body(header, parts))
    atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))
    return len(data)


def read_packed(path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(spec, meta, state_dict) of a .wfp file, without building the model."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a wattflow packed file (bad magic)")
    body = lzma.decompress(data[len(MAGIC):], format=lzma.FORMAT_ALONE)
    size = int.from_bytes(body[:4], "little")
    header = json.loads(body[4:4 + size])
    spec, meta, rows, state, offset = header["spec"], header["meta"], header["tensors"], {}, 4 + size
    shapes = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    if len(rows) != len(shapes):
        raise ValueError(f"{path}: {len(rows)} tensors for a model of {len(shapes)}")
    for (name, shape), row in zip(shapes.items(), rows, strict=True):
        parts = []
        for length in row["parts"]:
            parts.append(body[offset:offset + length])
            offset += length
        state[name], grid = _decode({**row, "shape": shape}, parts)
        if grid is not None:  # put the grid claim back as the checkpoint had it
            meta["weight_grid"][name][_GRID_FIELD[row["enc"]]] = grid.tolist()
    if offset != len(body):
        raise ValueError(f"{path}: {len(body) - offset} trailing bytes after the last tensor")
    return spec, meta, state


def load_packed(path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model in eval mode at the stored dtype, spec, meta), like `wattflow.models.load_checkpoint`."""
    spec, meta, state = read_packed(path)
    model = build_model(spec)
    model.to(next(iter(state.values())).dtype).load_state_dict(state)
    return model.eval(), spec, meta


def _body(header: dict[str, Any], parts: list[Part]) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return len(text).to_bytes(4, "little") + text + b"".join(parts)


def _compress(data: bytes) -> bytes:
    """The smaller of lzma's default literal context and none (lc=lp=pb=0: better on these binary parts,
    measured ~2%); the "alone" header records which, so the reader needs no option."""
    # A dictionary no larger than the data compresses the same and spares the reader a 64 MiB buffer.
    dict_size = min(max(len(data), 4096), 1 << 26)
    base = {"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}
    return min((lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[{**base, **props}])
                for props in ({}, {"lc": 0, "lp": 0, "pb": 0})), key=len)


# --- choosing an encoding -------------------------------------------------------------------------------

def _smallest(t: torch.Tensor, claim: Any) -> Encoded:
    """The candidate that compresses smallest on its own among those that decode to exactly `t`."""
    best, best_bytes = None, math.inf
    for row, parts in _candidates(t, claim):
        row = {"dtype": _dtype_name(t.dtype), **row}
        decoded, _ = _decode({**row, "shape": tuple(t.shape)}, parts)
        if not _identical(decoded, t):
            continue
        size = len(_compress(b"".join(parts)))
        if size < best_bytes:
            best, best_bytes = (row, parts), size
    assert best is not None, "raw encoding must always round-trip"
    return best


def _candidates(t: torch.Tensor, claim: Any):
    flat = t.reshape(-1)
    mask = (flat != 0).numpy()
    sparse = not mask.all()
    semi = _two_of_four(mask, t.shape)  # (kept mask, pattern part) where the tensor is 2:4 sparse, else None
    yield {"enc": "raw", "sparse": False}, [_planes(flat)]
    if sparse:
        yield {"enc": "raw", "sparse": True}, [_planes(flat[torch.from_numpy(mask)]), _gaps(mask)]
    if semi is not None:
        yield {"enc": "raw", "sparse": "2:4"}, [_planes(flat[torch.from_numpy(semi[0])]), semi[1]]
    if not isinstance(claim, dict) or claim.get("kind") not in _GRID_FIELD or not t.is_floating_point():
        return
    grid = _float32_list(claim.get(_GRID_FIELD[claim["kind"]]))
    if grid is None or t.numel() == 0:
        return
    values = flat.double().numpy()
    if claim["kind"] == "int8":
        codes = _int8_codes(values, grid, t.shape)
        if codes is not None:
            yield {"enc": "int8", "sparse": False}, [grid.tobytes(), codes.tobytes()]
            if sparse:
                yield {"enc": "int8", "sparse": True}, [grid.tobytes(), codes[mask].tobytes(), _gaps(mask)]
            if semi is not None:
                yield {"enc": "int8", "sparse": "2:4"}, [grid.tobytes(), codes[semi[0]].tobytes(), semi[1]]
        return
    codes = _table_codes(values, grid)  # index into [0, *grid]
    if codes is not None and len(grid) < 256:
        bits = _bits(len(grid) + 1)
        yield {"enc": "codebook", "sparse": False, "bits": bits}, [grid.tobytes(), _pack_bits(codes, bits)]
        if sparse:
            bits = _bits(len(grid))
            nonzero = codes[mask] - 1
            yield {"enc": "codebook", "sparse": True, "bits": bits}, [grid.tobytes(), _pack_bits(nonzero, bits),
                                                                    _gaps(mask)]
        if semi is not None:
            kept = codes[semi[0]]
            zero = bool((kept == 0).any())  # kept zeros need code 0 for zero, as dense codes have
            bits = _bits(len(grid) + zero)
            yield ({"enc": "codebook", "sparse": "2:4", "bits": bits, "zero": zero},
                   [grid.tobytes(), _pack_bits(kept if zero else kept - 1, bits), semi[1]])


def _float32_list(values: Any) -> np.ndarray | None:
    """The claim's numbers as float32, or None unless each one is exactly a finite float32."""
    if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
        return None
    grid = np.asarray(values, dtype=np.float32)
    exact = np.array_equal(grid.astype(np.float64), np.asarray(values, dtype=np.float64))
    return grid if exact and np.isfinite(grid).all() else None


def _int8_codes(values: np.ndarray, scales: np.ndarray, shape: torch.Size) -> np.ndarray | None:
    if len(shape) == 0 or len(scales) != shape[0]:
        return None
    rows = values.reshape(len(scales), -1)
    scale = scales.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(scale > 0, np.rint(rows / np.where(scale > 0, scale, 1.0)), 0.0)
    if not np.isfinite(codes).all() or np.abs(codes).max() > 127:
        return None  # not on the grid; the decode check would also catch it
    return codes.astype(np.int8).reshape(-1)


def _table_codes(values: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """Code of each value in [0, *table] (0 for zero, else 1 + the first equal table entry)."""
    order = np.argsort(table, kind="stable")
    ranks = np.clip(np.searchsorted(table[order], values), 0, max(len(table) - 1, 0))
    if len(table) == 0:
        codes = np.zeros(len(values), np.int64)
    else:
        codes = np.where(table[order][ranks] == values, order[ranks] + 1, -1)
    codes[values == 0] = 0
    return None if (codes < 0).any() else codes.astype(np.uint8)


# --- decoding -------------------------------------------------------------------------------------------

def _decode(row: dict[str, Any], parts: list[Part]) -> tuple[torch.Tensor, np.ndarray | None]:
    """(tensor, the grid stored in the parts or None for raw)."""
    dtype, shape = _DTYPES[row["dtype"]], tuple(row["shape"])
    numel = math.prod(shape)
    if row["sparse"] == "2:4":
        mask = _two_of_four_mask(parts[-1], numel)
    else:
        mask = _positions_mask(parts[-1], numel) if row["sparse"] else None
    count = numel if mask is None else int(mask.sum())
    grid = None
    if row["enc"] == "raw":
        values = _unplanes(parts[0], dtype, count)
    else:
        grid = np.frombuffer(parts[0], np.float32)
        if row["enc"] == "int8":
            scale = np.repeat(grid, numel // max(len(grid), 1))  # one scale per output channel
            scale = scale if mask is None else scale[mask]
            # the float32 product, exactly what snap_int8 computed
            found = np.frombuffer(parts[1], np.int8).astype(np.float32) * scale
        else:
            codes = _unpack_bits(parts[1], row["bits"], count)
            zero_coded = mask is None or row.get("zero", False)  # code 0 is zero, code i is grid[i - 1]
            table = np.concatenate([[np.float32(0)], grid]) if zero_coded else grid
            found = table[codes]
        values = torch.from_numpy(np.ascontiguousarray(found, np.float32)).to(dtype)
    if len(values) != count:
        raise ValueError(f"{len(values)} values for a tensor of {count} elements")
    if mask is None:
        return values.reshape(shape), grid
    out = torch.zeros(numel, dtype=dtype)
    out[torch.from_numpy(mask)] = values
    return out.reshape(shape), grid


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a, b) or bytes(_planes(a.reshape(-1))) == bytes(_planes(b.reshape(-1)))  # NaN: bitwise


# --- byte-level codecs ----------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"cannot pack a {dtype} tensor; supported: {', '.join(_DTYPES)}")
    return name


def _planes(flat: torch.Tensor) -> bytes:
    """Element bytes regrouped by position (all first bytes, then all second bytes, ...): the sign/exponent
    bytes of floats are nearly constant and compress well once they sit together."""
    raw = flat.contiguous().view(torch.uint8).numpy()
    width = flat.element_size()
    return raw.reshape(-1, width).T.tobytes()


def _unplanes(data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    width = torch.empty(0, dtype=dtype).element_size()
    if len(data) != count * width:
        raise ValueError(f"raw part has {len(data)} bytes, expected {count * width}")
    raw = np.frombuffer(data, np.uint8).reshape(width, count).T.copy()
    return torch.from_numpy(raw.reshape(-1)).view(dtype)


def _gaps(mask: np.ndarray) -> bytes:
    """uint8 zero-run lengths before each nonzero; a run of 255 or more is split with SKIP fillers."""
    positions = np.flatnonzero(mask)
    runs = np.diff(positions, prepend=-1) - 1
    fillers, rest = np.divmod(runs, SKIP)
    entries = fillers + 1
    out = np.full(int(entries.sum()), SKIP, np.uint8)
    out[np.cumsum(entries) - 1] = rest
    return out.tobytes()


def _positions_mask(data: bytes, numel: int) -> np.ndarray:
    gaps = np.frombuffer(data, np.uint8).astype(np.int64)
    ends = np.cumsum(np.where(gaps == SKIP, SKIP, gaps + 1)) - 1
    positions = ends[gaps != SKIP]
    if len(positions) and positions[-1] >= numel:
        raise ValueError(f"sparse position {positions[-1]} outside a tensor of {numel} elements")
    mask = np.zeros(numel, bool)
    mask[positions] = True
    return mask


def _two_of_four(mask: np.ndarray, shape: torch.Size) -> tuple[np.ndarray, bytes] | None:
    """(kept mask: exactly 2 per group of 4 along the last dimension, the nonzeros first; pattern codes packed
    base 6) where every group holds at most 2 nonzeros, else None."""
    if len(shape) < 1 or shape[-1] % 4 or mask.size == 0:
        return None
    groups = mask.reshape(-1, 4)
    if (groups.sum(1) > 2).any():
        return None
    # Fill each group up to 2 kept positions with its first zeros: the order of keys puts nonzeros first.
    order = np.argsort(~groups, axis=1, kind="stable")[:, :2]
    order.sort(axis=1)
    codes = (PAIRS[None, :, :] == order[:, None, :]).all(2).argmax(1)
    kept = np.zeros_like(groups)
    np.put_along_axis(kept, order, True, axis=1)
    triples = np.concatenate([codes, np.zeros(-len(codes) % 3, codes.dtype)]).reshape(-1, 3)
    return kept.reshape(-1), (triples @ np.array([36, 6, 1])).astype(np.uint8).tobytes()


def _two_of_four_mask(data: bytes, numel: int) -> np.ndarray:
    if numel % 4:
        raise ValueError(f"a 2:4 tensor needs a multiple of 4 elements, got {numel}")
    packed = np.frombuffer(data, np.uint8).astype(np.int64)
    if len(packed) != -(-numel // 12) or (packed >= 216).any():
        raise ValueError("2:4 pattern part of the wrong length, or a code out of range")
    codes = np.stack([packed // 36, packed // 6 % 6, packed % 6], axis=1).reshape(-1)[:numel // 4]
    kept = np.zeros((numel // 4, 4), bool)
    np.put_along_axis(kept, PAIRS[codes], True, axis=1)
    return kept.reshape(-1)


def _bits(n_codes: int) -> int:
    return max(1, math.ceil(math.log2(max(n_codes, 1))))


def _pack_bits(codes: np.ndarray, bits: int) -> bytes:
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    return np.packbits(((codes.astype(np.uint8)[:, None] >> shifts) & 1).reshape(-1)).tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    bit_rows = np.unpackbits(np.frombuffer(data, np.uint8))[:count * bits].reshape(count, bits)
    return bit_rows.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
