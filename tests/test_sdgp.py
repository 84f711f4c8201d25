"""SDGP: N:M pruning of dL/dY and the pruning-aware Linear / Conv2d backward.

The oracle here is written independently of sparsec (pairwise ranking instead of a stable sort).
The SDGP backward is intentionally not the true gradient, so there is no gradcheck; instead X.grad
is compared against the dgrad of an independently pruned dY (a test that looked only at the loss
or W.grad could not catch a broken SDGP).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparsec.runtime import sdgp
from sparsec.runtime.sdgp import prune_grad, sdgp_conv2d, sdgp_linear

# Native F.conv2d warns about the zero-padded copy it makes for padding="same" with an even kernel.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

NM = [(2, 4), (1, 4), (4, 8), (2, 8), (4, 4)]
CL = torch.channels_last


# --------------------------------------------------------------------------- independent oracle


def ref_keep(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Entry i of a group is kept iff fewer than n entries beat it (larger |x|, or equal and lower index)."""
    a = x.detach().double().abs().movedim(dim, -1)
    g = a.reshape(*a.shape[:-1], -1, m)
    gi, gj = g.unsqueeze(-1), g.unsqueeze(-2)  # [..., i, 1] and [..., 1, j]
    idx = torch.arange(m)
    lower = idx[None, :] < idx[:, None]  # [i, j]: j has the lower index
    rank = ((gj > gi) | ((gj == gi) & lower)).sum(-1)
    return (rank < n).reshape(a.shape).movedim(-1, dim)


def ref_prune(x: torch.Tensor, n: int, m: int, dim: int, mode: str = "magnitude") -> torch.Tensor:
    """Pruned x in float64; "rescale" restores the L1 norm per (n, c) plane (dim 1 of 4-D) or per row (last dim)."""
    x64 = x.detach().double()
    y = torch.where(ref_keep(x, n, m, dim), x64, torch.zeros_like(x64))
    if mode == "rescale":
        dims = (-1,) if dim in (-1, x.dim() - 1) else (2, 3)
        before, after = x64.abs().sum(dims, keepdim=True), y.abs().sum(dims, keepdim=True)
        y = y * torch.where(after > 0, before / after, torch.zeros_like(after))
    return y


def groups_along(x: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """[..., G, m] view of x's groups along dim (for structural checks)."""
    a = x.movedim(dim, -1)
    return a.reshape(*a.shape[:-1], -1, m)


# --------------------------------------------------------------------------- prune_grad structure


@st.composite
def prune_cases(draw, values="randn"):
    n, m = draw(st.sampled_from(NM))
    rank = draw(st.integers(1, 4))
    dim = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[dim] = m * draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if values == "randn":
        x = torch.randn(shape, generator=gen)
    else:  # few distinct magnitudes: ties and zeros everywhere
        x = torch.randint(-2, 3, shape, generator=gen).float()
    negdim = draw(st.booleans())
    return x, n, m, (dim - rank if negdim else dim), dim


@given(prune_cases())
def test_prune_structure(case):
    x, n, m, dim_arg, dim = case
    y = prune_grad(x, n, m, dim_arg)
    keep = ref_keep(x, n, m, dim)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y != 0, keep)  # randn has no zeros: exactly the oracle's n per group
    assert bool((groups_along(y != 0, dim, m).sum(-1) == n).all())
    assert torch.equal(y[keep], x[keep])  # kept values bit-identical
    assert bool((y[~keep] == 0).all())
    ax, ak = groups_along(x.abs(), dim, m), groups_along(keep, dim, m)
    min_kept = torch.where(ak, ax, torch.full_like(ax, float("inf"))).amin(-1)
    max_dropped = torch.where(ak, torch.full_like(ax, -1.0), ax).amax(-1)
    assert bool((min_kept >= max_dropped).all())


@given(prune_cases(values="ties"))
def test_prune_ties_and_zeros(case):
    x, n, m, dim_arg, dim = case
    y = prune_grad(x, n, m, dim_arg)
    ref = ref_prune(x, n, m, dim)
    assert torch.equal(y, ref.float())
    for dtype in (torch.float64, torch.bfloat16, torch.float16):  # small integers are exact in all
        assert torch.equal(prune_grad(x.to(dtype), n, m, dim_arg), ref.to(dtype))
    nnz = groups_along(x != 0, dim, m).sum(-1)
    assert torch.equal(groups_along(y != 0, dim, m).sum(-1), nnz.clamp(max=n))


def test_tie_rule_lower_index_wins():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 3.0, -3.0, 3.0], [2.0, 2.0, 2.0, 5.0]])
    expect = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 3.0, -3.0, 0.0], [2.0, 0.0, 0.0, 5.0]])
    assert torch.equal(prune_grad(x, 2, 4, -1), expect)
    assert torch.equal(prune_grad(x.t(), 2, 4, 0), expect.t())  # same along another dim


