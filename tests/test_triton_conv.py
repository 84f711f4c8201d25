"""The generated 2:4 conv kernel (implicit GEMM): numerics against F.conv2d on independently pruned
weights, compiled conv models on backend="triton" (every padding form, conv1d, fused activations,
int8), gradients, save / load, and what backend="auto" would time. Under the Triton interpreter on
CPU (conftest.py), on the GPU where there is one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import kernel_operands_24, output_error, pruned_model
from sparsec.codegen.builder import emit_matmul
from sparsec.codegen.launch import ConvGeometry, sparse24_conv2d
from sparsec.codegen.spec import MatmulSpec
from sparsec.errors import InvalidInputError
from sparsec.runtime.triton_conv import TritonSparseConv1d, TritonSparseConv2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = {None: lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}


def _conv_case(batch, c, n, size, kernel, stride, padding, dilation, dtype, int8=False, bias=True, activation=None,
               channels_last=False, seed=0):
    """The kernel's output on a fresh pruned conv, and F.conv2d's in float64 on the oracle's pruned weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, c, *kernel, generator=g)
    values, meta, scales, pruned = kernel_operands_24(w.reshape(n, -1), int8)  # pruned by the oracle
    x = torch.randn(batch, c, *size, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    act = str(dtype).removeprefix("torch.")
    spec = MatmulSpec(act, "int8" if int8 else act, bias, activation, False, act, layout="conv2d")
    name, source = emit_matmul(spec, [])
    xd = x.to(dtype).to(DEVICE)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    y = sparse24_conv2d(xd, dev(values if int8 else values.to(dtype)), dev(meta), dev(scales),
                        dev(b.to(dtype) if bias else None), None, spec, name, source,
                        ConvGeometry(kernel, stride, padding, dilation))
    expected = ACTS[activation](F.conv2d(x.to(dtype).double(), pruned.to(dtype).double().reshape(w.shape),
                                         b.to(dtype).double() if bias else None, stride, padding, dilation))
    return y, expected


CASES = {  # batch, in channels, out channels, input size, kernel, stride, padding, dilation
    "3x3 same": (2, 8, 12, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1)),
    "strided, unpadded": (2, 4, 16, (9, 9), (3, 3), (2, 2), (0, 0), (1, 1)),
    "1x1": (3, 16, 8, (5, 6), (1, 1), (1, 1), (0, 0), (1, 1)),
    "dilated 3x2, K = 36 (not a whole metadata word)": (1, 6, 20, (11, 8), (3, 2), (2, 1), (2, 1), (2, 2)),
    "one output pixel (M = 1)": (1, 16, 24, (3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),
    "more output channels than a tile": (1, 4, 150, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1)),
}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_kernel_matches_torch(case, dtype, tol):
    batch, c, n, size, kernel, stride, padding, dilation = CASES[case]
    y, expected = _conv_case(batch, c, n, size, kernel, stride, padding, dilation, dtype, activation="relu",
                             seed=len(case))
    assert y.dtype == dtype and y.shape == expected.shape
    assert output_error(y.cpu().double(), expected) <= tol


@pytest.mark.parametrize("int8, bias, activation, channels_last", [
    (True, True, "silu", False), (True, False, None, True), (False, False, "gelu", True)])
def test_conv_kernel_weights_epilogues_and_layouts(int8, bias, activation, channels_last):
    y, expected = _conv_case(2, 8, 16, (6, 5), (3, 3), (1, 1), (1, 1), (1, 1), torch.float16, int8=int8, bias=bias,
                             activation=activation, channels_last=channels_last, seed=7)
    assert output_error(y.cpu().double(), expected) <= 2e-3


def test_conv_kernel_refuses_operands_that_do_not_fit():
    spec = MatmulSpec("float32", "float32", False, None, False, "float32", layout="conv2d")
    name, source = emit_matmul(spec, [])
    values, meta = torch.zeros(8, 36), torch.zeros(8, 5, dtype=torch.int16)  # K = 72: 8 channels x 3 x 3
    geometry = ConvGeometry((3, 3), (1, 1), (0, 0), (1, 1))
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    with pytest.raises(InvalidInputError, match="do not fit a 3x3 conv on 4 channels"):
        sparse24_conv2d(x[:, :4], values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, geometry)
    with pytest.raises(InvalidInputError, match="leaves no output pixels on a 2x2 input"):
        sparse24_conv2d(x[..., :2, :2], values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source,
                        geometry)
    with pytest.raises(InvalidInputError, match="generated for float32 inputs, got torch.float16"):
        sparse24_conv2d(x.half(), values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, geometry)
    with pytest.raises(InvalidInputError, match="does not split K"):
        sparse24_conv2d(x, values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, geometry,
                        config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=2, num_warps=4, num_stages=1))
    with pytest.raises(InvalidInputError, match="has no GATHER form"):
        sparse24_conv2d(x, values.to(DEVICE), meta.to(DEVICE), None, None, None, spec, name, source, geometry,
                        config=dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, GATHER=1, num_warps=4, num_stages=1))


