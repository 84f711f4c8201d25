"""Where benchmark results go: bench/results/, or $SPARSEC_RESULTS_DIR (a device run's $OUT)."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import time
import traceback

import torch

from sparsec.atomic_file import replaced_on_success

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def results_dir() -> str:
    return os.environ.get("SPARSEC_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's command line: its docstring as --help, and --out (where results go)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=results_dir(), metavar="DIR",
                        help="folder for the JSON results (default: $SPARSEC_RESULTS_DIR, else bench/results)")
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of rounds, repeats, calls, threads, features)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor(), else "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_busy_s() -> float:
    """CPU seconds all processes have used since boot (/proc/stat), to spot co-tenants during a run."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        return float("nan")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Disturbance:
    """How much CPU time other processes took while a CPU benchmark ran. With every core busy with
    the benchmark's threads, a co-tenant stalls them all (scheduler slices of ms): times taken then are
    not the code's. `report()` prints it, with a warning past 5% of the wall time, and returns the figures
    for the JSON."""

    def __init__(self):
        self._busy, self._own, self._wall = cpu_busy_s(), own_cpu_s(), time.perf_counter()

    def report(self) -> dict:
        elsewhere = (cpu_busy_s() - self._busy) - (own_cpu_s() - self._own)
        wall = time.perf_counter() - self._wall
        disturbed = elsewhere > 0.05 * wall
        print(f"other processes used {elsewhere:.1f} CPU-s during the {wall:.0f} s run"
              + ("  <- results disturbed, rerun on an idle machine" if disturbed else ""))
        return {"other_processes_cpu_s": elsewhere, "wall_s": wall, "disturbed": disturbed}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info() -> dict:
    """What every results file records besides its device and date: versions, the sparsec commit (the package
    version names no code state) and the host CPU, under "host_cpu" (a script's own "cpu" part, its CPU results,
    had overwritten it)."""
    return {"torch": torch.__version__, "triton": _version("triton"), "python": platform.python_version(),
            "sparsec_commit": sparsec_commit(), "host_cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads()}


def sparsec_commit() -> str | None:
    """The checkout's commit, "+changes" when its files differ from it; None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def load_oracle():
    """tests/oracle.py, the independent plain-torch reference the tests use (written apart from
    sparsec/reference.py), loaded by path: benchmarks check sparsec's pruned weights against it."""
    spec = importlib.util.spec_from_file_location("sparsec_tests_oracle", os.path.join(ROOT, "tests", "oracle.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def effective_weight_error(cm, model, max_rows: int = 512) -> float:
    """Largest deviation, relative to the largest weight checked, of what each sparse layer of `cm`
    computes with (cm.effective_weight) from the oracle's pruning (and int8 fake quantization) of the
    original model's weight as the plan says: a benchmark whose expected outputs are computed from
    cm.effective_weight checks the kernels, and this checks the weights they were given. N:M pruning and
    the int8 scales are per row (output feature), so an N:M layer is checked on `max_rows` rows spread
    over it (the oracle's pairwise ranking takes tens of seconds on a whole 14336 x 4096 weight)."""
    oracle = load_oracle()
    params = dict(model.named_parameters())
    worst = 0.0
    for lp in cm.plan.sparse_layers:
        w = params.get(f"{lp.name}.weight", params.get(lp.name)).detach().cpu()
        got = cm.effective_weight(lp.name).detach().cpu()
        if lp.sparsity.startswith("fanin:"):  # (k depends on the whole weight's size)
            expected = oracle.pruned_weight(w, lp.op, lp.sparsity, lp.quant)
        else:
            rows, got = oracle.to_rows(w, lp.op), oracle.to_rows(got, lp.op)
            pick = torch.linspace(0, rows.shape[0] - 1, min(rows.shape[0], max_rows)).round().long().unique()
            rows, got = rows[pick], got[pick]
            expected = oracle.pruned_weight(rows, "linear", lp.sparsity, lp.quant)
        expected, got = expected.double(), got.double()
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)))
    return worst


def block_seconds(fn, block_s: float = 0.03) -> float:
    """Seconds per call over one block of calls lasting about block_s."""
    start, calls = time.perf_counter(), 0
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= block_s:
            return elapsed / calls


def in_rounds(fns: dict, rounds: int, best: dict | None = None, block_s: float = 0.03) -> dict[str, float]:
    """name -> median seconds per call of fn over `rounds` rounds, the methods taking turns in every round
    (one block_seconds block each), so a drift while measuring (another process, clocks) falls on all of them
    alike. `best`, when given, receives each method's least block (the least disturbed on a shared machine)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(block_seconds(fn, block_s))
    if best is not None:
        best.update({name: min(times) for name, times in samples.items()})
    return {name: statistics.median(times) for name, times in samples.items()}


def cpu_ceilings() -> dict:
    """This CPU's ceilings, measured now with every torch thread: read bandwidth (the sum of a 256 MB
    float32 tensor, past any L3) and dense GEMM rates (F.linear 2048 x 2048 x 2048 in float32 and in
    bfloat16, whose CPU GEMM may use bf16 dot products). Best of 3 blocks: a ceiling is what the
    machine reaches, not what it usually does."""
    big = torch.ones(64 << 20)
    big.sum()
    read = big.numel() * 4 / 1e9 / min(block_seconds(big.sum, 0.2) for _ in range(3))
    del big
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        fn = lambda a=a: torch.nn.functional.linear(a, a)  # noqa: E731
        fn()
        gemm[str(dtype).removeprefix("torch.")] = 2 * 2048 ** 3 / 1e9 / min(block_seconds(fn, 0.2) for _ in range(3))
    return {"read_gbs": read, "gemm_gflops": gemm}


def write_results(prefix: str, device: str, payload: dict, announce: bool = True) -> str:
    """Write `payload` (plus device, date, versions and host CPU: run_info()) to
    <results>/<prefix>-<device>-<date>.json, through a temp file and a rename: a run killed mid-write
    leaves the previous version whole."""
    date = datetime.date.today().isoformat()
    out = results_dir()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{prefix}-{device.replace(' ', '_')}-{date}.json")
    results = {"device": device, "date": date, **run_info(), **payload}
    with replaced_on_success(path, suffix=".json") as tmp, open(tmp, "w") as f:
        os.fchmod(f.fileno(), 0o644)  # (mkstemp's 0600 kept a results file from its other readers)
        json.dump(results, f, indent=2)
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
