"""SDGP (Structured Data Gradient Pruning): a backward that prunes dL/dY N:M before the data gradient.

For a layer `y = x W^T + b` (or a conv), backward turns `dY = dL/dy` into three results:

    dX = dY . W        the data gradient ("dgrad"), propagated to the previous layer
    dW = dY^T . X      the weight gradient ("wgrad")
    db = sum(dY)

SDGP (McDanel et al. 2022, /work/shared/methods.md (a)) feeds the dgrad with an N:M-pruned copy
of dY so that product can run on 2:4 sparse tensor cores; dW and db keep the dense dY and stay
exact. Groups run along the reduction dimension of the dgrad: out_features for Linear, output
channels at each (n, h, w) for Conv2d. They are defined on the logical dimension, never by memory
format (the original CUDA kernel grouped raw memory, i.e. along W for an NCHW tensor).

The backward is deliberately not the true gradient, so `torch.autograd.gradcheck` does not apply;
the backward is itself differentiable (double backward, `gradgradcheck` of it holds).

torch.func: both Functions are the "new style" (`forward` without ctx, `setup_context`, `backward`,
`generate_vmap_rule = True`), so `torch.func.grad` / `vjp` / `jacrev` / `vmap` run them, with the
SDGP backward (vmap over a batch gives each sample's result). No `jvp` is defined: forward-mode AD
(`jacfwd`, `jvp`) is refused by torch, since the true tangent would disagree with the SDGP vjp.

Autocast: `torch.amp.custom_fwd` binds one `device_type` at decoration time, so a Function
decorated for "cuda" ignores CPU autocast and vice versa. The Functions here instead do what
`custom_fwd(cast_inputs=<autocast dtype>)` does, for the device of `x` read at call time: if
autocast is on for that device, cast the floating inputs to its dtype (never float64) and run the
body with autocast off. `sdgp_linear` / `sdgp_conv2d` make that cast before `apply`, as tracked
ops (as native autocast does for F.linear), so it happens once and autograd casts each gradient
back; `forward` casts again for a direct `apply` (a no-op after the wrappers' cast), and
`setup_context` saves the tensors forward computed with. The backward always runs with autocast off
(in the dtype the forward computed in) and casts each gradient back to its input's dtype, so fp32
parameters get fp32 gradients, as with native autocast.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from sparsec.codegen import configs
from sparsec.errors import InvalidInputError
from sparsec.reference import nm_mask

MODES = ("magnitude", "rescale")

__all__ = ["MODES", "prune_grad", "SDGPLinear", "SDGPConv2d", "sdgp_linear", "sdgp_conv2d"]


# --------------------------------------------------------------------------- argument checks


def _check_nm(n: int, m: int, mode: str) -> None:
    if mode not in MODES:
        raise InvalidInputError(f"unknown SDGP mode {mode!r}; accepted modes: {', '.join(map(repr, MODES))}")
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise InvalidInputError(f"N and M must be integers, got n={n!r}, m={m!r}")
    if not 1 <= n <= m:
        raise InvalidInputError(f"need 1 <= N <= M, got N={n}, M={m}")


def _check_groupable(size: int, m: int, what: str) -> None:
    if size % m:
        raise InvalidInputError(f"cannot prune the gradient {what}: its size {size} is not a multiple of M={m}")


# --------------------------------------------------------------------------- pruning


def _norm_dims(ndim: int, dim: int) -> tuple[int, ...]:
    """Dimensions the 'rescale' mode sums |dY| over (one ratio per index of the others).

    * `dim` is the last dimension (Linear, dY `[..., out]`): each row of the flattened leading
      dims, i.e. each token's L1 norm over its out_features. The Linear analogue of the conv rule
      ("sum over everything but batch and dim") would sum over tokens, which is empty for 2-D dY.
    * otherwise (Conv, dY `[N, C, H, W]` with dim=1): each (sample, channel) plane over all other
      dims (H, W), as in the original 'maxnorm' prune type.
    """
    if dim == ndim - 1:
        return (dim,)
    return tuple(d for d in range(ndim) if d not in (0, dim))


def _rescale_l1(dy: torch.Tensor, pruned: torch.Tensor, dim: int) -> torch.Tensor:
    """Scale `pruned` so every unit of `_norm_dims` has the L1 norm it had in `dy`.

    No additive eps: the original divides by `sum|pruned| + 1e-4`, an absolute constant that
    biases the ratio by eps/sum and so depends on the gradient's scale (negligible for loss-scaled
    fp16, a large shrink for unscaled bf16 gradients of ~1e-6). Instead the sums are accumulated
    in fp32 (fp64 for fp64 input), where a low-precision sum cannot overflow, and a unit whose
    kept entries are all zero gets ratio 0, so it stays exactly zero (no NaN/Inf; the original
    also returns zeros there, as 0 * finite). For a conv plane that can happen with a nonzero
    `dy` plane (groups run across channels, so channel c may lose every group): its L1 norm is not
    restored. For rows (groups inside the unit) it only happens for an all-zero row.
    The ratio is at most M/N for rows but unbounded for conv planes; a product beyond the dtype's
    range becomes Inf, which a loss scaler treats as an overflow.
    """
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    dims = _norm_dims(dy.dim(), dim)
    before = dy.to(acc).abs().sum(dims, keepdim=True)
    after = pruned.to(acc).abs().sum(dims, keepdim=True)
    ratio = torch.where(after > 0, before / after, torch.zeros_like(after))
    return (pruned.to(acc) * ratio).to(dy.dtype)


def prune_grad(dy: torch.Tensor, n: int, m: int, dim: int, mode: str = "magnitude") -> torch.Tensor:
    """N:M magnitude pruning of `dy` along `dim`.

    Every group of m consecutive entries along `dim` keeps its n largest |dy| (ties go to the
    lower index); the rest become exactly 0. Mode "magnitude" keeps the kept values unchanged;
    "rescale" then scales them so the L1 norm is preserved per unit of `_norm_dims` (per (n, c)
    plane for conv gradients pruned along dim 1, per row for gradients pruned along the last dim;
    a unit left with no nonzero entry stays zero, see `_rescale_l1`).
    The result keeps `dy`'s memory format.

    N == M returns `dy` itself (an exact no-op, whatever the size along `dim`). Otherwise the size
    along `dim` must be a multiple of m (InvalidInputError, a ValueError): callers decide which
    layers are eligible beforehand. NaN/Inf entries sort as the largest, so they are kept and a
    loss scaler still sees an overflow.
    """
    _check_nm(n, m, mode)
    if dy.dim() == 0:
        raise InvalidInputError("cannot prune a 0-dim tensor: it has no dimension to group along")
    if not -dy.dim() <= dim < dy.dim():
        raise InvalidInputError(f"dim {dim} is out of range for a {dy.dim()}-dim tensor")
    dim %= dy.dim()
    if n == m:
        return dy
    _check_groupable(dy.shape[dim], m, f"along dim {dim} of shape {tuple(dy.shape)}")
    # Groups run along the last dim; moving `dim` there makes the grouping semantic.
    keep = nm_mask(dy.movedim(dim, -1), n, m).movedim(-1, dim)
    # clone() keeps dy's strides (out-of-place masked_fill would return NCHW for an NHWC dy).
    pruned = dy.clone().masked_fill_(~keep, 0)
    if mode == "rescale":
        pruned = _rescale_l1(dy, pruned, dim)
    return pruned


# --------------------------------------------------------------------------- autocast handling


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is on for `device_type`, else None."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    # float64 is never cast, as autocast's own `_cast` (custom_fwd's cast_inputs) and native ops leave it:
    # casting it put a float64 layer's product into bf16 under autocast (off by ~1e-2 from F.linear's)
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _autocast_inputs(x, weight, bias):
    """autocast's input cast (custom_fwd's cast_inputs) for x's device: (x, weight, bias) unchanged when
    autocast is off there. Under grad mode the casts are tracked ops, whose backward casts back."""
    dtype = _autocast_dtype(x.device.type)
    return _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)


def _save_inputs(ctx, x, weight, bias):
    """setup_context's common part: record the input dtypes (the gradients go back to them) and save
    x and weight as forward computed with them. After sdgp_linear / sdgp_conv2d's cast that is the
    inputs themselves (the cast is a no-op), so a double backward reaches them; only a direct `apply`
    under autocast casts a second time here (forward's cast was a temporary that could not be saved)."""
    ctx.device_type = x.device.type
    ctx.in_dtypes = tuple(None if t is None else t.dtype for t in (x, weight, bias))
    x, weight, _ = _autocast_inputs(x, weight, None)
    ctx.save_for_backward(x, weight)


def _grads_to_input_dtypes(ctx, grads):
    return tuple(g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, ctx.in_dtypes))


