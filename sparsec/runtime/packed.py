"""Compressed weight storage: N:M (values + metadata), condensed constant fan-in (values + int32
indices) and CSR for unstructured sparsity, each optionally quantized: int8 with per-output-channel
scales, or method (d)'s non-linear levels ("log2:B" / "codebook:B", sparsec/levels.py): uint8 codes into
one float32 table per layer, code 0 being exactly 0.

A packed weight is rows `[out, K]` (K = reduction dimension, see sparsec/reference.py). It keeps
no dense copy: `rows()` rebuilds the dense weight the layer computes with, `mask()` the boolean
mask it stands for. The mask is stored state (metadata / indices), never `weight != 0`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sparsec import reference as ref
from sparsec.errors import InvalidInputError
from sparsec.levels import (check_codes_in_table, check_levels, check_table_form, is_levels, lookup_levels, parse_levels,
                            quantize_levels)
from sparsec.patterns import NM, FanIn, Pattern, Unstructured
from sparsec.plan import QUANT_FORMS


class PackedWeight(nn.Module):
    """Base: values (float, int8 + fp32 scales, or uint8 level codes + an fp32 table) plus the metadata
    locating them."""

    levels: str | None = None  # "log2:B" / "codebook:B" when the values are level codes into `table`

    def __init__(self, values: torch.Tensor, scales: torch.Tensor | None, out_features: int, reduction: int,
                 dtype: torch.dtype):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scales", scales)
        self.register_buffer("table", None)
        self.out_features, self.reduction = out_features, reduction
        # An empty buffer in the weight's dtype: it follows .half() / .to(dtype) like a weight would,
        # so int8 layers know which float dtype to dequantize to. Not saved in state_dict.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def quant(self) -> str | None:
        return "int8" if self.scales is not None else self.levels

    def __setstate__(self, state):
        state.get("_buffers", {}).setdefault("table", None)  # (files saved before level tables existed)
        super().__setstate__(state)

    def _apply(self, fn, recurse=True):
        # int8 scales and level tables stay float32 through .half() / .to(dtype) (the format, and what the
        # kernels read): cast to float16 they kept 11 bits, and every dequantized weight moved with them.
        # Only the device follows fn; nn.Module._apply assigns new buffers, so the old ones are intact here.
        kept = {name: getattr(self, name) for name in ("scales", "table")}
        module = super()._apply(fn, recurse)
        for name, old in kept.items():
            if old is not None and getattr(self, name).dtype != old.dtype:
                setattr(self, name, old.to(getattr(self, name).device))
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.check_incoming(state_dict, prefix)  # before anything is copied: a refused load leaves the layer as it was
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def check_incoming(self, state_dict, prefix: str) -> None:
        """Refuse the buffers `state_dict` would load into this packed weight when they do not decode (a corrupt
        file, another quantization's state dict). Buffers it does not hold, or of another shape (torch's size
        mismatch error reports those), are checked as this layer holds them / not at all. CompiledModel runs
        this for every packed layer before its load copies anything."""
        buffers = {name: state_dict.get(prefix + name, own) for name, own in self._buffers.items() if own is not None}
        if all(isinstance(t, torch.Tensor) and t.shape == self._buffers[name].shape for name, t in buffers.items()):
            self._check_buffers(buffers)

    def _check_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        """Refuse buffers that do not decode (here, once: dequantizing under torch.compile checks no values)."""
        table = buffers.get("table")
        if table is None:
            return
        check_levels(buffers["values"], table)
        if self.levels is not None:
            # The table's layout is the form that made it (levels.table_form): a codebook's table has the same
            # size as a log2 one, and a log2 table (with its codes) is a valid codebook, so either loaded into
            # the other's layer ran its values while the plan said the other form
            check_table_form(table, self.levels)
            check_codes_in_table(buffers["values"], table, self.levels)

    def kept_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Kept values in a float dtype (dequantized for int8 and level codes)."""
        dtype = dtype or self.dtype_probe.dtype
        if self.table is not None:  # (checked when packed or loaded: check_incoming)
            return lookup_levels(self.values, self.table, dtype)
        if self.scales is None:
            return self.values.to(dtype)
        return ref.dequantize_int8(self.values, self.scales, dtype)

    def _set_levels(self, table: torch.Tensor | None, quant: str | None) -> PackedWeight:
        if table is not None:
            self.table, self.levels = table, quant
        return self

    @staticmethod
    def _quantize(values: torch.Tensor, quant: str | None,
                  fitted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(stored values, int8 scales, level table) of a layer's values under `quant`; `fitted`: the level table
        already fitted to these values (quantize_levels)."""
        if quant is None:
            return values, None, None
        if quant == "int8":
            if values.shape[-1] == 0:
                # no kept value in any row (a fan-in layer whose neurons were all ablated, kept because a
                # residual reads it: k = 0): nothing to scale. quantize_int8's amax over an empty dim
                # raised IndexError, so condense(quantize="int8") of such a model failed.
                return (values.to(torch.int8),
                        torch.ones(values.shape[:-1], dtype=torch.float32, device=values.device), None)
            return (*ref.quantize_int8(values), None)
        if is_levels(quant):  # one table for the whole layer (zeros, if any are stored, are code 0)
            codes, table = quantize_levels(values.detach(), parse_levels(quant), fitted)
            return codes, None, table
        raise ValueError(f"unknown quantization {quant!r}; supported: {QUANT_FORMS}")

    @staticmethod
    def _check_rows(rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Refuse a weight with no output rows, in every format alike: there is nothing to prune (the
        compiler keeps such a layer dense, "weight has no elements"), and the formats did not agree on it
        (FanInPacked raised IndexError reading row 0's count, NMPacked and DensePacked a RuntimeError
        from a reshape that cannot infer a group count from 0 elements)."""
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise InvalidInputError(f"cannot pack a weight of rows shape {tuple(rows.shape)}: it needs rows [out, K] with "
                                    f"out >= 1 (a layer with no output rows has nothing to prune; keep it dense)")
        ref.check_mask_shape(rows, mask)

    def rows(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def mask(self) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def pack(rows: torch.Tensor, mask: torch.Tensor, pattern: Pattern, quant: str | None,
             fitted: torch.Tensor | None = None) -> PackedWeight:
        """`rows` pruned by `mask` in the pattern's format. `fitted`: levels `quant`'s table, already fitted
        to the kept values (by the compile's analysis), so it is not fitted again."""
        if isinstance(pattern, NM):
            return NMPacked.pack(rows, mask, pattern, quant, fitted)
        if isinstance(pattern, FanIn):
            return FanInPacked.pack(rows, mask, pattern, quant, fitted)
        if isinstance(pattern, Unstructured):
            return CSRPacked.pack(rows, mask, pattern, quant, fitted)
        raise ValueError(f"cannot pack pattern {pattern}")


class NMPacked(PackedWeight):
    """values `[out, K*N/M]` + meta (2:4: int16 nibbles `[out, ceil(K/16)]`; else int16 positions)."""

    def __init__(self, values, meta, scales, n: int, m: int, reduction: int, dtype: torch.dtype):
        super().__init__(values, scales, values.shape[0], reduction, dtype)
        self.register_buffer("meta", meta)
        self.n, self.m = n, m

    @classmethod
    def pack(cls, rows, mask, pattern: NM, quant, fitted=None) -> NMPacked:
        cls._check_rows(rows, mask)
        values, meta = ref.nm_compress_masked(rows.detach(), mask, pattern.n, pattern.m)
        q, scales, table = cls._quantize(values, quant, fitted)
        packed = cls(q.contiguous(), meta.contiguous(), scales, pattern.n, pattern.m, rows.shape[1], rows.dtype)
        return packed._set_levels(table, quant)

    def _check_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        super()._check_buffers(buffers)
        # metadata from outside (a corrupt file, another N:M pattern's state dict of the same shapes): positions
        # out of [0, M) or not increasing in a group kept other counts than N, or failed at the next forward
        try:
            ref.checked_nm_positions(buffers["meta"], self.n, self.m, self.reduction // self.m)
        except InvalidInputError as e:
            raise InvalidInputError(f"this state dict's {self.n}:{self.m} metadata does not decode ({e}): a corrupt "
                                    f"file, or the state dict of a compile with another N:M pattern") from None

    def rows(self, dtype=None) -> torch.Tensor:
        return ref.nm_decompress_own(self.kept_values(dtype), self.meta, self.n, self.m)

    def mask(self) -> torch.Tensor:
        return ref.nm_mask_from_meta(self.meta, self.n, self.m, self.reduction)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, out={self.out_features}, K={self.reduction}, values={self.values.dtype}" + (f", {self.quant}" if self.quant else "")


class FanInPacked(PackedWeight):
    """Condensed constant fan-in: values `[out, k]` + ascending int32 column indices `[out, k]`.

    A trained layer whose rows ended with different counts (ablated neurons, shrunk inputs) is
    stored ragged: `row_counts[r]` real entries per row, the rest zero-valued padding.
    """

    def __init__(self, values, indices, scales, reduction: int, dtype: torch.dtype, row_counts=None):
        super().__init__(values, scales, values.shape[0], reduction, dtype)
        self.register_buffer("indices", indices)
        self.register_buffer("row_counts", row_counts)

    @classmethod
    def pack(cls, rows, mask, pattern: FanIn, quant, fitted=None) -> FanInPacked:
        cls._check_rows(rows, mask)
        counts = ref.kept_per_row(mask)
        if bool((counts == counts[0]).all()):
            values, indices = ref.fanin_compress(rows.detach(), mask)
            row_counts = None
        else:
            values, indices, row_counts = ref.fanin_compress_ragged(rows.detach(), mask)
        q, scales, table = cls._quantize(values, quant, fitted)
        packed = cls(q.contiguous(), indices.contiguous(), scales, rows.shape[1], rows.dtype, row_counts)
        return packed._set_levels(table, quant)

    def _check_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        super()._check_buffers(buffers)
        ref.check_fanin(buffers["values"], buffers["indices"], self.reduction, buffers.get("row_counts"))

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def rows(self, dtype=None) -> torch.Tensor:
        return ref.fanin_decompress(self.kept_values(dtype), self.indices, self.reduction)

    def mask(self) -> torch.Tensor:
        return ref.fanin_mask_from_indices(self.indices, self.reduction, self.row_counts)

    def extra_repr(self) -> str:
        return f"fan-in k={self.k}, out={self.out_features}, K={self.reduction}, values={self.values.dtype}" + (f", {self.quant}" if self.quant else "")


class CSRPacked(PackedWeight):
    """Unstructured sparsity as compressed sparse rows: values `[nnz]`, int32 col_indices `[nnz]` ascending
    per row, int64 crow_indices `[out + 1]` (sparsec/reference.py, csr_compress). int8 keeps per-row scales
    of the row's kept values, as the other formats do."""

    def __init__(self, values, col_indices, crow_indices, scales, out_features: int, reduction: int, dtype):
        super().__init__(values, scales, out_features, reduction, dtype)
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("crow_indices", crow_indices)

    @classmethod
    def pack(cls, rows, mask, pattern, quant, fitted=None) -> CSRPacked:
        cls._check_rows(rows, mask)
        if quant == "int8":
            # quantized whole rows, pruned first: a row's scale comes from its kept values, as in the other formats
            pruned = torch.where(mask, rows.detach(), torch.zeros((), dtype=rows.dtype, device=rows.device))
            quantized, scales, table = cls._quantize(pruned, quant)
            crow, col, values = ref.csr_compress(quantized, mask)
        else:  # float or levels: one table from the kept values alone (the dense rows in float64 took 0.5 GB
            # for a 4096 x 14336 layer; pruned zeros would only have been code 0)
            crow, col, kept = ref.csr_compress(rows.detach(), mask)
            values, scales, table = cls._quantize(kept, quant, fitted)
        packed = cls(values.contiguous(), col.contiguous(), crow, scales, rows.shape[0], rows.shape[1], rows.dtype)
        return packed._set_levels(table, quant)

    @property
    def nnz(self) -> int:
        return self.col_indices.shape[0]

    def _check_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        super()._check_buffers(buffers)
        # a corrupt file would otherwise scatter values to the wrong places, or out of bounds later
        ref.check_csr(buffers["crow_indices"], buffers["col_indices"], buffers["values"].shape[0], self.out_features,
                      self.reduction)

    def kept_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype_probe.dtype
        if self.scales is None:  # (float values, or level codes: the base class's lookup)
            return super().kept_values(dtype)
        row_scales = self.scales[ref.csr_row_index(self.crow_indices, self.nnz)]  # one scale per stored value
        return (self.values.float() * row_scales).to(dtype)

    def rows(self, dtype=None) -> torch.Tensor:
        return ref.csr_decompress(self.crow_indices, self.col_indices, self.kept_values(dtype), self.reduction)

    def mask(self) -> torch.Tensor:
        return ref.csr_mask(self.crow_indices, self.col_indices, self.reduction)

    def extra_repr(self) -> str:
        return (f"CSR nnz={self.nnz}, out={self.out_features}, K={self.reduction}, values={self.values.dtype}"
                + (f", {self.quant}" if self.quant else ""))


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask [out, K] as uint8 [out, ceil(K/8)], bit j of byte b = column 8*b + j: the mask a
    dense-stored layer keeps beside its weight, at 1/8 byte per weight instead of bool's 1."""
    out, k = mask.shape
    padded = torch.zeros(out, -(-k // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :k] = mask
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(out, padded.shape[1] // 8, 8) * weights).sum(-1, dtype=torch.uint8)  # (not -1: 0 rows leave it nothing to infer from)


def unpack_mask_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits.unsqueeze(-1) & weights).ne(0).flatten(-2)[:, :k]


class DensePacked(PackedWeight):
    """The pruned (and dequantized) weight kept dense, with its mask (as bits): what a layer runs
    when no sparse kernel is faster than a dense GEMM at the compiled shape (backend "dense").

    With levels ("log2:B" / "codebook:B") it also keeps the table its values come from (`table`, 2**B float32
    values, 4 * 2**B bytes): the values alone cannot tell the forms apart (a log2 layer's weights are a valid
    codebook's), the table's layout does (levels.table_form), so a state dict of the other form is refused
    when loaded. A state dict saved before dense layers kept the table is accepted where its values are what
    this layer's form makes of them (quantizing them again changes nothing); the table is then rebuilt from them.
    With int8 it keeps the per-row scales its values come from (`scales`, 4 bytes a row) for the same reason:
    float values, and int8 ones, look alike; a state dict saved before, without them, is accepted where its
    values are int8 values (fake-quantizing them again changes nothing), and the scales are rebuilt.
    """

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor, quant: str | None):
        super().__init__(rows, None, rows.shape[0], rows.shape[1], rows.dtype)
        self.register_buffer("mask_bits", pack_mask_bits(mask))
        self.dense_of_quant = quant  # int8 already applied to the stored values (fake-quantized)

    def __setstate__(self, state):
        # files saved before the mask was stored as bits hold it as a bool buffer "stored_mask"
        buffers = state.get("_buffers", {})
        if "stored_mask" in buffers:
            buffers["mask_bits"] = pack_mask_bits(buffers.pop("stored_mask"))
        super().__setstate__(state)
        # files saved before an int8 layer kept its scales: rebuilt from its values (int8 values give them back),
        # so it takes a state dict holding them, and its bytes are what its plan counts
        if self.__dict__.get("dense_of_quant") == "int8" and self.scales is None:
            self.scales = ref.quantize_int8(self.values)[1]

    @classmethod
    def pack(cls, rows, mask, pattern, quant, fitted=None) -> DensePacked:
        cls._check_rows(rows, mask)
        # where, not rows * mask: a masked inf or NaN times 0 is NaN, and a masked weight is exactly 0
        pruned = torch.where(mask, rows.detach(), torch.zeros((), dtype=rows.dtype, device=rows.device))
        if quant == "int8":
            q, scales = ref.quantize_int8(pruned)
            packed = cls(ref.dequantize_int8(q, scales, pruned.dtype).contiguous(), mask, quant)
            packed.scales = scales  # the form's record (see the class doc); the values are dequantized
            return packed
        if quant is not None:  # levels: the table from the kept values (zeros are code 0 and stay 0)
            codes, table = quantize_levels(pruned, parse_levels(quant), fitted)
            packed = cls(lookup_levels(codes, table, pruned.dtype).contiguous(), mask, quant)
            packed.table = table  # the form's record (see the class doc); the values are not codes
            return packed
        return cls(pruned.contiguous(), mask, quant)

    @property
    def quant(self) -> str | None:
        return self.dense_of_quant

    def kept_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.values.to(dtype or self.dtype_probe.dtype)  # (dense values: `table` records their form only)

    def _levels(self):
        return parse_levels(self.dense_of_quant) if is_levels(self.dense_of_quant) else None

    def check_incoming(self, state_dict, prefix: str) -> None:
        levels, table = self._levels(), state_dict.get(prefix + "table")
        values = state_dict.get(prefix + "values")
        bits = state_dict.get(prefix + "mask_bits", self.mask_bits)
        if isinstance(values, torch.Tensor) and values.shape == self.values.shape and isinstance(bits, torch.Tensor) \
                and bits.shape == self.mask_bits.shape and bool((values * ~unpack_mask_bits(bits, self.reduction)).any()):
            # a masked weight is exactly 0 (cm.mask() and effective_weight() say so): nonzero ones would compute
            raise InvalidInputError(f"this state dict's dense-stored weight at {prefix}values is nonzero where its mask "
                                    f"says pruned: not a pruned weight (a corrupt file, or another model's values)")
        self._check_int8_form(state_dict.get(prefix + "scales"), values)
        if levels is None:
            if table is not None and values is not None:  # (strict=False copied the values, dropping the table)
                raise InvalidInputError(
                    f"this state dict holds the dense-stored weight at {prefix}values with a level table beside it, "
                    f"but this layer's weight is {self.dense_of_quant or 'not quantized'}: the state dict comes from "
                    f"a compile with quantize='log2:B' / 'codebook:B'; compile with the saving model's plan "
                    f"(sparsec.compile(model, example_inputs=..., plan=saved.plan)), or save and load the whole "
                    f"model (sparsec.save / sparsec.load)")
            return
        if not isinstance(values, torch.Tensor) or values.shape != self.values.shape:
            return  # (nothing to load here, or torch's size mismatch error says it)
        if table is not None:
            if not isinstance(table, torch.Tensor) or table.shape != (levels.table_size,):
                return
            check_levels(torch.zeros(0, dtype=torch.uint8), table)
            check_table_form(table, levels)
            kept = values[values != 0].double()
            if not bool(torch.isin(kept, table.double()).all()):
                raise InvalidInputError(f"corrupt {levels} layer: its dense-stored weight holds values that are not "
                                        f"in its level table")
        else:  # a state dict saved before dense layers kept their table: its values alone tell what they can
            self._legacy_table(values, levels)

    def _check_int8_form(self, scales, values) -> None:
        """Refuse int8 values for a float or levels layer and float values for an int8 one (see the class doc)."""
        remedy = ("compile with the saving model's plan (sparsec.compile(model, example_inputs=..., plan=saved.plan)), "
                  "or save and load the whole model (sparsec.save / sparsec.load)")
        if self.dense_of_quant != "int8":
            if isinstance(scales, torch.Tensor):
                raise InvalidInputError(f"this state dict holds the dense-stored weight with int8 scales beside it, but "
                                        f"this layer's weight is {self.dense_of_quant or 'not quantized'}: the state dict "
                                        f"comes from a compile with quantize='int8'; {remedy}")
        elif scales is None and isinstance(values, torch.Tensor) and values.shape == self.values.shape \
                and not torch.equal(ref.fake_quant_int8(values), values):
            raise InvalidInputError(f"this state dict's dense-stored weight is not int8 values (each row a multiple of "
                                    f"its max |w| / 127) and holds no int8 scales, but this layer's weight is int8: the "
                                    f"state dict comes from a compile with another quantization; {remedy}")

    @staticmethod
    def _legacy_table(values: torch.Tensor, levels) -> torch.Tensor:
        """The table of a weight loaded without one, refusing a weight that is not this form's levels."""
        if levels.kind == "codebook" and values[values != 0].unique().numel() >= levels.table_size:
            again = None  # (more distinct values than shared ones: not a codebook; k-means would only say so slowly)
        else:
            codes, table = quantize_levels(values, levels)
            again = lookup_levels(codes, table, values.dtype)
        if again is None or not torch.equal(again, values):
            raise InvalidInputError(
                f"this state dict holds a dense-stored weight (no level table, as saved by an older sparsec) that is "
                f"not {levels} levels ({'not powers of two in the range of one table' if levels.kind == 'log2' else 'more distinct values than a table holds'}): "
                f"it comes from a compile with another quantization; compile with the saving model's plan "
                f"(sparsec.compile(model, example_inputs=..., plan=saved.plan)), or save and load the whole model "
                f"(sparsec.save / sparsec.load)")
        return table

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        legacy = (self.table is not None and prefix + "table" not in state_dict
                  and isinstance(state_dict.get(prefix + "values"), torch.Tensor))
        legacy_int8 = (self.scales is not None and prefix + "scales" not in state_dict
                       and isinstance(state_dict.get(prefix + "values"), torch.Tensor)
                       and state_dict[prefix + "values"].shape == self.values.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if legacy_int8:  # accepted by check_incoming: the scales of the int8 values now loaded
            if prefix + "scales" in missing_keys:
                missing_keys.remove(prefix + "scales")
            with torch.no_grad():
                self.scales.copy_(ref.quantize_int8(self.values)[1])
        if legacy and self._levels() is not None and state_dict[prefix + "values"].shape == self.values.shape:
            # accepted by check_incoming: the table is rebuilt from the values now loaded (not a missing key)
            if prefix + "table" in missing_keys:
                missing_keys.remove(prefix + "table")
            with torch.no_grad():
                self.table.copy_(self._legacy_table(self.values, self._levels()))

    def rows(self, dtype=None) -> torch.Tensor:
        return self.values if dtype is None or dtype == self.values.dtype else self.values.to(dtype)

    def mask(self) -> torch.Tensor:
        return unpack_mask_bits(self.mask_bits, self.reduction)

    def extra_repr(self) -> str:
        return f"dense pruned weight, out={self.out_features}, K={self.reduction}"
