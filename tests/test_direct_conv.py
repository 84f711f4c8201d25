"""Direct sparse convolution (method (d), D.3 / D.4 item 3): the plain-torch form (sparsec.direct_conv) and
the Triton kernel (sparsec.codegen.direct_conv) against F.conv2d on the dense masked weight, for random
unstructured masks at 50-99% sparsity. The kernel runs under the Triton interpreter on CPU (conftest.py),
on the GPU where there is one; its sm_80 / sm_90 builds are checked in a fresh process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

from oracle import output_error
from sparsec.codegen.direct_conv import direct_conv2d, direct_conv_source
from sparsec.direct_conv import conv_padding, direct_sparse_conv2d, input_offsets, pixel_offsets
from sparsec.errors import InvalidInputError
from sparsec.reference import check_csr, csr_compress, csr_decompress

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(m, c_per_group, kernel, sparsity, seed, empty_rows=(), dtype=torch.float64):
    """CSR arrays (crow, col, values in `dtype`) of a random weight [m, c_per_group, *kernel] under a
    random mask keeping round(numel * (1 - sparsity)) weights (at least one), minus the rows in
    `empty_rows`; and that masked weight, dense, in `dtype` (the oracle's operand)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, c_per_group, *kernel, generator=g, dtype=torch.float64)
    k = w[0].numel()
    mask = torch.zeros(m * k, dtype=torch.bool)
    mask[torch.randperm(m * k, generator=g)[:max(1, round(m * k * (1 - sparsity)))]] = True
    mask = mask.reshape(m, k)
    mask[list(empty_rows)] = False
    crow, col, values = csr_compress(w.reshape(m, k), mask)
    dense = torch.where(mask, w.reshape(m, k), 0.0)
    assert torch.equal(csr_decompress(crow, col, values, k), dense)  # the format is read as the reference writes it
    return crow, col, values.to(dtype), dense.reshape(w.shape).to(dtype)


def _inputs(batch, channels, size, m, seed, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(batch, channels, *size, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(m, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, b


# ------------------------------------------------------------------------------------------ plain torch

SPARSITIES = (0.5, 0.75, 0.9, 0.99)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_torch_direct_conv_matches_conv2d(stride, padding, kernel, dilation, groups):
    """float64, so any wrong tap shows far above rounding: batch 3, 5 channels per group (a multiple of
    nothing), 3 output channels per group, a non-square 12 x 11 input."""
    seed = stride + 3 * padding + 7 * kernel + 31 * dilation + 97 * groups
    sparsity = SPARSITIES[seed % len(SPARSITIES)]
    crow, col, values, dense = _layer(3 * groups, 5, (kernel, kernel), sparsity, seed)
    x, b = _inputs(3, 5 * groups, (12, 11), 3 * groups, seed)
    y = direct_sparse_conv2d(x, crow, col, values, b, stride, padding, dilation, groups, kernel_size=kernel)
    expected = F.conv2d(x, dense, b, stride, padding, dilation, groups)
    assert y.shape == expected.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # (F.conv2d's own note on its copy)
@given(batch=st.integers(1, 3), c_per_group=st.integers(1, 6), m_per_group=st.integers(1, 4), groups=st.integers(1, 3),
       size=st.tuples(st.integers(1, 13), st.integers(1, 13)), kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.sampled_from(["same", "valid"])),
       sparsity=st.floats(0.5, 0.99), seed=st.integers(0, 2 ** 16))
def test_torch_direct_conv_matches_conv2d_at_random_shapes(batch, c_per_group, m_per_group, groups, size, kernel,
                                                           stride, dilation, padding, sparsity, seed):
    """Asymmetric kernels, strides, dilations and paddings, "same" (odd totals included) and "valid"."""
    if padding == "same":
        stride = (1, 1)
    pads = conv_padding(padding, kernel, stride, dilation)
    assume(all(s + p0 + p1 >= d * (k - 1) + 1 for s, p0, p1, d, k in
               zip(size, (pads[0], pads[2]), (pads[1], pads[3]), dilation, kernel)))
    m = m_per_group * groups
    crow, col, values, dense = _layer(m, c_per_group, kernel, sparsity, seed)
    x, b = _inputs(batch, c_per_group * groups, size, m, seed, bias=seed % 2 == 0)
    y = direct_sparse_conv2d(x, crow, col, values, b, stride, padding, dilation, groups, kernel_size=kernel)
    torch.testing.assert_close(y, F.conv2d(x, dense, b, stride, padding, dilation, groups), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_torch_direct_conv_in_lower_precision(dtype, tol):
    """16-bit inputs accumulate in fp32: compared with F.conv2d in float64 on the same rounded operands."""
    crow, col, values, dense = _layer(8, 7, (3, 3), 0.8, seed=3, dtype=dtype)
    x, b = _inputs(2, 7, (9, 10), 8, seed=3, dtype=dtype)
    y = direct_sparse_conv2d(x, crow, col, values, b, 2, 1, 1, 1, kernel_size=3)
    expected = F.conv2d(x.double(), dense.double(), b.double(), 2, 1)
    assert y.dtype == dtype
    assert output_error(y.double(), expected) <= tol


def test_torch_direct_conv_unbatched_input_and_chunks(monkeypatch):
    """x [C, H, W] gives [M, OH, OW] as F.conv2d; and a layer taken in many chunks of nonzeros (one nonzero
    per chunk here) gives what one chunk gives."""
    crow, col, values, dense = _layer(4, 3, (3, 3), 0.6, seed=5)
    x, b = _inputs(2, 3, (6, 7), 4, seed=5)
    whole = direct_sparse_conv2d(x, crow, col, values, b, 1, 1, kernel_size=3)
    torch.testing.assert_close(direct_sparse_conv2d(x[1], crow, col, values, b, 1, 1, kernel_size=3), whole[1])
    monkeypatch.setattr("sparsec.direct_conv.CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(direct_sparse_conv2d(x, crow, col, values, b, 1, 1, kernel_size=3), whole,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, F.conv2d(x, dense, b, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_rows_give_the_bias_and_an_empty_layer_gives_the_bias_everywhere(dtype):
    crow, col, values, dense = _layer(6, 4, (3, 3), 0.7, seed=9, empty_rows=(0, 3, 5), dtype=dtype)
    x, b = _inputs(2, 4, (7, 7), 6, seed=9, dtype=dtype)
    y = direct_sparse_conv2d(x, crow, col, values, b, 1, 1, kernel_size=3)
    for row in (0, 3, 5):
        assert torch.equal(y[:, row], b[row].expand_as(y[:, row]))
    torch.testing.assert_close(y, F.conv2d(x, dense, b, 1, 1))

    crow, col = torch.zeros(7, dtype=torch.int64), torch.zeros(0, dtype=torch.int32)
    values = torch.zeros(0, dtype=dtype)
    y = direct_sparse_conv2d(x, crow, col, values, b, 1, 1, kernel_size=3)
    assert y.shape == (2, 6, 7, 7) and torch.equal(y, b[None, :, None, None].expand_as(y))
    assert torch.equal(direct_sparse_conv2d(x, crow, col, values, None, 2, 0, kernel_size=3), torch.zeros(2, 6, 3, 3,
                                                                                                           dtype=dtype))


def test_csr_invariants_of_the_layers_tested():
    """crow monotone from 0 to nnz, columns in [0, K) and ascending within each row (D.4 item 3)."""
    for sparsity in SPARSITIES:
        crow, col, values, _ = _layer(9, 5, (3, 3), sparsity, seed=int(sparsity * 100))
        k = 5 * 9
        assert crow[0] == 0 and crow[-1] == col.numel() == values.numel() and bool((crow[1:] >= crow[:-1]).all())
        assert bool(((col >= 0) & (col < k)).all())
        for row in range(9):
            cols = col[crow[row]:crow[row + 1]]
            assert bool((cols[1:] > cols[:-1]).all())
        check_csr(crow, col, col.numel(), 9, k)


def test_input_offsets_by_their_definition():
    """Each nonzero's offset, spelled out per nonzero: (group * C/groups + c) * Hp * Wp + r * dil_h * Wp
    + s * dil_w; and it is where that tap of output pixel (0, 0) sits in the padded input."""
    groups, cg, (r, s), (hp, wp), (dh, dw) = 3, 2, (3, 2), (9, 8), (2, 1)
    crow, col, values, _ = _layer(6, cg, (r, s), 0.5, seed=11)
    offsets = input_offsets(crow, col, cg, (r, s), (hp, wp), (dh, dw), groups)
    assert offsets.dtype == torch.int64 and offsets.shape == col.shape
    xp = torch.arange(groups * cg * hp * wp).reshape(groups * cg, hp, wp)
    for row in range(6):
        group = row // 2
        for j in range(int(crow[row]), int(crow[row + 1])):
            c, tap = divmod(int(col[j]), r * s)
            want = (group * cg + c) * hp * wp + tap // s * dh * wp + tap % s * dw
            assert int(offsets[j]) == want == int(xp[group * cg + c, tap // s * dh, tap % s * dw])
    assert pixel_offsets((2, 3), (2, 3), wp).tolist() == [0, 3, 6, 16, 19, 22]


def test_padding_forms():
    assert conv_padding("valid", (3, 3), (1, 1), (1, 1)) == (0, 0, 0, 0)
    assert conv_padding("same", (4, 3), (1, 1), (1, 2)) == (1, 2, 2, 2)  # odd total: the extra row at the bottom
    assert conv_padding((1, 2), (3, 3), (2, 2), (1, 1)) == (1, 1, 2, 2)
    with pytest.raises(InvalidInputError, match="padding='same' needs stride 1"):
        conv_padding("same", (3, 3), (2, 1), (1, 1))
    with pytest.raises(InvalidInputError, match="'same' or 'valid'"):
        conv_padding("full", (3, 3), (1, 1), (1, 1))
    with pytest.raises(InvalidInputError, match="padding must be an int or a pair of ints >= 0"):
        conv_padding(-1, (3, 3), (1, 1), (1, 1))


def _bad_input_cases():
    crow, col, values, _ = _layer(4, 3, (3, 3), 0.6, seed=13, dtype=torch.float32)
    x, b = _inputs(2, 3, (6, 6), 4, seed=13, dtype=torch.float32)
    ok = dict(x=x, crow=crow, col=col, values=values, bias=b, stride=1, padding=1, dilation=1, groups=1, kernel_size=3)
    descending = col.clone()
    descending[:2] = descending[:2].flip(0)
    return ok, [
        (dict(values=values.double()), "values .* and x .* must have the same dtype"),
        (dict(bias=b.half()), "bias .* and x .* must have the same dtype"),
        (dict(bias=b[:3]), r"bias must be \[4\]"),
        (dict(x=x.int()), "x must be float16, bfloat16, float32 or float64"),
        (dict(x=x[0, 0]), r"x must be \[N, C, H, W\]"),
        (dict(crow=crow.float()), "crow must be a 1-d int32 or int64 tensor"),
        (dict(col=col[:-1]), r"col .* and values .* must both be \[nnz\]"),
        (dict(kernel_size=2), "corrupt CSR weight: column indices must lie in"),  # columns of a 3x3 filter
        (dict(col=descending), "corrupt CSR weight: column indices must ascend"),
        (dict(crow=torch.cat([crow[:-1], crow[-1:] - 1])), "corrupt CSR weight: crow_indices must rise"),
        (dict(groups=2), "groups=2 must divide the input channels"),
        (dict(groups=0), "groups must be a positive int"),
        (dict(stride=(1, 0)), "stride must be an int or a pair of ints >= 1"),
        (dict(stride=2, padding="same"), "padding='same' needs stride 1"),
        (dict(padding=0, kernel_size=3, dilation=3), "does not fit the padded input"),
        (dict(x=[[1.0]]), "x must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases()[1])))
def test_torch_direct_conv_refuses_bad_input(case):
    ok, cases = _bad_input_cases()
    change, message = cases[case]
    args = dict(ok, **change)
    with pytest.raises(InvalidInputError, match=message):
        direct_sparse_conv2d(**args)


# ------------------------------------------------------------------------------------------ Triton kernel

KERNEL_CASES = {  # batch, channels per group, out channels, input size, kernel, stride, padding, dilation, groups
    "3x3 padded": (2, 5, 6, (7, 6), 3, 1, 1, 1, 1),
    "5x5 strided, dilated, groups 2": (2, 3, 4, (11, 9), 5, 2, 2, 2, 2),
    "1x1 stride 2": (3, 7, 5, (5, 6), 1, 2, 0, 1, 1),
    "asymmetric 'same'": (1, 4, 3, (6, 5), (2, 3), 1, "same", (2, 1), 1),
}


def _kernel_case(case, dtype, bias, activation, sparsity=0.6, config=None, empty_rows=()):
    batch, cg, m, size, kernel, stride, padding, dilation, groups = KERNEL_CASES[case]
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    crow, col, values, dense = _layer(m, cg, kernel, sparsity, seed=len(case), empty_rows=empty_rows, dtype=dtype)
    x, b = _inputs(batch, cg * groups, size, m, seed=len(case), dtype=dtype, bias=bias)
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    y = direct_conv2d(dev(x), dev(crow), dev(col), dev(values), dev(b), stride, padding, dilation, groups,
                      kernel_size=kernel, activation=activation, config=config)
    expected = F.conv2d(x.double(), dense.double(), b.double() if bias else None, stride, padding, dilation, groups)
    return y, (expected.relu() if activation == "relu" else expected)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_conv2d(case, dtype, tol):
    y, expected = _kernel_case(case, dtype, bias=True, activation="relu")
    assert y.dtype == dtype and y.shape == expected.shape and y.device.type == DEVICE
    assert output_error(y.cpu().double(), expected) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bias, activation", [(False, None), (True, None), (False, "relu")])
def test_kernel_epilogues(bias, activation, dtype, tol):
    y, expected = _kernel_case("3x3 padded", dtype, bias, activation)
    assert output_error(y.cpu().double(), expected) <= tol
    if activation is None:
        assert bool((y < 0).any())  # (the relu case's check above is not vacuous: there are negatives to clip)


def test_kernel_many_tiles_and_steps():
    """Tiles of 16 pixels (42 output pixels: a partial last tile) and 4 nonzeros per loop step (rows of ~20
    nonzeros: several steps, the last one partial), at 50% and 99% sparsity."""
    config = dict(BLOCK=16, BLOCK_J=4, num_warps=1, num_stages=1)
    for sparsity in (0.5, 0.99):
        y, expected = _kernel_case("3x3 padded", torch.float32, True, "relu", sparsity, config)
        assert output_error(y.cpu().double(), expected) <= 1e-5


def test_kernel_empty_rows_and_empty_layer():
    y, expected = _kernel_case("3x3 padded", torch.float32, True, None, empty_rows=(1, 4))
    assert output_error(y.cpu().double(), expected) <= 1e-5
    bias = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    crow = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    col, values = torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, device=DEVICE)
    x = torch.randn(2, 2, 5, 5, device=DEVICE)
    y = direct_conv2d(x, crow, col, values, bias, 1, 1, kernel_size=3, activation="relu")
    assert torch.equal(y.cpu(), bias.relu().cpu()[None, :, None, None].expand(2, 3, 5, 5))


def test_kernel_relu_propagates_nan():
    """torch.relu keeps NaN; tl.maximum's default would give 0. A NaN bias makes its whole channel NaN; a NaN
    in x makes NaN exactly the outputs whose kept weights read it (the plain-torch form says which)."""
    crow, col, values, _ = _layer(3, 2, (3, 3), 0.5, seed=17, dtype=torch.float32)
    x, b = _inputs(1, 2, (5, 5), 3, seed=17, dtype=torch.float32)
    b[1] = float("nan")
    x[0, 0, 2, 2] = float("nan")
    expected = direct_sparse_conv2d(x, crow, col, values, b, 1, 1, kernel_size=3).relu()
    dev = [t.to(DEVICE) for t in (x, crow, col, values, b)]
    y = direct_conv2d(*dev, 1, 1, kernel_size=3, activation="relu").cpu()
    assert bool(y[:, 1].isnan().all())
    assert bool(expected[:, 0].isnan().any())  # the NaN pixel is read by channel 0's kept weights
    assert torch.equal(y.isnan(), expected.isnan())
    torch.testing.assert_close(y, expected, equal_nan=True)


def test_kernel_with_precomputed_offsets_unbatched_and_channels_last_input():
    crow, col, values, dense = _layer(4, 3, (3, 3), 0.7, seed=19, dtype=torch.float32)
    x, b = _inputs(2, 3, (6, 5), 4, seed=19, dtype=torch.float32)
    expected = F.conv2d(x, dense, b, 2, 1)
    dev = [t.to(DEVICE) for t in (x, crow, col, values, b)]
    offsets = input_offsets(dev[1], dev[2], 3, (3, 3), (8, 7), 1)  # 6 x 5 padded by 1 on each side
    y = direct_conv2d(*dev, 2, 1, kernel_size=3, offsets=offsets.to(torch.int32))
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-5, atol=1e-5)
    y1 = direct_conv2d(dev[0][1], *dev[1:], 2, 1, kernel_size=3)
    assert y1.shape == (4, 3, 3)
    torch.testing.assert_close(y1.cpu(), expected[1], rtol=1e-5, atol=1e-5)
    y_cl = direct_conv2d(dev[0].contiguous(memory_format=torch.channels_last), *dev[1:], 2, 1, kernel_size=3)
    torch.testing.assert_close(y_cl.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_what_it_cannot_run(monkeypatch):
    crow, col, values, _ = _layer(2, 2, (3, 3), 0.5, seed=23, dtype=torch.float32)
    x = torch.randn(1, 2, 5, 5)
    dev = [t.to(DEVICE) for t in (x, crow, col, values)]
    with pytest.raises(InvalidInputError, match="activation must be one of"):
        direct_conv2d(*dev, kernel_size=3, activation="gelu")
    with pytest.raises(InvalidInputError, match="takes float16 or float32 inputs"):
        direct_conv2d(dev[0].double(), *dev[1:3], dev[3].double(), kernel_size=3)
    with pytest.raises(InvalidInputError, match=r"offsets must be an int32 or int64 \[\d+\] tensor"):
        direct_conv2d(*dev, kernel_size=3, offsets=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(InvalidInputError, match="values .* and x .* must have the same dtype"):
        direct_conv2d(dev[0].half(), *dev[1:], kernel_size=3)
    if DEVICE == "cpu":
        with pytest.raises(InvalidInputError, match="bfloat16 kernels give wrong results in the Triton interpreter"):
            direct_conv2d(x.bfloat16(), crow, col, values.bfloat16(), kernel_size=3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        direct_conv2d(x, crow, col, values, kernel_size=3)  # a CPU tensor, no interpreter


def test_kernel_source_is_deterministic_and_self_describing():
    name, source = direct_conv_source()
    direct_conv_source.cache_clear()
    assert direct_conv_source() == (name, source)
    assert name.startswith("direct_conv2d_") and f"def {name}(" in source
    assert source.startswith("# sparsec direct sparse conv2d") and "propagate_nan=tl.PropagateNan.ALL" in source


BUILD_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TRITON_INTERPRET"] = "0"
    import torch
    from sparsec.codegen.aot import resource_usage
    from sparsec.codegen.direct_conv import DIRECT_CONV_BUILDS, build_direct_conv
    from sparsec.errors import last_line
    results = {}
    for cap in (80, 90):
        for dtype in (torch.float16, torch.float32, torch.bfloat16):
            for pixels, constexprs in DIRECT_CONV_BUILDS:
                key = f"sm_{cap} {dtype} pixels={pixels} {constexprs}"
                try:
                    compiled = build_direct_conv(cap, dtype, pixels, constexprs)
                    cubin = compiled.asm.get("cubin")
                    results[key] = {"cubin": bool(cubin), "usage": resource_usage(cubin) if cubin else None}
                except Exception as e:
                    results[key] = {"error": last_line(e)}
    print(json.dumps(results))
""")


def test_kernel_builds_for_sm80_and_sm90_without_spills():
    """triton.compile to cubin for sm_80 and sm_90 (fp16, fp32, bf16; GPU configs of a 7 x 7 and a 14 x 14
    map; heaviest and lightest epilogue), in a fresh process with the interpreter off (a process that ran
    the interpreter keeps triton.language patched). compile_for refuses a register spill; the stack frame is
    checked here too where cuobjdump can read it."""
    result = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    builds = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(builds) == 18
    failures = {key: value for key, value in builds.items() if "error" in value or not value["cubin"]}
    assert not failures, failures
    for key, value in builds.items():
        if value["usage"] is not None:
            assert value["usage"].get("STACK", 0) == 0, (key, value["usage"])
