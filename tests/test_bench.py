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
                            env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # (as run by hand:
                                 "OMP_NUM_THREADS": "1"})  # the tests' own setting hid its being set too late)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("call-overhead-*.json")
    us = json.loads(path.read_text())["us_per_call"]
    expected = {"sparsec layer", "compiled model", "nn.Linear"} | ({"sparsec layer, JIT launch"} if torch.cuda.is_available()
                                                                  else set())
    assert set(us) == expected and all(0 < v < 1e4 for v in us.values())
    if not torch.cuda.is_available():  # the stubbed launch was timed, not the interpreter (~7 ms a call)
        assert us["sparsec layer"] < 2000


def test_decode_profile_script_checks_and_launches_every_config():
    """bench/profile_decode.py, what gpu_session.sh's ncu part profiles, runs end to end at a small shape (in
    the interpreter here): each config checked against torch, then launched, in the order it prints."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, os.path.join(BENCH, "profile_decode.py"), "--n", "64", "--k", "256"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    order = [line for line in result.stdout.splitlines() if line.startswith("  ") and "launches" in line]
    per_kind = 3 * (2 if torch.cuda.is_available() else 1) + 2  # three configs, on a GPU each with PRMT_EXPAND too,
    # and two GATHER configs (which expand nothing)
    assert sum("fp16 values" in line for line in order) == sum("int8 values" in line for line in order) == per_kind


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
    written = json.loads(open(second).read())
    assert written["rows"] == [1, 2]
    # what every results file records about the run: device, date, versions, host CPU
    assert {"device", "date", "torch", "triton", "python", "host_cpu", "cpu_count", "sparsec_commit", "threads"} <= set(written)
    assert written["device"] == "Some GPU" and written["torch"] == torch.__version__ and written["host_cpu"]
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
    # rates against ceilings measured in the run (not assumed), and a record of other processes' CPU time
    assert data["read_ceiling_gbs"] > 0 and set(data["gemm_ceiling_gflops"]) == {"float32", "bfloat16"}
    for r in data["layers"]:
        assert r["of_read_ceiling"]["bitmask"] == pytest.approx(r["weight_gbs"]["bitmask"] / data["read_ceiling_gbs"])
        ceiling = data["gemm_ceiling_gflops"]["bfloat16" if r["weights"] == "bf16" else "float32"]
        assert r["of_gemm_ceiling"]["dense"] == pytest.approx(r["gflops"]["dense"] / ceiling)
        assert r["x_dense"]["bitmask"] == pytest.approx(r["us"]["dense"] / r["us"]["bitmask"])
    assert {"other_processes_cpu_s", "wall_s", "disturbed"} <= set(data) and data["python"] and data["host_cpu"]


def test_count_options_refuse_zero_and_non_integers():
    """--rounds 0 / --repeats 0 used to run the whole benchmark setup, then die in statistics.median."""
    import argparse

    sys.path.insert(0, BENCH)
    from results_io import positive_int

    assert positive_int("3") == 3
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cpu24.py"), "--rounds", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--rounds: expected a positive integer, got '0'" in proc.stderr


def test_effective_weight_check_matches_the_oracle_and_catches_a_wrong_weight():
    """effective_weight_error (the benchmarks' check of the weights their kernels are given) is 0 for
    a correct compile, N:M (sampled rows) and fan-in, int8 included, and large for a weight that is not
    the oracle's pruning of the original."""
    import torch.nn as nn

    import sparsec

    sys.path.insert(0, BENCH)
    from results_io import effective_weight_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(3, 64)
    for options in (dict(pattern="2:4"), dict(pattern="2:4", quantize="int8"), dict(pattern="fanin:0.8")):
        cm = sparsec.compile(model, example_inputs=(x,), include=[".*"], min_weights=0, backend="torch", **options)
        assert len(cm.plan.sparse_layers) == 2
        assert effective_weight_error(cm, model, max_rows=16) == 0.0, options
        other = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))  # other weights: not cm's
        assert effective_weight_error(cm, other, max_rows=16) > 0.1, options


