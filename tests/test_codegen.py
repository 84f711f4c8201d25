"""Generated Triton kernels: numerics under the interpreter (or on a GPU), bit-exact prune+compress,
sm_80 / sm_90 builds without a GPU, determinism, the kernel cache, fusion in compiled models."""
import copy
import json
import os
import subprocess
import re
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import kernel_operands_24, load_example, oracle_int8, oracle_nm_mask, output_error, pruned_model
from sparsec import reference as ref
from sparsec.codegen.builder import LayerUse, emit_matmul
from sparsec.codegen.cache import HEADER_PREFIX, KernelCache
from sparsec.codegen.measure import pick_fastest
from sparsec.codegen.launch import sparse24_matmul
from sparsec.codegen.prune_launch import prune24, prune24_dense
from sparsec.codegen.spec import MatmulSpec
from sparsec.errors import InvalidInputError
from sparsec.runtime.traced_call import OpaqueKernel
from sparsec.runtime.triton_linear import TritonSparseLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def on_device(model: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    """A model and its inputs where backend="triton" runs them: the GPU when there is one, else the
    CPU (under the interpreter, which conftest.py turns on)."""
    return model.to(DEVICE), tuple(t.to(DEVICE) for t in inputs)


ACTS = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu}


def _operands(m, n, k, dtype, int8, seed):
    g = torch.Generator().manual_seed(seed)
    values, meta, scales, pruned = kernel_operands_24(torch.randn(n, k, generator=g), int8)
    x = torch.randn(m, k, generator=g)
    return x, values, meta, scales, pruned


def _kernel_case(m, n, k, dtype, int8, bias, activation, seed, config=None, uses=()):
    """Run the generated 2:4 kernel on a fresh pruned layer; returns its output and torch's (float64)."""
    x, values, meta, scales, pruned = _operands(m, n, k, dtype, int8, seed=seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype) if bias else None
    x, pruned = x.to(dtype), pruned.to(dtype)
    values = values if int8 else values.to(dtype)
    act = str(dtype).removeprefix("torch.")
    spec = MatmulSpec(act, "int8" if int8 else act, bias, activation, False, act)
    name, source = emit_matmul(spec, list(uses))
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    y = sparse24_matmul(dev(x), dev(values), dev(meta), dev(scales), dev(b), None, spec, name, source, config=config)
    expected = ACTS[activation](x.double() @ pruned.double().t() + (b.double() if b is not None else 0))
    return y, expected


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (37, 48, 80), (16, 32, 16), (5, 600, 32), (70, 24, 48)])
@pytest.mark.parametrize("bias, activation, int8", [(False, None, False), (True, "relu", False), (True, "gelu", True),
                                                    (False, "silu", True), (True, "gelu_tanh", False)])
def test_sparse24_matmul_matches_torch(dtype, tol, m, n, k, bias, activation, int8):
    y, expected = _kernel_case(m, n, k, dtype, int8, bias, activation, seed=m * 1000 + n + k, uses=[LayerUse("t", m, n, k)])
    assert y.dtype == dtype and y.shape == (m, n)
    assert output_error(y.cpu().double(), expected) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m, n, k, split, block_k", [(1, 64, 256, 4, 32),   # even split
                                                     (5, 48, 80, 3, 16),    # 5 K blocks in 3 splits: a short last one
                                                     (3, 40, 160, 8, 16),   # 10 K blocks in 8 splits: empty splits
                                                     (17, 32, 64, 2, 32)])  # two M tiles
@pytest.mark.parametrize("bias, activation, int8", [(False, None, False), (True, "gelu", True)])
def test_split_k_matches_torch_and_resets_its_counters(dtype, tol, m, n, k, split, block_k, bias, activation, int8):
    from sparsec.codegen import launch

    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=1, SPLIT_K=split, num_warps=4, num_stages=1)
    (first, expected), (second, _) = (_kernel_case(m, n, k, dtype, int8, bias, activation, seed=m + n + k + split,
                                                   config=cfg) for _ in range(2))
    assert output_error(first.cpu().double(), expected) <= tol
    assert torch.equal(first, second)  # partials are summed in split order: no run-to-run difference
    counters = launch.split_counters(torch.device(DEVICE), 1)
    assert int(counters.abs().sum()) == 0  # the last split of every tile reset its counter


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m, n, k, block_m, block_k, split", [(1, 64, 256, 1, 64, 1),   # decode: one row
                                                              (3, 40, 80, 1, 32, 1),    # a program per row, ragged K
                                                              (5, 48, 96, 4, 32, 2),    # two row blocks, split K
                                                              (2, 24, 36, 2, 16, 3),    # K not a multiple of 16
                                                              (1, 40, 160, 1, 16, 8)])  # 10 K blocks in 8 splits
@pytest.mark.parametrize("bias, activation, int8", [(False, None, False), (True, "silu", True)])
@pytest.mark.parametrize("stages", [1, 2])
def test_cuda_core_form_matches_torch(dtype, tol, m, n, k, block_m, block_k, split, bias, activation, int8, stages):
    """BLOCK_M under 16: multiply-adds into per-k partial sums instead of tl.dot (configs.py); with
    num_stages > 1 each next K block is loaded ahead (PREFETCH), past the last block of a split and of
    an empty split too."""
    cfg = dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=1, SPLIT_K=split, num_warps=4, num_stages=stages)
    y, expected = _kernel_case(m, n, k, dtype, int8, bias, activation, seed=m + n + k + block_m, config=cfg)
    assert y.shape == (m, n) and output_error(y.cpu().double(), expected) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("m, n, k, block_n, block_k, split", [(1, 64, 256, 32, 64, 1),   # decode: one row
                                                              (3, 40, 80, 16, 32, 1),    # a program per row, ragged K
                                                              (2, 24, 36, 16, 16, 3),    # K not a multiple of 16
                                                              (1, 40, 160, 32, 16, 8)])  # 10 K blocks in 8 splits
@pytest.mark.parametrize("bias, activation, int8", [(False, None, False), (True, "silu", True)])
@pytest.mark.parametrize("stages", [1, 2])
def test_gather_form_matches_torch(dtype, tol, m, n, k, block_n, block_k, split, bias, activation, int8, stages):
    """GATHER: each kept value times the x at its position, one row per program (configs.py); with num_stages > 1
    each next K block is loaded ahead, past the last block of a split and of an empty split too. (bfloat16: the
    interpreter truncates the output to it, hence the wider tolerance.)"""
    cfg = dict(BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1, SPLIT_K=split, GATHER=1, num_warps=4,
               num_stages=stages)
    y, expected = _kernel_case(m, n, k, dtype, int8, bias, activation, seed=m + n + k + block_n, config=cfg)
    assert y.shape == (m, n) and output_error(y.cpu().double(), expected) <= tol


@pytest.mark.parametrize("int8, split", [(False, 1), (True, 2)])
def test_gather_form_keeps_the_nans_of_a_dense_product(int8, split):
    """The GATHER form multiplies kept values only; a dense product also has 0 * x at the pruned positions, NaN
    where x is inf or NaN. Rows whose x has inf / NaN at pruned positions of some output rows and at kept
    positions of others come out as F.linear's (NaN where it has NaN, inf where it has inf), the finite rows too."""
    m, n, k = 3, 32, 64
    x, values, meta, scales, pruned = _operands(m, n, k, torch.float16, int8, seed=11)
    x, values = x.half(), values if int8 else values.half()
    x[0, 5] = float("inf")   # position 5: kept in some output rows, pruned in others
    x[1, 9] = float("nan")
    x[1, 40] = float("-inf")  # (row 2 stays finite)
    kept = pruned[:, 5] != 0
    assert kept.any() and not kept.all()
    spec = MatmulSpec("float16", "int8" if int8 else "float16", False, None, False, "float16")
    name, source = emit_matmul(spec, [])
    cfg = dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=split, GATHER=1, num_warps=4, num_stages=2)
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    y = sparse24_matmul(dev(x), dev(values), dev(meta), dev(scales), None, None, spec, name, source, config=cfg).cpu()
    expected = (x.double() @ pruned.double().t()).half()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert torch.equal(y[0].isnan(), ~kept)  # NaN exactly where the inf meets a pruned zero
    finite = expected.isfinite()
    assert output_error(y[finite].double(), expected[finite].double()) <= 2e-3


@pytest.mark.parametrize("stages", [1, 2])
def test_gather_form_with_k_0_runs_the_epilogue_of_an_empty_sum(stages):
    """(Its unmasked loads need K > 0: derived_constexprs gives K = 0 the masked path, which loads nothing.)"""
    from sparsec.codegen.configs import derived_constexprs

    spec = MatmulSpec("float16", "float16", True, "relu", False, "float16")
    name, source = emit_matmul(spec, [])
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=2, GATHER=1, num_warps=4, num_stages=stages)
    assert not derived_constexprs(cfg, 0)["EVEN_K"]
    b = torch.tensor([1.0, -2.0, 3.0]).half()
    y = sparse24_matmul(torch.randn(2, 0, device=DEVICE).half(), torch.zeros(3, 0, device=DEVICE).half(),
                        torch.zeros(3, 0, dtype=torch.int16, device=DEVICE), None, b.to(DEVICE), None, spec, name,
                        source, config=cfg)
    assert torch.equal(y.cpu(), F.relu(b).expand(2, 3))


def test_gather_form_reads_an_unaligned_input_row(monkeypatch):
    """The GATHER form loads a group's four x values as one 8-byte word (on a GPU a misaligned one faults; the
    interpreter reads it anyway): an x that starts off such a boundary (a view one element in), or whose rows
    are not a multiple of 4 elements apart, reaches the kernel as an aligned copy."""
    from sparsec.codegen.direct_launch import DirectLaunch

    launched = []
    launch = DirectLaunch.launch
    monkeypatch.setattr(DirectLaunch, "launch", lambda self, grid, args, kwargs: (
        launched.append((args[0].data_ptr() % 8, args[1] % 4)), launch(self, grid, args, kwargs))[1])
    n, k = 32, 64
    _, values, meta, _, pruned = _operands(1, n, k, torch.float16, False, seed=5)
    wide = torch.randn(2, k + 3).half()
    inputs = [wide[0, 1:k + 1].unsqueeze(0), wide[:, 3:]]  # 2 bytes off; rows k + 3 elements apart
    spec = MatmulSpec("float16", "float16", False, None, False, "float16")
    name, source = emit_matmul(spec, [])
    cfg = dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=1, GATHER=1, num_warps=4, num_stages=1)
    for xi in inputs:
        xi = xi.to(DEVICE)
        assert xi.data_ptr() % 8 or xi.stride(0) % 4
        y = sparse24_matmul(xi, values.half().to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source,
                            config=cfg)
        assert output_error(y.cpu().double(), xi.cpu().double() @ pruned.double().t()) <= 2e-3
    assert launched == [(0, 0), (0, 0)]