@pytest.mark.parametrize("channels_last", [False, True])
def test_groups_run_along_channels(channels_last):
    # x = 10*c + w (+ noise): grouping along C keeps c in {2, 3}; grouping along W would keep w in {2, 3}.
    c = torch.arange(4).view(1, 4, 1, 1)
    w = torch.arange(4).view(1, 1, 1, 4)
    x = 10.0 * c + w + 0.01 * torch.rand(2, 4, 3, 4)
    if channels_last:
        x = x.to(memory_format=CL)
    y = prune_grad(x, 2, 4, 1)
    assert torch.equal(y != 0, (c >= 2).expand_as(x))
    assert y.is_contiguous(memory_format=CL) == channels_last  # memory format is kept


@given(st.sampled_from(NM), st.sampled_from(sdgp.MODES), st.lists(st.integers(1, 3), min_size=4, max_size=4),
       st.integers(0, 2**31 - 1))
def test_channels_last_prunes_like_contiguous(nm, mode, sizes, seed):
    n, m = nm
    shape = (sizes[0], m * sizes[1], sizes[2], sizes[3])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    dense = prune_grad(x, n, m, 1, mode)
    nhwc = prune_grad(x.to(memory_format=CL), n, m, 1, mode)
    assert torch.equal(nhwc != 0, dense != 0)
    if mode == "magnitude":
        assert torch.equal(nhwc, dense)
    else:  # the per-plane sums may be accumulated in another order
        torch.testing.assert_close(nhwc, dense, rtol=1e-6, atol=0.0)


def test_nan_and_inf_are_kept():
    x = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("inf"), 0.0, -9.0, 1.0])
    y = prune_grad(x, 2, 4, 0)
    assert bool(y[1].isnan()) and y[2] == 3.0 and y[3] == 0.0
    assert y[4] == float("inf") and y[6] == -9.0


# --------------------------------------------------------------------------- rescale


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
@pytest.mark.parametrize("scale", [1.0, 1e-8])  # tiny gradients: an additive eps would bias the ratio
def test_rescale_conv_planes(n, m, scale):
    torch.manual_seed(0)
    x = torch.randn(3, 2 * m, 5, 4) * scale
    x[1, 3] = 0.0  # an all-zero plane
    x[2, :m, 0, 0] = 0.0  # an all-zero group inside a live plane
    x[0, 1] = 0.01 * x[0, 1]  # a live plane that loses every group: pruned away entirely
    y = prune_grad(x, n, m, 1, "rescale")
    mag = prune_grad(x, n, m, 1, "magnitude")
    assert torch.equal(y != 0, mag != 0)  # same support
    assert bool(((y.sign() == x.sign()) | (y == 0)).all())  # signs kept
    assert bool(y.isfinite().all()) and bool((y[1, 3] == 0).all()) and bool((y[0, 1] == 0).all())
    before, after = x.double().abs().sum((2, 3)), y.double().abs().sum((2, 3))
    live = mag.flatten(2).ne(0).any(-1)  # planes that kept something
    assert not bool(live[0, 1]) and not bool(live[1, 3])
    torch.testing.assert_close(after[live], before[live], rtol=1e-4, atol=0.0)
    assert bool((after[~live] == 0).all())
    ratio = torch.where(mag != 0, y / mag, torch.nan).flatten(2)  # constant within each plane
    live = ~ratio.isnan()
    spread = torch.where(live, ratio, -torch.inf).amax(-1) - torch.where(live, ratio, torch.inf).amin(-1)
    assert bool((spread[live.any(-1)] <= 1e-6 * ratio[live].abs().max()).all())
    torch.testing.assert_close(y.double(), ref_prune(x, n, m, 1, "rescale"), rtol=1e-6, atol=0.0)


