"""Analysis: run the graph once on the example inputs and record each node's output shape/dtype."""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.errors import ExampleInputError, ParameterWriteError
from sparsec.example_inputs import describe_inputs
from sparsec.meta import update_meta
from sparsec.state import preserved_state
from sparsec.user_code import user_frame


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.current: fx.Node | None = None
        self.outputs: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        self.current = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.outputs[n] = result
        return result


def propagate_shapes(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.example_inputs is None:
        ctx.notes.append("no example inputs given: output shapes and FLOP estimates are unknown")
        return gm
    recorder = _Recorder(gm)
    try:
        with torch.no_grad(), preserved_state(gm):
            recorder.run(*ctx.example_inputs)
    except ParameterWriteError:  # (preserved_state's: not a problem of the inputs)
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the inputs not fitting the model
        node = recorder.current
        at = ""
        if node is not None:
            stack = node.meta.get("nn_module_stack") or {}
            module = node.target if node.op == "call_module" else (list(stack.values())[-1][0] if stack else "")
            at = f" at graph node '{node.name}'" + (f" (module '{module}')" if module else "")
        where = user_frame(e)
        raise ExampleInputError(
            f"the example inputs do not fit the model: running it on {describe_inputs(ctx.example_inputs)} "
            f"failed{at}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            + (f"\n  at {where}" if where else "")
            + "\nexample_inputs must be a tuple of the positional arguments the model's forward accepts") from e
    for node, value in recorder.outputs.items():
        update_meta(node, shape=tuple(value.shape), dtype=value.dtype)
    return gm