# --------------------------------------------------------------------------- Linear


class SDGPLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` whose backward prunes dY N:M (last dim) for dX only.

    apply(x, weight, bias, n, m, mode); x may have any number of leading dims.
    """

    generate_vmap_rule = True  # every op in forward and backward has a vmap rule

    @staticmethod
    def forward(x, weight, bias, n, m, mode):
        _check_nm(n, m, mode)
        if n != m:  # fail at forward time, not later inside backward
            _check_groupable(weight.shape[0], m, f"of a Linear with out_features={weight.shape[0]}")
        x, weight, bias = _autocast_inputs(x, weight, bias)
        with _no_autocast(x.device.type):
            y = F.linear(x, weight, bias)
        # (x not 2-D, with a bias): autograd refuses in-place ops (ReLU(inplace=True)) on a view a Function
        # returns. TorchDynamo cannot trace _is_view() (torch.compile(fullgraph=True) of an SDGP step failed
        # on it): while tracing, every y F.linear may return as a view (x not 2-D) is copied.
        if (x.dim() != 2) if torch.compiler.is_compiling() else y._is_view():
            y = y.clone()
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, n, m, mode = inputs
        _save_inputs(ctx, x, weight, bias)
        ctx.nm = (n, m, mode)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, m, mode = ctx.nm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _no_autocast(ctx.device_type):
            if need_x:
                grad_x = _linear_dgrad(dy, weight, n, m, mode)
            if need_w or need_b:
                dy_rows = dy.reshape(-1, dy.shape[-1])  # leading dims flattened: [tokens, out]
            if need_w:
                grad_w = dy_rows.t().mm(x.reshape(-1, x.shape[-1]))
            if need_b:
                grad_b = dy_rows.sum(0)
        return (*_grads_to_input_dtypes(ctx, (grad_x, grad_w, grad_b)), None, None, None)


def _kernel_path(dy: torch.Tensor) -> bool:
    """2:4 gradients on CUDA are pruned by sparsec's Triton prune kernel, except while torch.compile
    traces the backward: TorchDynamo cannot trace a Triton launch, and the torch form is the same
    function (the kernel is bit-exact with it), which Inductor then generates code for. Likewise
    under torch.func (a batched or grad-tracking wrapper has no storage of its own to launch on)."""
    return (_prune_kernel_runs_on(dy.device) and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(dy))


def _prune_kernel_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" and configs.triton_installed()


def _linear_dgrad(dy: torch.Tensor, weight: torch.Tensor, n: int, m: int, mode: str) -> torch.Tensor:
    """prune(dY) @ W. On CUDA the 2:4 prune is one pass of the Triton kernel, and the product is a
    dense GEMM on the pruned dY. (Until 2026-11-23 the product went through torch's semi-structured
    tensor, compressing dY every step: on an H100 with torch 2.11 that made a training step of a
    768/3072 MLP block 5x slower than dense and of a 4096/14336 one 2x slower, the semi-structured
    call's setup alone about 0.6 ms; bench/results/training-semistructured-dgrad-*-2026-11-23.json.)"""
    if (n, m) != (2, 4) or not _kernel_path(dy):
        return prune_grad(dy, n, m, -1, mode).matmul(weight)
    from sparsec.codegen.prune_launch import prune24_dense

    pruned = prune24_dense(dy)
    if mode == "rescale":
        pruned = _rescale_l1(dy, pruned, dy.dim() - 1)
    return pruned.matmul(weight)


def sdgp_linear(x, weight, bias=None, n: int = 2, m: int = 4, mode: str = "magnitude"):
    """Drop-in for `F.linear` with an SDGP backward (see `SDGPLinear`)."""
    return SDGPLinear.apply(*_autocast_inputs(x, weight, bias), n, m, mode)


# --------------------------------------------------------------------------- Conv2d


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise InvalidInputError(f"{name} must be an int or a pair, got {v!r}")
    return v


def _resolve_padding(padding, weight, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(symmetric padding, extra bottom/right padding) for F.conv2d's padding argument.

    "same" with an even total padding `dilation * (k - 1)` puts the odd pixel at the bottom/right,
    as aten's `_convolution_mode` does; convolution_backward only knows symmetric padding, so
    the forward pads that pixel explicitly and the backward slices it off again.
    """
    if not isinstance(padding, str):
        return _pair(padding, "padding"), (0, 0)
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise InvalidInputError("padding='same' is not supported for strided convolutions (as in F.conv2d)")
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        return tuple(t // 2 for t in total), tuple(t % 2 for t in total)
    raise InvalidInputError(f"invalid padding string {padding!r}; accepted: 'same', 'valid'")


class SDGPConv2d(torch.autograd.Function):
    """`F.conv2d` whose backward prunes dY N:M along output channels (dim 1) for dX only.

    apply(x, weight, bias, stride, padding, dilation, groups, n, m, mode). Groups are M
    consecutive output channels at each (n, h, w) whatever the memory format. Padding may be an
    int, a pair, "valid" or "same"; padding_mode other than zeros is not supported (pad first).
    """

    generate_vmap_rule = True  # every op in forward and backward has a vmap rule

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups, n, m, mode):
        _check_nm(n, m, mode)
        if x.dim() != 4:  # (sdgp_conv2d batches an unbatched [C, H, W] input, whose dim 1 is not the channels)
            raise InvalidInputError(f"SDGP conv2d expects a batched input [N, C, H, W], got shape {tuple(x.shape)}")
        if n != m:
            _check_groupable(weight.shape[0], m, f"of a Conv2d with out_channels={weight.shape[0]}")
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        padding, extra = _resolve_padding(padding, weight, stride, dilation)
        x, weight, bias = _autocast_inputs(x, weight, bias)
        with _no_autocast(x.device.type):
            return F.conv2d(_pad_extra(x, extra), weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups, n, m, mode = inputs
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        padding, ctx.extra = _resolve_padding(padding, weight, stride, dilation)
        # x is saved unpadded (the padded copy is a forward temporary); backward pads it again
        _save_inputs(ctx, x, weight, bias)
        ctx.conv = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        ctx.has_bias = bias is not None
        ctx.nm = (n, m, mode)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, m, mode = ctx.nm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        backward = torch.ops.aten.convolution_backward
        grad_x = grad_w = grad_b = None
        with _no_autocast(ctx.device_type):
            input_hw = tuple(x.shape[-2:])
            x = _pad_extra(x, ctx.extra)
            dy_x = prune_grad(dy, n, m, 1, mode) if need_x else None
            if dy_x is dy:
                # N == M: nothing was pruned, so make the dense backward's single call.
                grad_x, grad_w, grad_b = backward(dy, x, weight, bias_sizes, *ctx.conv, [True, need_w, need_b])
            else:
                if need_x:  # dgrad from the pruned dY
                    grad_x = backward(dy_x, x, weight, None, *ctx.conv, [True, False, False])[0]
                if need_w or need_b:  # wgrad and bias from the dense dY
                    _, grad_w, grad_b = backward(dy, x, weight, bias_sizes, *ctx.conv, [False, need_w, need_b])
        if grad_x is not None and any(ctx.extra):
            grad_x = grad_x[..., : input_hw[0], : input_hw[1]]  # drop the "same" extra pixel
        return (*_grads_to_input_dtypes(ctx, (grad_x, grad_w, grad_b)), None, None, None, None, None, None, None)


def _pad_extra(x: torch.Tensor, extra: tuple[int, int]) -> torch.Tensor:
    """x with "same" padding's odd bottom / right pixel added (see `_resolve_padding`)."""
    return F.pad(x, (0, extra[1], 0, extra[0])) if any(extra) else x


def sdgp_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
                n: int = 2, m: int = 4, mode: str = "magnitude"):
    """Drop-in for `F.conv2d` with an SDGP backward (see `SDGPConv2d`); x is [N, C, H, W] or, as F.conv2d
    takes it, unbatched [C, H, W] (an nn.Conv2d / Conv1d called on one sample must still run once compiled)."""
    if x.dim() not in (3, 4):
        raise InvalidInputError(f"SDGP conv2d expects an input [N, C, H, W] or unbatched [C, H, W], got shape "
                                f"{tuple(x.shape)}")
    x, weight, bias = _autocast_inputs(x, weight, bias)
    if x.dim() == 3:
        return SDGPConv2d.apply(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, n, m, mode).squeeze(0)
    return SDGPConv2d.apply(x, weight, bias, stride, padding, dilation, groups, n, m, mode)
