"""Backend auto on CPU times a layer the way the model will run it: with its weights evicted from the
caches when the model's weights exceed half the last-level cache, hot otherwise, and says which."""
import hashlib

import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import output_error, pruned_model
from sparsec.passes import backend as backend_pass
from sparsec.codegen import cpu_cache, measure
from sparsec.runtime import bitmask_cpu


def test_cache_size_parsing_and_reading():
    assert cpu_cache._parse_size("32768K") == 32 << 20
    assert cpu_cache._parse_size("1M") == 1 << 20
    assert cpu_cache._parse_size("512") == 512
    assert cpu_cache.last_level_cache_bytes() >= 256 << 10  # any real CPU's largest cache, or the fallback


def test_weights_from_memory_compares_the_model_with_half_the_cache(monkeypatch):
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # 2 x (256 KB + 1 KB)
    total = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 2 * total)
    cold, note = cpu_cache.weights_from_memory(model)
    assert not cold and note == "timed with weights in cache (the model's 0.5 MB fit in half the 1.1 MB cache)"
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 2 * total - 2)
    cold, note = cpu_cache.weights_from_memory(model)
    assert cold and note.startswith("timed with weights from memory (the model's 0.5 MB exceed half the")
    shared = nn.Sequential(model[0], model[0])  # a tensor used twice is read once per call: counted once
    assert not cpu_cache.weights_from_memory(shared)[0]


def test_cold_timing_evicts_before_every_timed_call(monkeypatch):
    events = []
    monkeypatch.setattr(cpu_cache, "evict", lambda: events.append("evict"))
    measure.time_cpu(lambda: events.append("call"), blocks=2, cold=True)
    # one warm-up call, then at least 3 timed calls, each right after an eviction
    assert events[0] == "call" and events[1:] == ["evict", "call"] * 3
    events.clear()
    measure.time_cpu(lambda: events.append("call"), block_s=1e-4, blocks=3)
    assert "evict" not in events


@pytest.mark.parametrize("cold", [False, True])
def test_cpu_timing_is_not_the_time_another_process_held_the_core(monkeypatch, cold):
    """Another process taking the core only adds to a sample: with two of three samples held up (by 50
    ms, a time slice or few), the timing is still the call's own 1 ms (the median was the held-up one).
    A fake clock that the call advances by 1 ms, and by 50 ms more in the held-up samples."""
    from sparsec.codegen import timing

    clock, calls = [0.0], [0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cpu_cache, "evict", lambda: None)

    def call():  # (a warm-up call, then three samples of one call each: a 1 ms call fills a 0.5 ms block)
        calls[0] += 1
        clock[0] += 1e-3 + (50e-3 if calls[0] in (3, 4) else 0.0)

    assert measure.time_cpu(call, block_s=0.5e-3, blocks=3, cold=cold) == pytest.approx(1e-3)


def test_cpu_timing_holds_when_every_block_was_held_up(monkeypatch):
    """Under heavier load every block of calls held a time slice somewhere (a multi-threaded GEMM waiting
    for a descheduled thread): the least block mean read 6-16 ms for a 7 us call. The least single call
    is the call's own time. A fake clock: 1 ms calls, every third one 50 ms longer."""
    from sparsec.codegen import timing

    clock, calls = [0.0], [0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call():
        calls[0] += 1
        clock[0] += 1e-3 + (50e-3 if calls[0] % 3 == 0 else 0.0)

    assert measure.time_cpu(call, block_s=10e-3, blocks=4) == pytest.approx(1e-3)


def test_cpu_timing_holds_when_the_first_calls_were_held_up(monkeypatch):
    """The first call and the next three held up by another process (30 ms each, for a 5 us call): the
    blocks were sized from the first call, one call each, and all three samples read 30 ms (the plan
    quoted 16-24 ms for a 5 us layer, and auto chose a layer 2x slower than dense)."""
    from sparsec.codegen import timing

    clock, calls = [0.0], [0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call():
        calls[0] += 1
        clock[0] += 5e-6 + (30e-3 if calls[0] <= 4 else 0.0)

    assert measure.time_cpu(call, block_s=20e-3, blocks=3) == pytest.approx(5e-6)


def test_evict_reads_a_buffer_twice_the_cache(monkeypatch):
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 1 << 20)
    cpu_cache.evict()
    (buffer,) = cpu_cache._EVICTION.values()
    assert buffer.numel() * buffer.element_size() == 2 << 20


def test_compile_times_a_model_too_large_for_the_cache_cold(monkeypatch):
    """A model whose weights exceed half the (stand-in, tiny) cache: its layers are timed cold, the plan
    says so, and hot and cold timings of the same shape are kept apart."""
    if not bitmask_cpu.is_available():
        pytest.skip("the C++ bitmask kernel did not build here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))
    x = torch.randn(2, 128)
    hot = sparsec.compile(model, example_inputs=(x,)).plan["2"]
    assert "timed with weights in cache" in hot.reason
    evictions = []
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 64 << 10)
    monkeypatch.setattr(cpu_cache, "evict", lambda: evictions.append(1))
    cm = sparsec.compile(model, example_inputs=(x,))
    lp = cm.plan["2"]
    assert lp.backend in ("bitmask", "dense") and "backend auto at M=2: " in lp.reason
    assert "dense), timed with weights from memory (the model's" in lp.reason
    assert evictions, "the cold measurement evicted before its timed calls"
    assert {key[2] for key in backend_pass.CPU_MEASUREMENTS if key[0][2] == (128, 128)} >= {False, True}
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_compile_frees_the_eviction_buffer_once_it_has_measured(monkeypatch):
    """Cold timing reads a buffer twice the last-level cache; it was kept for the life of the process
    (64 MB on this machine, more on large-cache servers) after compile returned."""
    if not bitmask_cpu.is_available():
        pytest.skip("the C++ bitmask kernel did not build here")
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 64 << 10)  # the model is "too large"
    monkeypatch.setattr(backend_pass, "CPU_MEASUREMENTS", {})  # (measure here, not from an earlier test)
    sizes, real_evict = [], cpu_cache.evict
    monkeypatch.setattr(cpu_cache, "evict", lambda: (real_evict(), sizes.append(len(cpu_cache._EVICTION))))
    cm = sparsec.compile(model, example_inputs=(torch.randn(2, 128),))
    assert "timed with weights from memory" in cm.plan["2"].reason
    assert sizes and all(sizes), "the cold measurement held an eviction buffer while it timed"
    assert not cpu_cache._EVICTION


