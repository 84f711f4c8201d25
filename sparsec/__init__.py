"""sparsec: a graph-level compiler for sparse PyTorch models.

    import sparsec
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,))
    print(cm.plan)                  # which layers went sparse, and why
    print(cm.graph_module.code)     # the rewritten graph, each layer annotated
"""
from sparsec.api import compile, explain
from sparsec.compiled import CompiledModel
from sparsec.gradual import GradualPruning
from sparsec.group_lasso import GroupLasso
from sparsec.errors import (CorruptFileError, ExampleInputError, InvalidInputError, InvalidTypeError, MissingCodeError,
                            PassError, SparsecError, TraceError)
from sparsec.interop import to_cutlass
from sparsec.plan import LayerPlan, Plan
from sparsec.reference import nm_compress, nm_decompress
from sparsec.serialization import load, save
from sparsec.shrink import ShrinkReport, shrink
from sparsec.srigl import SRigL

__version__ = "0.1.0"

__all__ = [
    "compile", "explain", "save", "load", "CompiledModel", "Plan", "LayerPlan", "SRigL", "GradualPruning", "GroupLasso",
    "shrink", "ShrinkReport",
    "nm_compress", "nm_decompress", "to_cutlass",
    "SparsecError", "InvalidInputError", "InvalidTypeError", "ExampleInputError", "TraceError", "PassError",
    "CorruptFileError", "MissingCodeError",
]
