"""Plain-torch reference math: masks, compressed formats, int8 quantization.

This is both the oracle the tests trust and the CPU runtime, so it is written to be read by eye.
Every function works on a weight viewed as rows `[out, K]` with K the reduction dimension
(`weight_to_rows`): Linear `[out, in]` as is, Conv2d `[out, in/groups*kh*kw]` flattened in memory
order, and a matmul right operand `[K, N]` transposed.

Ties in magnitude are broken by the lower index (a stable descending sort keeps index order among
equal keys); -0.0 ties with 0.0, NaN ranks above inf (torch.sort's order) and NaNs tie among
themselves. Masks are explicit boolean tensors, never inferred from `weight != 0`.
"""
from __future__ import annotations

import math

import torch

from sparsec import flat_top
from sparsec.errors import InvalidInputError

# Row-wise masks and compression run over slices of at most this many weights at a time: a sort
# makes int64 indices and copies (~20 bytes per weight in all), which for one 32768 x 4096 bf16 layer
# came to 8x the layer's size at once; a slice's temporaries stay a few tens of MB.
ROW_CHUNK_WEIGHTS = 1 << 22


def by_row_chunks(fn, *tensors: torch.Tensor):
    """`fn(*tensors)` for a row-wise `fn` (row r of each output depends on row r of each input alone),
    computed on slices of the leading dim and written into outputs allocated once: the same result,
    with temporaries the size of one slice. `fn` returns a tensor or a tuple of them."""
    first = tensors[0]
    if any(t.shape[:1] != first.shape[:1] for t in tensors):  # (a slice would pair rows with nothing)
        raise InvalidInputError(f"row-wise inputs of shapes {', '.join(str(tuple(t.shape)) for t in tensors)} do not "
                                f"have the same number of rows")
    if first.dim() < 2 or first.numel() <= ROW_CHUNK_WEIGHTS:
        return fn(*tensors)
    outputs = None
    for start, parts in row_slices(*tensors):
        part = fn(*parts)
        single = isinstance(part, torch.Tensor)
        part = (part,) if single else part
        if outputs is None:
            outputs = tuple(p.new_empty((first.shape[0], *p.shape[1:])) for p in part)
        for out, p in zip(outputs, part):
            out[start:start + p.shape[0]] = p
    return outputs[0] if single else outputs