def test_rescale_linear_rows():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8)
    x[0, 1] = 0.0
    y = prune_grad(x, 2, 4, -1, "rescale")
    assert torch.equal(y != 0, prune_grad(x, 2, 4, -1) != 0)
    torch.testing.assert_close(y.abs().sum(-1), x.abs().sum(-1), rtol=1e-4, atol=0.0)
    assert bool((y[0, 1] == 0).all()) and bool(y.isfinite().all())
    torch.testing.assert_close(y.double(), ref_prune(x, 2, 4, -1, "rescale"), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rescale_low_precision_zero_planes(dtype):
    x = torch.randn(2, 8, 3, 3).to(dtype)
    x[0] = 0
    y = prune_grad(x, 2, 4, 1, "rescale")
    assert y.dtype == dtype and bool(y.isfinite().all()) and bool((y[0] == 0).all())
    tol = {torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double().abs().sum((2, 3)), x.double().abs().sum((2, 3)), rtol=tol, atol=0.0)


# --------------------------------------------------------------------------- N == M


@pytest.mark.parametrize("mode", sdgp.MODES)
def test_prune_n_equals_m_is_identity(mode):
    x = torch.randn(2, 6, 3)  # 6 is no multiple of 4: a no-op needs no grouping
    assert prune_grad(x, 4, 4, 1, mode) is x


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("mode", sdgp.MODES)
@pytest.mark.parametrize("xshape", [(5, 8), (2, 3, 8)])
def test_linear_n_equals_m_matches_dense(xshape, mode):
    torch.manual_seed(2)
    x, w, b = torch.randn(xshape), torch.randn(12, 8), torch.randn(12)
    g = torch.randn(*xshape[:-1], 12)
    dense = [_leaf(t) for t in (x, w, b)]
    F.linear(*dense).backward(g)
    ours = [_leaf(t) for t in (x, w, b)]
    sdgp_linear(*ours, n=4, m=4, mode=mode).backward(g)
    for d, o in zip(dense, ours):
        assert torch.equal(o.grad, d.grad)


# --------------------------------------------------------------------------- autograd contract: Linear


@pytest.mark.parametrize("mode", sdgp.MODES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
@pytest.mark.parametrize("xshape", [(6, 10), (2, 5, 10), (10,)])
def test_linear_contract(xshape, n, m, mode):
    torch.manual_seed(3)
    out = 16
    x, w, b = torch.randn(xshape), torch.randn(out, 10), torch.randn(out)
    g = torch.randn(*xshape[:-1], out)
    dense = [_leaf(t) for t in (x, w, b)]
    y_dense = F.linear(*dense)
    y_dense.backward(g)
    ours = [_leaf(t) for t in (x, w, b)]
    y = sdgp_linear(*ours, n=n, m=m, mode=mode)
    assert torch.equal(y, y_dense)
    y.backward(g)
    torch.testing.assert_close(ours[1].grad, dense[1].grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[2].grad, dense[2].grad, rtol=1e-6, atol=1e-6)
    x_grad_ref = ref_prune(g, n, m, -1, mode).float() @ w
    torch.testing.assert_close(ours[0].grad, x_grad_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0].grad, dense[0].grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("xshape", [(6, 10), (10,)])
def test_linear_output_takes_an_in_place_activation(xshape):
    """F.linear of a 1-D input returns a view; returned from the Function as is, ReLU(inplace=True)
    after it was refused ("a view ... being modified inplace")."""
    x, w, b = torch.randn(xshape, requires_grad=True), torch.randn(16, 10, requires_grad=True), torch.randn(16)
    y = torch.relu_(sdgp_linear(x, w, b, 2, 4))
    y.sum().backward()
    expected = ref_prune((y > 0).float(), 2, 4, -1, "magnitude").float() @ w.detach()
    torch.testing.assert_close(x.grad, expected)


# --------------------------------------------------------------------------- autograd contract: Conv2d

CONV_CASES = {
    "plain": dict(k=3, kw=dict()),
    "pad1": dict(k=3, kw=dict(padding=1)),
    "stride2": dict(k=3, kw=dict(stride=2, padding=1)),
    "stride_pair": dict(k=3, kw=dict(stride=(2, 1), padding=(0, 1))),
    "dilation2": dict(k=3, kw=dict(dilation=2, padding=2)),
    "groups2": dict(k=3, kw=dict(groups=2, padding=1)),
    "depthwise": dict(k=3, kw=dict(groups=8, padding=1)),
    "same_even_kernel": dict(k=4, kw=dict(padding="same")),
    "same_dilated": dict(k=3, kw=dict(padding="same", dilation=2)),
    "valid": dict(k=1, kw=dict(padding="valid")),
}


def ref_conv_dgrad(x, w, dy, kw):
    """dL/dX of F.conv2d at upstream gradient dy (conv2d_input; autograd of F.conv2d for string padding)."""
    if isinstance(kw.get("padding"), str):
        xr = _leaf(x)
        F.conv2d(xr, w, None, **kw).backward(dy)
        return xr.grad
    return torch.nn.grad.conv2d_input(x.shape, w, dy, kw.get("stride", 1), kw.get("padding", 0),
                                      kw.get("dilation", 1), kw.get("groups", 1))


def conv_setup(case, channels_last, dtype=torch.float32, cout=8, seed=4):
    torch.manual_seed(seed)
    k, kw = CONV_CASES[case]["k"], CONV_CASES[case]["kw"]
    cin = 8
    x = torch.randn(2, cin, 9, 8)
    w = torch.randn(cout, cin // kw.get("groups", 1), k, k)
    b = torch.randn(cout)
    if channels_last:
        x, w = x.to(memory_format=CL), w.to(memory_format=CL)
    return x.to(dtype), w.to(dtype), b.to(dtype), kw


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_contract(case, channels_last):
    x, w, b, kw = conv_setup(case, channels_last)
    dense = [_leaf(t) for t in (x, w, b)]
    y_dense = F.conv2d(*dense, **kw)
    g = torch.randn_like(y_dense)  # keeps y's memory format
    y_dense.backward(g)
    for (n, m), mode in [((2, 4), "magnitude"), ((1, 4), "rescale"), ((2, 8), "magnitude")]:
        ours = [_leaf(t) for t in (x, w, b)]
        y = sdgp_conv2d(*ours, **kw, n=n, m=m, mode=mode)
        assert torch.equal(y, y_dense)
        y.backward(g)
        torch.testing.assert_close(ours[1].grad, dense[1].grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[2].grad, dense[2].grad, rtol=1e-6, atol=1e-6)
        x_grad_ref = ref_conv_dgrad(x, w, ref_prune(g, n, m, 1, mode).float(), kw)
        torch.testing.assert_close(ours[0].grad, x_grad_ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours[0].grad, dense[0].grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", ["stride2", "groups2", "same_even_kernel"])
def test_conv_n_equals_m_matches_dense(case, channels_last):
    x, w, b, kw = conv_setup(case, channels_last)
    dense = [_leaf(t) for t in (x, w, b)]
    y_dense = F.conv2d(*dense, **kw)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    ours = [_leaf(t) for t in (x, w, b)]
    sdgp_conv2d(*ours, **kw, n=4, m=4, mode="rescale").backward(g)
    for d, o in zip(dense, ours):
        assert torch.equal(o.grad, d.grad)


def test_channels_last_dy_is_grouped_along_channels():
    # The same values, once NCHW and once NHWC in memory, must give the same X.grad.
    x, w, b, kw = conv_setup("pad1", channels_last=False)
    g = torch.randn(2, 8, 9, 8)
    grads = []
    for fmt in (torch.contiguous_format, CL):
        xr = _leaf(x.contiguous(memory_format=fmt))
        sdgp_conv2d(xr, w.contiguous(memory_format=fmt), b, **kw).backward(g.contiguous(memory_format=fmt))
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sdgp.MODES)
def test_conv_unbatched_input_is_one_sample(mode):
    """F.conv2d takes an unbatched [C, H, W] input (nn.Conv2d on one sample, and a Conv1d's [C, L] run as
    [C, 1, L]); SDGP refused it, so a model compiled for training failed on inputs the original ran."""
    x, w, b, kw = conv_setup("stride2", channels_last=False)
    x = x[1]
    ours = [_leaf(t) for t in (x, w, b)]
    y = torch.relu_(sdgp_conv2d(*ours, **kw, mode=mode))  # (an in-place activation after it, as ReLU(inplace=True))
    dense = [_leaf(t) for t in (x, w, b)]
    y_dense = torch.relu(F.conv2d(*dense, **kw))
    assert y.shape == y_dense.shape == (8, 5, 4) and torch.equal(y, y_dense)
    g = torch.randn_like(y)
    y.backward(g)
    y_dense.backward(g)
    torch.testing.assert_close(ours[1].grad, dense[1].grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[2].grad, dense[2].grad, rtol=1e-6, atol=1e-6)
    dy = (g * (y_dense > 0)).unsqueeze(0)  # the conv's own dY, as one sample: pruned along channels (dim 1)
    expected = ref_conv_dgrad(x.unsqueeze(0), w, ref_prune(dy, 2, 4, 1, mode).float(), kw)[0]
    torch.testing.assert_close(ours[0].grad, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0].grad, dense[0].grad, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- needs_input_grad


def test_unneeded_gradients_are_not_computed(monkeypatch):
    x, w, b, kw = conv_setup("pad1", channels_last=False)

    def boom(*args, **kwargs):
        raise AssertionError("dY pruned although X needs no gradient")

    # X needs no gradient (e.g. the input image): dY is never pruned, dW/db still come out right.
    with monkeypatch.context() as patch:
        patch.setattr(sdgp, "prune_grad", boom)
        wl, bl = _leaf(w), _leaf(b)
        y = sdgp_conv2d(x, wl, bl, **kw)
        g = torch.randn_like(y)
        y.backward(g)
        torch.testing.assert_close(wl.grad, torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1), rtol=1e-5, atol=1e-5)
        xs, ws = torch.randn(3, 8), _leaf(torch.randn(4, 8))
        sdgp_linear(xs, ws).sum().backward()
        torch.testing.assert_close(ws.grad, torch.ones(4, 3) @ xs)

    # Frozen weight and bias: only the dgrad.
    xl = _leaf(x)
    sdgp_conv2d(xl, w, b, **kw).backward(g)
    torch.testing.assert_close(xl.grad, ref_conv_dgrad(x, w, ref_prune(g, 2, 4, 1).float(), kw), rtol=1e-5, atol=1e-5)
    xl = _leaf(torch.randn(3, 8))
    gl = torch.randn(3, 4)
    sdgp_linear(xl, w[:4, :, 0, 0]).backward(gl)
    torch.testing.assert_close(xl.grad, ref_prune(gl, 2, 4, -1).float() @ w[:4, :, 0, 0])


# --------------------------------------------------------------------------- dtypes and autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", sdgp.MODES)
def test_dtypes(dtype, mode):
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    x, w, b, kw = conv_setup("pad1", channels_last=True, dtype=dtype)
    xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
    y = sdgp_conv2d(xl, wl, bl, **kw, mode=mode)
    assert y.dtype == dtype and torch.equal(y, F.conv2d(x, w, b, **kw))
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    assert (xl.grad.dtype, wl.grad.dtype, bl.grad.dtype) == (dtype,) * 3
    # Same-dtype reference dgrad from the independently pruned dY (rounded to dtype like ours).
    ref = ref_conv_dgrad(x, w, ref_prune(g, 2, 4, 1, mode).to(dtype), kw)
    torch.testing.assert_close(xl.grad.double(), ref.double(), rtol=tol, atol=tol * ref.abs().max().item())

    xl, wl = _leaf(torch.randn(4, 3, 8).to(dtype)), _leaf(torch.randn(8, 8).to(dtype))
    y = sdgp_linear(xl, wl, None, mode=mode)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    assert (xl.grad.dtype, wl.grad.dtype) == (dtype, dtype)
    ref = ref_prune(g, 2, 4, -1, mode).to(dtype) @ wl.detach()
    torch.testing.assert_close(xl.grad.double(), ref.double(), rtol=tol, atol=tol * ref.abs().max().item())


class TinyNet(torch.nn.Module):
    """SDGP conv on the image (x needs no grad: no dgrad) -> SDGP conv (rescale) -> SDGP linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(sdgp_conv2d(x, self.c1.weight, self.c1.bias, padding=1))
        h = torch.relu(sdgp_conv2d(h, self.c2.weight, self.c2.bias, padding=1, mode="rescale"))
        return sdgp_linear(h.mean((2, 3)), self.fc.weight, self.fc.bias)


def test_autocast_bf16_training_step():
    torch.manual_seed(5)
    net = TinyNet().to(memory_format=CL)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, 8).to(memory_format=CL)
    target = torch.randint(0, 4, (4,))
    before = [p.detach().clone() for p in net.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        assert out.dtype == torch.bfloat16
        loss = F.cross_entropy(out, target)
    loss.backward()
    for p in net.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32
        assert bool(p.grad.isfinite().all())
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_autocast_matches_native_and_prunes_in_bf16():
    torch.manual_seed(6)
    x, w, b = _leaf(torch.randn(5, 8)), _leaf(torch.randn(8, 8)), _leaf(torch.randn(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdgp_linear(x, w, b)
        assert torch.equal(y, F.linear(x, w, b))
        yc = sdgp_conv2d(x.detach().view(5, 8, 1, 1), w.detach().view(8, 8, 1, 1), b.detach())
        assert torch.equal(yc, F.conv2d(x.detach().view(5, 8, 1, 1), w.detach().view(8, 8, 1, 1), b.detach()))
    g = torch.randn(5, 8).to(torch.bfloat16)
    y.backward(g)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    ref = (ref_prune(g, 2, 4, -1).to(torch.bfloat16) @ w.detach().to(torch.bfloat16)).float()
    torch.testing.assert_close(x.grad, ref, rtol=2e-2, atol=2e-2)


def test_autocast_leaves_float64_as_native_ops_do():
    """Autocast never casts float64 (neither native ops nor custom_fwd's cast_inputs): a float64 layer under
    autocast computed in bf16 here (output off by ~1e-2 and bf16, where F.linear stays float64)."""
    torch.manual_seed(8)
    x, w, b = (_leaf(torch.randn(*s, dtype=torch.float64)) for s in ((5, 8), (8, 8), (8,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdgp_linear(x, w, b)
        yc = sdgp_conv2d(x.detach().view(5, 8, 1, 1), w.detach().view(8, 8, 1, 1), b.detach())
        native, native_c = F.linear(x, w, b), F.conv2d(x.detach().view(5, 8, 1, 1), w.detach().view(8, 8, 1, 1), b.detach())
    assert native.dtype == y.dtype == yc.dtype == torch.float64
    assert torch.equal(y, native) and torch.equal(yc, native_c)
    g = torch.randn(5, 8, dtype=torch.float64)
    y.backward(g)
    torch.testing.assert_close(x.grad, ref_prune(g, 2, 4, -1) @ w.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, g.t() @ x.detach(), rtol=1e-12, atol=1e-12)


def test_backward_inside_autocast_keeps_forward_precision():
    # Forward in fp32, loss.backward() called inside an autocast block: the dgrad must stay fp32.
    torch.manual_seed(7)
    x, w = _leaf(torch.randn(6, 8)), torch.randn(8, 8)
    y = sdgp_linear(x, w)
    g = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y.backward(g)
    torch.testing.assert_close(x.grad, ref_prune(g, 2, 4, -1).float() @ w, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_mode():
    with pytest.raises(ValueError, match="'magnitude', 'rescale'"):
        prune_grad(torch.randn(8), 2, 4, 0, mode="max")
    with pytest.raises(ValueError, match="unknown SDGP mode"):
        sdgp_linear(torch.randn(2, 8), torch.randn(8, 8), mode="rnd")


def test_size_not_multiple_of_m():
    with pytest.raises(ValueError, match=r"size 6 is not a multiple of M=4"):
        prune_grad(torch.randn(2, 6, 3), 2, 4, 1)
    with pytest.raises(ValueError, match=r"out_features=6.*multiple of M=4"):
        sdgp_linear(torch.randn(2, 8), torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"out_channels=12.*multiple of M=8"):
        sdgp_conv2d(torch.randn(1, 8, 4, 4), torch.randn(12, 8, 1, 1), n=2, m=8)


@pytest.mark.parametrize("n,m", [(0, 4), (5, 4), (2.0, 4), (True, 4)])
def test_bad_nm(n, m):
    with pytest.raises(ValueError):
        prune_grad(torch.randn(8), n, m, 0)


def test_bad_dim_and_padding():
    with pytest.raises(ValueError, match="out of range"):
        prune_grad(torch.randn(2, 8), 2, 4, 2)
    with pytest.raises(ValueError, match="0-dim"):
        prune_grad(torch.tensor(1.0), 2, 4, 0)
    with pytest.raises(ValueError, match="'same', 'valid'"):
        sdgp_conv2d(torch.randn(1, 8, 4, 4), torch.randn(8, 8, 3, 3), padding="full")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or unbatched \[C, H, W\], got shape \(8, 4\)"):
        sdgp_conv2d(torch.randn(8, 4), torch.randn(8, 8, 3, 3))
    with pytest.raises(ValueError, match="batched"):
        sdgp_conv2d(torch.randn(1, 1, 8, 4, 4), torch.randn(8, 8, 3, 3))
    with pytest.raises(ValueError, match="strided"):
        sdgp_conv2d(torch.randn(1, 8, 4, 4), torch.randn(8, 8, 3, 3), padding="same", stride=2)


@pytest.mark.parametrize("mode", ["magnitude", "rescale"])
def test_kernel_dgrad_path_matches_the_reference(mode, monkeypatch):
    """The CUDA path (the Triton prune kernel writing the pruned dY, then a dense GEMM), run here
    under the interpreter, gives the same dX as pruning with plain torch."""
    import sparsec.runtime.sdgp as sdgp

    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: the kernel in the interpreter)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    w = torch.randn(8, 16, device=device, requires_grad=True)
    G = torch.randn(3, 5, 8, device=device)
    monkeypatch.setattr(sdgp, "_kernel_path", lambda dy: False)
    sdgp.sdgp_linear(x, w, None, 2, 4, mode).mul(G).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(sdgp, "_kernel_path", lambda dy: True)
    sdgp.sdgp_linear(x, w, None, 2, 4, mode).mul(G).sum().backward()
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_torch_compile_of_a_training_step_prunes_gradients_in_torch(monkeypatch):
    """Under torch.compile the backward is traced, and TorchDynamo cannot trace the Triton prune
    kernel's launch: the traced backward prunes dY in torch (the same function) and Inductor runs it;
    the gradients equal the eager step's, which runs the kernel (here in the interpreter)."""
    import copy

    import torch.nn as nn

    import sparsec
    import sparsec.runtime.sdgp as sdgp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(sdgp, "_prune_kernel_runs_on", lambda device: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8)).to(device)
    x = torch.randn(16, 32, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=[".*"], train=True, grad_pattern="2:4")
    eager, traced = copy.deepcopy(cm), copy.deepcopy(cm)
    eager(x).square().sum().backward()
    torch.compile(traced)(x).square().sum().backward()
    grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), traced.parameters()) if a.grad is not None]
    assert len(grads) == 6 and all(torch.allclose(a, b, atol=1e-5) for a, b in grads)