def test_gather_form_is_a_candidate_at_one_row_of_16_bit_inputs_only(monkeypatch):
    from sparsec.codegen.configs import matmul_candidates, matmul_config

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tables
    for act, weight in (("float16", "float16"), ("bfloat16", "bfloat16"), ("float16", "int8"), ("bfloat16", "int8")):
        assert matmul_config(1, 4096, 4096, act, 132)["GATHER"] == 0  # never by default: unmeasured
        gathering = [c for c in matmul_candidates(1, 4096, 4096, act, 132, weight) if c["GATHER"]]
        assert gathering and all(c["BLOCK_M"] == 1 and not c["PRMT_EXPAND"] for c in gathering)
        # one metadata word per thread (the kernel's docstring): no layout change inside the K loop
        assert all(c["BLOCK_N"] * c["BLOCK_K"] == 512 * c["num_warps"] for c in gathering)
        assert not any(c["GATHER"] for c in matmul_candidates(16, 4096, 4096, act, 132, weight))
        assert not any(c["GATHER"] for c in matmul_candidates(1, 4096, 4096, act, None, weight, conv=True))
    assert not any(c["GATHER"] for c in matmul_candidates(1, 4096, 4096, "float32", 132, "int8"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not any(c["GATHER"] for c in matmul_candidates(1, 64, 64, "float16", None, "float16"))


def test_gather_form_is_refused_where_it_cannot_apply():
    from sparsec.codegen.configs import matmul_config, validate_launch

    cfg = dict(matmul_config(1, 64, 64, "float16"), BLOCK_M=1, GATHER=1)
    assert validate_launch(dict(cfg, M=1)) is None
    assert "GATHER must be 0 or 1" in validate_launch(dict(cfg, M=1, GATHER=2))
    assert "GATHER=1 takes BLOCK_M 1" in validate_launch(dict(cfg, M=1, BLOCK_M=16))
    assert "GATHER=1 takes BLOCK_M 1" in validate_launch(dict(cfg, M=1, PRMT_EXPAND=1))
    x, values, meta, _, _ = _operands(2, 32, 64, torch.float32, False, seed=1)
    spec = MatmulSpec("float32", "float32", False, None, False, "float32")
    name, source = emit_matmul(spec, [])
    with pytest.raises(InvalidInputError, match="GATHER=1 applies to one row .* float16 / bfloat16 inputs.* float32 "
                                                "weights and float32 inputs"):
        sparse24_matmul(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, config=cfg)
    for key, bad in (("GATHER", "0"), ("GATHER", 2), ("GATHER", True), ("PRMT_EXPAND", "0")):  # ("0" ran the form)
        with pytest.raises(InvalidInputError, match=f"launch {key} must be 0 or 1, got {bad!r}"):
            sparse24_matmul(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source,
                            config={**cfg, "GATHER": 0, key: bad})
    model = nn.Sequential(nn.Linear(64, 32)).to(DEVICE)
    cm = sparsec.compile(model, example_inputs=(x.to(DEVICE),), backend="triton", include=[".*"], min_weights=0)
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    plan["0"].launch = dict(cfg, M=2)
    with pytest.raises(ValueError, match="this layer has float32 weights and float32 inputs. Set GATHER to 0"):
        sparsec.compile(model, example_inputs=(x.to(DEVICE),), plan=plan)


@pytest.mark.parametrize("m, int8", [(1, True), (16, False)])
def test_every_decode_candidate_tile_matches_torch(monkeypatch, m, int8):
    """Each launch config backend="auto" may time at decode sizes (the GPU table: K steps up to 256,
    2 to 8 warps, split K, at one row the GATHER form), run on a small layer; PRMT_EXPAND twins need a GPU
    (inline PTX)."""
    from sparsec.codegen.configs import matmul_candidates

    n, k = 256, 1024  # (at M = 16, split K only where K >= 32 M per split: configs.split_k)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tables, not the interpreter's
    configs = [cfg for cfg in matmul_candidates(m, n, k, "float16", 132, "int8" if int8 else "float16")
               if not cfg["PRMT_EXPAND"]]
    monkeypatch.undo()
    assert {cfg["num_warps"] for cfg in configs} == ({2, 4, 8} if m == 1 else {2, 4})  # (8: GATHER tiles)
    assert max(cfg["SPLIT_K"] for cfg in configs) > 1 and max(cfg["BLOCK_K"] for cfg in configs) == 256
    assert any(cfg["GATHER"] for cfg in configs) == (m == 1)
    for cfg in configs:
        y, expected = _kernel_case(m, n, k, torch.float16, int8, True, "gelu", seed=m + k, config=cfg)
        assert output_error(y.cpu().double(), expected) <= 2e-3, cfg


def test_split_k_falls_back_when_tiles_outnumber_the_counters(monkeypatch):
    from sparsec.codegen import launch

    monkeypatch.setattr(launch, "SPLIT_COUNTERS", 2)
    monkeypatch.setattr(launch, "_LAUNCHES", {})  # launches resolved before with room for the split
    x, values, meta, _, pruned = _operands(4, 48, 64, torch.float32, False, seed=3)
    spec = MatmulSpec("float32", "float32", False, None, False, "float32")
    name, source = emit_matmul(spec, [])
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=2, num_warps=4, num_stages=1)  # 3 tiles
    y = sparse24_matmul(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, config=cfg)
    assert output_error(y.cpu().double(), x.double() @ pruned.double().t()) <= 1e-5
    resolved = launch.sparse24_launch(4, 48, 64, spec, name, source, torch.device(DEVICE), cfg)
    assert resolved.tiles == 3 and resolved.cfg["SPLIT_K"] == 1


def test_launch_candidates_split_k_only_where_tiles_are_few(monkeypatch):
    from sparsec.codegen.configs import LAUNCH_KEYS, matmul_candidates, matmul_config, validate_launch

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tables, not the interpreter's

    decode = matmul_config(1, 4096, 4096, "float16", sms=132)
    tiles = 4096 // decode["BLOCK_N"]
    assert decode["SPLIT_K"] > 1 and tiles * decode["SPLIT_K"] >= 132  # fills an H100
    assert 4096 // decode["BLOCK_K"] // decode["SPLIT_K"] >= 4        # each split keeps several K blocks
    assert matmul_config(1, 4096, 4096, "float16", sms=None)["SPLIT_K"] == 1
    assert matmul_config(16, 14336, 4096, "float16", sms=132)["SPLIT_K"] == 1  # 448 tiles already fill it
    assert matmul_config(4096, 4096, 4096, "float16", sms=132)["SPLIT_K"] == 1
    assert matmul_config(128, 4096, 4096, "float16", sms=132)["SPLIT_K"] == 1  # partials would cost too much
    from sparsec.codegen.configs import split_k

    tile = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)  # 64 tiles; programs under 4 warps get proportionally more
    splits = {warps: split_k(1, 4096, 4096, dict(tile, num_warps=warps), 132) for warps in (2, 4, 8)}
    assert splits == {2: 16, 4: 8, 8: 8}  # (2 warps: twice the programs of 4; 8 warps: as many as 4)
    for m in (1, 16, 64, 128, 4096):
        configs = matmul_candidates(m, 4096, 4096, "float16", 132)
        assert configs[0] == matmul_config(m, 4096, 4096, "float16", 132)
        assert len(configs) == len({tuple(sorted(c.items())) for c in configs}) >= 2
        for cfg in configs:
            assert list(cfg) == list(LAUNCH_KEYS) and validate_launch(dict(cfg, M=m)) is None
    assert "power of two" in validate_launch(dict(decode, M=1, BLOCK_N=48))
    assert validate_launch(dict(decode, M=1, BLOCK_M=1)) is None  # the CUDA-core form
    assert "BLOCK_N and BLOCK_K must be >= 16" in validate_launch(dict(decode, M=1, BLOCK_N=8))
    assert {c["BLOCK_M"] for c in matmul_candidates(1, 4096, 4096, "float16", 132)} == {1, 16}
    assert all(c["BLOCK_M"] >= 16 for c in matmul_candidates(2, 4096, 4096, "float16", 132))
    assert {c["BLOCK_M"] for c in matmul_candidates(1, 4096, 4096, "float32", 132)} == {1, 16}
    assert {c["BLOCK_M"] for c in matmul_candidates(2, 4096, 4096, "float32", 132)} == {16}
    from sparsec.codegen.measure import describe_launch

    assert describe_launch(dict(decode, BLOCK_M=1, PRMT_EXPAND=1, num_stages=1)).endswith("prmt expand, CUDA cores")
    assert describe_launch(dict(decode, BLOCK_M=1, num_stages=3)).endswith("CUDA cores, next K block loaded ahead")
    assert "ahead" not in describe_launch(dict(decode, num_stages=3))  # (Triton pipelines the tensor-core form itself)
    assert "CUDA cores" not in describe_launch(decode)
    assert "exactly the keys" in validate_launch(dict(decode))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m, n, k, fanin", [(1, 64, 100, 10), (13, 70, 64, 33), (5, 8, 16, 16), (40, 300, 48, 1)])