def test_condensed_bench_checks_every_layer_before_timing():
    """bench_condensed's check covers each layer of a case and raises on a wrong one (it used to run
    after the timing, on the first layer only, and only record the deviation)."""
    sys.path.insert(0, BENCH)
    import bench_condensed

    from sparsec.runtime import condensed_cpu

    layers = [bench_condensed.make_layer(0.9, seed) for seed in range(2)]
    x = torch.randn(3, bench_condensed.K)
    assert bench_condensed.check(layers, x) < 1e-5
    wrong = layers[1]
    wrong["prepared"] = condensed_cpu.prepare(wrong["values"] * 1.01, wrong["indices"].to(torch.int32))
    with pytest.raises(AssertionError, match=r"condensed differs from dense .*layer 1"):
        bench_condensed.check(layers, x)


def test_training_bench_checks_dgrad_against_the_oracle(monkeypatch):
    """bench_training's case, small on this machine (timer replaced): SDGP's data gradient (alone and
    with 2:4 weights) matches prune(dY) @ W with dY pruned by the oracle; with dY left unpruned by a
    broken reference the check fails, so it can fail."""
    sys.path.insert(0, BENCH)
    import bench_training

    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = bench_training.run_case(64, 128, torch.float32, device=device, tokens=32, timer=lambda model, x: 1e-3)
    assert row["ok"] and row["dgrad_rel_err"] < 1e-5 and row["dgrad_rel_err_sparse_weights"] < 1e-5
    assert row["weight_rel_err"] == 0.0 and row["plan_grad"] == {"fc1": "2:4", "fc2": "2:4"}

    real = bench_training.load_oracle()

    class Unpruned:
        to_rows, pruned_weight = real.to_rows, real.pruned_weight

        @staticmethod
        def oracle_nm_mask(rows, n, m):
            return torch.ones_like(rows, dtype=torch.bool)

    monkeypatch.setattr(bench_training, "load_oracle", lambda: Unpruned)
    assert not bench_training.run_case(64, 128, torch.float32, device=device, tokens=32,
                                       timer=lambda model, x: 1e-3)["ok"]


def _load_example(name):
    from oracle import load_example

    sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "examples"))
    return load_example(name)


def test_demo_reference_pruning_agrees_with_the_oracle():
    """The demo's plain-torch pruning (its reference for every compiled model) is the oracle's: N:M and
    fan-in with ties in magnitude (to the lower index), int8 included, conv filters as rows."""
    from oracle import pruned_weight

    demo = _load_example("demo")
    g = torch.Generator().manual_seed(0)
    for shape, op in (((12, 16), "linear"), ((8, 4, 3, 3), "conv2d")):
        w = torch.randint(-3, 4, shape, generator=g).float()  # many equal magnitudes
        for sparsity in ("2:4", "1:4", "fanin:0.7"):
            for quant in (None, "int8"):
                expected = pruned_weight(w, op, sparsity, quant)
                assert torch.equal(demo.pruned_in_plain_torch(w, sparsity, quant), expected), (shape, sparsity, quant)


def test_srigl_example_times_dense_and_condensed_in_turns():
    """The SRigL example's latencies: the models take turns in every round (a ratio of times taken
    minutes apart on a shared machine was mostly drift)."""
    srigl = _load_example("train_srigl_digits")
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    times = srigl.latency_us({"dense": Recorder("dense"), "condensed": Recorder("condensed")}, torch.zeros(1),
                             repeats=2, rounds=3)
    assert set(times) == {"dense", "condensed"} and min(times.values()) > 0
    timed = calls[40:]  # after 20 warm-up calls each
    assert timed == (["dense"] * 2 + ["condensed"] * 2) * 3


