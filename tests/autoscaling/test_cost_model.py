"""The cost model: what it predicts, and that it fits step times online."""
import math

import pytest

from pdserve.cluster.cost_model import (
    DecodeProfile, PrefillProfile, Profiles, Slo, StepSample, Workload, format_ms, predict, predict_tpot, predict_ttft,
    smallest_holding,
)

PROFILES = Profiles(PrefillProfile(tokens_per_s=4000.0, handoff_s=0.005), DecodeProfile(0.020, 0.001, max_running=64))
SLO = Slo(ttft_s=0.8, tpot_s=0.060)


def test_fit_recovers_a_linear_step_time_from_replica_reports():
    samples = [StepSample(n, 0.012 + 0.0005 * n) for n in (1, 4, 9, 16, 30)]
    profile = DecodeProfile.fit(samples)
    assert profile.base_s == pytest.approx(0.012) and profile.per_seq_s == pytest.approx(0.0005)
    assert profile.step_time(20) == pytest.approx(0.022)


def test_fit_of_one_batch_size_is_a_constant_step_time():
    profile = DecodeProfile.fit([StepSample(4, 0.010), StepSample(4, 0.012)])
    assert (profile.base_s, profile.per_seq_s) == (pytest.approx(0.011), 0.0)


def test_fit_uses_the_context_term_when_contexts_differ():
    samples = [StepSample(n, 0.01 + n * (0.0002 + 1e-6 * ctx), ctx) for n, ctx in [(2, 100), (8, 100), (8, 900), (16, 500)]]
    profile = DecodeProfile.fit(samples)
    assert profile.per_seq_token_s == pytest.approx(1e-6) and profile.step_time(10, 400) == pytest.approx(0.016)


def test_ttft_is_prompt_time_plus_handoff_when_idle_and_unbounded_past_capacity():
    light = predict(Workload(0.01, 400, 10), 1, 1, PROFILES)
    assert light.ttft_s == pytest.approx(0.1 + 0.005, rel=0.01)
    assert math.isinf(predict(Workload(11.0, 400, 10), 1, 1, PROFILES).ttft_s)  # 4,400 tokens/s against 4,000
    assert predict(Workload(11.0, 400, 10), 2, 1, PROFILES).ttft_s < 0.8


def test_a_backlog_adds_its_drain_time_to_ttft():
    backlog = predict(Workload(1.0, 400, 10, queued_prompt_tokens=8000), 2, 1, PROFILES)
    assert backlog.ttft_s == pytest.approx(8000 / 8000 + 0.1 + 0.005)


def test_tpot_is_the_step_time_at_the_batch_little_law_gives():
    p = predict(Workload(4.0, 100, 251), 1, 2, PROFILES)  # 500 tokens/s a replica: n = 500·(0.02 + 0.001n)
    assert p.running_per_decode == pytest.approx(20.0) and p.tpot_s == pytest.approx(0.040)
    assert math.isinf(predict(Workload(4.0, 100, 251), 1, 1, PROFILES).tpot_s)  # 1,000 tokens/s: 1 - 1000·0.001 = 0


def test_the_bottleneck_is_the_phase_nearer_its_slo():
    assert predict(Workload(9.0, 400, 10), 1, 1, PROFILES, SLO).bottleneck == "prefill"
    assert predict(Workload(2.0, 50, 400), 1, 1, PROFILES, SLO).bottleneck == "decode"


def sizes(workload: Workload) -> tuple[int, int]:
    """The smallest prefill (of 1..4) and decode (of 1..6) pools the model says hold the SLOs."""
    prefill = smallest_holding(lambda n: predict_ttft(workload, n, PROFILES.prefill)[0] <= SLO.ttft_s, 1, 4)
    decode = smallest_holding(lambda n: predict_tpot(workload, n, PROFILES.decode)[0] <= SLO.tpot_s, 1, 6)
    return prefill, decode


def test_each_pool_grows_only_for_its_own_phase():
    decode_heavy = Workload(8.0, 100, 400)
    assert sizes(decode_heavy)[0] == 1 and sizes(decode_heavy)[1] > 1
    assert predict(decode_heavy, *sizes(decode_heavy), PROFILES).tpot_s <= SLO.tpot_s
    assert sizes(Workload(6.0, 2000, 4)) == (4, 1)


def test_the_largest_size_is_the_answer_when_none_holds():
    overload = Workload(100.0, 2000, 400)
    assert sizes(overload) == (4, 6) and not predict(overload, 4, 6, PROFILES).holds(SLO)
    assert format_ms(predict(overload, 4, 6, PROFILES).ttft_s) == "unbounded"


def test_prefix_cache_hits_cost_the_prefill_pool_nothing_and_the_decode_pool_the_same():
    """The measured prefill rate counts computed tokens only: a 75% hit rate makes a prompt a quarter as dear."""
    cold, warm = Workload(6.0, 2000, 4), Workload(6.0, 2000, 4, prefix_hit_rate=0.75)
    assert predict_ttft(warm, 1, PROFILES.prefill)[1] == pytest.approx(predict_ttft(cold, 1, PROFILES.prefill)[1] / 4)
    assert predict_tpot(warm, 1, PROFILES.decode) == predict_tpot(cold, 1, PROFILES.decode)  # KV is the whole prompt
    assert sizes(cold)[0] == 4 and sizes(warm)[0] < sizes(cold)[0]


def test_the_step_model_is_the_gpu_table_fitted_plus_the_hosts_exposed_time():
    """A synthetic table: the GPU's step 3.6 ms + 0.027 ms per sequence, the host's exposed 1 ms + 0.07 ms."""
    gpu = [StepSample(n, 0.0036 + 0.000027 * n) for n in (1, 16, 64, 256)]
    host = [StepSample(n, 0.001 + 0.00007 * n) for n in (16, 64, 256)]
    profile = DecodeProfile.measured(gpu, host, max_running=256)
    assert profile.base_s == pytest.approx(0.0036) and profile.per_seq_s == pytest.approx(0.000027)
    assert profile.host_base_s == pytest.approx(0.001) and profile.host_per_seq_s == pytest.approx(0.00007)
    assert profile.step_time(256) == pytest.approx(0.0036 + 0.000027 * 256 + 0.001 + 0.00007 * 256)
    assert profile.max_running == 256
    without_host = DecodeProfile.measured(gpu, [], max_running=256)
    load = Workload(40.0, 128, 256)
    assert predict_tpot(load, 1, profile)[0] > predict_tpot(load, 1, without_host)[0]


def test_one_loaded_batch_size_is_anchored_by_the_engines_own_steps_not_extrapolated():
    loaded = [StepSample(256, 0.0103)] * 5  # every report of the run at one batch size
    alone = DecodeProfile.fit(loaded)
    assert alone.base_s == pytest.approx(0.0103) and alone.per_seq_s == 0  # alone: a constant, batch 1 as slow
    anchored = DecodeProfile.measured(loaded + [StepSample(1, 0.0036), StepSample(256, 0.0103)], [])
    assert anchored.gpu_step_time(1) == pytest.approx(0.0036, rel=0.01)
    assert anchored.gpu_step_time(256) == pytest.approx(0.0103, rel=0.01)