@pytest.mark.parametrize("bias, activation, int8", [(False, None, False), (True, "relu", True), (True, "gelu", False)])
def test_condensed_matmul_matches_torch(dtype, tol, m, n, k, fanin, bias, activation, int8):
    from oracle import oracle_fanin_mask
    from sparsec.codegen.launch import condensed_matmul

    g = torch.Generator().manual_seed(m + n + k + fanin)
    w = torch.randn(n, k, generator=g)
    mask = oracle_fanin_mask(w, fanin)
    mask[0] = False  # an ablated row: stored ragged, padded with zero values
    pruned = w * mask
    if int8:
        pruned = oracle_int8(pruned)
    values, indices, _ = ref.fanin_compress_ragged(pruned, mask)
    scales = None
    if int8:
        values, scales = ref.quantize_int8(values)
    x, b = torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, generator=g).to(dtype) if bias else None)
    values = values if int8 else values.to(dtype)
    act = str(dtype).removeprefix("torch.")
    spec = MatmulSpec(act, "int8" if int8 else act, bias, activation, False, act, format="fanin")
    name, source = emit_matmul(spec, [])
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    y = condensed_matmul(dev(x), dev(values), dev(indices), dev(scales), dev(b), None, spec, name, source)
    expected = ACTS[activation](x.double() @ pruned.double().t() + (b.double() if b is not None else 0))
    assert output_error(y.cpu().double(), expected) <= tol


def test_matmul_out_scale_cast_and_3d_input():
    x, values, meta, _, pruned = _operands(6, 32, 64, torch.float32, False, seed=1)
    scale = torch.rand(32) + 0.5
    spec = MatmulSpec("float32", "float32", False, "relu", True, "float16")
    name, source = emit_matmul(spec, [])
    x3 = x.reshape(2, 3, 64).to(DEVICE)
    y = sparse24_matmul(x3, values.to(DEVICE), meta.to(DEVICE), None, None, scale.to(DEVICE), spec, name, source)
    expected = (F.relu(x.double() @ pruned.double().t()) * scale.double()).reshape(2, 3, 32)
    assert y.dtype == torch.float16 and y.shape == (2, 3, 32)
    assert output_error(y.cpu().double(), expected) <= 2e-3
    # a tensor of its own, not a view of a [6, 32] one: KernelForward had to copy a view under autograd
    # (an in-place op after it is refused on a view made inside a Function)
    assert y._base is None
    for out in (torch.empty(6, 32, dtype=torch.float16, device=DEVICE), None):
        z = sparse24_matmul(x3[:, :0] if out is None else x3, values.to(DEVICE), meta.to(DEVICE), None, None,
                            scale.to(DEVICE), spec, name, source, out=out)
        assert z.shape == ((2, 0, 32) if out is None else (2, 3, 32)) and z._base is (None if out is None else out)


def test_matmul_rejects_mismatched_operands():
    x, values, meta, _, _ = _operands(4, 32, 64, torch.float32, False, seed=2)
    spec = MatmulSpec("float32", "float32", False, None, False, "float32")
    name, source = emit_matmul(spec, [])
    with pytest.raises(ValueError, match="do not fit"):
        sparse24_matmul(x[:, :60].to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source)
    with pytest.raises(ValueError, match="generated for float32 inputs"):
        sparse24_matmul(x.half().to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source)


@settings(max_examples=15)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 10**6), st.sampled_from([torch.float32, torch.float16]),
       st.booleans())
def test_prune24_is_bit_exact(rows, groups, seed, dtype, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4 * groups, generator=g)
    if ties:
        x = torch.randint(-2, 3, x.shape, generator=g).float()
    x = x.to(dtype)
    values, meta = prune24(x.to(DEVICE))
    mask = oracle_nm_mask(x, 2, 4)
    expected_values, expected_meta = ref.nm_compress_masked(x, mask, 2, 4)
    assert torch.equal(values.cpu(), expected_values)
    assert torch.equal(meta.cpu(), expected_meta)


@settings(max_examples=15)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 10**6), st.sampled_from([torch.float32, torch.float16]),
       st.booleans(), st.booleans())
def test_prune24_dense_is_bit_exact(rows, groups, seed, dtype, ties, batched):
    """The pruned tensor in place (what SDGP's dense dgrad multiplies) equals x * the oracle's mask,
    ties to the lower index included; leading dims are kept."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4 * groups, generator=g)
    if ties:
        x = torch.randint(-2, 3, x.shape, generator=g).float()
    x = x.to(dtype)
    x = x.reshape(rows, 1, 4 * groups) if batched else x
    pruned = prune24_dense(x.to(DEVICE))
    assert pruned.shape == x.shape and pruned.dtype == x.dtype
    assert torch.equal(pruned.cpu(), x * oracle_nm_mask(x.reshape(rows, -1), 2, 4).reshape(x.shape))


def test_prune24_rejects_bad_shapes():
    for prune in (prune24, prune24_dense):
        with pytest.raises(ValueError, match="not a multiple of 4"):
            prune(torch.zeros(2, 6, device=DEVICE))


SPECS = [MatmulSpec("float16", "float16", True, "relu", False, "float16"),
         MatmulSpec("float16", "int8", True, "gelu", True, "float32")]


@pytest.fixture(scope="module")
def standard_builds():
    """triton.compile to cubin with explicit sm_80 / sm_90 targets, in a fresh process: the
    interpreter (used by the numeric tests here) leaves triton.language patched in its process."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "sparsec.codegen.aot"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_kernel_builds_for_sm80_and_sm90(standard_builds, monkeypatch):
    """Catches what the interpreter never checks: shared memory over an arch's limit and register
    spills, at the decode, mid and large-batch configurations of every dtype / weight / epilogue /
    format family, and every config backend="auto" may time."""
    from sparsec.codegen import aot

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU configs, as the build process saw them
    expected = {f"{key}@sm_{cap}" for key, _, _ in aot.standard_builds() for cap in (80, 90)}
    assert set(standard_builds) == expected
    assert any("SPLIT_K=4" in key for key in expected) and any("SPLIT_K=1" in key for key in expected)
    failures = {k: v for k, v in standard_builds.items() if v != "ok"}
    assert not failures, failures


def test_aligned_builds_mark_only_what_real_launches_give_as_multiples_of_16(monkeypatch):
    """The build check builds each kernel as Triton's JIT specializes a real launch: integer arguments
    marked divisible by 16 must be multiples of 16 in the launches of layers at the standard shapes,
    and those left unmarked must not be (else the check built a variant no layer launches). The
    launches are recorded, not run: 2:4 at K = 4096, condensed at 307 of 768 inputs, conv on 14 x 14
    and 7 x 7 feature maps; 5 rows (any row count may come)."""
    from oracle import fanin_k

    from sparsec.codegen import aot, launch
    from sparsec.codegen.launch import ConvGeometry, condensed_matmul, sparse24_conv2d

    calls = []
    monkeypatch.setattr(launch, "loaded_kernel", lambda *a: type("Recorder", (), {
        "__getitem__": lambda self, grid: lambda *args, **kw: calls.append(args)})())
    monkeypatch.setattr(launch, "require_runnable", lambda device: None)
    monkeypatch.setattr(launch, "_LAUNCHES", {})
    half = torch.float16
    spec = MatmulSpec("float16", "float16", True, "relu", False, "float16")
    sparse24_matmul(torch.randn(5, 4096, dtype=half), torch.randn(64, 2048, dtype=half),
                    torch.zeros(64, 256, dtype=torch.int16), None, torch.randn(64, dtype=half), None, spec, "k", "",
                    config={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4})
    kinds = [aot.matmul_signature(spec)]
    fanin = MatmulSpec("float16", "float16", True, "relu", False, "float16", format="fanin")
    kept = fanin_k(64 * 768, 64, 0.6)
    condensed_matmul(torch.randn(5, 768, dtype=half), torch.randn(64, kept, dtype=half),
                     torch.zeros(64, kept, dtype=torch.int32), None, torch.randn(64, dtype=half), None, fanin, "k", "")
    kinds.append(aot.condensed_signature(fanin))
    conv = MatmulSpec("float16", "float16", True, "relu", False, "float16", layout="conv2d")
    for size, channels in [(14, 256), (7, 512)]:
        k = channels * 9
        sparse24_conv2d(torch.randn(2, channels, size, size, dtype=half), torch.randn(32, k // 2, dtype=half),
                        torch.zeros(32, k // 16, dtype=torch.int16), None, None, None, conv, "k", "",
                        ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)))
        kinds.append(aot.conv_signature(conv))
    assert len(calls) == len(kinds) == 4
    for args, signature in zip(calls, kinds):
        integers = {name: value for name, value in zip([n for n, kind in signature.items() if kind != "constexpr"],
                                                       args) if signature[name] == "i32"}
        assert len(integers) == sum(kind == "i32" for kind in signature.values())
        ragged = aot._ragged_integers(signature)
        assert {name for name, value in integers.items() if value % 16} == ragged & set(integers), integers


def test_the_build_check_sees_register_spills():
    """The spill check is live: a tile known to spill (128 x 128 x 64 over 4 warps, decompressed in
    registers) is refused, naming the stack frame; the same tile over 8 warps builds."""
    script = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        from sparsec.codegen.aot import compile_for, matmul_signature, resource_usage
        from sparsec.codegen.builder import emit_matmul
        from sparsec.codegen.spec import MatmulSpec
        spec = MatmulSpec("float16", "float16", True, "gelu", False, "float16")
        name, source = emit_matmul(spec, [])
        tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, EVEN_K=True, PREFETCH=False)
        fine = compile_for(90, name, source, matmul_signature(spec), tiles, num_warps=8, num_stages=3)
        print("usage", resource_usage(fine.asm["cubin"]))
        try:
            compile_for(90, name, source, matmul_signature(spec), tiles, num_warps=4, num_stages=3)
        except ValueError as e:
            print("refused", e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-2000:]
    if "usage None" in result.stdout:
        pytest.skip("no cuobjdump next to this Triton: register use cannot be read")
    assert "refused" in result.stdout and "spills registers" in result.stdout and "stack frame" in result.stdout


def test_emitted_source_is_deterministic_and_self_describing():
    spec = MatmulSpec("float16", "int8", True, "gelu", False, "float16")
    uses = [LayerUse("b.fc", 8, 64, 128), LayerUse("a.fc", 8, 64, 128)]
    first = emit_matmul(spec, uses)
    assert first == emit_matmul(spec, list(reversed(uses)))
    name, source = first
    assert source.index("a.fc") < source.index("b.fc")
    for text in ["pattern 2:4", "epilogue [dequant, bias, gelu]", "triton=", "torch=", "M=8, N=64, K=128",
                 f"def {name}("]:
        assert text in source
    assert "0x" not in source.split("import triton")[0]  # no addresses in the header


# ------------------------------------------------------------------------------------------------ cache