@pytest.mark.parametrize("mode", ["magnitude", "rescale"])
def test_empty_batch_backward_matches_native(mode):
    """A batch of 0 samples (a detection head with no proposals, an uneven last shard) must give
    native autograd's empty / zero gradients: the backward used to fail reshaping 0 elements into
    groups ("cannot reshape tensor of 0 elements ... ambiguous")."""
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    wc = torch.randn(8, 8, 3, 3, requires_grad=True)
    for fn, ref, x, weight in [(lambda x, w: sdgp_linear(x, w, b, 2, 4, mode), lambda x, w: F.linear(x, w, b),
                                torch.randn(0, 16), w),
                               (lambda x, w: sdgp_conv2d(x, w, None, 1, 1, 1, 1, 2, 4, mode),
                                lambda x, w: F.conv2d(x, w, None, 1, 1), torch.randn(0, 8, 5, 5), wc)]:
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = torch.autograd.grad(fn(xs, weight).sum(), (xs, weight))
        want = torch.autograd.grad(ref(xr, weight).sum(), (xr, weight))
        for g, r in zip(got, want):
            assert g.shape == r.shape
            torch.testing.assert_close(g, r)


# --------------------------------------------------------------------------- torch.func


def _per_sample_linear_grads(x, w, g, mode):
    """Hand-written SDGP gradients of sum(sdgp_linear(x, w, b) * g) for one sample: dX = prune(dY) W,
    dW = dY^T X and db = sum(dY) from the unpruned dY = g."""
    g2, x2 = g.reshape(-1, g.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    return ref_prune(g, 2, 4, -1, mode) @ w.double(), g2.t() @ x2, g2.sum(0)


@pytest.mark.parametrize("mode", sdgp.MODES)
def test_func_grad_of_a_loss_is_the_sdgp_gradient(mode):
    """torch.func.grad through sdgp_linear gives the SDGP gradients (it raised: an old-style Function
    with forward(ctx, ...) and no setup_context cannot run under torch.func)."""
    torch.manual_seed(11)
    x, w, b, g = torch.randn(3, 5, 8), torch.randn(12, 8), torch.randn(12), torch.randn(3, 5, 12)
    grads = torch.func.grad(lambda x, w, b: (sdgp_linear(x, w, b, 2, 4, mode) * g).sum(), argnums=(0, 1, 2))(x, w, b)
    for got, want in zip(grads, _per_sample_linear_grads(x, w, g, mode)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grads[0], g @ w, atol=1e-3)  # the dgrad really is pruned


@pytest.mark.parametrize("mode", sdgp.MODES)
def test_func_vmap_gives_each_samples_output_and_gradients(mode):
    """vmap(sdgp_linear) is F.linear per sample, and vmap(grad(...)) gives per-sample gradients (the
    Opacus / functorch per-sample-gradient recipe): each sample's dX, dW, db from its own dY."""
    torch.manual_seed(12)
    xs, gs, w, b = torch.randn(4, 3, 8), torch.randn(4, 3, 8), torch.randn(8, 8), torch.randn(8)
    assert torch.equal(torch.func.vmap(lambda x: sdgp_linear(x, w, b))(xs), F.linear(xs, w, b))

    def loss(x, w, b, g):
        return (sdgp_linear(x, w, b, 2, 4, mode) * g).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(xs, w, b, gs)
    assert [t.shape for t in per_sample] == [(4, 3, 8), (4, 8, 8), (4, 8)]
    for i in range(len(xs)):
        for got, want in zip(per_sample, _per_sample_linear_grads(xs[i], w, gs[i], mode)):
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)


