"""Review probes of the Triton codegen against plain-torch references written here: NaN through a fused
relu, a kernel dump with the interpreter switched on, K = 0, input layouts the launchers must accept,
and the prune kernel on every mix of NaN / inf / -0.0 ties. Runs on the interpreter without a GPU."""
import itertools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.codegen.builder import emit_matmul
from sparsec.codegen.launch import ConvGeometry, condensed_matmul, sparse24_conv2d, sparse24_matmul
from sparsec.codegen.prune_launch import prune24, prune24_dense
from sparsec.codegen.spec import MatmulSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")


def compress24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, int16 meta, pruned dense) of w [N, K]: the two largest |w| of each group of four, ties to
    the lower index; meta nibble i0 | i1 << 2 at bits 4 * (g % 4) of word g // 4."""
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    # stable descending sort of |w| keeps index order among ties; the kept two, back in index order
    kept = groups.abs().sort(dim=-1, descending=True, stable=True).indices[..., :2].sort(dim=-1).values
    values = groups.gather(-1, kept).reshape(n, k // 2)
    nibbles = (kept[..., 0] | (kept[..., 1] << 2)).long()
    words = torch.zeros(n, (k + 15) // 16, dtype=torch.int64)
    for g in range(k // 4):
        words[:, g // 4] |= nibbles[:, g] << (4 * (g % 4))
    meta = torch.where(words >= 2 ** 15, words - 2 ** 16, words).to(torch.int16)
    pruned = torch.zeros_like(groups).scatter(-1, kept, groups.gather(-1, kept)).reshape(n, k)
    return values, meta, pruned


def dev(t):
    return t.to(DEVICE) if t is not None else None


# ------------------------------------------------------------------------------- NaN through relu


def _same_nans_and_close(y: torch.Tensor, expected: torch.Tensor) -> None:
    y, expected = y.cpu().double(), expected.double()
    assert torch.equal(torch.isnan(y), torch.isnan(expected)), (y, expected)
    finite = ~torch.isnan(expected)
    assert torch.allclose(y[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["2:4", "fanin", "conv"])
def test_a_fused_relu_keeps_a_nan_as_torch_relu_does(kind):
    """tl.maximum(acc, 0.0) ignores a NaN operand: a NaN product left the fused relu as 0, where the
    replaced `F.relu` (and the torch backend) keeps it, so a NaN input vanished from the model's output."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    values, meta, pruned = compress24(w)
    b = torch.randn(8, generator=g)
    if kind == "conv":
        x = torch.randn(1, 4, 3, 3, generator=g)
        x[0, 1, 1, 1] = NAN
        spec = MatmulSpec("float32", "float32", True, "relu", False, "float32", layout="conv2d")
        name, source = emit_matmul(spec, [])
        y = sparse24_conv2d(dev(x), dev(values), dev(meta), None, dev(b), None, spec, name, source,
                            ConvGeometry((2, 2), (1, 1), (0, 0), (1, 1)))
        expected = F.relu(F.conv2d(x.double(), pruned.double().reshape(8, 4, 2, 2), b.double()))
    elif kind == "2:4":
        x = torch.randn(3, 16, generator=g)
        x[1, 5] = NAN
        spec = MatmulSpec("float32", "float32", True, "relu", False, "float32")
        name, source = emit_matmul(spec, [])
        y = sparse24_matmul(dev(x), dev(values), dev(meta), None, dev(b), None, spec, name, source)
        expected = F.relu(x.double() @ pruned.double().t() + b.double())
    else:  # fan-in 5: an output sums only its 5 kept columns, so only those reading column 5 see the NaN
        x = torch.randn(3, 16, generator=g)
        x[1, 5] = NAN
        indices = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(8)]).to(torch.int32)
        fan = w.gather(1, indices.long())
        spec = MatmulSpec("float32", "float32", True, "relu", False, "float32", format="fanin")
        name, source = emit_matmul(spec, [])
        y = condensed_matmul(dev(x), dev(fan), dev(indices), None, dev(b), None, spec, name, source)
        gathered = (x.double()[:, indices.long()] * fan.double()).sum(-1)  # [rows, N]
        expected = F.relu(gathered + b.double())
    assert torch.isnan(expected).any()
    _same_nans_and_close(y, expected)


def test_a_compiled_model_on_the_triton_backend_keeps_a_nan_through_relu():
    import sparsec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(DEVICE)
    x = torch.randn(2, 16, device=DEVICE)
    x[0, 3] = NAN
    options = dict(example_inputs=(x,), include=["0", "2", "4"])
    triton_model = sparsec.compile(model, backend="triton", **options)
    assert any("relu" in entry["fused_ops"] for entry in triton_model.kernel_manifest.values())
    with torch.no_grad():
        _same_nans_and_close(triton_model(x), sparsec.compile(model, backend="torch", **options)(x))


# ------------------------------------------------------------------------------- kernel dump


def test_dump_kernels_writes_bf16_kernels_with_the_interpreter_switched_on(tmp_path, monkeypatch):
    """The interpreter's bf16 tl.dot gap stops running a bf16 kernel, not writing one: with TRITON_INTERPRET=1
    in its environment (as in this test suite) a dump left bf16 layers without a kernel."""
    from sparsec.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    target = tmp_path / "model.py"
    target.write_text("import torch, torch.nn as nn\n"
                      "def build():\n"
                      "    torch.manual_seed(0)\n"
                      "    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 8))\n"
                      "    return m.to(torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)\n")
    out = tmp_path / "kernels"
    assert main(["dump-kernels", f"{target}:build", "--pattern", "2:4", "--include", "0", "2", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers_without_kernel"] == {}
    entries = sorted(manifest["kernels"].values(), key=lambda e: e["fused_ops"])
    assert [(e["dtype"], e["pattern"], e["fused_ops"]) for e in entries] == [
        ("bfloat16", "2:4", ["bias"]), ("bfloat16", "2:4", ["bias", "relu"])]
    layers = {layer["name"]: (layer["M"], layer["N"], layer["K"]) for e in entries for layer in e["layers"]}
    assert layers == {"0": (4, 32, 32), "2": (4, 32, 32)}
    assert sorted(p.name for p in out.glob("*.py")) == sorted(e["file"] for e in entries)


# ------------------------------------------------------------------------------- launchers


def test_a_2_4_launch_with_k_0_runs_the_epilogue_of_an_empty_sum():
    """Rows were counted as numel // K, 0 for K = 0: nothing launched and the output came back uninitialized."""
    spec = MatmulSpec("float32", "float32", True, "relu", False, "float32")
    name, source = emit_matmul(spec, [])
    b = torch.tensor([1.0, -2.0, 3.0])
    y = sparse24_matmul(torch.randn(5, 0, device=DEVICE), torch.zeros(3, 0, device=DEVICE),
                        torch.zeros(3, 0, dtype=torch.int16, device=DEVICE), None, dev(b), None, spec, name, source)
    assert torch.equal(y.cpu(), F.relu(b).expand(5, 3))


K = 48
LAYOUTS = {  # x [6, K] as the launcher may receive it (values unchanged)
    "3-d": lambda x: x.reshape(2, 3, K),
    "transposed storage": lambda x: x.t().contiguous().t(),
    "storage offset": lambda x: torch.cat([torch.zeros(6, 3, dtype=x.dtype), x], 1)[:, 3:],
    "row stride": lambda x: torch.cat([x, torch.zeros(6, 8, dtype=x.dtype)], 1)[:, :K],
    "broadcast rows": lambda x: x[:1].expand(6, K),
    "every other element": lambda x: torch.stack([x, x], 2).reshape(6, 2 * K)[:, ::2],
    "permuted 3-d": lambda x: x.reshape(3, 2, K).transpose(0, 1),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matmul_kernels_read_inputs_of_any_layout(layout):
    """M = 6 rows (not a block multiple), N = 20 (nor that), K = 48 (not a multiple of BLOCK_K); fp16 with
    int8 weights, bias, silu, per-channel scale and a cast to fp32, on the 2:4 and the fan-in kernel."""
    g = torch.Generator().manual_seed(1)
    x = LAYOUTS[layout](torch.randn(6, K, generator=g).half())
    w = torch.randn(20, K, generator=g)
    values, meta, pruned = compress24(w)
    scales = values.abs().amax(1) / 127
    q = torch.round(values / scales[:, None]).to(torch.int8)
    b, scale = torch.randn(20, generator=g).half(), (torch.rand(20, generator=g) + 0.5).half()
    dequant = torch.zeros_like(w).masked_scatter(pruned != 0, (q.float() * scales[:, None]))
    spec = MatmulSpec("float16", "int8", True, "silu", True, "float32")
    name, source = emit_matmul(spec, [])
    y = sparse24_matmul(dev(x), dev(q), dev(meta), dev(scales.float()), dev(b), dev(scale), spec, name, source)
    expected = F.silu(x.double() @ dequant.double().t() + b.double()) * scale.double()
    assert y.shape == (*x.shape[:-1], 20) and y.dtype == torch.float32
    torch.testing.assert_close(y.cpu().double(), expected, rtol=2e-3, atol=2e-3)

    indices = torch.stack([torch.randperm(K, generator=g)[:7] for _ in range(20)]).to(torch.int32)
    fan = w.gather(1, indices.long()).half()
    spec = MatmulSpec("float16", "float16", True, "gelu_tanh", False, "float16", format="fanin")
    name, source = emit_matmul(spec, [])
    y = condensed_matmul(dev(x), dev(fan), dev(indices), None, dev(b), None, spec, name, source)
    dense = torch.zeros(20, K, dtype=torch.float64).scatter(1, indices.long(), fan.double())
    expected = F.gelu(x.double() @ dense.t() + b.double(), approximate="tanh")
    assert y.shape == (*x.shape[:-1], 20) and y.dtype == torch.float16
    torch.testing.assert_close(y.cpu().double(), expected, rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("batch, channels, size, kernel, stride, padding, dilation, layout", [
    (1, 4, (9, 6), (3, 1), (2, 1), (1, 0), (1, 1), "channels_last"),
    (3, 1, (10, 9), (2, 2), (3, 2), (1, 1), (2, 3), "storage offset"),
    (1, 2, (8, 8), (2, 4), (1, 2), (0, 2), (2, 1), "sliced width"),
])
def test_the_conv_kernel_on_awkward_geometries_and_layouts(batch, channels, size, kernel, stride, padding, dilation,
                                                           layout):
    g = torch.Generator().manual_seed(2)
    n = 5
    w = torch.randn(n, channels * kernel[0] * kernel[1], generator=g)
    values, meta, pruned = compress24(w)
    x = torch.randn(batch, channels, *size, generator=g)
    xin = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
           "storage offset": lambda t: torch.cat([t, t], 0)[batch:],
           "sliced width": lambda t: torch.cat([t[..., :1], t], 3)[..., 1:]}[layout](x)
    b = torch.randn(n, generator=g)
    spec = MatmulSpec("float32", "float32", True, "gelu", False, "float32", layout="conv2d")
    name, source = emit_matmul(spec, [])
    y = sparse24_conv2d(dev(xin), dev(values), dev(meta), None, dev(b), None, spec, name, source,
                        ConvGeometry(kernel, stride, padding, dilation))
    expected = F.gelu(F.conv2d(x.double(), pruned.double().reshape(n, channels, *kernel), b.double(), stride,
                               padding, dilation))
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- prune + compress


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prune24_on_every_group_of_nans_infs_and_signed_zeros(dtype):
    """Every group of four drawn from {NaN, -NaN, inf, -inf, 0, -0, 1}, compared bit for bit (-0.0 kept as
    -0.0) with a rule written here: NaN ranks above everything, NaNs tie, ties go to the lower index."""
    specials = [NAN, -NAN, INF, -INF, 0.0, -0.0, 1.0]
    groups = torch.tensor(list(itertools.product(specials, repeat=4)))[:2400]  # (a whole number of rows of 16)
    rank = torch.where(torch.isnan(groups), 3.0, torch.where(torch.isinf(groups), 2.0, groups.abs()))  # |1| = 1, |0| = 0
    keep_at = rank.sort(dim=-1, descending=True, stable=True).indices[:, :2].sort(dim=-1).values
    x = groups.to(dtype).reshape(-1, 16)
    keep_at = keep_at.reshape(x.shape[0], 4, 2)
    xg = x.reshape(x.shape[0], 4, 4)
    values, meta = prune24(dev(x))
    assert torch.equal(_bits(values.cpu()), _bits(xg.gather(-1, keep_at).reshape(x.shape[0], 8)))
    nibbles = (keep_at[..., 0] | (keep_at[..., 1] << 2)) << torch.tensor([0, 4, 8, 12])
    words = nibbles.sum(-1)
    assert torch.equal(meta.cpu(), torch.where(words >= 2 ** 15, words - 2 ** 16, words).to(torch.int16)[:, None])
    mask = torch.zeros(xg.shape, dtype=torch.bool).scatter(-1, keep_at, True).reshape(x.shape)
    pruned = prune24_dense(dev(x))
    assert torch.equal(_bits(pruned.cpu()), _bits(torch.where(mask, x, torch.zeros((), dtype=dtype))))


# ------------------------------------------------------------------------------- hooks on a fused activation


@pytest.mark.parametrize("activation", [nn.ReLU, nn.SiLU, nn.GELU])
def test_an_activation_module_with_hooks_is_not_fused(monkeypatch, activation):
    """Fusing an activation module removes its call, and with it the hooks registered on it: a forward hook
    that doubles the output was dropped (the kernel's output differed from the model's by the hook). Such a
    module stays in the graph, after the kernel, and its hooks run on every call."""
    import sparsec

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(32, 16), activation()

        def forward(self, x):
            return self.act(self.fc(x))

    torch.manual_seed(0)
    model = Block().eval()
    calls = []
    model.act.register_forward_pre_hook(lambda m, args: calls.append(1))
    model.act.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(3, 32)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", include=["fc"], min_weights=0)
    calls.clear()
    y = cm(x)
    pruned = cm.effective_weight("fc")
    expected = 2 * activation()(F.linear(x.double(), pruned.double(), model.fc.bias.double()))
    assert calls == [1] and list(cm.kernels)
    assert torch.allclose(y.double(), expected, atol=1e-5)


# ------------------------------------------------------------------------------- bfloat16 casts in the interpreter


def test_a_bfloat16_cast_is_not_fused_where_the_interpreter_would_truncate_it(monkeypatch):
    """The Triton CPU interpreter's float32 -> bfloat16 conversion truncates: a float32 layer's fused
    `.to(torch.bfloat16)` differed from torch's round-to-nearest cast in about half its outputs. Run in the
    interpreter, the cast stays after the kernel (its output is torch's cast of the kernel's float32 output);
    a kernel dump, which is for a GPU, still fuses it."""
    import sparsec
    from sparsec.api import compile_with_options
    from sparsec.options import CompileOptions

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    class CastOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 64)

        def forward(self, x):
            return self.fc(x).to(torch.bfloat16)

    torch.manual_seed(0)
    model, x = CastOut(), torch.randn(8, 32)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", include=["fc"], min_weights=0)
    (entry,) = cm.kernel_manifest.values()
    assert not any(op.startswith("cast") for op in entry["fused_ops"])
    expected = F.linear(x.double(), cm.effective_weight("fc").double(), model.fc.bias.double()).float().to(torch.bfloat16)
    y = cm(x)
    assert y.dtype == torch.bfloat16
    # the kernel's float32 sums differ from float64's in the last bits; rounding each to bfloat16 may land a
    # value one bfloat16 step apart, never further (truncation was off by up to one step in every other value)
    assert (y.float() - expected.float()).abs().le(expected.float().abs() * 2 ** -8 + 1e-30).all()
    assert (y != expected).sum() <= 2

    options = CompileOptions.from_user("2:4", include=["fc"], backend="triton", emit_only=True, min_weights=0)
    dumped = compile_with_options(model, (x,), options, {})
    assert any(entry["fused_ops"] == ["bias", "cast:bfloat16"] for entry in dumped.kernel_manifest.values())


# ------------------------------------------------------------------------------- TRITON_INTERPRET spellings


@pytest.mark.parametrize("value", ["true", "On"])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """Triton takes TRITON_INTERPRET=true (on, yes) for its interpreter; sparsec took only "1", so a CPU
    compile with backend="triton" was refused ("needs TRITON_INTERPRET=1") while Triton interpreted, and on
    a GPU machine its tables and cache key would have said GPU while the kernels ran in the interpreter."""
    import sparsec
    from sparsec.codegen.cache import device_arch
    from sparsec.codegen.configs import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() and device_arch() == "interpreter"
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 16)), torch.randn(3, 32)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", include=["0"], min_weights=0)
    assert list(cm.kernels)
    expected = F.linear(x.double(), cm.effective_weight("0").double(), model[0].bias.double())
    assert torch.allclose(cm(x).double(), expected, atol=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