def test_cache_hit_corrupt_and_rebuild(tmp_path):
    cache = KernelCache(str(tmp_path))
    name, source = emit_matmul(SPECS[0], [])
    path = cache.store(name, source)
    assert cache.counters == {"written": 1}
    assert open(path).read().startswith(HEADER_PREFIX)
    cache.store(name, source)
    assert cache.counters["hit"] == 1
    with open(path, "w") as f:  # truncated entry
        f.write(open(path).read()[:100] if False else HEADER_PREFIX + "0" * 64 + "\nimport triton\n")
    cache.store(name, source)
    assert cache.counters["corrupt"] == 1 and cache.counters["written"] == 2
    assert cache._valid(path, source)


@pytest.mark.parametrize("obstacle", ["root is a file", "entry is a folder"])
def test_a_cache_that_cannot_be_written_says_so_and_leaves_nothing(tmp_path, obstacle):
    """The error names what is in the way (the root, or the entry's path: it named the temporary file it
    could not rename there), and a root that is a file is not counted a corrupt entry (there is none)."""
    name, source = emit_matmul(SPECS[0], [])
    root = tmp_path / "cache"
    entry = KernelCache(str(root)).path(name, source)
    if obstacle == "root is a file":
        root.write_text("not a folder")
    else:
        os.makedirs(entry)
    cache = KernelCache(str(root))
    with pytest.raises(InvalidInputError, match=r"the kernel cache in .*cache cannot be written: .*Set SPARSEC_CACHE_DIR") as e:
        cache.store(name, source)
    assert (str(root) if obstacle == "root is a file" else f"({entry})") in str(e.value)
    assert ".tmp-" not in str(e.value) and cache.counters["corrupt"] == (obstacle == "entry is a folder")
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert not leftovers


def test_cache_key_changes_with_source_and_versions(tmp_path, monkeypatch):
    cache = KernelCache(str(tmp_path))
    a, b = emit_matmul(SPECS[0], []), emit_matmul(SPECS[1], [])
    assert cache.key(a[1]) != cache.key(b[1])
    key = cache.key(a[1])
    monkeypatch.setattr("sparsec.codegen.cache.versions", lambda: "sparsec=0 torch=0 triton=0")
    assert cache.key(a[1]) != key


def test_two_processes_filling_the_cache_at_once(tmp_path):
    """Both write the same entries concurrently; every file ends up valid, no temp files remain."""
    script = textwrap.dedent(f"""
        import sys
        from sparsec.codegen.builder import emit_matmul
        from sparsec.codegen.cache import KernelCache
        from sparsec.codegen.spec import MatmulSpec
        cache = KernelCache({str(tmp_path)!r})
        for i in range(30):
            for act in ("relu", "gelu", "silu", None):
                name, source = emit_matmul(MatmulSpec("float16", "float16", True, act, False, "float16"), [])
                path = cache.store(name, source)
                assert cache._valid(path, source), path
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "ok" in out, err
    files = os.listdir(tmp_path / "kernels")
    assert len(files) == 4 and not [f for f in files if f.startswith(".tmp")]


# ------------------------------------------------------------------------------------------------ compiled models


class Chains(nn.Module):
    """Every fusable chain shape but the cast (CastChains): + bias vector, activations (module, function, method),
    scale."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64, bias=False)
        self.b_bias = nn.Parameter(torch.randn(64) * 0.1)
        self.c = nn.Linear(64, 64)
        self.c_scale = nn.Parameter(torch.rand(64) + 0.5)
        self.d = nn.Linear(64, 64)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = self.act(self.a(h))                          # module activation
        h = F.silu(self.b(h) + self.b_bias)              # bias add, then silu
        h = (self.c(h).relu() * self.c_scale)            # method relu, per-channel scale
        shared = self.d(h)                               # two users: nothing fused
        h = F.gelu(shared) + shared
        return self.out(h)


def _compiled_on_triton(model_class):
    """(model, input, compiled model, its Triton layers by name) for a 32-feature test model."""
    torch.manual_seed(0)
    model, (x,) = on_device(model_class().eval(), (torch.randn(5, 32),))
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton")
    return model, x, cm, {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear)}


def test_fusion_in_a_compiled_model():
    model, x, cm, modules = _compiled_on_triton(Chains)
    assert set(modules) == {"a", "b", "c", "d"}
    assert modules["a"].activation == "gelu_tanh"
    assert modules["b"].activation == "silu" and modules["b"].bias is not None
    assert modules["c"].activation == "relu" and modules["c"].out_scale is not None
    assert modules["d"].activation is None
    assert cm.counters["fused_gelu_tanh"] == 1 and cm.counters["fused_bias"] == 1 and cm.counters["fused_scale"] == 1
    assert cm.counters["fused_relu"] == 1 and cm.counters["fused_silu"] == 1
    targets = [n.target for n in cm.graph_module.graph.nodes if n.op == "call_function"]
    assert F.silu not in targets and torch.relu in targets  # inp's relu stays: inp is the dense first layer
    assert len(cm.kernels) == 4 and all(f"def {name}(" in src for name, src in cm.kernels.items())
    assert "fused relu+scale" in cm.graph_module.code.replace("scale, kernel", "scale")
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    # the kernels really run: the result differs from the torch reference only by rounding
    with torch.no_grad():
        assert output_error(cm(x), model(x)) > 1e-4


class CastChains(nn.Module):
    """Casts closing a chain, in each spelling the fusion pass reads; the cast back to fp32 stays in the graph."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.d = nn.Linear(64, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        h = self.inp(x)
        h = F.relu(self.a(h)).half().float()             # method cast after an activation
        h = self.b(h).to(torch.bfloat16).float()         # .to(dtype)
        h = self.c(h).to(dtype=torch.float16).float()    # .to(dtype=...)
        h = self.d(h).to(h.device).float()               # .to(device): not a cast the kernel does
        return self.out(h)


def test_cast_fusion_in_a_compiled_model():
    """(Without a GPU the bfloat16 cast stays in the graph: the interpreter's conversion truncates.)"""
    model, x, cm, modules = _compiled_on_triton(CastChains)
    bf16 = DEVICE == "cuda"
    assert {k: modules[k].out_dtype for k in "abcd"} == {"a": torch.float16, "b": torch.bfloat16 if bf16 else None,
                                                         "c": torch.float16, "d": None}
    assert modules["a"].activation == "relu" and cm.counters["fused_cast"] == 2 + bf16
    methods = [n.target for n in cm.graph_module.graph.nodes if n.op == "call_method"]
    assert "half" not in methods and methods.count("float") == 4 and methods.count("to") == 2 - bf16
    assert all(f"cast:{t}" in str(cm.kernel_manifest) for t in ("float16", "bfloat16")[:1 + bf16])
    with torch.no_grad():
        # the casts round the same outputs (summed in another order) to fp16 / bf16: a few bf16 ulps at most
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 5e-3


class PromotingChains(nn.Module):
    """A float16 body with float32 vectors after two of its layers: torch promotes that sum and that
    product to float32, which a kernel writing float16 would not; a float16 vector is fused as usual."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 64, bias=False), nn.Linear(64, 64)
        self.c = nn.Linear(64, 64, bias=False)
        self.half()
        self.a_bias, self.b_scale = nn.Parameter(torch.randn(64)), nn.Parameter(torch.rand(64))  # float32
        self.c_bias = nn.Parameter(torch.randn(64).half())
        self.out = nn.Linear(64, 8)  # float32, as the promoted values are

    def forward(self, x):
        h = torch.relu(self.a(self.inp(x)) + self.a_bias)   # float32: neither the bias nor the relu is fused
        h = (self.b(h.half()) * self.b_scale).half()        # float32 product: the scale stays in the graph
        h = torch.relu(self.c(h) + self.c_bias)             # float16: bias and relu fused
        return self.out(h.float())


def test_a_vector_that_would_promote_the_dtype_is_not_fused():
    torch.manual_seed(0)
    model, (x,) = on_device(PromotingChains().eval(), (torch.randn(5, 32).half(),))
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton")
    modules = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear)}
    assert set(modules) == {"a", "b", "c"}
    assert modules["a"].bias is None and modules["a"].activation is None and modules["b"].out_scale is None
    assert modules["c"].bias is not None and modules["c"].activation == "relu"
    with torch.no_grad():
        out = cm(x)
        assert out.dtype == torch.float32 and output_error(out, pruned_model(model, cm.plan)(x)) <= 2e-3


class CopiedVectorChains(nn.Module):
    """Vectors a kernel's copy would not stand for: a bias parameter read again after the layer (tied: its
    gradient is the sum of both reads), a trainable one-element bias (one value, not one per feature); a
    float16 bias buffer on float32 layers (torch promotes it: fused, in the layer's dtype, which the
    backward's F.linear needs); a cast that also moves the output to another device."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.a, self.b, self.c, self.d = (nn.Linear(64, 64, bias=False) for _ in range(4))
        self.tied, self.one = nn.Parameter(torch.randn(64) * 0.1), nn.Parameter(torch.tensor([0.1]))
        self.register_buffer("half_bias", (torch.randn(64) * 0.1).half())
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        h = self.inp(x)
        h = torch.relu(self.a(h) + self.tied) + self.tied   # nothing fused
        h = torch.relu(self.b(h) + self.one)                 # nothing fused
        h = torch.relu(self.c(h) + self.half_bias)           # bias and relu fused
        return self.out(h), F.silu(self.d(h)).to("meta", dtype=torch.float16)  # silu fused, the move stays


def test_a_fused_vector_or_cast_computes_what_it_did():
    torch.manual_seed(0)
    model, (x,) = on_device(CopiedVectorChains().eval(), (torch.randn(5, 32),))
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=["d"])
    modules = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear)}
    assert modules["a"].bias is None and modules["b"].bias is None and modules["a"].activation is None
    assert modules["c"].activation == "relu" and modules["c"].bias.dtype == torch.float32
    assert modules["d"].activation == "silu" and modules["d"].out_dtype is None
    ref = pruned_model(model, cm.plan)
    (y, moved), (y_ref, _) = cm(x), ref(x)
    assert moved.device.type == "meta" and moved.dtype == torch.float16  # the kernel wrote where d ran
    assert output_error(y, y_ref) <= 1e-5
    y.square().sum().backward()  # the backward runs the layers' torch reference: the bias in their dtype
    y_ref.square().sum().backward()
    params = dict(cm.graph_module.named_parameters())
    for name in ("tied", "one", "out.weight"):
        assert output_error(params[name].grad, dict(ref.named_parameters())[name].grad) <= 1e-4, name


