"""GPU benchmark scripts must run, and skip cleanly, on a machine without CUDA."""
import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("script", ["bench_sparse24.py", "bench_conv24.py", "bench_training.py", "bench_condensed_gpu.py",
                                    "bench_decode_compile.py"])
def test_gpu_benchmarks_skip_cleanly_without_cuda(script):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmarks are run by hand there")
    result = subprocess.run([sys.executable, os.path.join(BENCH, script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout


def test_call_overhead_benchmark_runs_anywhere(tmp_path):
    """On a CPU it times sparsec's own per-call Python (the launch stubbed); on a GPU, real launches."""
    import json

    # one thread: on a machine busy with other processes, nn.Linear's multi-threaded CPU matmul waited out
    # scheduler slices at its barrier (~16 ms a call), past the sanity bound below
    result = subprocess.run([sys.executable, os.path.join(BENCH, "bench_call_overhead.py"), "--features", "64",
                             "--calls", "20", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("call-overhead-*.json")
    us = json.loads(path.read_text())["us_per_call"]
    expected = {"sparsec layer", "compiled model", "nn.Linear"} | ({"sparsec layer, JIT launch"} if torch.cuda.is_available()
                                                                  else set())
    assert set(us) == expected and all(0 < v < 1e4 for v in us.values())


def test_sparse24_sweep_times_every_candidate_and_checks_nothing_silently(monkeypatch):
    """The launch-config sweep of bench_sparse24 runs end to end (kernels in the interpreter, timer
    replaced by a call counter), so the first GPU session does not find its bugs."""
    import torch.nn as nn

    import sparsec
    from sparsec.runtime.triton_linear import TritonSparseLinear

    sys.path.insert(0, BENCH)
    import bench_sparse24

    calls = []
    monkeypatch.setattr(bench_sparse24, "median_time", lambda fn, **kw: calls.append(fn()) or 1e-6 * len(calls))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU runs the kernels in the interpreter)
    model = nn.Sequential(nn.Linear(64, 32, bias=False)).to(device)
    x = torch.randn(2, 64, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    layer = next(m for m in cm.modules() if isinstance(m, TritonSparseLinear))
    expected = x.double() @ cm.effective_weight("0").double().t()
    results = bench_sparse24.sweep_configs(layer, x, expected)
    assert len(results) == len(calls) >= 1
    assert [r["s"] for r in results] == [1e-6 * (i + 1) for i in range(len(results))]
    assert all(r["ok"] and r["max_rel_err"] < 1e-5 for r in results)
    for out in calls:
        assert torch.allclose(out, expected.float(), atol=1e-4)
    # a config computing the wrong thing is recorded as such and not timed
    wrong = bench_sparse24.sweep_configs(layer, x, 2 * expected)
    assert len(calls) == len(results) and all(not r["ok"] and r["s"] is None for r in wrong)
    # a config that fails to run is recorded with its error, and the sweep goes on
    from sparsec.codegen import configs

    real = configs.matmul_candidates
    monkeypatch.setattr(configs, "matmul_candidates", lambda *a: [dict(real(*a)[0], BLOCK_N=24)] + real(*a))
    swept = bench_sparse24.sweep_configs(layer, x, expected)
    assert not swept[0]["ok"] and swept[0]["s"] is None and "power of 2" in swept[0]["error"]
    assert all(r["ok"] for r in swept[1:]) and len(swept) == len(results) + 1
    # a kernel leaving elements unwritten fails its check, whatever a reused allocation held
    from sparsec.codegen import launch

    real_matmul = launch.sparse24_matmul

    def skips_row_0(*args, out=None, **kwargs):
        y = real_matmul(*args, **kwargs)
        if out is None:
            return y
        out[1:] = y[1:]
        return out

    monkeypatch.setattr(launch, "sparse24_matmul", skips_row_0)
    skipped = bench_sparse24.sweep_configs(layer, x, expected)[1:]
    assert skipped and all(not r["ok"] and r["s"] is None and r["max_rel_err"] != r["max_rel_err"] for r in skipped)


def test_conv24_sweep_checks_then_times_every_config(monkeypatch):
    """bench_conv24's launch-config sweep runs end to end on a reflect-padded conv (the kernel in the
    interpreter on CPU, the timer a call counter); a wrong result is recorded, not timed."""
    import torch.nn as nn
    import torch.nn.functional as F

    import sparsec
    from sparsec.runtime.triton_conv import TritonSparseConv2d

    sys.path.insert(0, BENCH)
    import bench_conv24

    calls = []
    monkeypatch.setattr(bench_conv24, "median_time", lambda fn, **kw: calls.append(fn()) or 1e-6 * len(calls))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), nn.ReLU()).to(device).eval()
    x = torch.randn(2, 8, 6, 6, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    layer = next(m for m in cm.modules() if isinstance(m, TritonSparseConv2d))
    expected = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect").double(), cm.effective_weight("0").double(),
                               model[0].bias.detach().double()))
    results = bench_conv24.sweep_configs(layer, x, expected)
    assert len(results) == len(calls) >= 1 and all(r["ok"] and r["max_rel_err"] < 1e-5 for r in results)
    assert all(torch.allclose(out, expected.float(), atol=1e-4) for out in calls)
    wrong = bench_conv24.sweep_configs(layer, x, 2 * expected)
    assert len(calls) == len(results) and all(not r["ok"] and r["s"] is None for r in wrong)


def test_sparse24_reports_each_target_at_its_worst_row():
    sys.path.insert(0, BENCH)
    import bench_sparse24

    rows = [dict(weights="fp16", M=1, vs_dense=1.6, auto_vs_dense=1.5, auto_vs_dense_eager=0.9, auto_graph_vs_dense=1.5),
            dict(weights="fp16", M=16, vs_dense=1.4, auto_vs_dense=1.3, auto_vs_dense_eager=1.1, auto_graph_vs_dense=1.3),
            dict(weights="fp16", M=2048, vs_dense=0.5, auto_vs_dense=0.98, auto_vs_dense_eager=0.99,  # no 1.5x target
                 auto_graph_vs_dense=1.2),
            dict(weights="int8", M=1, vs_dense=3.0, auto_vs_dense=2.9, auto_vs_dense_eager=1.2, auto_graph_vs_dense=2.9)]
    targets = bench_sparse24.check_targets(rows)
    assert targets["fp16 2:4 vs dense at M <= 16"] == {"worst": 1.4, "needs": 1.5, "met": False, "rows": 2}
    assert targets["int8 2:4 vs dense fp16 at M <= 16"] == {"worst": 3.0, "needs": 2.8, "met": True, "rows": 1}
    assert targets["auto vs dense (GPU time), every shape"] == {"worst": 0.98, "needs": 0.97, "met": True, "rows": 4}
    eager = targets["auto vs dense (eager calls, host time included), every shape"]
    assert eager == {"worst": 0.9, "needs": 0.97, "met": False, "rows": 4}
    assert "int8 2:4 vs dense fp16 at M <= 16" not in bench_sparse24.check_targets(rows[:3])


def test_sparse24_runs_over_other_rows_write_other_files():
    """gpu_session.sh runs the decode rows and the large-M rows in separate calls on the same day:
    neither file may overwrite the other, nor the full run's."""
    sys.path.insert(0, BENCH)
    import bench_sparse24

    names = {bench_sparse24.results_prefix(quick, weights, ms) for quick in (False, True)
             for weights in ("fp16", "int8", "both") for ms in (None, [1, 16], [128, 2048, 8192])}
    assert len(names) == 2 * 3 * 3
    assert bench_sparse24.results_prefix(False, "both", None) == "sparse24"
    assert bench_sparse24.results_prefix(False, "both", [1, 16]) == "sparse24-m1-16"


def test_results_are_written_whole_and_rewritten_in_place(tmp_path, monkeypatch, capsys):
    """bench_sparse24 rewrites its file after every row; each write replaces the file whole."""
    import json

    sys.path.insert(0, BENCH)
    from results_io import write_results

    monkeypatch.setenv("SPARSEC_RESULTS_DIR", str(tmp_path))
    first = write_results("sparse24", "Some GPU", {"rows": [1]}, announce=False)
    second = write_results("sparse24", "Some GPU", {"rows": [1, 2], "complete": True})
    assert first == second and os.listdir(tmp_path) == [os.path.basename(first)]  # no temp file left
    assert json.loads(open(second).read())["rows"] == [1, 2]
    assert capsys.readouterr().out == f"wrote {second}\n"  # only the announced write prints


def test_case_runner_keeps_going_past_a_failure_and_stops_at_its_budget(tmp_path, monkeypatch, capsys):
    """One failing case costs one row (recorded with its error, traceback logged); once the budget is
    spent the remaining cases are recorded as skipped, not run; the rows keep the cases' order."""
    sys.path.insert(0, BENCH)
    from results_io import ERROR_LOG, CaseRunner

    monkeypatch.setenv("SPARSEC_RESULTS_DIR", str(tmp_path))
    ran = []

    def case(i):
        ran.append(i)
        if i == 1:
            raise RuntimeError("ptxas failed\nout of registers")
        return {"i": i, "ok": True}

    runner = CaseRunner(budget_s=3600)
    assert [runner.run({"i": i}, case, i) for i in range(3)] == [{"i": 0, "ok": True}, None, {"i": 2, "ok": True}]
    assert runner.rows[1] == {"i": 1, "error": "RuntimeError: out of registers"}
    assert runner.measured == [{"i": 0, "ok": True}, {"i": 2, "ok": True}]
    assert "ptxas failed" in (tmp_path / ERROR_LOG).read_text()  # the whole traceback, not only the printed line
    assert "ERROR {'i': 1}: RuntimeError: out of registers" in capsys.readouterr().out

    spent = CaseRunner(budget_s=-1)  # already over budget: nothing runs
    assert spent.run({"i": 9}, case, 9) is None and ran == [0, 1, 2]
    assert spent.rows == [{"i": 9, "skipped": "the run's time budget was spent"}]


def test_case_runner_stops_when_the_first_cases_all_fail(tmp_path, monkeypatch):
    """A bug every case hits (the first two fail) stops the run: the rest are skipped, not retried."""
    sys.path.insert(0, BENCH)
    from results_io import CaseRunner

    monkeypatch.setenv("SPARSEC_RESULTS_DIR", str(tmp_path))
    calls = []

    def broken(i):
        calls.append(i)
        raise ValueError("no kernel")

    runner = CaseRunner()
    for i in range(4):
        runner.run({"i": i}, broken, i)
    assert calls == [0, 1]
    assert [("error" in r, "skipped" in r) for r in runner.rows] == [(True, False)] * 2 + [(False, True)] * 2


def test_decode_compile_bench_checks_and_times_every_variant(monkeypatch):
    """bench_decode_compile's case, run small on this machine (timer replaced by a counter): every
    variant, torch.compile ones included, is checked against float64 before it is timed."""
    sys.path.insert(0, BENCH)
    import bench_decode_compile

    monkeypatch.setattr(bench_decode_compile, "per_call_s", lambda fn: (fn(), 1e-6)[1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = bench_decode_compile.run_case(1, None, device=device, d=64, h=128, dtype=torch.float32)
    assert row["ok"] and set(row["s"]) == {"original", "sparsec", "original, torch.compile", "sparsec, torch.compile"}
    assert all(err < 1e-5 for err in row["max_rel_err"].values())
    assert row["vs_original"] == row["vs_original_compiled"] == 1.0


def test_every_gpu_session_part_the_docs_name_exists():
    """A device call is scarce: the runs gpu_session.sh, gpu_notes.md and the README tell the next GPU
    session to make must name parts the script has (an unknown one exits 2 and wastes the call)."""
    import re

    root = os.path.dirname(BENCH)
    with open(os.path.join(BENCH, "gpu_session.sh")) as f:
        script = f.read()
    assert subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_session.sh")]).returncode == 0
    parts = set(re.findall(r"^    ([a-z0-9-]+)\)", script, flags=re.M))
    assert {"tests", "decode", "large", "decode-compile"} <= parts
    named = []
    for doc in ("bench/gpu_session.sh", "bench/gpu_notes.md", "README.md"):
        with open(os.path.join(root, doc)) as f:
            for run in re.findall(r"gpu_session\.sh ([a-z0-9 -]+)", f.read()):
                named += run.split()
    assert named and set(named) <= parts, set(named) - parts


def test_cpu24_bench_checks_and_times_every_method(tmp_path):
    """bench_cpu24 on its small shapes: every method checked against dense, then timed; results written."""
    env = dict(os.environ, SPARSEC_RESULTS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cpu24.py"), "--shapes", "small", "--rounds", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("cpu24-*.json")
    data = json.loads(result.read_text())
    assert {r["weights"] for r in data["layers"]} == {"fp32", "int8", "bf16"} and len(data["models"]) == 6
    assert [r["M"] for r in data["models"] if r["model"].endswith("bf16")] == [1, 5]
    # the CNN's 2:4 convs have no CPU kernel: auto keeps them dense
    assert [r["backends"] for r in data["models"] if r["model"].startswith("CNN")] == [["dense"], ["dense"]]
    assert all(set(r["us"]) == {"dense", "torch", "bitmask"} and min(r["us"].values()) > 0 for r in data["layers"])
