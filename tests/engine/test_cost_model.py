from engine.moe.cost_model import DEVICE_PROFILES, CostModel

EXPERT = 3 * 4096 * 14336 * 2  # one Mixtral expert in bf16
FLOPS = 2 * 3 * 4096 * 14336


def test_decode_runs_misses_on_the_cpu_and_big_prefills_fetch():
    cost = CostModel(cpu_bytes_per_s=40e9, cpu_flops_per_s=1e12, device=DEVICE_PROFILES["rtx4090-24gb"])
    assert not cost.should_fetch(EXPERT, tokens=1, flops_per_token=FLOPS)
    assert not cost.should_fetch(EXPERT, tokens=4, flops_per_token=FLOPS)
    assert cost.should_fetch(EXPERT, tokens=512, flops_per_token=FLOPS)


def test_a_slower_bus_moves_the_break_even_point_up():
    fast = CostModel(40e9, 1e12, DEVICE_PROFILES["rtx4090-24gb"])
    slow = CostModel(40e9, 1e12, DEVICE_PROFILES["rtx4090-24gb"].__class__("slow bus", 2e9, 800e9, 140e12, 2**34))

    def break_even(c):
        return next(t for t in range(1, 100000) if c.should_fetch(EXPERT, t, FLOPS))

    assert break_even(slow) > break_even(fast)


def test_without_a_separate_device_nothing_is_fetched():
    assert not CostModel(40e9, 1e12, None).should_fetch(EXPERT, 10**6, FLOPS)