def test_digits_examples_check_compiled_models_against_plain_torch(monkeypatch):
    """digits_common.check_against_plain_torch passes a trained compiled model and fails on a mask
    that breaks its pattern or on outputs plain torch does not reproduce."""
    pytest.importorskip("sklearn")  # (the GPU image may lack it)
    import sparsec

    common = _load_example("digits_common")
    data = common.load_digits_split(0)
    cm = sparsec.compile(common.make_model(0), pattern="2:4", example_inputs=(data[0][:2],), train=True,
                         include=[".*"])
    common.train(cm, data, epochs=1)
    assert common.check_against_plain_torch(cm, data[2]) <= 1e-5
    monkeypatch.setattr(common, "plain_torch_forward", lambda cm, x: cm(x) + 1)
    with pytest.raises(AssertionError, match="differs from plain torch"):
        common.check_against_plain_torch(cm, data[2])
    monkeypatch.undo()
    with torch.no_grad():
        cm.sparse_module("hidden.1").weight_mask[0, :4] = True  # 4 of 4 kept in one group
    with pytest.raises(AssertionError, match="hidden.1: not 2:4"):
        common.check_against_plain_torch(cm, data[2])


def test_unstructured_bench_runs_small_and_records_its_gpu_cases(tmp_path):
    """bench_unstructured on its small shapes: the CPU rows (CSR vs dense, checked first), the crossover per
    (shape, M), backend auto's pick and the plan check are written; without CUDA every GPU case is a row
    marked skipped (on a GPU machine the test runs the CPU part alone: the GPU part is a device run's job)."""
    cuda = torch.cuda.is_available()
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_unstructured.py"), "--shapes", "small",
                           "--rounds", "1", "--parts", "cpu" if cuda else "cpu,gpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("unstructured-cpu*.json")
    data = json.loads(path.read_text())
    assert {"device", "date", "torch", "host_cpu", "sparsec_commit", "threads", "complete", "cpu"} <= set(data)
    assert data["host_cpu"] != data["cpu"]  # (its CPU part had overwritten the host model)
    cpu = data["cpu"]
    assert cpu["read_ceiling_gbs"] > 0 and cpu["gemm_ceiling_gflops"]["float32"] > 0
    assert {"other_processes_cpu_s", "wall_s", "disturbed"} <= set(cpu)
    rows = cpu["rows"]
    assert [(r["sparsity"], r["M"]) for r in rows] == [(s, m) for s in (0.5, 0.8, 0.9, 0.95, 0.99) for m in (1, 8)]
    for r in rows:
        assert {"N", "K", "M", "sparsity", "nnz", "us", "x_dense", "gbs", "of_read_ceiling", "gflops",
                "of_gemm_ceiling", "bytes", "max_rel_err", "csr_gbs"} <= set(r), r
        assert set(r["us"]) == {"dense", "csr"} and min(r["us"].values()) > 0
        assert r["x_dense"] == pytest.approx(r["us"]["dense"] / r["us"]["csr"])
        assert r["of_read_ceiling"]["csr"] == pytest.approx(r["gbs"]["csr"] / cpu["read_ceiling_gbs"])
        assert r["nnz"] == 256 * 128 - round(r["sparsity"] * 256 * 128) and max(r["max_rel_err"].values()) < 1e-5
    (c1, c8) = sorted(cpu["crossover"], key=lambda c: c["M"])
    assert (c1["M"], c8["M"]) == (1, 8) and set(c1["x_dense"]) == {"0.5", "0.8", "0.9", "0.95", "0.99"}
    assert all(c["crossover"] in (None, 0.5, 0.8, 0.9, 0.95, 0.99) and c["text"] for c in (c1, c8))
    (auto,) = cpu["auto"]
    assert auto["backend"] in ("csr", "dense") and "backend auto at M=1" in auto["reason"]
    assert auto["meets_bar"] == (auto["auto_vs_dense"] >= 0.97)
    assert cpu["plan_check"]["layer"] == "CsrLinear" and cpu["plan_check"]["same_layout"]
    if not cuda:
        gpu = data["gpu"]
        assert gpu["skipped"] == "no CUDA device" and gpu["conv_rows"] and gpu["linear_rows"]
        assert all(r["skipped"] == "no CUDA device" for r in gpu["conv_rows"] + gpu["linear_rows"])
        assert {"layer", "batch", "dtype", "sparsity"} <= set(gpu["conv_rows"][0])
        assert not data["complete"] and "GPU part skipped: no CUDA device" in proc.stdout


