"""The `sparsec` command (also `python -m sparsec`).

    sparsec inspect FILE.py[:FUNC] --pattern 2:4 [--json] [--quantize int8|auto|log2:B|codebook:B] [--include NAME ...] [--exclude NAME ...]
    sparsec dump-kernels FILE.py[:FUNC] --pattern 2:4 -o DIR [--quantize int8]

FUNC (default: build_model) is a function in FILE.py taking no arguments and returning a model,
(model, example_inputs) or (model, example_inputs, example_kwargs). `inspect` prints the plan and the
transformed graph; with --json it prints only the plan as JSON (pipe it to a file, edit it, pass it back with --plan).
`dump-kernels` generates the Triton kernels the model's 2:4 and constant fan-in layers get (no GPU
needed: kernels are written, not run) and writes each as an importable DIR/<kernel>.py plus DIR/manifest.json.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import traceback
import warnings

import torch
import torch.nn as nn

DEFAULT_FUNC = "build_model"
_RETURNS = "a model, (model, example_inputs) or (model, example_inputs, example_kwargs)"


class CliError(Exception):
    pass


def load_target(spec: str) -> tuple[nn.Module, tuple | None, dict | None]:
    """Import FILE.py and call FUNC; return (model, example_inputs or None, example_kwargs or None)."""
    # FUNC follows the last colon, so a folder name holding one ("runs/12:30/model.py") still works
    path, sep, func = spec.rpartition(":")
    if not sep or os.path.isfile(spec):
        path, func = spec, ""
    func = func or DEFAULT_FUNC
    if not os.path.isfile(path):
        raise CliError(f"{path} is a folder: give the Python file that defines {func}" if os.path.isdir(path)
                       else f"no such file: {path}")
    module_name = f"sparsec_cli_target_{abs(hash(path))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None:  # importlib picks a loader by suffix and has none for a script named `train` or
        # `model.txt` (an AttributeError traceback followed): read such a file as Python source
        loader = importlib.machinery.SourceFileLoader(module_name, path)
        module_spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as `import` does: @dataclass (with `from __future__ import annotations`),
    # typing.get_type_hints and pickle look the module up in sys.modules and failed without it.
    sys.modules[module_name] = module
    # Let the file import its neighbours, as `python FILE.py` does, for the whole command (main restores
    # sys.path): FUNC, and forward while it is traced, often import them only when called; popping the
    # entry after the import made those fail (and popped the file's own sys.path.insert instead of ours).
    sys.path.insert(0, os.path.dirname(os.path.realpath(path)))  # (python FILE.py: a link's target's folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file; say where it failed instead of a sparsec traceback
        sys.modules.pop(module_name, None)
        raise CliError(f"importing {path} failed: {_where(e, path)}") from e
    except SystemExit as e:  # sys.exit() or argparse run at import: not sparsec's exit, and not a success
        sys.modules.pop(module_name, None)
        raise CliError(f"importing {path} exited (SystemExit {e.code!r}{_at_line(e, path)}): "
                       f"the file runs a script at import; put that under `if __name__ == \"__main__\":` so "
                       f"that importing it only defines {func}") from e
    builder = getattr(module, func, None)
    if not callable(builder):
        callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        raise CliError(f"{path} has no function {func!r}; write FILE.py:FUNC with one of: {', '.join(callables) or '(none)'}")
    try:
        result = builder()
    except Exception as e:  # noqa: BLE001 - as above
        raise CliError(f"{path}:{func}() failed: {_where(e, path)}") from e
    except SystemExit as e:  # (sys.exit(0) in FUNC ended the command with status 0 and no output)
        raise CliError(f"{path}:{func}() exited (SystemExit {e.code!r}{_at_line(e, path)}) instead of returning "
                       f"{_RETURNS}") from e
    if isinstance(result, nn.Module):
        return result, None, None
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        model, inputs, kwargs = (*result, None)[:3]
        return model, (inputs,) if isinstance(inputs, torch.Tensor) else inputs, kwargs
    raise CliError(f"{path}:{func}() must return {_RETURNS}, got {type(result).__name__}")


def _where(error: BaseException, path: str) -> str:
    """The error and the innermost line of `path` it passed through."""
    return f"{type(error).__name__}: {error}{_at_line(error, path)}"


def _at_line(error: BaseException, path: str) -> str:
    """' (at PATH line N)': the innermost line of `path` the error passed through (a SyntaxError's own)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
    line = error.lineno if isinstance(error, SyntaxError) else (frames[-1].lineno if frames else None)
    return f" (at {path} line {line})" if line else ""


def _read_plan(path: str | None):
    import sparsec
    from sparsec.errors import SparsecError

    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        # JSON text may come in UTF-8, -16 or -32, with or without a byte-order mark (PowerShell's `>` writes UTF-16)
        text = data.decode(json.detect_encoding(data))
    except OSError as e:
        raise CliError(f"cannot read the plan file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CliError(f"the plan file {path} is not JSON text in UTF-8, -16 or -32 ({e.reason} at byte {e.start}): "
                       f"write it with `sparsec inspect ... --json > plan.json` or Plan.to_json()") from e
    try:
        return sparsec.Plan.from_json(text)
    except (SparsecError, TypeError, ValueError) as e:  # name the file (Plan.from_json cannot); a TypeError
        # comes from JSON of the wrong shape, e.g. "layers": 3
        raise CliError(f"the plan file {path} is not a usable sparsec plan: {e}") from e


def _inspect(args: argparse.Namespace) -> int:
    import sparsec

    # With --json, stdout is the plan alone (piped into a file or jq): whatever the user's file prints
    # while it is imported and builds the model (a progress line) goes to stderr instead of into the JSON
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        model, inputs, kwargs = load_target(args.target)
        plan = _read_plan(args.plan)
        with _plan_says_nothing_is_sparse():
            cm = sparsec.compile(model, pattern=args.pattern, example_inputs=inputs, quantize=args.quantize,
                                 include=args.include, exclude=args.exclude, plan=plan, example_kwargs=kwargs,
                                 **_tracing_options(args))
    if args.json:
        print(cm.plan.to_json())
        return 0
    print(cm.plan)
    print()
    print(f"# transformed graph (traced with {cm.trace_method})")
    print(cm.graph_module.code.strip())
    return 0


def _tracing_options(args: argparse.Namespace) -> dict:
    """--leaf-modules / --min-weights as compile's options, where given (compile refuses min_weights with a plan)."""
    options = {"leaf_modules": args.leaf_modules}
    if args.min_weights is not None:
        options["min_weights"] = args.min_weights
    return options


def _dump_kernels(args: argparse.Namespace) -> int:
    from sparsec.api import compile_with_options
    from sparsec.options import CompileOptions

    # (the options first: a bad one, or no Triton to generate kernels with, is said before the model is built)
    options = CompileOptions.from_user(args.pattern, args.quantize, args.include, args.exclude, backend="triton",
                                       emit_only=True, **_tracing_options(args))
    model, inputs, kwargs = load_target(args.target)
    with _plan_says_nothing_is_sparse():
        cm = compile_with_options(model, inputs, options, kwargs)
    manifest = {"pattern": cm.plan.pattern, "kernels": cm.kernel_manifest,
                "layers_without_kernel": {lp.name: lp.reason for lp in cm.plan if lp.sparsity and lp.backend != "triton"}}
    files = {f"{name}.py": source for name, source in sorted(cm.kernels.items())}
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True)
    try:
        os.makedirs(args.output, exist_ok=True)
        stale = _earlier_dump(args.output, files)
        for name in stale:
            os.remove(os.path.join(args.output, name))
        for name, text in files.items():
            with open(os.path.join(args.output, name), "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        raise CliError(f"cannot write to the output folder {args.output}: {e.strerror or e}"
                       + (f" ({e.filename})" if e.filename and e.filename != args.output else "")) from e
    print(f"wrote {len(cm.kernels)} kernel{'s' if len(cm.kernels) != 1 else ''} and manifest.json to {args.output}"
          + (f" (removed {len(stale)} kernel{'s' if len(stale) != 1 else ''} of the earlier dump there)" if stale else ""))
    for name, entry in sorted(cm.kernel_manifest.items()):
        print(f"  {name}.py: {', '.join(layer['name'] for layer in entry['layers'])} [{', '.join(entry['fused_ops']) or 'no epilogue'}]")
    if not cm.plan.sparse_layers:
        print(f"  no layer was made sparse with pattern {cm.plan.pattern!r}: `sparsec inspect` with the same options "
              f"gives each layer's reason")
    for name, reason in manifest["layers_without_kernel"].items():  # (they run on the torch runtime)
        print(f"  {name}: no kernel, {reason.rpartition('runs on the torch runtime: ')[2]}")
    return 0