class ViewChains(Chains):
    """Views between a layer and its epilogue: those keeping the last dim are looked through, others end the chain."""

    def forward(self, x):                                       # x [5, 32]
        h = self.inp(x)
        h = F.relu(self.a(h).view(5, 1, 64))                    # rows regrouped: relu fused, the view stays
        h = torch.relu(self.b(h.reshape(5, 64)).reshape(1, 5, 64) + self.b_bias).reshape(5, 64)  # bias and relu fused
        h = self.c(h).view(5, 2, 32).relu().reshape(5, 64)      # the feature dim split: nothing fused
        return self.out(h)


def test_fusion_looks_through_views_that_keep_the_features():
    model, x, cm, modules = _compiled_on_triton(ViewChains)
    assert modules["a"].activation == "relu"
    assert modules["b"].activation == "relu" and modules["b"].bias is not None
    assert modules["c"].activation is None
    calls = [n.target for n in cm.graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    assert [t for t in calls if "relu" in str(t)] == ["relu"]  # c's x.relu(): its input is split
    assert calls.count("view") == 2 and calls.count("reshape") == 4 and not any("add" in str(t) for t in calls)
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


@pytest.mark.parametrize("example, quantize", [("mlp", None), ("mlp", "int8"), ("transformer", "int8")])
def test_examples_on_the_triton_backend(example, quantize):
    model, inputs = load_example(example).build_model()
    if example == "transformer":
        inputs = (inputs[0][:, :4],)
    model, inputs = on_device(model, inputs)
    cm = sparsec.compile(model, example_inputs=inputs, backend="triton", quantize=quantize)
    assert cm.kernels and all(lp.backend == "triton" for lp in cm.plan.sparse_layers)
    with torch.no_grad():
        assert output_error(cm(*inputs), pruned_model(model, cm.plan)(*inputs)) <= 1e-5


def test_fanin_model_on_the_triton_backend():
    model, inputs = on_device(*load_example("mlp").build_model())
    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=inputs, backend="triton")
    assert all(lp.backend == "triton" for lp in cm.plan.sparse_layers)
    assert all(entry["pattern"] == "fanin" and "relu" in entry["fused_ops"] for entry in cm.kernel_manifest.values())
    with torch.no_grad():
        assert output_error(cm(*inputs), pruned_model(model, cm.plan)(*inputs)) <= 1e-5


def test_half_precision_model_on_the_triton_backend():
    model, (x,) = on_device(*load_example("mlp").build_model())
    model, x = model.half(), x.half()
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton")
    with torch.no_grad():
        assert output_error(cm(x).double(), pruned_model(model, cm.plan)(x).double()) <= 5e-3


@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.5", "unstructured:0.7"])
def test_triton_layers_follow_autocast_as_the_layers_they_replace(pattern):
    """Under autocast to another dtype a Triton layer computes in that dtype, as nn.Linear / nn.Conv2d do:
    the kernels, generated for float32, refused the bfloat16 inputs the autocast layers before them made
    ("generated for float32 inputs, got torch.bfloat16"), and returned float32 from float32 inputs. A
    model compiled in the autocast dtype still runs its kernels under it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 8))
    model, (x,) = on_device(model, (torch.randn(2, 4, 6, 6),))
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), backend="triton", include=[".*"])
    assert not any(lp.sparsity is None for lp in cm.plan)
    oracle = pruned_model(model, cm.plan)
    device = x.device.type
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.no_grad(), torch.autocast(device, dtype=low):
        first, y, expected = cm.sparse_module("0")(x), cm(x), oracle(x)
    assert first.dtype == y.dtype == expected.dtype == low  # (the first layer sees the float32 input itself)
    assert output_error(y.double(), expected.double()) <= 2e-2
    half_model = copy.deepcopy(model).half()
    half = sparsec.compile(half_model, pattern=pattern, example_inputs=(x.half(),), backend="triton", include=[".*"])
    calls, kernel_layers = [], [m for m in half.modules() if isinstance(m, OpaqueKernel)]
    for layer in kernel_layers:
        layer.kernel_forward = lambda x, run=layer.kernel_forward, **kw: calls.append(1) or run(x, **kw)
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16):
        y = half(x.half())
    assert kernel_layers and y.dtype == torch.float16 and len(calls) == len(kernel_layers)
    with torch.no_grad():
        assert output_error(y.double(), pruned_model(half_model, half.plan)(x.half()).double()) <= 1e-2


class _BiasAddedInTheGraph(nn.Module):
    def __init__(self, scale: torch.Tensor | None = None):
        super().__init__()
        self.fc = nn.Linear(32, 32, bias=False)
        self.b = nn.Parameter(torch.randn(32))
        self.register_buffer("s", scale)

    def forward(self, x):
        y = F.relu(self.fc(x) + self.b)
        return y if self.s is None else y * self.s


def test_a_fused_bias_add_keeps_its_dtype_under_autocast():
    """`relu(fc(x) + b)`, b a float32 vector the fusion pass folds into the layer: under bf16 autocast the
    original computes fc in bf16 and the add in float32 (`bf16 + float32` promotes), but the layer's
    reference passed b to F.linear as its bias, which autocast cast to bf16: the model returned bf16."""
    torch.manual_seed(0)
    model, (x,) = on_device(_BiasAddedInTheGraph(), (torch.randn(3, 32),))
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", include=[".*"])
    assert cm.graph_module.fc.spec().epilogue_ops() == ["bias", "relu"]
    oracle = pruned_model(model, cm.plan)
    low = torch.bfloat16 if x.device.type == "cpu" else torch.float16
    with torch.no_grad():
        torch.testing.assert_close(cm(x), oracle(x))
        with torch.autocast(x.device.type, dtype=low):
            y, expected = cm(x), oracle(x)
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, expected)


def test_a_zero_dim_scale_of_a_wider_dtype_stays_in_the_graph():
    """`y * s`, s a 0-dim float32 buffer on a float16 layer: torch multiplies by s unrounded on the CPU (the
    outputs are finite for s = 2**17) and rounds it to float16 on CUDA (inf), so a float16 copy in the
    kernel's epilogue matched neither everywhere: it stays in the graph, computing what the model does."""
    torch.manual_seed(0)
    model = _BiasAddedInTheGraph(torch.tensor(2.0 ** 17)).half()
    model.s = torch.tensor(2.0 ** 17)  # (.half() converted the buffer too)
    model, (x,) = on_device(model, (torch.randn(3, 32).half(),))
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", include=[".*"])
    assert cm.graph_module.fc.spec().epilogue_ops() == ["bias", "relu"]
    with torch.no_grad():
        y, expected = cm(x), pruned_model(model, cm.plan)(x)
    assert torch.equal(y.isfinite(), expected.isfinite())
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)  # (fp16 outputs in the thousands)


def test_non_kernel_layers_stay_on_torch_with_reason():
    model, inputs = on_device(*load_example("cnn").build_model())
    plan = sparsec.explain(model, example_inputs=inputs, backend="triton", include=["head"], pattern="2:4")
    assert plan["stage1.0.0"].backend == "triton" and plan["head"].backend == "triton"
    grouped = plan["stage2.1.0"]
    assert grouped.sparsity == "2:4" and grouped.backend == "torch" and "covers groups=1 only" in grouped.reason
    fanin = sparsec.explain(model, example_inputs=inputs, backend="triton", pattern="fanin:0.5")
    assert fanin["stage1.0.0"].backend == "torch" and "conv kernels cover 2:4 and unstructured only" in fanin["stage1.0.0"].reason
    model, inputs = on_device(*load_example("mlp").build_model())
    other = sparsec.explain(model, pattern="1:4", backend="triton", example_inputs=inputs)
    assert other["fc2"].backend == "torch" and "cover 2:4, constant fan-in and unstructured convs only" in other["fc2"].reason


def test_second_compile_emits_nothing_new():
    model, inputs = on_device(*load_example("mlp").build_model())
    first = sparsec.compile(model, example_inputs=inputs, backend="triton")
    second = sparsec.compile(model, example_inputs=inputs, backend="triton")
    assert first.kernels == second.kernels
    assert second.counters["kernel_cache_hit"] == len(second.kernels) and not second.counters["kernel_cache_written"]


def test_triton_backend_without_a_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, inputs = load_example("mlp").build_model()
    if torch.cuda.is_available():
        pytest.skip("the model is on the CPU but this machine has CUDA; covered by the CPU CI")
    with pytest.raises(ValueError, match="backend='triton' needs the model on a CUDA device, or TRITON_INTERPRET=1"):
        sparsec.compile(model, example_inputs=inputs, backend="triton")
    # auto on CPU says what runs each layer: a float32 linear layer its measured choice between the C++
    # kernel and dense, a float64 one (no C++ kernel) its pruned weight kept dense
    auto = sparsec.compile(model, example_inputs=inputs).plan["fc2"]
    assert auto.backend in ("bitmask", "dense") and "backend auto at M=8: " in auto.reason
    double = sparsec.compile(copy.deepcopy(model).double(), example_inputs=tuple(x.double() for x in inputs)).plan["fc2"]
    assert double.backend == "dense" and ("runs as a dense pruned weight (backend auto): the bitmask CPU "
                                          "kernel runs float32 / bfloat16 / float16 layers (this one is float64)") in double.reason
    assert "torch runtime" not in sparsec.compile(model, example_inputs=inputs, backend="torch").plan["fc2"].reason