def test_func_jacrev_rows_are_pruned_cotangents():
    """jacrev of x -> sdgp_linear(x, W) @ A: row o is the dgrad of the layer's dY = A[:, o], pruned 2:4."""
    torch.manual_seed(13)
    x, w, a = torch.randn(8), torch.randn(12, 8), torch.randn(12, 5)
    jac = torch.func.jacrev(lambda x: sdgp_linear(x, w) @ a)(x)
    torch.testing.assert_close(jac.double(), ref_prune(a.t(), 2, 4, -1) @ w.double(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(jac, a.t() @ w, atol=1e-3)


@pytest.mark.parametrize("mode", sdgp.MODES)
@pytest.mark.parametrize("case", ["pad1", "stride2", "same_even_kernel", "groups2"])
def test_func_grad_and_vmap_of_conv(case, mode):
    """grad through sdgp_conv2d: dX from the pruned dY, dW dense; vmap over single [C, H, W] samples
    (the unbatched input path) gives each sample's output and its own SDGP gradients."""
    x, w, b, kw = conv_setup(case, channels_last=False)
    y = F.conv2d(x, w, b, **kw)
    g = torch.randn_like(y)

    def loss(x, w, g):
        return (sdgp_conv2d(x, w, b, **kw, mode=mode) * g).sum()

    gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, w, g)
    torch.testing.assert_close(gx, ref_conv_dgrad(x, w, ref_prune(g, 2, 4, 1, mode).float(), kw), rtol=1e-5, atol=1e-5)
    wr = _leaf(w)
    F.conv2d(x, wr, b, **kw).backward(g)
    torch.testing.assert_close(gw, wr.grad, rtol=1e-5, atol=1e-5)

    assert torch.equal(torch.func.vmap(lambda s: sdgp_conv2d(s, w, b, **kw))(x), y)
    gxs, gws = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None, 0))(x, w, g)
    for i in range(len(x)):
        xi, gi = x[i : i + 1], g[i : i + 1]
        torch.testing.assert_close(gxs[i : i + 1], ref_conv_dgrad(xi, w, ref_prune(gi, 2, 4, 1, mode).float(), kw),
                                   rtol=1e-5, atol=1e-5)
        wr = _leaf(w)
        F.conv2d(xi, wr, b, **kw).backward(gi)
        torch.testing.assert_close(gws[i], wr.grad, rtol=1e-5, atol=1e-5)