def row_slices(*tensors: torch.Tensor):
    """(first row, the tensors' slices of rows from it), slices of at most ROW_CHUNK_WEIGHTS weights of the
    first tensor (one row at least), covering every row."""
    rows = tensors[0].shape[0]
    step = max(1, ROW_CHUNK_WEIGHTS // max(1, tensors[0][0].numel())) if rows else 1
    for start in range(0, max(rows, 1), step):  # (no rows: one empty slice, so what is built from them is empty)
        yield start, tuple(t[start:start + step] for t in tensors)


def nm_group_counts(mask: torch.Tensor, m: int) -> list[int]:
    """The distinct counts of kept entries in a mask's groups of m consecutive ones along its last dim,
    ascending ([n] for a valid n:m mask): what an error about a mask that is not n:m names."""
    return sorted(mask.reshape(-1, m).sum(-1, dtype=torch.int32).unique().tolist())


def kept_per_row(mask: torch.Tensor) -> torch.Tensor:
    """int64 count of True entries along the last dim, a slice at a time (a bool sum converts its whole
    input to int64 first: 8 bytes per weight)."""
    return by_row_chunks(lambda part: part.sum(-1), mask)


def count_nonfinite(t: torch.Tensor) -> int:
    """How many entries of `t` are NaN or +-inf, counted a slice at a time (isfinite's temporaries of a
    whole large weight were several times its size)."""
    flat = t.detach().reshape(-1)  # a view of a contiguous weight, a copy of any other
    return sum(int((~torch.isfinite(part)).sum()) for part in flat.split(ROW_CHUNK_WEIGHTS))


# --------------------------------------------------------------------------- layouts


def weight_to_rows(weight: torch.Tensor, op: str) -> torch.Tensor:
    """View a layer's weight as `[out, K]` with K the reduction dimension."""
    if op == "matmul":  # y = x @ W, W is [K, N]: the reduction runs down W's columns
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def rows_to_weight(rows: torch.Tensor, op: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `weight_to_rows`."""
    if op == "matmul":
        return rows.t().contiguous()
    return rows.reshape(shape)


# --------------------------------------------------------------------------- masks


def magnitude(t: torch.Tensor) -> torch.Tensor:
    """A key ordering entries by |t|, the one masks rank by: |t| itself (NaN sorts above everything), but
    |t| - 1 for signed integers, computed as ~min(t, -t), which cannot overflow: abs() of int8 -128 is
    -128, so the largest magnitude ranked as the smallest and was pruned first."""
    t = t.detach()
    if t.dtype.is_floating_point or t.dtype.is_complex or not t.dtype.is_signed:
        return t.abs()
    return torch.bitwise_not(torch.minimum(t, t.neg()))


def _top_along_last(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` largest entries along the last dim; ties go to the lower index.
    (Out of place, from zeros_like: torch.func.vmap refuses an in-place scatter into a fresh unbatched
    buffer, and SDGP's backward, which prunes with nm_mask, runs batched under vmap.)"""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, True)


def nm_mask(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest-magnitude weights in every group of m consecutive ones along the last dim."""
    if rows.shape[-1] % m:
        raise InvalidInputError(f"last dimension {rows.shape[-1]} is not a multiple of M={m}")
    # (the group count spelled out, not -1: a tensor with no rows has no groups to infer it from)
    groups = magnitude(rows).reshape(*rows.shape[:-1], rows.shape[-1] // m, m)
    return _top_along_last(groups, n).reshape(rows.shape)


def fanin_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest-magnitude weights of every row (constant fan-in)."""
    if not 1 <= k <= rows.shape[-1]:
        raise InvalidInputError(f"fan-in k={k} must be in [1, {rows.shape[-1]}]")
    return _top_along_last(magnitude(rows), k)


def unstructured_mask(rows: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the `keep` largest-magnitude weights of the whole layer, wherever they are; ties go to the
    lower flat index of the rows view `[out, K]` (row-major)."""
    if not 0 <= keep <= rows.numel():
        raise InvalidInputError(f"cannot keep {keep} of {rows.numel()} weights")
    # the same mask, in bounded memory (not under torch.func transforms: vmap batches its histograms)
    if rows.numel() > ROW_CHUNK_WEIGHTS and flat_top.selectable(rows) and \
            not torch._C._functorch.is_functorch_wrapped_tensor(rows):
        return flat_top.largest_mask(rows, keep, ROW_CHUNK_WEIGHTS)
    return _top_along_last(magnitude(rows).reshape(-1), keep).reshape(rows.shape)


# --------------------------------------------------------------------------- N:M compressed format


def _kept_positions(mask_groups: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending in-group positions of the True entries of a mask with exactly n per group."""
    return torch.sort(mask_groups.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]


def pack_nibbles(positions: torch.Tensor) -> torch.Tensor:
    """2:4 metadata: positions `[..., G, 2]` (i0 < i1) -> int16 `[..., ceil(G/4)]`.

    Group g is the nibble `i0 | i1 << 2` at bits `4 * (g % 4)` of element `g // 4` (the `mma.sp`
    encoding before CUTLASS reordering). Unused trailing nibbles are 0.
    """
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.int32)
    groups = nibbles.shape[-1]
    pad = (-groups) % 4
    # (the word count spelled out, not -1: a tensor with no rows has no words to infer it from)
    nibbles = torch.nn.functional.pad(nibbles, (0, pad)).reshape(*nibbles.shape[:-1], (groups + pad) // 4, 4)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=positions.device)
    words = (nibbles << shifts).sum(-1)  # in [0, 65535]
    words = torch.where(words >= 32768, words - 65536, words)  # reinterpret as signed int16
    return words.to(torch.int16)


def unpack_nibbles(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: int16 `[..., W]` -> int64 positions `[..., groups, 2]`."""
    words = meta.to(torch.int32) & 0xFFFF
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=meta.device)
    nibbles = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(*meta.shape[:-1], -1)[..., :groups]
    return torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], dim=-1).long()


def nm_compress_masked(rows: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress `rows` keeping exactly the masked positions (exactly n of every m).

    Returns `values[..., K*n/m]` (kept values in index order) and `meta`: the nibble int16
    `[..., ceil(K/16)]` for 2:4, otherwise int16 in-group positions `[..., K*n/m]`.
    """
    k = rows.shape[-1]
    if k % m:
        raise InvalidInputError(f"last dimension {k} is not a multiple of M={m}")
    if m > 32768:  # positions 0..M-1 as int16: a larger M wrapped to negative positions that failed at decompress
        raise InvalidInputError(f"M={m} is too large: in-group positions are stored as int16, so M must be at most 32768")
    check_mask_shape(rows, mask)
    values, meta, rows_ok = by_row_chunks(lambda r, mk: _nm_compress_rows(r, mk, n, m), rows, mask)
    if not bool(rows_ok.all()):  # (every count the mask holds, as before slicing: an error, so at once)
        raise InvalidInputError(f"mask must keep exactly {n} of every {m}; found groups keeping {nm_group_counts(mask, m)}")
    return values, meta


def _nm_compress_rows(rows: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nm_compress_masked` of some rows, and whether each row's mask keeps exactly n of every m."""
    k = rows.shape[-1]
    mask_groups = mask.reshape(*mask.shape[:-1], k // m, m)
    rows_ok = (mask_groups.sum(-1) == n).all(-1)
    positions = _kept_positions(mask_groups, n)
    values = rows.reshape(*rows.shape[:-1], k // m, m).gather(-1, positions).reshape(*rows.shape[:-1], k * n // m)
    if (n, m) == (2, 4):
        return values, pack_nibbles(positions), rows_ok
    return values, positions.to(torch.int16).reshape(*rows.shape[:-1], k * n // m), rows_ok


def nm_positions(meta: torch.Tensor, n: int, m: int, groups: int) -> torch.Tensor:
    """Decode metadata into int64 positions `[..., groups, n]` (no checks: see `checked_nm_positions`)."""
    if (n, m) == (2, 4):
        return unpack_nibbles(meta, groups)
    return meta.long().reshape(*meta.shape[:-1], groups, n)


def checked_nm_positions(meta: torch.Tensor, n: int, m: int, groups: int) -> torch.Tensor:
    """`nm_positions` for metadata from outside: the wrong shape, or positions that are not
    increasing inside [0, m) (e.g. nibble 0: i0 == i1), is an error, since decoding it would drop
    values silently."""
    want = math.ceil(groups * m / 16) if (n, m) == (2, 4) else groups * n
    if meta.shape[-1:] != (want,):
        raise InvalidInputError(f"{n}:{m} metadata for {groups * n} values per row must have {want} entries per "
                                f"row, got shape {tuple(meta.shape)}")
    positions = nm_positions(meta, n, m, groups)
    if positions.numel() and not (((positions >= 0) & (positions < m)).all()
                                  and (positions[..., 1:] > positions[..., :-1]).all()):
        raise InvalidInputError(f"corrupt {n}:{m} metadata: kept positions must lie in [0, {m}) and increase within each "
                                f"group of {m}" + (" (nibble i0 | i1 << 2 with i0 < i1)" if (n, m) == (2, 4) else ""))
    return positions


def nm_decompress(values: torch.Tensor, meta: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Dense tensor `[..., K]` from N:M values + metadata (zeros everywhere else); the metadata is checked."""
    if tuple(meta.shape[:-1]) != tuple(values.shape[:-1]):  # (fewer metadata rows decoded the rest as zeros)
        raise InvalidInputError(f"{n}:{m} metadata of shape {tuple(meta.shape)} does not match values of shape "
                                f"{tuple(values.shape)}: they must agree in every dim but the last")
    return _scatter_groups(values, meta, n, m, checked_nm_positions)


def nm_decompress_own(values: torch.Tensor, meta: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """`nm_decompress` of metadata sparsec wrote itself (packed layers, SDGP): unchecked, since the check
    costs about a tenth of a decompress and packed layers decompress on every CPU forward."""
    return _scatter_groups(values, meta, n, m, nm_positions)


def _scatter_groups(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, positions_of) -> torch.Tensor:
    if values.shape[-1] % n:
        raise InvalidInputError(f"values' last dimension {values.shape[-1]} is not a multiple of N={n}")
    groups = values.shape[-1] // n
    positions = positions_of(meta, n, m, groups)
    dense = torch.zeros(*values.shape[:-1], groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(*values.shape[:-1], groups, n))
    return dense.reshape(*values.shape[:-1], groups * m)


def nm_mask_from_meta(meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """The boolean mask `[..., K]` a compressed N:M tensor stands for."""
    groups = k // m
    positions = nm_positions(meta, n, m, groups)
    mask = torch.zeros(*meta.shape[:-1], groups, m, dtype=torch.bool, device=meta.device)
    return mask.scatter_(-1, positions, True).reshape(*meta.shape[:-1], k)


def nm_compress(weight: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress an already-N:M tensor along its last dimension.

    Groups holding fewer than n nonzeros are filled with their lowest-index zero positions.
    A group with more than n nonzeros is an error (prune first, e.g. with `nm_mask`).
    """
    if n < 1 or m < n:
        raise InvalidInputError(f"need 1 <= n <= m, got n={n}, m={m}")
    if weight.shape[-1] % m:
        raise InvalidInputError(f"last dimension {weight.shape[-1]} is not a multiple of M={m}")
    nonzero = (weight != 0).reshape(*weight.shape[:-1], -1, m)
    worst = int(nonzero.sum(-1).max()) if nonzero.numel() else 0
    if worst > n:
        raise InvalidInputError(f"tensor is not {n}:{m} sparse: a group of {m} holds {worst} nonzeros; prune it first")
    mask = _top_along_last(nonzero.to(torch.uint8), n).reshape(weight.shape)
    return nm_compress_masked(weight, mask, n, m)


# --------------------------------------------------------------------------- constant fan-in (condensed)


def fanin_compress(rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Condensed constant fan-in: `values[out, k]` and ascending int32 `indices[out, k]`."""
    check_mask_shape(rows, mask)
    counts = kept_per_row(mask)
    k = int(counts[0]) if counts.numel() else 0
    if not bool((counts == k).all()):
        raise InvalidInputError(f"mask is not constant fan-in: rows keep {sorted(set(counts.unique().tolist()))} weights")
    return by_row_chunks(lambda r, mk: _gathered(r, _kept_positions(mk, k)), rows, mask)


def check_mask_shape(rows: torch.Tensor, mask: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(rows.shape):
        raise InvalidInputError(f"mask shape {tuple(mask.shape)} does not match rows shape {tuple(rows.shape)}")


def _gathered(rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.gather(-1, positions), positions.to(torch.int32)


def fanin_compress_ragged(rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condensed rows when rows keep different counts (after neuron ablation / shrinking a trained
    fan-in layer): k = the largest count; row r holds its counts[r] kept columns ascending, then
    padding with its lowest unkept columns and value 0, so indices stay unique per row and the
    product is unchanged. Returns (values, int32 indices, int32 counts)."""
    check_mask_shape(rows, mask)
    counts = kept_per_row(mask)
    k = max(1, int(counts.max())) if counts.numel() else 1
    # kept columns first (ascending), then unkept ones (ascending)
    values, order = by_row_chunks(lambda r, mk: _gathered(r, _kept_positions(mk, k)), rows, mask)
    real = torch.arange(k, device=rows.device).unsqueeze(0) < counts.unsqueeze(1)
    return values * real, order, counts.to(torch.int32)


def fanin_decompress(values: torch.Tensor, indices: torch.Tensor, k_total: int) -> torch.Tensor:
    """Dense rows `[out, K]` from condensed values and indices."""
    dense = torch.zeros(values.shape[0], k_total, dtype=values.dtype, device=values.device)
    return dense.scatter_(-1, indices.long(), values)


def fanin_mask_from_indices(indices: torch.Tensor, k_total: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The mask condensed indices stand for; with `counts`, only each row's first counts[r] entries
    are real (the rest is padding)."""
    mask = torch.zeros(indices.shape[0], k_total, dtype=torch.bool, device=indices.device)
    real = torch.ones_like(indices, dtype=torch.bool)
    if counts is not None:
        real = torch.arange(indices.shape[1], device=indices.device).unsqueeze(0) < counts.unsqueeze(1)
    return mask.scatter_(-1, indices.long(), real)


def check_fanin(values: torch.Tensor, indices: torch.Tensor, k_total: int, counts: torch.Tensor | None) -> None:
    """Refuse condensed fan-in arrays that would decompress to something else than they claim (a corrupt
    file, another layer's state dict): indices in [0, K), distinct within each row (a repeated column
    scattered one value over another), a row's real entries ascending, counts in [0, k], and padding
    entries (past a row's count) holding stored value 0."""
    out, k = indices.shape
    problem = None
    if indices.numel() and not bool(((indices >= 0) & (indices < k_total)).all()):
        problem = f"column indices must lie in [0, {k_total})"
    elif counts is not None and not bool(((counts >= 0) & (counts <= k)).all()):
        problem = f"row counts must lie in [0, {k}]"
    else:
        real = torch.ones_like(indices, dtype=torch.bool)
        if counts is not None:
            real = torch.arange(k, device=indices.device).unsqueeze(0) < counts.unsqueeze(1).long()
        if k > 1 and bool((real[:, 1:] & (indices[:, 1:] <= indices[:, :-1])).any()):
            problem = "column indices must ascend within each row's kept entries"
        elif k > 1 and bool((indices.sort(dim=1).values.diff(dim=1) == 0).any()):
            problem = "column indices must be distinct within each row"
        elif bool((values[~real] != 0).any()):
            problem = "padding entries (past a row's count) must hold 0"
    if problem:
        raise InvalidInputError(f"corrupt fan-in weight: {problem}")


# --------------------------------------------------------------------------- CSR (unstructured)


def csr_compress(rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compressed sparse rows of the masked positions: (crow_indices int64 `[out + 1]`, col_indices int32
    `[nnz]` ascending within each row, values `[nnz]` in the rows' dtype). A masked-in zero is stored
    (the mask is state), a masked-out value never is."""
    if tuple(mask.shape) != tuple(rows.shape) or rows.dim() != 2:
        raise InvalidInputError(f"CSR needs rows [out, K] and a mask of the same shape, got {tuple(rows.shape)} "
                                f"and {tuple(mask.shape)}")
    counts = kept_per_row(mask)
    crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = counts.cumsum(0)
    where = mask.nonzero()  # row-major: rows in order, columns ascending within each row
    return crow, where[:, 1].to(torch.int32), rows[where[:, 0], where[:, 1]]


def check_csr(crow: torch.Tensor, col: torch.Tensor, nnz: int, out: int, k_total: int) -> None:
    """Refuse CSR arrays that would decompress to something else than they claim (a corrupt file): crow must
    have out + 1 entries from 0 rising to nnz, and each row's columns must lie in [0, K) and ascend."""
    problem = None
    if crow.shape != (out + 1,) or col.shape != (nnz,):
        problem = f"crow_indices of shape {tuple(crow.shape)} (want ({out + 1},)), col_indices {tuple(col.shape)} (want ({nnz},))"
    elif int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        problem = f"crow_indices must rise from 0 to nnz = {nnz}"
    elif nnz and not bool(((col >= 0) & (col < k_total)).all()):
        problem = f"column indices must lie in [0, {k_total})"
    elif nnz:
        row_of = csr_row_index(crow, nnz)
        same_row = row_of[1:] == row_of[:-1]
        if bool((same_row & (col[1:] <= col[:-1])).any()):
            problem = "column indices must ascend within each row"
    if problem:
        raise InvalidInputError(f"corrupt CSR weight: {problem}")


def csr_row_index(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of each of the nnz stored values (int64 `[nnz]`): the last row starting at or before it.
    (searchsorted over a size known from the arrays' shapes, not repeat_interleave of the row counts,
    whose output size depends on their values: torch.compile traces this without a graph break.)"""
    return torch.searchsorted(crow, torch.arange(nnz, dtype=crow.dtype, device=crow.device), right=True).long() - 1


def csr_decompress(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, k_total: int) -> torch.Tensor:
    """Dense rows `[out, K]` from CSR arrays (zeros everywhere else)."""
    dense = torch.zeros(crow.shape[0] - 1, k_total, dtype=values.dtype, device=values.device)
    dense[csr_row_index(crow, col.shape[0]), col.long()] = values
    return dense


def csr_mask(crow: torch.Tensor, col: torch.Tensor, k_total: int) -> torch.Tensor:
    mask = torch.zeros(crow.shape[0] - 1, k_total, dtype=torch.bool, device=crow.device)
    mask[csr_row_index(crow, col.shape[0]), col.long()] = True
    return mask


# --------------------------------------------------------------------------- int8 quantization


def int8_scales(absmax: torch.Tensor) -> torch.Tensor:
    """max|row| / 127 per row, from float32 row maxima. A tensor divisor, not the number 127: CUDA divides
    by a Python number as a multiplication by its reciprocal, one bit off for some rows, so a model
    quantized on a GPU got other scales (and, at rounding ties, other int8 values) than on the CPU."""
    return absmax / absmax.new_tensor(127.0)


def quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per output channel) symmetric int8: scale = max|row| / 127, q in [-127, 127].

    Zeros stay exactly zero. A row whose scale would be 0 gets scale 1 so nothing divides by zero: an
    all-zero row, and one whose max / 127 underflows (float32 max|row| below ~1.8e-43), which got scale 0,
    its zeros 0 / 0 = NaN cast to int8 and the rest +-127 (passes/quantization.py refuses int8 for it).
    """
    return by_row_chunks(_quantize_int8_rows, rows)


def _quantize_int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = rows.detach().abs().amax(dim=-1).float()
    scales = int8_scales(absmax)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows.detach().float() / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales.unsqueeze(-1)).to(dtype)


def fake_quant_int8(rows: torch.Tensor) -> torch.Tensor:
    """What an int8 layer really computes with, in the rows' dtype."""
    q, scales = quantize_int8(rows)
    return dequantize_int8(q, scales, rows.dtype)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F (0 when exact is all zero and approx equals it)."""
    exact64, approx64 = exact.detach().double(), approx.detach().double()
    norm = float(exact64.norm())
    diff = float((approx64 - exact64).norm())
    return diff / norm if norm > 0 else diff


# --------------------------------------------------------------------------- patterns


def pattern_mask(rows: torch.Tensor, pattern) -> torch.Tensor:
    """The mask a pattern (`sparsec.patterns.NM` / `FanIn` / `Unstructured`) gives a weight viewed as `[out, K]`."""
    from sparsec.patterns import NM, FanIn, Unstructured  # local: patterns imports nothing from here, keep it that way

    if isinstance(pattern, NM):
        return by_row_chunks(lambda r: nm_mask(r, pattern.n, pattern.m), rows)
    if isinstance(pattern, FanIn):
        k = pattern.k(rows.numel(), rows.shape[0])
        return by_row_chunks(lambda r: fanin_mask(r, k), rows)
    if isinstance(pattern, Unstructured):
        return unstructured_mask(rows, pattern.kept(rows.numel()))
    raise InvalidInputError(f"no mask for pattern {pattern}")