def test_gradients_flow_through_triton_layers():
    model, (x,) = on_device(*load_example("mlp").build_model())
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton")
    x = x.clone().requires_grad_(True)
    cm(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_second_derivatives_through_triton_layers():
    """The Triton layers' backward (their reference recomputed) is differentiable again: a gradient
    penalty through a layer whose fused GELU makes its input gradient depend on x gives every parameter
    the dense pruned model's gradient (without create_graph it stopped there: the penalty raised that
    nothing required grad, or left gradients None)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(DEVICE)
    x = torch.randn(4, 32, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=["2"], min_weights=0)
    layer = cm.sparse_module("2")
    assert isinstance(layer, TritonSparseLinear) and layer.activation == "gelu"
    ref = pruned_model(model, cm.plan)
    for m in (cm, ref):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xr).pow(2).sum(), xr, create_graph=True)
        g.pow(2).sum().backward()
    expected = dict(ref.named_parameters())
    for name, p in cm.named_parameters():
        want = expected[name.removeprefix("graph_module.")].grad
        assert p.grad is not None and output_error(p.grad, want) <= 1e-4, name


def test_plan_with_backend_round_trips():
    model, inputs = on_device(*load_example("mlp").build_model())
    cm = sparsec.compile(model, example_inputs=inputs, backend="triton")
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    again = sparsec.compile(model, example_inputs=inputs, plan=plan)
    assert again.plan == cm.plan and again.kernels == cm.kernels


def test_a_triton_layer_called_at_several_row_counts_and_with_wrong_features():
    """A layer resolves its launch once per row count (per-call Python time matters at one row): each
    row count gets its own, and an input of the wrong width is refused, naming the layer."""
    torch.manual_seed(0)
    model, (x,) = on_device(nn.Sequential(nn.Linear(64, 48), nn.ReLU()), (torch.randn(3, 64),))
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    w = cm.effective_weight("0").double()
    with torch.no_grad():
        for rows in (3, 5, 1, 3, 70):
            xi = torch.randn(rows, 64, device=x.device)
            expected = F.relu(xi.double() @ w.t() + model[0].bias.double())
            assert output_error(cm(xi).double(), expected) <= 1e-5, rows
        assert output_error(cm(xi.reshape(7, 10, 64)).double(), expected.reshape(7, 10, 48)) <= 1e-5
        with pytest.raises(ValueError, match="layer '0' takes inputs with 64 features in the last dimension, got 32"):
            cm(torch.randn(3, 32, device=x.device))


def test_a_triton_layer_sees_new_and_updated_operands_after_its_first_call(monkeypatch):
    """A layer binds its operands once per shape (per-call Python time matters at one row); updating them
    in place reaches the kernel, and assigning a new bias or launch config rebinds."""
    from sparsec.codegen import launch as launch_module
    from sparsec.codegen.configs import matmul_config

    configs_used = []
    real_launch = launch_module.sparse24_launch
    monkeypatch.setattr(launch_module, "sparse24_launch",
                        lambda *args: configs_used.append(args[-1]) or real_launch(*args))
    torch.manual_seed(0)
    model, (x,) = on_device(nn.Sequential(nn.Linear(64, 48)), (torch.randn(3, 64),))
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    layer = cm.sparse_module("0")
    w = cm.effective_weight("0").double()
    with torch.no_grad():
        cm(x)
        layer.bias.add_(1.0)  # in place
        assert output_error(cm(x).double(), x.double() @ w.t() + layer.bias.double()) <= 1e-5
        layer.bias = nn.Parameter(torch.full((48,), -2.0, device=x.device))  # a new parameter
        assert output_error(cm(x).double(), x.double() @ w.t() - 2.0) <= 1e-5
        assert configs_used == [None, None]  # bound twice (at first, and for the new bias), the shape table's config
        layer.launch = dict(matmul_config(3, 48, 64, "float32"), M=3, BLOCK_N=16)
        assert output_error(cm(x).double(), x.double() @ w.t() - 2.0) <= 1e-5
        assert len(configs_used) == 3 and configs_used[-1]["BLOCK_N"] == 16


def test_auto_picks_the_fastest_measured(monkeypatch):
    timings = {"dense": 20e-6, "triton": 12e-6, "cusparselt": 15e-6}
    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: {k: k for k in timings})
    monkeypatch.setattr("sparsec.codegen.measure.check_candidates", lambda options, **kw: ({}, {}))  # stand-ins compute nothing
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", lambda fn: timings[fn])
    best, note, launch = pick_fastest(None, None, None, None, 16, None)
    assert (best, launch) == ("triton", None)  # a condensed (fan-in) kernel has no launch choices
    assert note == "backend auto at M=16, eager calls after an L2 flush: triton 12.0 us, cusparselt 15.0 us, dense 20.0 us -> triton (1.67x dense)"
    timings["dense"] = 5e-6
    assert pick_fastest(None, None, None, None, None, None)[0] == "dense"


def test_auto_keeps_the_fastest_launch_config(monkeypatch):
    from sparsec.codegen.measure import KernelCall

    configs = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=s, num_warps=4, num_stages=4) for s in (4, 2, 1)]
    seconds = {4: 9e-6, 2: 7e-6, 1: 11e-6}
    options = {"dense": "dense", "cusparselt": "cusparselt"}
    options.update({("triton" if i == 0 else f"triton#{i}"): KernelCall(None, cfg) for i, cfg in enumerate(configs)})
    timings = {"dense": 12e-6, "cusparselt": 8e-6}
    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: options)
    monkeypatch.setattr("sparsec.codegen.measure.check_candidates", lambda options, **kw: ({}, {}))
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda",
                        lambda fn, **kw: seconds[fn.config["SPLIT_K"]] if isinstance(fn, KernelCall) else timings[fn])
    best, note, launch = pick_fastest(None, None, None, None, 1, None)
    assert best == "triton" and launch == dict(configs[1], M=1)
    assert note.startswith("backend auto at M=1, eager calls after an L2 flush: triton 7.0 us (16x32x128 tiles, split-K 2, 4 warps, 4 stages, "
                           "fastest of 3 configs by GPU time), cusparselt 8.0 us, dense 12.0 us -> triton (1.71x dense)")
    timings["cusparselt"] = 6e-6  # a faster library: no launch config is kept
    assert pick_fastest(None, None, None, None, 1, None)[::2] == ("cusparselt", None)


def test_auto_ranks_launch_configs_by_gpu_time_even_when_timing_eager_calls(monkeypatch):
    """Launch configs share one host path: eager timings of a one-row call are mostly host time and ranked
    them by noise (on the H100 auto kept split-K 1 at 48.3 us of GPU time, split-K 4 ran 39.7 us: 0.95x
    dense). The configs are ranked by CUDA-graph replays; only the fastest is timed eagerly against the
    other backends, whose choice stays by eager time."""
    from sparsec.codegen.measure import KernelCall

    configs = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=s, num_warps=4, num_stages=4) for s in (1, 4)]
    options = {"dense": "dense", **{("triton" if i == 0 else f"triton#{i}"): KernelCall(None, cfg)
                                    for i, cfg in enumerate(configs)}}
    gpu = {1: 48e-6, 4: 40e-6, "dense": 46e-6}
    eager = {1: 100e-6, 4: 101e-6, "dense": 104e-6}  # host-bound: the slower config reads faster by noise
    timed = []

    def time_cuda(fn, graph=False):
        key = fn.config["SPLIT_K"] if isinstance(fn, KernelCall) else fn
        timed.append((key, graph))
        return (gpu if graph else eager)[key]

    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: options)
    monkeypatch.setattr("sparsec.codegen.measure.check_candidates", lambda options, **kw: ({}, {}))
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", time_cuda)
    best, note, launch = pick_fastest(None, None, None, None, 16, None)
    assert best == "triton" and launch == dict(configs[1], M=16)
    assert "triton 101.0 us (16x32x128 tiles, split-K 4, 4 warps, 4 stages, fastest of 2 configs by GPU time)" in note
    assert {key for key, graph in timed if not graph} == {4, "dense"}  # the slower config is not timed eagerly
    assert {key for key, graph in timed if graph} == {1, 4}  # and dense only eagerly, as the model calls it
    eager["dense"] = 90e-6  # the backend choice itself stays by eager time
    assert pick_fastest(None, None, None, None, 16, None)[::2] == ("dense", None)


def test_auto_never_picks_a_candidate_that_computes_the_wrong_thing(monkeypatch):
    """Every candidate's output is compared with dense before timing: a wrong one (here the fastest,
    and one returning NaN) is dropped and named in the reason; right ones within rounding are kept."""
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    right = F.linear(x, w)
    options = {"dense": lambda: F.linear(x, w), "triton": lambda: right.half(),  # rounded once: agrees
               "triton#1": lambda: right * 1.1, "cusparselt": lambda: right * float("nan")}
    timings = {"dense": 10e-6, "triton": 8e-6, "triton#1": 1e-6, "cusparselt": 2e-6}
    names = {id(fn): name for name, fn in options.items()}
    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: options)
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", lambda fn: timings[names[id(fn)]])
    best, note, _ = pick_fastest(None, None, None, None, 4, None)
    assert best == "triton"
    assert note.endswith("rejected for wrong results: cusparselt (error nan of dense's largest output), "
                         "triton#1 (error 0.1 of dense's largest output)")


def test_auto_names_a_candidate_that_fails_to_run(monkeypatch):
    """A candidate raising (say, a launch config the installed Triton cannot compile) is not chosen,
    and the reason says which one and why, instead of dropping it silently."""
    x, w = torch.randn(4, 64), torch.randn(32, 64)

    def broken():
        raise RuntimeError("PTX assembly failed\nptxas: unknown instruction 'prmt.b32'")

    options = {"dense": lambda: F.linear(x, w), "triton": lambda: F.linear(x, w), "triton#1": broken}
    timings = {"dense": 10e-6, "triton": 8e-6}
    names = {id(fn): name for name, fn in options.items()}
    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: options)
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", lambda fn: (fn(), timings[names[id(fn)]])[1])  # runs it
    best, note, _ = pick_fastest(None, None, None, None, 4, None)
    assert best == "triton"
    assert note.endswith("; failed to run: triton#1 (RuntimeError: ptxas: unknown instruction 'prmt.b32')")


def test_auto_rejects_a_kernel_that_leaves_outputs_unwritten(monkeypatch):
    """Launchers are checked writing into a NaN-filled `out`: a kernel that skips a tile fails, even
    where a fresh allocation would have handed it the last freed block holding a right answer."""
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    right = F.linear(x, w)

    def skips_a_tile(out=None):
        y = right.clone() if out is None else out  # without out: what a reused allocation may hold
        y[:, :16] = right[:, :16]
        return y

    options = {"dense": lambda: F.linear(x, w), "triton": skips_a_tile}
    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: options)
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", lambda fn: 1e-6 if fn is skips_a_tile else 1e-5)
    best, note, _ = pick_fastest(None, None, None, None, 4, None)
    assert best == "dense" and note.endswith("rejected for wrong results: triton (error nan of dense's largest output)")


def test_launchers_write_into_a_given_output():
    x, values, meta, _, pruned = _operands(5, 32, 64, torch.float32, False, seed=3)
    spec = MatmulSpec("float32", "float32", False, None, False, "float32")
    name, source = emit_matmul(spec, [])
    out = torch.full((10, 32), float("nan"), device=DEVICE)[::2]  # a row stride the kernel must honour
    y = sparse24_matmul(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, out=out)
    assert y.data_ptr() == out.data_ptr() and output_error(out.cpu().double(), x.double() @ pruned.double().t()) <= 1e-5
    for bad in (torch.empty(5, 31, device=DEVICE), torch.empty(5, 32, dtype=torch.float16, device=DEVICE),
                torch.empty(32, 5, device=DEVICE).t()):
        with pytest.raises(ValueError, match=r"out must be a \[5, 32\] torch.float32 tensor"):
            sparse24_matmul(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source,
                            out=bad)


def test_a_plan_launch_config_is_used_and_checked():
    model, (x,) = on_device(nn.Sequential(nn.Linear(64, 48), nn.ReLU()), (torch.randn(3, 64),))
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    assert cm.plan["0"].launch is None  # backend="triton" alone measures nothing
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    launch = dict(M=3, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=3, PRMT_EXPAND=0, num_warps=4, num_stages=1)
    plan["0"].launch = launch
    with pytest.raises(ValueError, match=r"a launch config needs exactly the keys \[.*'GATHER'"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)
    launch["GATHER"] = 0
    tuned = sparsec.compile(model, example_inputs=(x,), plan=plan)
    assert tuned.plan["0"].launch == launch
    layer = next(m for m in tuned.modules() if isinstance(m, TritonSparseLinear))
    assert layer.launch_config(3) == {k: v for k, v in launch.items() if k != "M"} and layer.launch_config(4) is None
    entry = next(iter(tuned.kernel_manifest.values()))["layers"][0]
    assert entry["launch_config"]["SPLIT_K"] == 3
    with torch.no_grad():
        assert output_error(tuned(x).double(), F.relu(x.double() @ cm.effective_weight("0").double().t()
                                                      + model[0].bias.double())) <= 1e-5
    plan["0"].launch = dict(launch, BLOCK_N=24)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)
    plan["0"].launch, plan["0"].backend = launch, "torch"
    with pytest.raises(ValueError, match=r"launch config applies to 2:4 layers on backend 'triton' \(and 'max_rows'"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


# ------------------------------------------------------------------------------------------------ CLI


def test_dump_kernels_writes_importable_files_and_manifest(tmp_path, monkeypatch):
    from sparsec.cli import main
    from oracle import EXAMPLES

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no device needed to dump
    out = tmp_path / "kernels"
    assert main(["dump-kernels", os.path.join(EXAMPLES, "transformer.py"), "--pattern", "2:4", "--quantize", "int8",
                 "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["kernels"]) == {p.stem for p in out.glob("*.py")}
    gelu = [k for k, v in manifest["kernels"].items() if "gelu" in v["fused_ops"]]
    assert len(gelu) == 1 and {layer["name"] for layer in manifest["kernels"][gelu[0]]["layers"]} == {"blocks.0.fc1", "blocks.1.fc1"}
    for entry in manifest["kernels"].values():
        for layer in entry["layers"]:
            assert {"M", "N", "K", "launch_config"} <= set(layer)
            # (a GPU's launch sizes split-K by its SM count, which a dump without one cannot know: it says so)
            assert "without a GPU" in layer["launch_config_for"] and layer["launch_config"]["SPLIT_K"] == 1
    for path in out.glob("*.py"):
        result = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(path)!r})"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    # a second dump into the folder: the first one's kernels it does not write go; other files stay
    (out / "notes.txt").write_text("mine")
    first = set(manifest["kernels"])
    assert main(["dump-kernels", os.path.join(EXAMPLES, "transformer.py"), "--pattern", "2:4", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["kernels"]) == {p.stem for p in out.glob("*.py")} and set(manifest["kernels"]) != first
    assert (out / "notes.txt").read_text() == "mine"



def test_values_at_an_odd_offset_are_realigned(monkeypatch):
    """The kernel reads a group's two kept values as one word: a values view starting mid-word
    (odd element offset, a misaligned-address fault on a GPU) reaches the kernel copied to an
    aligned start, and the result is right."""
    from sparsec.codegen import launch

    launched = []
    real_kernel = launch.loaded_kernel

    class Spy:  # records the values pointer each launch receives, then launches for real
        def __init__(self, *a):
            self.kernel = real_kernel(*a)

        def __getitem__(self, grid):
            return lambda *args, **kw: (launched.append(args[2].data_ptr()), self.kernel[grid](*args, **kw))

    monkeypatch.setattr(launch, "loaded_kernel", Spy)
    x, values, meta, _, pruned = _operands(3, 16, 32, torch.float16, False, seed=5)
    spec = MatmulSpec("float16", "float16", False, None, False, "float16")
    name, source = emit_matmul(spec, [])
    storage = torch.zeros(values.numel() + 1, dtype=torch.float16)
    storage[1:] = values.half().flatten()
    shifted = storage[1:].view(values.shape)  # contiguous, one element past an aligned start
    assert shifted.data_ptr() % 4
    y = sparse24_matmul(x.half().to(DEVICE), shifted.to(DEVICE) if DEVICE != "cpu" else shifted, meta.to(DEVICE),
                        None, None, None, spec, name, source)
    assert output_error(y.cpu().double(), x.half().double() @ pruned.half().double().t()) <= 2e-3
    assert len(launched) == 1 and launched[0] % 4 == 0


def test_auto_candidates_take_turns_so_a_drift_falls_on_all_of_them(monkeypatch):
    """Timing drifts while auto measures (clocks ramping up from idle): with each candidate timed to
    the end in turn, the first one measured would absorb it. In rounds, every candidate sees it."""
    from sparsec.codegen.timing import ROUNDS, timed_in_rounds

    clock = iter(range(1000))
    order = []

    def drifting_timer(fn):  # every call is slower than the last; fn names itself
        order.append(fn())
        return 1e-6 * (10 + next(clock)) if order[-1] != "slow" else 1.0

    times = timed_in_rounds({"dense": lambda: "dense", "triton": lambda: "triton", "slow": lambda: "slow"},
                            drifting_timer, ROUNDS, failed := {})
    assert order == ["dense", "triton", "slow"] * ROUNDS and not failed
    assert times["dense"] < times["triton"] < times["slow"]
    assert times["triton"] - times["dense"] == pytest.approx(1e-6)  # one call apart, not a whole candidate


def test_a_candidate_failing_in_a_later_round_is_named_not_chosen():
    from sparsec.codegen.timing import timed_in_rounds

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("launch failed")
        return None

    failed = {}
    times = timed_in_rounds({"triton": flaky, "dense": lambda: None}, lambda fn: fn() or 1e-5, 3, failed)
    assert set(times) == {"dense"} and failed == {"triton": "RuntimeError: launch failed"} and len(calls) == 2


def test_fp32_candidates_are_held_to_tf32_tolerance_when_dense_runs_on_tf32():
    """cuDNN runs float32 convs on TF32 by default: an exact float32 kernel then differs from the
    dense candidate by TF32's rounding (~1e-3), which must not count as a wrong result; with TF32
    off, float32's own tolerance applies."""
    from sparsec.codegen.measure import check_candidates

    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(128, 256)
    exact = x @ w.t()
    tf32_like = (x.half().float() @ w.half().float().t())  # inputs rounded to a 10-bit mantissa, as TF32 does
    options = {"dense": lambda: tf32_like, "triton": lambda: exact}
    assert check_candidates(options, tf32=True) == ({}, {})
    wrong, failed = check_candidates(options, tf32=False)
    assert set(wrong) == {"triton"} and not failed


