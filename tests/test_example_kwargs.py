"""example_kwargs: example arguments given by name (keyword-only parameters, a mask= past defaulted ones),
through symbolic_trace and the torch.export fallback, against the model run with weights pruned by the
oracle; and the errors for arguments the forward cannot take."""
import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import output_error, pruned_model
from sparsec.errors import ExampleInputError


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x, *, scale, shift=None):
        h = self.c(torch.relu(self.b(torch.relu(self.a(x)))) * scale)
        return h if shift is None else h + shift


class KeywordOnlyExported(KeywordOnly):
    def forward(self, x, *, scale):
        h = self.a(x)
        if x.size(0) > 2:  # (a branch on a size: symbolic_trace fails, torch.export records it)
            h = h * 2
        return self.c(torch.relu(self.b(torch.relu(h))) * scale)


class Defaulted(KeywordOnly):
    def forward(self, x, mask=None, bias=None):
        h = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        h = h if mask is None else h * mask
        return h if bias is None else h + bias


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, generator=g), torch.rand(64, generator=g), torch.rand(32, generator=g)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("cls, method", [(KeywordOnly, "symbolic_trace"), (KeywordOnlyExported, "torch.export")])
def test_keyword_only_arguments_compile_and_are_taken_by_name(cls, method, backend):
    torch.manual_seed(0)
    model = cls()
    x, scale, _ = _inputs(4, 0)
    cm = sparsec.compile(model, "2:4", (x,), example_kwargs={"scale": scale}, backend=backend, include=[".*"])
    assert cm.trace_method == method and [lp.sparsity for lp in cm.plan] == ["2:4"] * 3
    reference = pruned_model(model, cm.plan)
    x, scale, _ = _inputs(7, 1)  # another batch and scale than the example's
    with torch.no_grad():
        assert output_error(cm(x, scale=scale), reference(x, scale=scale)) <= 1e-5
    plan = sparsec.explain(model, "2:4", (x,), example_kwargs={"scale": scale}, include=[".*"])
    assert [(lp.name, lp.sparsity) for lp in plan] == [(lp.name, lp.sparsity) for lp in cm.plan]


def test_a_keyword_past_defaulted_parameters_is_placed_by_name():
    torch.manual_seed(0)
    model = Defaulted()
    x, _, bias = _inputs(4, 0)
    cm = sparsec.compile(model, "2:4", (x,), example_kwargs={"bias": bias}, backend="torch", include=[".*"])
    reference = pruned_model(model, cm.plan)
    x, _, bias = _inputs(5, 2)
    with torch.no_grad():
        assert output_error(cm(x, bias=bias), reference(x, bias=bias)) <= 1e-5
    # the mask between was left at its default, so the graph fixed it, and says where to pass it
    with pytest.raises(ValueError, match=r"mask has been specialized .* pass in example_inputs \(or by name in "
                                         r"example_kwargs\) every argument you will vary"):
        cm(x, mask=torch.ones(32), bias=bias)
    mask = (torch.arange(32) % 3 > 0).float()
    cm = sparsec.compile(model, "2:4", (x,), example_kwargs={"bias": bias, "mask": mask}, backend="torch", include=[".*"])
    mask = 1 - mask
    with torch.no_grad():
        assert output_error(cm(x, mask=mask, bias=bias), reference(x, mask=mask, bias=bias)) <= 1e-5


class StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, *xs, scale=1.0):
        return self.a(xs[0]) * scale


class StarKwargs(StarArgs):
    def forward(self, x, **options):
        return self.a(x) * options["scale"]