def test_unstructured_bench_gpu_cases_check_before_timing(monkeypatch):
    """bench_unstructured's GPU cases run small on this machine (the direct conv kernel in the interpreter
    without a GPU, the timer a call counter): the direct conv and the CSR product agree with float64 first,
    every contender is timed, and a kernel computing something else fails its case instead of being timed."""
    sys.path.insert(0, BENCH)
    import bench_unstructured as bench
    from sparsec.codegen import direct_conv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    timer = lambda fn: (calls.append(fn()), 1e-3 * len(calls))[1]  # noqa: E731
    ceil = {"read_GBps": 1.0, "copy_GBps": 2.0}
    for dtype in (torch.float32, torch.float16):
        row = bench.conv_case("t", 8, 16, 3, 6, 2, 0.9, dtype, ceil, device=device, timer=timer)
        assert row["max_rel_err"] < (1e-5 if dtype == torch.float32 else 2e-3) and row["nnz"] == 1152 - 1037
        assert set(row["cudnn_all_s"]) == ({"nchw", "channels_last"} | ({"nchw_tf32", "channels_last_tf32"}
                                                                          if dtype == torch.float32 else set()))
        assert row["vs_cudnn"] == pytest.approx(row["cudnn_s"] / row["direct_s"])
        el = 4 if dtype == torch.float32 else 2  # input + row pointers + values + int32 offsets + output
        assert row["bytes"] == 2 * 8 * 36 * el + 17 * 8 + 115 * (el + 4) + 2 * 16 * 36 * el
    n_calls = len(calls)
    row = bench.linear_case(64, 96, 0.9, 3, torch.float32, ceil, device=device, timer=timer)
    assert set(row["s"]) == {"cublas", "cusparse"} and max(row["max_rel_err"].values()) < 1e-5
    assert len(calls) == n_calls + 2
    real = direct_conv.direct_conv2d
    monkeypatch.setattr(direct_conv, "direct_conv2d", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(AssertionError, match="the direct conv kernel differs from float64"):
        bench.conv_case("t", 8, 16, 3, 6, 2, 0.8, torch.float32, ceil, device=device, timer=timer)
    assert len(calls) == n_calls + 2  # nothing timed


def test_unstructured_bench_crossover_is_the_lowest_sparsity_it_wins_from():
    sys.path.insert(0, BENCH)
    from bench_unstructured import crossover

    c = crossover({0.5: 0.2, 0.8: 1.2, 0.9: 0.8, 0.95: 2.0, 0.99: 4.0})
    assert (c["crossover"], c["below"], c["wins_below"]) == (0.95, 0.9, [0.8]) and 0.9 < c["estimate"] < 0.95
    assert crossover({0.5: 1.5, 0.9: 3.0})["text"] == "<= 0.5"
    assert crossover({0.5: 0.5, 0.9: 0.9})["crossover"] is None and crossover({})["text"] == "nothing measured"


def test_compile_memory_bench_measures_each_case_in_its_own_process(tmp_path):
    """Small: a 64-row large layer, the baselines and the first two cases (each a fresh process)."""
    result = subprocess.run([sys.executable, os.path.join(BENCH, "bench_compile_memory.py"), "--out-features", "64",
                             "--cases", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("compile-memory-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["dtype"], r["config"]) for r in rows] == [("bfloat16", {"baseline": True}), ("float32", {"baseline": True}),
                                                         ("bfloat16", {"pattern": "2:4"}),
                                                         ("bfloat16", {"pattern": "2:4", "quantize": "int8"})]
    assert all(r["peak_mib"] >= 0 and r["seconds"] > 0 and r["model_mib"] > 0 for r in rows)
    assert [(r["sparsity"], r["quant"]) for r in rows[2:]] == [("2:4", None), ("2:4", "int8")]  # the layer was pruned