def test_auto_with_graph_timing_times_gpu_time_and_says_so(monkeypatch):
    """timing="graph": candidates replayed from a CUDA graph (time_cuda(graph=True)), for models run
    under CUDA graphs; the plan's reason says which timing chose."""
    timings = {"dense": 20e-6, "triton": 12e-6}
    seen = []
    monkeypatch.setattr("sparsec.codegen.measure.candidates", lambda *a: {k: k for k in timings})
    monkeypatch.setattr("sparsec.codegen.measure.check_candidates", lambda options, **kw: ({}, {}))
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", lambda fn, **kw: seen.append(kw) or timings[fn])
    best, note, _ = pick_fastest(None, None, None, None, 4, None, graph=True)
    assert best == "triton" and seen and all(kw == {"graph": True} for kw in seen)
    assert note.startswith("backend auto at M=4, CUDA graph replays (GPU time) after an L2 flush: triton 12.0 us")
    seen.clear()
    assert "eager calls" in pick_fastest(None, None, None, None, 4, None)[1] and all(kw == {} for kw in seen)


def test_timing_refuses_an_unknown_l2_flush_before_running_anything():
    from sparsec.codegen.timing import time_cuda

    calls = []
    with pytest.raises(ValueError, match=r"unknown L2 flush 'hot'; use one of \['clean', 'dirty'\]"):
        time_cuda(lambda: calls.append(1), l2_flush="hot")
    assert calls == []


