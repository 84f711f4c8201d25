"""Where benchmark results go: bench/results/, or $SPARSEC_RESULTS_DIR (a device run's $OUT)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import traceback

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


def add_budget_option(parser: argparse.ArgumentParser) -> None:
    """--budget-s, for the benches that run their cases through CaseRunner."""
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="start no new case after S seconds (the rest are recorded as skipped)")


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


ERROR_LOG = "bench-errors.log"


def _log_traceback(case: dict) -> None:
    """Append the exception being handled, whole, to <results>/bench-errors.log (the printed line
    keeps the output short enough for its tail to hold the table)."""
    os.makedirs(results_dir(), exist_ok=True)
    with open(os.path.join(results_dir(), ERROR_LOG), "a") as f:
        f.write(f"=== {case}\n{traceback.format_exc()}\n")


class CaseRunner:
    """Runs a benchmark's cases one at a time, so that one failure costs one row, not the device call:
    * a case that raises becomes an error row (its identity plus the exception's last line, printed);
    * once `budget_s` seconds have passed, the remaining cases are recorded as skipped instead of run
      (a device call has a hard time limit; a case killed half-way leaves nothing);
    * if the first `systemic` cases all raise, the rest are skipped too: every case hits that bug,
      and the device time is better spent on the fix.
    `rows` holds every outcome in order; `measured` only the rows that ran."""

    def __init__(self, budget_s: float | None = None, systemic: int = 2):
        self._deadline = None if budget_s is None else time.monotonic() + budget_s
        self._systemic = systemic
        self.rows: list[dict] = []

    @property
    def measured(self) -> list[dict]:
        return [r for r in self.rows if "error" not in r and "skipped" not in r]

    def run(self, case: dict, fn, *args) -> dict | None:
        """fn(*args)'s row (None, with a row recording why, if it failed or was skipped)."""
        from sparsec.errors import last_line

        first = self.rows[:self._systemic]
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.rows.append({**case, "skipped": "the run's time budget was spent"})
        elif len(first) == self._systemic and all("error" in r for r in first):
            self.rows.append({**case, "skipped": f"the first {self._systemic} cases all failed"})
        else:
            try:
                row = fn(*args)
            except Exception as e:  # noqa: BLE001 - recorded with the case; the other cases still run
                self.rows.append({**case, "error": last_line(e)})
                _log_traceback(case)
                print(f"ERROR {case}: {self.rows[-1]['error']} (traceback in {ERROR_LOG})", flush=True)
                return None
            self.rows.append(row)
            return row
        print(f"skipped {case}: {self.rows[-1]['skipped']}", flush=True)
        return None