def test_func_grad_under_autocast_keeps_parameter_dtypes():
    """Under CPU bf16 autocast, torch.func.grad returns float32 gradients for float32 inputs, computed
    from the bf16 product as the autograd path does."""
    torch.manual_seed(14)
    x, w, g = torch.randn(6, 8), torch.randn(8, 8), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gx, gw = torch.func.grad(lambda x, w: (sdgp_linear(x, w).float() * g).sum(), argnums=(0, 1))(x, w)
        xl, wl = _leaf(x), _leaf(w)
        (sdgp_linear(xl, wl).float() * g).sum().backward()
    assert gx.dtype == gw.dtype == torch.float32
    assert torch.equal(gx, xl.grad) and torch.equal(gw, wl.grad)
    ref = (ref_prune(g.to(torch.bfloat16), 2, 4, -1).to(torch.bfloat16) @ w.to(torch.bfloat16)).float()
    torch.testing.assert_close(gx, ref, rtol=2e-2, atol=2e-2)


def test_double_backward():
    """The SDGP backward is differentiable: gradgradcheck holds for the backward as written (it is not the
    true gradient, so gradcheck does not), and torch.func's nested grad agrees with autograd's."""
    torch.manual_seed(15)
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 8), (8, 8), (8,)))
    for mode in sdgp.MODES:
        assert torch.autograd.gradgradcheck(lambda x, w, b: sdgp_linear(x, w, b, 2, 4, mode), (x, w, b))

    def f(x):
        return sdgp_linear(x, w.detach(), b.detach()).pow(2).sum()

    nested = torch.func.grad(lambda x: torch.func.grad(f)(x).pow(2).sum())(x.detach())
    (g1,) = torch.autograd.grad(f(x), x, create_graph=True)
    (want,) = torch.autograd.grad(g1.pow(2).sum(), x)
    torch.testing.assert_close(nested, want)


