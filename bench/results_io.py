"""Where benchmark results go: bench/results/, or $SPARSEC_RESULTS_DIR (a device run's $OUT)."""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def results_dir() -> str:
    return os.environ.get("SPARSEC_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's command line: its docstring as --help, and --out (where results go)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=results_dir(), metavar="DIR",
                        help="folder for the JSON results (default: $SPARSEC_RESULTS_DIR, else bench/results)")
    return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, and send every write_results of this run to --out."""
    args = parser.parse_args()
    os.environ["SPARSEC_RESULTS_DIR"] = args.out
    return args


def skip_without_cuda(script: str) -> bool:
    """True (after saying so) on a machine without CUDA, where a GPU benchmark writes nothing."""
    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device on this machine; the GPU benchmark is skipped (nothing written).")
    return True


def write_results(prefix: str, device: str, payload: dict, announce: bool = True) -> str:
    """Write `payload` (plus device, date, torch version) to <results>/<prefix>-<device>-<date>.json,
    through a temp file and a rename: a run killed mid-write leaves the previous version whole."""
    date = datetime.date.today().isoformat()
    out = results_dir()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{prefix}-{device.replace(' ', '_')}-{date}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": device, "date": date, "torch": torch.__version__, **payload}, f, indent=2)
    os.replace(path + ".tmp", path)
    if announce:
        print(f"wrote {path}")
    return path