# ------------------------------------------------------------------------------------------------ kernel cache
# (codegen/cache.py; its other tests are in test_codegen.py)


def test_kernel_cache_entries_are_readable_by_the_other_users_of_a_shared_cache(tmp_path):
    """Entries were created by mkstemp (mode 0600) and renamed into place, so in a cache several users
    share (SPARSEC_CACHE_DIR) each one's entries were unreadable to the others: rebuilt as 'corrupt', or,
    in a sticky folder, not replaceable at all. They hold generated source: readable like any file."""
    import os
    import stat

    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.cache import KernelCache
    from sparsec.codegen.spec import MatmulSpec

    name, source = emit_matmul(MatmulSpec("float16", "float16", True, "relu", False, "float16"), [])
    path = KernelCache(str(tmp_path)).store(name, source)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH, oct(mode)
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH), oct(mode)
    again = KernelCache(str(tmp_path))
    assert again.store(name, source) == path and again.counters == {"hit": 1}


@pytest.mark.parametrize("damage, said", [
    ("empty", "is empty"),
    ("truncated", "is truncated or edited (its body does not match the sha256 in its header)"),
    ("edited", "is truncated or edited"),
    ("binary", "is not UTF-8 text"),
    ("headerless", "has no sparsec-cache header"),
    ("unreadable", "cannot be read (Permission denied)"),
])
def test_a_damaged_kernel_cache_entry_is_rebuilt_and_named(tmp_path, monkeypatch, caplog, damage, said):
    """A damaged entry was rewritten silently (a counter only), so whatever kept damaging the cache (a
    full disk, a tool rewriting line ends, another user's 0600 files) went unseen, rewritten at every
    compile. It is rebuilt, and the log names the file and what was wrong with it."""
    import builtins
    import logging

    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.cache import HEADER_PREFIX, KernelCache
    from sparsec.codegen.spec import MatmulSpec

    name, source = emit_matmul(MatmulSpec("float32", "float32", True, "relu", False, "float32"), [])
    cache = KernelCache(str(tmp_path))
    path = cache.store(name, source)
    whole = open(path, encoding="utf-8").read()
    damaged = {"empty": b"", "truncated": whole[: len(whole) // 2].encode(), "binary": b"\xff\xfe" + whole.encode(),
               "edited": whole.replace("tl.maximum(acc, 0.0,", "tl.maximum(acc, 1.0,").encode(),
               "headerless": source.encode(), "unreadable": whole.encode()}[damage]
    with open(path, "wb") as f:
        f.write(damaged)
    if damage == "unreadable":  # (another user's 0600 entry; this test may run as root, who reads anything)
        real_open = builtins.open

        def open_as_another_user(file, *args, **kwargs):
            if file == path and "w" not in (args[0] if args else kwargs.get("mode", "r")):
                raise PermissionError(13, "Permission denied", file)
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", open_as_another_user)
    cache = KernelCache(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sparsec.codegen.cache"):
        assert cache.store(name, source) == path
    assert cache.counters == {"corrupt": 1, "written": 1}
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"sparsec kernel cache: {path} {said}") and message.endswith("; writing it again")
    monkeypatch.undo()
    with open(path, encoding="utf-8") as f:  # what the entry now holds, read independently of the cache
        first, _, body = f.read().partition("\n")
    assert body == source and first == HEADER_PREFIX + hashlib.sha256(source.encode()).hexdigest()
    caplog.clear()
    again = KernelCache(str(tmp_path))
    assert again.store(name, source) == path and again.counters == {"hit": 1} and not caplog.records
