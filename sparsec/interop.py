"""Conversions from sparsec's 2:4 format to the layouts other libraries expect.

`to_cutlass` produces exactly what
`torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass` returns for
the same pruned dense matrix, so values compressed by sparsec can be handed to torch's
semi-structured kernels. Torch derives its metadata from `dense != 0`; for groups holding fewer
than two nonzeros it picks fixed filler positions (below), so we canonicalise the same way rather
than trusting whatever filler our own metadata carries.
"""
from __future__ import annotations

import torch

from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.reference import nm_decompress

# Nonzero flags of a group of 4 (bit j set = position j nonzero) -> the two positions CUTLASS
# metadata names. Two nonzeros: their positions. Fewer: fixed fillers. More (never produced by a
# 2:4 tensor): the choices torch makes, listed for completeness.
_CANONICAL_PAIR = {
    0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3),
    0b0011: (0, 1), 0b0101: (0, 2), 0b0110: (1, 2), 0b1001: (0, 3), 0b1010: (1, 3), 0b1100: (2, 3),
    0b0111: (0, 1), 0b1011: (0, 1), 0b1101: (0, 3), 0b1110: (1, 3), 0b1111: (0, 1),
}


def _canonical_positions(dense: torch.Tensor) -> torch.Tensor:
    """Positions `[rows, groups, 2]` torch's CUTLASS encoder chooses for each group of 4."""
    flags = (dense.reshape(dense.shape[0], -1, 4) != 0).to(torch.int64)
    code = (flags * torch.tensor([1, 2, 4, 8], device=dense.device)).sum(-1)
    table = torch.tensor([_CANONICAL_PAIR[c] for c in range(16)], dtype=torch.int64, device=dense.device)
    return table[code]


def _cutlass_meta_offsets(rows: int, cols: int, interleave_rows: int, device: torch.device) -> torch.Tensor:
    """Where element (r, c) of the row-major metadata lands in CUTLASS's ColumnMajorInterleaved<2>.

    Rows are regrouped in bands (32 rows for 16-bit metadata, 16 for 32-bit), interleaving
    8-row slices; then each 2x2 block is transposed off the diagonal; then columns are stored
    in pairs, column-major.
    """
    band = 32 if interleave_rows == 4 else 16
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols, device=device).unsqueeze(0).expand(rows, cols)
    r = (r // band) * band + (r % 8) * interleave_rows + (r % band) // 8
    swap_down = ((r % 2 == 0) & (c % 2 == 1)).long()
    swap_up = ((r % 2 == 1) & (c % 2 == 0)).long()
    r = r + swap_down - swap_up
    c = c - swap_down + swap_up
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def to_cutlass(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsec 2:4 (values, nibble meta) -> torch's CUTLASS (sparse, reordered meta)."""
    # (nm_decompress checks only meta's last dim: a meta of fewer rows than values decoded the first rows
    # and silently left the others zero, so the whole shape and the documented int16 dtype are checked here)
    for what, t in (("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise InvalidTypeError(f"to_cutlass takes torch tensors (values, meta) as sparsec.nm_compress returns "
                                   f"them; {what} is a {type(t).__name__}")
    if values.dim() != 2:
        raise InvalidInputError(f"to_cutlass expects 2-D values [rows, K/2], got shape {tuple(values.shape)}")
    if values.dtype in (torch.float16, torch.bfloat16):
        meta_dtype, nibbles_per_word, row_multiple = torch.int16, 4, 32
    elif values.dtype == torch.int8:
        meta_dtype, nibbles_per_word, row_multiple = torch.int32, 8, 16
    else:
        raise InvalidInputError(
            f"to_cutlass supports float16, bfloat16 and int8 values, got {values.dtype}: torch's CUTLASS "
            "format stores float32 as 1:2 pairs (TF32), which a 2:4 tensor is not in general")
    rows, k = values.shape[0], values.shape[1] * 2
    want = (rows, -(-k // 16))
    if meta.dtype != torch.int16 or tuple(meta.shape) != want:
        raise InvalidInputError(
            f"to_cutlass needs sparsec's 2:4 metadata for values of shape {tuple(values.shape)}: int16 of shape "
            f"{want} (one nibble per group of 4, as sparsec.nm_compress returns it), got {meta.dtype} of shape "
            f"{tuple(meta.shape)}")
    # Metadata words are stored in column pairs (ColumnMajorInterleaved<2>): an even number of them per row.
    k_multiple = 8 * nibbles_per_word
    if rows % row_multiple or k % k_multiple:
        raise InvalidInputError(
            f"CUTLASS layout for {values.dtype} needs rows % {row_multiple} == 0 and K % {k_multiple} == 0; "
            f"got rows={rows}, K={k}")
    dense = nm_decompress(values, meta, 2, 4)
    positions = _canonical_positions(dense)
    sparse = dense.reshape(rows, -1, 4).gather(-1, positions).reshape(rows, k // 2)

    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).reshape(rows, -1, nibbles_per_word)
    shifts = 4 * torch.arange(nibbles_per_word, device=values.device)
    words = (nibbles << shifts).sum(-1)  # unsigned value of each metadata word
    bits = 8 * meta_dtype.itemsize
    words = torch.where(words >= 2 ** (bits - 1), words - 2 ** bits, words).to(meta_dtype)

    cols = words.shape[1]
    reordered = torch.empty(rows * cols, dtype=meta_dtype, device=values.device)
    reordered[_cutlass_meta_offsets(rows, cols, 4 if meta_dtype == torch.int16 else 2, values.device)] = words.reshape(-1)
    return sparse, reordered.reshape(rows, cols)