@pytest.mark.parametrize("model, args, kwargs, error, match", [
    (KeywordOnly(), (torch.randn(2, 64),), None, ExampleInputError,
     r"forward\(x, \*, scale, shift=None\) cannot take \(Tensor\[2, 64\] float32\): missing a required argument: "
     r"'scale'\n.*keyword-only ones too\) go in example_kwargs=\{name: value\}"),
    (KeywordOnly(), (torch.randn(2, 64), torch.rand(64)), None, ExampleInputError, "too many positional arguments"),
    (KeywordOnly(), (torch.randn(2, 64),), {"scael": torch.rand(64)}, ExampleInputError,
     r"cannot take \(Tensor\[2, 64\] float32\) with keywords \['scael'\]: "),
    (KeywordOnly(), (torch.randn(2, 64),), [("scale", 1.0)], TypeError, "example_kwargs must be a dict"),
    (KeywordOnly(), (torch.randn(2, 64),), {1: 1.0}, TypeError, "example_kwargs must be a dict"),
    (StarArgs(), (torch.randn(2, 8),), {"scale": 2.0}, ExampleInputError, r"takes \*xs: pass its arguments in example_inputs"),
    (StarKwargs(), (torch.randn(2, 8),), {"scale": 2.0}, ExampleInputError,
     r"example_kwargs \['scale'\] are taken by StarKwargs.forward's \*\*options: .* name them in the forward's signature"),
])
def test_arguments_the_forward_cannot_take_are_refused_naming_the_remedy(model, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsec.compile(model, "2:4", args, example_kwargs=kwargs)


class OptionalArguments(nn.Module):
    """forward(x, mask=None, flag=False), as models with an attention mask and a return-type switch have;
    `export`: a branch on a size makes sparsec capture with torch.export."""

    def __init__(self, export: bool):
        super().__init__()
        self.export = export
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x, mask=None, flag=False):
        h = self.a(x)
        if self.export and x.size(0) > 2:
            h = h * 2
        if mask is not None:
            h = h * mask
        if flag:
            h = -h
        return self.c(torch.relu(self.b(torch.relu(h))))


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
@pytest.mark.parametrize("given", [{}, {"mask": None, "flag": False}], ids=["defaults", "example_kwargs"])
def test_arguments_fixed_at_the_examples_values_may_be_passed_again_or_left_out(export, given, tmp_path):
    """torch.export's graph took the example's arguments alone: cm(x, mask=None) was refused where the example
    left mask at its default, cm(x) where it passed it, though the model computes the same (the fx path took
    both). Another value is refused, naming the argument, on both paths."""
    torch.manual_seed(0)
    model, x = OptionalArguments(export), torch.randn(8, 64)
    cm = sparsec.compile(model, example_inputs=(x,), example_kwargs=given or None)
    assert cm.trace_method == ("torch.export" if export else "symbolic_trace")
    assert cm.plan.sparse_layers
    reference = pruned_model(model, cm.plan)
    expected = reference(x)
    sparsec.save(cm, tmp_path / "m.sparsec")
    loaded = sparsec.load(tmp_path / "m.sparsec")
    for compiled in (cm, loaded):
        for args, kwargs in [((x,), {}), ((x,), {"mask": None}), ((x,), {"flag": False}), ((x, None, False), {}),
                             ((x,), {"flag": False, "mask": None})]:
            assert output_error(compiled(*args, **kwargs), expected) <= 1e-5, (args[1:], kwargs)
        with pytest.raises(ValueError, match="flag"):
            compiled(x, flag=True)
        with pytest.raises(ValueError, match="mask"):
            compiled(x, mask=torch.ones(64))


class DefaultedScale(nn.Module):
    """forward(x, scale=2.0, *, mask=None): a float default, and a keyword-only one; export-captured."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x, scale=2.0, *, mask=None):
        h = self.a(x)
        if x.size(0) > 2:
            h = h * scale
        if mask is not None:
            h = h * mask
        return self.c(torch.relu(self.b(torch.relu(h))))


def test_an_exported_graph_takes_any_plain_default_again_and_keyword_only_ones_by_name_only():
    torch.manual_seed(0)
    model, x = DefaultedScale(), torch.randn(8, 64)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "torch.export"
    expected = pruned_model(model, cm.plan)(x)
    for args, kwargs in [((x,), {"scale": 2.0}), ((x, 2.0), {}), ((x, 2), {}), ((x,), {"mask": None})]:
        assert output_error(cm(*args, **kwargs), expected) <= 1e-5
    with pytest.raises(ValueError, match="argument 'scale' is 3.0 in this call"):
        cm(x, 3.0)
    with pytest.raises(TypeError):  # (mask is keyword-only: the model refuses it by position too)
        cm(x, 2.0, None)
