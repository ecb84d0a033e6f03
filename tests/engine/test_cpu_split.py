"""The second CPU thread of the miss path: results in order, errors surface, the thread ends."""

from __future__ import annotations

import gc
import threading

import pytest

from engine.moe.cpu_split import SplitRunner


def test_runs_both_halves_and_keeps_their_order():
    runner = SplitRunner()
    names = []

    def work(x):
        names.append(threading.current_thread().name)
        return x * 10

    assert runner.run(work, [1, 2]) == [10, 20]
    assert set(names) == {threading.current_thread().name, "moe-chat-cpu-experts-0"}
    runner.close()
    assert not any(t.is_alive() for _, _, t in runner._workers)


def test_workers_run_their_kernels_on_one_thread_and_leave_the_callers_count():
    """OpenMP's thread count is per thread: a worker left at the default would start a second team of
    threads beside the caller's (3x slower multithreaded products for the caller, measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    runner = SplitRunner()
    try:
        counts = runner.run(lambda _: torch.get_num_threads(), [0, 1])
        assert counts == [2, 1]  # the caller's own, the worker's one
        assert torch.get_num_threads() == 2
    finally:
        runner.close()
        torch.set_num_threads(before)


def test_a_failure_on_either_side_is_raised_and_the_runner_stays_usable():
    runner = SplitRunner()

    def work(x):
        if x < 0:
            raise ValueError("bad half")
        return x

    for parts in ([-1, 1], [1, -1]):
        with pytest.raises(ValueError, match="bad half"):
            runner.run(work, parts)
    assert runner.run(work, [3, 4]) == [3, 4]
    runner.close()


def test_a_dropped_runner_ends_its_threads():
    threads = [t for _, _, t in SplitRunner(workers=3)._workers]
    gc.collect()
    for thread in threads:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_many_ways_keep_order_and_cut_evenly():
    from engine.moe.cpu_split import chunks

    runner = SplitRunner(workers=3)
    assert runner.ways == 4
    assert runner.run(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]  # fewer parts than ways
    with pytest.raises(ValueError):
        runner.run(lambda x: x, [1, 2, 3, 4, 5])
    runner.close()
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4, 5]]
    assert chunks([1, 2], 4) == [[1], [2]]


@pytest.mark.parametrize("mv", [False, True], ids=["mm", "mv"])
@pytest.mark.parametrize("split", [False, True], ids=["one core", "split"])
def test_one_row_linear_matches_linear_and_leaves_batches_alone(mv, split):
    import torch

    from engine.moe.cpu_split import OneRowLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    linear._moe_one_row_mv = mv
    runner = SplitRunner() if split else None
    one_row = OneRowLinear(linear, runner)
    one, many = torch.randn(1, 1, 64), torch.randn(5, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a decode step runs beside a split
    try:
        assert torch.allclose(one_row(one), linear(one), atol=1e-6) and one_row(one).shape == (1, 1, 96)
        assert torch.equal(one_row(many), linear(many))  # a prompt's rows: the stock path, untouched
    finally:
        torch.set_num_threads(threads)
        if runner is not None:
            runner.close()


def test_linear_subclasses_with_their_own_forward_keep_it():
    import torch

    from engine.moe.cpu_split import one_row_linears

    class Router(torch.nn.Linear):  # as Phi-MoE's: a Linear whose forward returns the routing
        def forward(self, x):
            return x, super().forward(x), None

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Router(8, 4))
    for m in model:
        m._moe_one_row_mv = True  # as the loader marks them where matrix-vector products win
    assert one_row_linears(model, None, min_bytes=0) == [model[0]]
    assert len(model[1](torch.randn(1, 8))) == 3


def test_two_threads_split_decode_and_restore_the_thread_count(tiny_model_factory, monkeypatch):
    import torch

    from engine import GenerationParams, Session, load_model
    from engine.moe import cpu_experts
    from engine.moe.cpu_split import one_row_linears

    monkeypatch.setattr(cpu_experts.CpuExperts, "_measure", lambda self, choices, ways: {"backend": choices[0], "split": True})

    path = tiny_model_factory("qwen3_moe")
    params = GenerationParams(max_new_tokens=6, greedy=True, repetition_penalty=1.0)
    single = Session(load_model(path, device="cpu", budget=0.3, threads=1, profile=None))
    expected = [e.token_id for e in single.generate([5, 6, 7, 8], params)]
    loaded = load_model(path, device="cpu", budget=0.3, threads=2, profile=None)
    rt = loaded.runtime
    try:
        assert rt.cpu.split is not None and torch.get_num_threads() == 2
        linears = one_row_linears(loaded.model, rt.cpu.split, min_bytes=0)  # tiny layers: split them all here
        rt.cpu.one_row_linears += linears
        assert [e.token_id for e in Session(loaded).generate([5, 6, 7, 8], params)] == expected
        assert torch.get_num_threads() == 2  # a decode step's single thread is given back after the step
    finally:
        rt.close()
        torch.set_num_threads(1)
    assert all("forward" not in vars(m) for m in linears)


def test_no_split_where_the_measurement_says_so(tiny_model_factory, monkeypatch):
    import torch

    from engine import load_model
    from engine.moe import cpu_experts

    monkeypatch.setattr(cpu_experts.CpuExperts, "_measure", lambda self, choices, ways: {"backend": choices[0], "split": False})
    try:
        loaded = load_model(tiny_model_factory("qwen3_moe"), device="cpu", threads=2, profile=None)
        assert loaded.runtime.cpu.split is None and loaded.runtime.kernel_choice["split"] is False
    finally:
        torch.set_num_threads(1)


def test_a_decode_step_runs_with_the_measured_thread_count(tiny_model_factory, monkeypatch):
    """Not split, one intra-op thread measured faster: decode steps run on one, prefill and the
    caller's count stay at two, and the tokens are those of a single-threaded load."""
    import torch

    from engine import GenerationParams, Session, load_model
    from engine.moe import cpu_experts

    monkeypatch.setattr(cpu_experts.CpuExperts, "_measure",
                        lambda self, choices, ways: {"backend": choices[0], "split": False, "threads": 1})
    path = tiny_model_factory("qwen3_moe")
    params = GenerationParams(max_new_tokens=6, greedy=True, repetition_penalty=1.0)
    expected = [e.token_id for e in Session(load_model(path, device="cpu", threads=1, profile=None)).generate(
        [5, 6, 7, 8], params)]
    try:
        loaded = load_model(path, device="cpu", threads=2, profile=None)
        seen = []
        loaded.runtime.add_observer(lambda event: seen.append((event.hidden_states.shape[0], torch.get_num_threads())))
        assert [e.token_id for e in Session(loaded).generate([5, 6, 7, 8], params)] == expected
        assert {threads for rows, threads in seen if rows == 1} == {1}
        assert {threads for rows, threads in seen if rows > 1} == {2}
        assert torch.get_num_threads() == 2 and loaded.runtime.kernel_choice["threads"] == 1
    finally:
        torch.set_num_threads(1)