@pytest.mark.parametrize("padding", [1, "same"])
def test_conv_double_backward(padding):
    """gradgradcheck of the conv backward, also for "same" with an even kernel: the backward used the
    padded copy of x that forward made (a temporary no graph led back from), so the second-order
    terms through x were missing (gradgradcheck failed)."""
    torch.manual_seed(16)
    xc = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(8, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    bc = torch.randn(8, dtype=torch.float64, requires_grad=True)
    for mode in sdgp.MODES:
        assert torch.autograd.gradgradcheck(lambda x, w, b: sdgp_conv2d(x, w, b, padding=padding, mode=mode), (xc, wc, bc))


def test_direct_apply_under_autocast_casts_like_the_wrappers():
    """SDGPLinear / SDGPConv2d.apply called directly (not through sdgp_linear / sdgp_conv2d, which cast
    before apply) still compute in the autocast dtype and hand back gradients in the inputs' dtypes."""
    torch.manual_seed(17)
    x, w, b = _leaf(torch.randn(5, 8)), _leaf(torch.randn(8, 8)), _leaf(torch.randn(8))
    xc, wc = _leaf(torch.randn(2, 8, 4, 4)), _leaf(torch.randn(8, 8, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdgp.SDGPLinear.apply(x, w, b, 2, 4, "magnitude")
        yc = sdgp.SDGPConv2d.apply(xc, wc, None, 1, 1, 1, 1, 2, 4, "magnitude")
        assert torch.equal(y, F.linear(x, w, b)) and torch.equal(yc, F.conv2d(xc, wc, None, 1, 1))
    g, gc = torch.randn(5, 8).to(torch.bfloat16), torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    y.backward(g)
    yc.backward(gc)
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == xc.grad.dtype == wc.grad.dtype == torch.float32
    bf = torch.bfloat16
    torch.testing.assert_close(x.grad, (ref_prune(g, 2, 4, -1).to(bf) @ w.detach().to(bf)).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, (g.t() @ x.detach().to(bf)).float(), rtol=2e-2, atol=2e-2)
    want = ref_conv_dgrad(xc.detach().to(bf), wc.detach().to(bf), ref_prune(gc, 2, 4, 1).to(bf), dict(padding=1))
    torch.testing.assert_close(xc.grad, want.float(), rtol=2e-2, atol=5e-2)