@contextlib.contextmanager
def _plan_says_nothing_is_sparse():
    """compile's warning that no layer took the pattern tells a Python caller to print the plan; the commands
    print it (inspect) or say it themselves (dump-kernels)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sparsec.compile: no layer was made sparse")
        yield


def _add_model_options(parser: argparse.ArgumentParser, takes_plan: bool) -> None:
    # nargs="?" only so that a target after --include / --exclude can be taken back (_take_back_target):
    # it is required, as the usage line says
    parser.add_argument("target", nargs="?", metavar="FILE.py[:FUNC]",
                        help=f"required; FUNC (default {DEFAULT_FUNC}) returns {_RETURNS}")
    parser.add_argument("--pattern", default=None,
                        help='"N:M" (e.g. 2:4), "fanin:S" (e.g. fanin:0.9), "unstructured:S" (e.g. unstructured:0.95) or '
                             '"dense"; default 2:4' + (" (with --plan: the plan's)" if takes_plan else ""))
    parser.add_argument("--quantize", default=None, metavar="{int8,auto,log2:B,codebook:B}",
                        help="int8: per-output-channel int8 weights for the sparse layers; auto: int8 only where the "
                             "weight error stays within 2%%; log2:B / codebook:B (2 <= B <= 8): one table of 2^B "
                             "levels per layer (powers of two / k-means); default: none")
    parser.add_argument("--include", nargs="*", default=None, metavar="NAME", help="module names / regexes forced sparse")
    parser.add_argument("--exclude", nargs="*", default=None, metavar="NAME", help="module names / regexes kept dense")
    # (what compile's errors and warnings advise as leaf_modules= / min_weights=: a model that needs one
    # could not be inspected from the command line at all)
    parser.add_argument("--leaf-modules", nargs="*", default=None, metavar="NAME",
                        help="module paths called whole instead of traced into (compile's leaf_modules=)")
    parser.add_argument("--min-weights", type=int, default=None, metavar="N",
                        help="layers with fewer weights stay dense unless included (compile's min_weights=, default "
                             "1024)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsec", description="graph-level compiler for sparse PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", usage="sparsec inspect FILE.py[:FUNC] [options]", help="print the plan and the transformed graph of a model")
    _add_model_options(inspect, takes_plan=True)
    inspect.add_argument("--plan", default=None, metavar="PLAN.json", help="apply this (edited) plan exactly")
    inspect.add_argument("--json", action="store_true", help="print only the plan, as JSON")
    inspect.set_defaults(run=_inspect)
    dump = sub.add_parser("dump-kernels", usage="sparsec dump-kernels FILE.py[:FUNC] -o DIR [options]", help="write the generated Triton kernels and a manifest to a folder")
    _add_model_options(dump, takes_plan=False)
    dump.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for <kernel>.py files and manifest.json")
    dump.set_defaults(run=_dump_kernels)
    return parser


# the keys every manifest dump-kernels writes has: a manifest.json without them is someone else's
_MANIFEST_KEYS = {"pattern", "kernels", "layers_without_kernel"}


def _earlier_dump(folder: str, files: dict[str, str]) -> list[str]:
    """The kernel files an earlier dump into `folder` wrote (its manifest lists them) that this one does not:
    left there, they would sit beside a manifest that does not list them. Nothing else is touched.
    Raises CliError when `folder` holds a manifest.json that is not a dump's (a web app's, say): it would be
    overwritten, and files its "kernels" named deleted."""
    manifest = os.path.join(folder, "manifest.json")
    if not os.path.lexists(manifest):
        return []
    try:
        with open(manifest, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and _MANIFEST_KEYS <= data.keys() and isinstance(data["kernels"], dict)):
        raise CliError(f"{manifest} exists and is not the manifest of an earlier `sparsec dump-kernels`; "
                       f"writing there would replace it: choose another output folder, or remove it yourself")
    return [f"{name}.py" for name in data["kernels"] if os.path.basename(name) == name
            and f"{name}.py" not in files
            and os.path.isfile(os.path.join(folder, f"{name}.py"))]


def _is_target(word: str) -> bool:
    return os.path.isfile(word) or os.path.isfile(word.rpartition(":")[0])


def _take_back_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--include / --exclude take every following word, so `sparsec inspect --include fc2 model.py` leaves
    no target (argparse reads model.py as a second name): the last of their words that names an existing
    file is the target. With none, the target is missing, as argparse would say."""
    if getattr(args, "target", "") is not None:
        return
    for option in ("leaf_modules", "exclude", "include"):
        names = getattr(args, option) or []
        files = [i for i, word in enumerate(names) if _is_target(word)]
        if files:
            args.target = names.pop(files[-1])
            return
    parser.error("the following arguments are required: target")


def main(argv: list[str] | None = None) -> int:
    from sparsec.errors import SparsecError

    parser = build_parser()
    args = parser.parse_args(argv)
    _take_back_target(parser, args)
    saved_path = list(sys.path)  # load_target adds the target's folder for the whole command
    try:
        code = args.run(args)
        sys.stdout.flush()  # (a closed pipe shows here, inside the handler below, not at interpreter exit)
        return code
    except (CliError, SparsecError) as e:
        print(f"sparsec: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`sparsec inspect ... | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not print a second traceback (Python docs, signal)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    finally:
        sys.path[:] = saved_path  # (main called in-process: the user's folder must not shadow later imports)


if __name__ == "__main__":
    sys.exit(main())
