"""The autoscaling policy as a pure function, driven by the fluid simulator."""
from simulator import simulate

from pdserve.cluster.autoscaling import PolicySettings, PoolBounds
from pdserve.cluster.cost_model import Slo

SETTINGS = PolicySettings(slo=Slo(ttft_s=0.8, tpot_s=0.060), prefill=PoolBounds(1, 4), decode=PoolBounds(1, 6),
                          upscale_delay_s=10.0, downscale_delay_s=60.0, interval_s=5.0, max_running=64)
LIGHT = (1.0, 200.0, 50.0)  # requests/s, prompt tokens, output tokens: one replica of each holds it


def surge(heavy, start=100.0, end=400.0):
    return lambda t: heavy if start <= t < end else LIGHT


def test_a_prefill_heavy_surge_scales_only_the_prefill_pool():
    run = simulate(surge((5.0, 2000.0, 4.0)), SETTINGS, 700)  # 10k prompt tokens/s against 4k/s a replica
    during = [t for t in run.ticks if 250 <= t.time < 400]
    assert all(t.prefill >= 3 for t in during) and all(t.ttft_s <= 0.8 for t in during[-60:])
    assert set(run.targets("decode")) == {1}


def test_a_decode_heavy_surge_scales_only_the_decode_pool():
    run = simulate(surge((8.0, 100.0, 400.0)), SETTINGS, 700)  # 3,200 tokens/s to generate
    during = [t for t in run.ticks if 250 <= t.time < 400]
    assert all(t.decode >= 2 for t in during) and all(t.tpot_s <= 0.060 for t in during[-60:])
    assert set(run.targets("prefill")) == {1}
    assert any("decode: 1 → " in text and "predicted TPOT" in text and "> SLO 60 ms" in text for _, text in run.decisions)


def test_steady_load_does_not_oscillate_over_a_long_run():
    for steady in [(8.0, 100.0, 400.0), (5.0, 2000.0, 4.0), (6.0, 1200.0, 300.0)]:
        run = simulate(lambda t: steady, SETTINGS, 4 * 3600)
        assert run.changes("prefill", after=600) == 0 and run.changes("decode", after=600) == 0, run.decisions
        assert run.changes("prefill") + run.changes("decode") <= 4, run.decisions


def test_targets_stay_within_the_bounds_under_any_load():
    run = simulate(surge((50.0, 3000.0, 800.0)), SETTINGS, 1200)
    assert max(run.targets("prefill")) == 4 and max(run.targets("decode")) == 6
    assert min(run.targets("prefill")) == 1 and min(run.targets("decode")) == 1


def test_no_scale_up_before_the_upscale_delay_nor_down_before_the_downscale_delay():
    run = simulate(surge((8.0, 100.0, 400.0)), SETTINGS, 700)
    first_up = run.first_time("decode", lambda n: n > 1)
    assert 100 + SETTINGS.upscale_delay_s <= first_up <= 100 + SETTINGS.upscale_delay_s + 2 * SETTINGS.interval_s
    peak = max(run.targets("decode"))
    first_down = run.first_time("decode", lambda n: n < peak, after=first_up)
    assert first_down >= 400 + SETTINGS.downscale_delay_s


def test_pools_return_to_their_minimum_when_load_stops():
    run = simulate(lambda t: (10.0, 1500.0, 300.0) if t < 300 else (0.0, 0.0, 0.0), SETTINGS, 800)
    assert max(run.targets("prefill")) > 1 and max(run.targets("decode")) > 1
    assert run.ticks[-1].target_prefill == 1 and run.ticks[-1].target_decode == 1
    assert any("no load" in text for _, text in run.decisions)


def test_a_fixed_pool_never_moves():
    fixed = PolicySettings(slo=SETTINGS.slo, prefill=PoolBounds(2, 2), decode=PoolBounds(1, 6),
                           upscale_delay_s=10.0, downscale_delay_s=60.0, interval_s=5.0, max_running=64)
    run = simulate(surge((10.0, 2000.0, 300.0)), fixed, 700)
    assert set(run.targets("prefill")) == {2} and max(run.targets("decode")) > 1