def test_auto_times_the_modules_the_compiled_model_runs(auto_as_on_a_gpu):
    """backend="auto" as on a GPU (the device check and the timer stand in; the candidates run for
    real, in the interpreter here): each candidate is the runtime module that choice becomes, called
    as the compiled model calls it, so eager timings include that module's per-call Python; the
    kernel's configs are checked against dense, the fastest is kept, and the compiled model runs it."""
    from sparsec.codegen.measure import KernelCall
    from sparsec.runtime.layers import SparseLinear

    timed = auto_as_on_a_gpu  # the kernel's second config is the fastest
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 32), nn.ReLU()).to(DEVICE), torch.randn(3, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="auto", include=[".*"], min_weights=0)
    layer = cm.plan["0"]
    assert layer.backend == "triton" and layer.launch["BLOCK_K"] == 16 and layer.launch["M"] == 3
    assert "triton 10.0 us" in layer.reason and "dense 30.0 us" in layer.reason and "rejected" not in layer.reason
    dense_calls = [fn for fn in timed if not isinstance(fn, KernelCall)]
    kernel_calls = [fn for fn in timed if isinstance(fn, KernelCall)]
    assert dense_calls and all(type(fn.func) is SparseLinear for fn in dense_calls)
    modules = {id(fn.run.args[0]): fn.run.args[0] for fn in kernel_calls}
    assert len(modules) == 2 and all(type(m) is TritonSparseLinear for m in modules.values())
    assert sorted(m.launch["BLOCK_K"] for m in modules.values()) == [16, 32]
    for fn in kernel_calls:  # each module runs the config it is timed for, at the compiled rows
        assert fn.run.args[0].launch_config(3) == fn.config
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_compile_passes_graph_timing_to_the_measurement(monkeypatch):
    """compile(timing="graph") reaches the measurement of every layer (the device check and the
    measurement stand in), and a plain compile measures eagerly."""
    graphs = []

    def fake_pick(gm, ctx, layer, decision, m, problem, device="cuda", input_shape=None, graph=False, cpu_cold=None):
        graphs.append(graph)
        return "dense", f"measured with graph={graph}", None

    monkeypatch.setattr("sparsec.passes.backend._device", lambda gm, layer: torch.device("cuda"))
    monkeypatch.setattr("sparsec.codegen.measure.pick_fastest", fake_pick)
    model, x = nn.Sequential(nn.Linear(64, 32), nn.ReLU()), torch.randn(3, 64)
    plan = sparsec.explain(model, example_inputs=(x,), include=[".*"], min_weights=0, timing="graph")
    assert graphs == [True] and "measured with graph=True" in plan["0"].reason
    sparsec.explain(model, example_inputs=(x,), include=[".*"], min_weights=0)
    assert graphs == [True, False]


@pytest.mark.parametrize("kwargs, message", [
    (dict(timing="fast"), "timing='fast' is not supported; accepted: ('eager', 'graph')"),
    (dict(timing="graph", backend="triton"), "backend='triton' measures nothing"),
])
def test_bad_timing_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sparsec.compile(nn.Sequential(nn.Linear(8, 8)), **kwargs)


def test_converting_a_model_that_runs_triton_kernels_to_another_dtype_is_refused_untouched():
    """cm.half() on a float32 compile: the kernels were generated for float32 (they failed inside, or
    with a message naming the wrong dtype); refused before any tensor is converted, naming the remedy."""
    model, x, cm, modules = _compiled_on_triton(Chains)
    for convert in (lambda m: m.half(), lambda m: m.to(torch.float64)):
        with pytest.raises(ValueError, match=r"generated for float32; converting the model to float(16|64) would need "
                                             r"another kernel: convert the model first"):
            convert(cm)
    assert all(p.dtype == torch.float32 for p in cm.parameters())
    cm.to(x.device)  # a conversion that keeps the dtype is fine
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_fused_bias_and_scale_parameters_stay_parameters_with_their_gradients(tmp_path):
    """A trainable vector folded into a kernel's epilogue (b_bias, c_scale) is still a parameter of the
    compiled model, with the gradient the model gives it (the scale was a buffer copy: no gradient)."""
    model, x, cm, modules = _compiled_on_triton(Chains)
    assert isinstance(modules["c"].out_scale, nn.Parameter) and isinstance(modules["b"].bias, nn.Parameter)
    ref = pruned_model(model, cm.plan)
    cm(x).square().sum().backward()
    ref(x).square().sum().backward()
    for fused, original in ((modules["c"].out_scale, ref.c_scale), (modules["b"].bias, ref.b_bias)):
        assert fused.grad is not None and output_error(fused.grad, original.grad) <= 1e-4
    sparsec.save(cm, tmp_path / "m")
    loaded = sparsec.load(tmp_path / "m")
    assert any(name.endswith("c.out_scale") for name, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), cm(x))


def _one_triton_linear(pattern: str):
    """(compiled model, its one Triton layer, an input) of Linear(32, 24) compiled sparse on backend="triton"."""
    torch.manual_seed(0)
    model, (x,) = on_device(nn.Sequential(nn.Linear(32, 24)).eval(), (torch.randn(3, 32),))
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), backend="triton", include=["0"], min_weights=0)
    return cm, next(m for m in cm.modules() if isinstance(m, TritonSparseLinear)), x


@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.75"])
def test_a_triton_linear_refuses_inputs_of_another_width_or_device(pattern):
    """The fan-in kernel gathers x's columns by index: a 16-wide input to this 32-feature layer was read
    out of bounds and a 40-wide one silently cut, with no error. An input on another device than the
    weight is refused as F.linear refuses it (here the weight is moved to meta, the one other device a
    CPU has; the interpreter failed inside on it, a GPU launch would read one device's addresses on
    the other)."""
    _, layer, x = _one_triton_linear(pattern)
    with torch.no_grad():
        for width in (16, 40):
            message = f"takes inputs with 32 features in the last dimension, got {width}"
            with pytest.raises(InvalidInputError, match=message):
                layer(torch.randn(3, width, device=x.device))
        with pytest.raises(InvalidInputError, match=f"holds its weight on meta, got an input on {x.device}"):
            copy.deepcopy(layer).to("meta")(x)
        assert output_error(layer(x), F.linear(x, layer.effective_weight(), layer.bias)) <= 1e-5


def test_a_triton_layer_changed_after_compiling_refuses_its_stale_kernel():
    """A layer's kernel is generated for its spec at compile time. Converted on its own (only
    CompiledModel refuses conversions) it failed inside the kernel; with its bias set to None the
    kernel, generated with one, added the packed weight values as the bias (wrong numbers, no error);
    with another activation, forward skipped it while backward's reference applied it."""
    _, layer, x = _one_triton_linear("2:4")
    changes = {
        "half": (lambda m: m.half(), r"now computes x float16, W 2:4 float16, epilogue \[bias\], out float16, but its "
                                     r"Triton kernel sparse24_mm_f32_bias_\w+ was generated for x float32"),
        "no bias": (lambda m: setattr(m, "bias", None), r"epilogue \[none\], .* generated for .*epilogue \[bias\]"),
        "relu": (lambda m: setattr(m, "activation", "relu"), r"epilogue \[bias, relu\], .* generated for")}
    for change, message in changes.values():
        changed = copy.deepcopy(layer)
        change(changed)
        with torch.no_grad(), pytest.raises(InvalidInputError, match=message):
            changed(x.to(changed.packed.dtype_probe.dtype))
    with torch.no_grad():
        assert output_error(layer(x), F.linear(x, layer.effective_weight(), layer.bias)) <= 1e-5


def test_weights_of_another_dtype_loaded_into_a_2_4_triton_layer_are_refused():
    """load_state_dict(assign=True) keeps the state dict's dtypes: float16 values in a layer whose 2:4
    kernel was generated for float32 ones were read by their width as garbage (outputs of 1e36, no error)."""
    cm, layer, x = _one_triton_linear("2:4")
    with torch.no_grad():
        cm(x)  # (the layer's launch for this shape is built, then must not be reused as it was)
    cm.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in cm.state_dict().items()}, assign=True)
    assert layer.packed.values.dtype == torch.float16
    with torch.no_grad(), pytest.raises(InvalidInputError, match=r"for float32 weight values, got torch\.float16"):
        cm(x)


# ------------------------------------------------------------------------------------------------ emission determinism


def test_a_layer_made_for_two_row_counts_emits_one_source_in_any_order():
    """A layer called at two row counts has two uses with one name; the header sorted them by name
    alone, so their order, and with it the source and its cache key, followed the set they came in
    (PYTHONHASHSEED): two processes wrote two files for one kernel."""
    spec = MatmulSpec("float32", "float32", True, None, False, "float32")
    uses = [LayerUse("b", 5, 64, 64), LayerUse("b", 3, 64, 64), LayerUse("b", None, 64, 64), LayerUse("a", 7, 64, 64)]
    name, source = emit_matmul(spec, uses)
    assert all(emit_matmul(spec, order) == (name, source) for order in (uses[::-1], uses[1:] + uses[:1], uses + uses))
    made_for = [line for line in source.splitlines() if line.startswith("#   ")]
    assert made_for == ["#   a: M=7, N=64, K=64", "#   b: M=?, N=64, K=64", "#   b: M=3, N=64, K=64",
                        "#   b: M=5, N=64, K=64"]


def test_two_processes_with_different_hash_seeds_emit_byte_identical_sources_into_one_cache(tmp_path):
    """The same model compiled at once by two processes with different PYTHONHASHSEED (1 and 2 ordered
    the uses of a layer called at two row counts differently) into one empty cache: the same sources,
    one file per kernel, every file valid and importable on its own, no temp file left."""
    script = textwrap.dedent("""
        import json, torch, torch.nn as nn
        from sparsec.api import compile_with_options
        from sparsec.options import CompileOptions

        class TwoCalls(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

            def forward(self, x, z):
                return self.c(self.b(torch.relu(self.a(x)))).sum(0) + self.c(self.b(torch.relu(self.a(z)))).sum(0)

        torch.manual_seed(0)
        options = CompileOptions.from_user("2:4", backend="triton")
        cm = compile_with_options(TwoCalls(), (torch.randn(3, 32), torch.randn(5, 32)), options)
        print(json.dumps([cm.kernels, cm.kernel_manifest]))  # (the manifest, which dump-kernels writes, too)
    """)
    env = dict(os.environ, SPARSEC_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="0")
    # (the children run the kernels: on a GPU, or here in the interpreter; a kernel dump writes no cache)
    child_env = dict(env, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(child_env, PYTHONHASHSEED=seed)) for seed in ("1", "2")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1] and len(results[0][0]) == 1
    ((name, source),) = results[0][0].items()
    assert [(u["name"], u["M"]) for u in results[0][1][name]["layers"]] == [("b", 3), ("b", 5)]
    assert "#   b: M=3, N=64, K=64\n#   b: M=5, N=64, K=64" in source
    files = os.listdir(tmp_path / "kernels")
    assert len(files) == 1 and files[0].startswith(f"{name}-"), files
    path = str(tmp_path / "kernels" / files[0])
    assert KernelCache(str(tmp_path))._valid(path, source)
    check = subprocess.run([sys.executable, "-c", f"import runpy; assert {name!r} in runpy.run_path({path!r})"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode == 0, check.stderr[-2000:]