@pytest.mark.parametrize("launch", [dict(SPLIT_K=2), dict(BLOCK_M=1, GATHER=1)])
def test_a_conv_layers_plan_launch_that_the_conv_kernel_cannot_run_is_refused_when_compiling(launch):
    """(It was accepted, and failed at the model's first call.)"""
    model = nn.Sequential(nn.Conv2d(16, 16, 3)).half().to(DEVICE)
    x = torch.randn(1, 16, 6, 6, device=DEVICE).half()
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    plan["0"].launch = {**dict(M=16, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=1, PRMT_EXPAND=0, GATHER=0,
                               num_warps=4, num_stages=1), **launch}
    with pytest.raises(ValueError, match="runs the conv kernel, which neither splits K nor has a GATHER form"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


def test_conv_kernel_source_is_deterministic():
    spec = MatmulSpec("float16", "int8", True, "relu", False, "float16", layout="conv2d")
    first, second = emit_matmul(spec, []), emit_matmul(spec, [])
    assert first == second and first[0].startswith("sparse24_conv_f16_w8_bias_relu_")
    assert "conv2d (implicit GEMM)" in first[1] and "def " + first[0] in first[1]
    with pytest.raises(ValueError, match="conv2d with format 2:4 only"):
        MatmulSpec("float16", "float16", True, None, False, "float16", format="fanin", layout="conv2d")


class ConvNet(nn.Module):
    """A small CNN with every padding form the kernel handles: zeros (its own), reflect / replicate /
    circular and uneven 'same' (padded with torch first), 'valid', a 1x1 conv and a conv1d stage."""

    def __init__(self, mode="zeros"):
        super().__init__()
        self.stem = nn.Conv2d(4, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode=mode)
        self.b = nn.Conv2d(16, 24, 4, padding="same", padding_mode=mode)    # even kernel: uneven padding
        self.c = nn.Conv2d(24, 16, 1, bias=False)
        self.d = nn.Conv2d(16, 16, 3, padding="valid", dilation=2)
        self.seq = nn.Conv1d(16, 16, 3, padding=1, padding_mode=mode)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.a(F.relu(self.stem(x))))
        x = F.silu(self.b(x))
        x = F.gelu(self.d(self.c(x)))
        x = F.relu(self.seq(x.flatten(2)))
        return self.head(x.mean(-1))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_compiled_conv_models_run_the_conv_kernel(mode):
    torch.manual_seed(0)
    model, x = ConvNet(mode).eval().to(DEVICE), torch.randn(2, 4, 12, 12, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", min_weights=0)
    kernels = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseConv2d)}
    assert set(kernels) == {"a", "b", "c", "d", "seq"}
    assert isinstance(kernels["seq"], TritonSparseConv1d)
    assert all(cm.plan[name].backend == "triton" for name in kernels)
    assert kernels["a"].activation == "relu" and kernels["b"].activation == "silu" and kernels["d"].activation == "gelu"
    assert cm.counters["fused_relu"] == 2 and not any(k.startswith("fused_scale") for k in cm.counters)
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert all(source.count("@triton.jit") == 1 for source in cm.kernels.values())
    manifest = cm.kernel_manifest[kernels["a"].kernel_name]
    assert manifest["layers"][0]["M"] == 2 * 6 * 6 and manifest["layers"][0]["K"] == 16 * 9


def test_conv_kernel_layers_with_int8_weights_fp16_and_unbatched_inputs():
    torch.manual_seed(0)
    model = ConvNet().eval().to(DEVICE)
    x = torch.randn(2, 4, 10, 10, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", quantize="int8", min_weights=0)
    assert cm.plan["b"].quant == "int8" and cm.plan["b"].backend == "triton"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    half = ConvNet().eval().half().to(DEVICE)
    cm = sparsec.compile(half, example_inputs=(x.half(),), backend="triton", min_weights=0)
    assert output_error(cm(x.half()).float(), pruned_model(half, cm.plan)(x.half()).float()) <= 5e-3
    layers = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseConv2d)}
    image, sequence = torch.randn(16, 6, 6, device=DEVICE).half(), torch.randn(16, 9, device=DEVICE).half()
    assert torch.equal(layers["a"](image), layers["a"](image[None])[0])  # unbatched, as nn.Conv2d takes it
    assert torch.equal(layers["seq"](sequence), layers["seq"](sequence[None])[0])
    with pytest.raises(InvalidInputError, match="layer 'a' takes inputs with 16 channels, got 4"):
        layers["a"](x.half())


def test_gradients_flow_through_the_conv_kernel():
    torch.manual_seed(0)
    model, x = ConvNet().eval().to(DEVICE), torch.randn(2, 4, 10, 10, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", min_weights=0)
    ref_model = pruned_model(model, cm.plan)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    cm(xa).square().sum().backward()
    ref_model(xb).square().sum().backward()
    assert output_error(xa.grad, xb.grad) <= 1e-5


def test_saved_conv_kernel_models_load_and_run(tmp_path):
    torch.manual_seed(0)
    model, x = ConvNet("reflect").eval().to(DEVICE), torch.randn(1, 4, 12, 12, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", min_weights=0)
    sparsec.save(cm, tmp_path / "conv.sparsec")
    loaded = sparsec.load(tmp_path / "conv.sparsec")
    assert loaded.kernels == cm.kernels
    assert torch.equal(loaded(x), cm(x))


def test_backend_auto_times_the_conv_kernel_against_dense(auto_as_on_a_gpu):
    """backend="auto" as on a GPU (the device check and the timer stand in; the candidates run for
    real, in the interpreter here): every launch config of the conv kernel is checked against dense
    before it is timed, the faster is chosen with its config, and the compiled model runs it."""
    torch.manual_seed(0)
    model, x = ConvNet("reflect").eval().to(DEVICE), torch.randn(2, 4, 12, 12, device=DEVICE)
    timed = auto_as_on_a_gpu  # the kernel's second config is the fastest
    cm = sparsec.compile(model, example_inputs=(x,), backend="auto", min_weights=0)
    b = cm.plan["b"]
    assert b.backend == "triton" and b.launch["BLOCK_K"] == 16 and b.launch["M"] == 2 * 6 * 6
    assert "triton 10.0 us" in b.reason and "dense 30.0 us" in b.reason and "rejected" not in b.reason
    assert cm.plan["seq"].backend == "triton" and "failed" not in cm.plan["seq"].reason
    from sparsec.codegen.timing import ROUNDS

    # per layer: the 2 configs ranked by GPU time, then dense against the fastest, each ROUNDS times
    assert len(timed) == ROUNDS * (2 + 2) * sum(lp.sparsity is not None for lp in cm.plan)
    assert "fastest of 2 configs by GPU time" in b.reason
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    without_inputs = sparsec.explain(model, backend="auto", min_weights=0)
    assert without_inputs["b"].backend == "torch" and "pass example_inputs" in without_inputs["b"].reason


def test_a_conv_kernel_layer_refuses_a_stale_kernel_and_operands_it_was_not_made_for():
    """Its bias set to None after compiling, the conv kernel (generated with a bias) added the packed
    weight values as the bias; float16 values loaded by load_state_dict(assign=True) were read as
    garbage: wrong numbers, no error. An input on another device than the weight (moved to meta here,
    the one other device a CPU has) is refused as F.conv2d refuses it."""
    import copy

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).eval().to(DEVICE), torch.randn(1, 4, 5, 5, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=["0"], min_weights=0)
    layer = next(m for m in cm.modules() if isinstance(m, TritonSparseConv2d))
    unbiased = copy.deepcopy(layer)
    unbiased.bias = None
    with torch.no_grad():
        with pytest.raises(InvalidInputError, match=r"epilogue \[none\], .* generated for .*epilogue \[bias\]"):
            unbiased(x)
        with pytest.raises(InvalidInputError, match=f"weight is on meta, got an input on {x.device}"):
            copy.deepcopy(layer).to("meta")(x)
        assert output_error(layer(x), F.conv2d(x, layer.effective_weight(), layer.bias, padding=1)) <= 1e-5
    cm.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in cm.state_dict().items()}, assign=True)
    with torch.no_grad(), pytest.raises(InvalidInputError, match=r"for float32 weight values, got torch\.float16"):
        cm(x)
