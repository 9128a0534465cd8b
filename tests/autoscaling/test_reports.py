"""From the replicas' custom autoscaling metrics to the policy's Observation, and back out as status and metrics."""
import dataclasses

import pytest

from loads import IDLE_DECODE, IDLE_PREFILL
from pdserve.cluster.autoscaling import observe, pool_loads, serve_autoscaling_config
from pdserve.cluster.config import load_config
from pdserve.cluster.status_cmd import format_status
from pdserve.engine.messages import DecodeLoad, LoadReportError, PrefillLoad
from pdserve.router.metrics import autoscaling_lines

NOTE = {"pools": {"prefill": {"replicas": 1, "target": 1, "reason": "no load"},
                  "decode": {"replicas": 2, "target": 3, "reason": "predicted TPOT 71 ms > SLO 60 ms at 38 running sequences"}},
        "last_decision": "decode: 2 → 3, predicted TPOT 71 ms > SLO 60 ms at 38 running sequences",
        "decisions": {"decode/up/tpot_above_slo": 2, "decode/down/idle": 1}, "slo": {"ttft_ms": 800, "tpot_ms": 60}}


def test_observe_sums_pools_and_derives_output_length_from_generated_tokens():
    metrics = {"prefill": {"queued_tokens": {"p1": 300.0, "p2": 100.0}, "tokens_per_s": {"p1": 5000.0, "p2": 0.0},
                           "prefix_hit_rate": {"p1": 0.5, "p2": 0.1}},
               "decode": {"arrivals_per_s": {"d1": 3.0, "d2": 1.0}, "prompt_tokens_mean": {"d1": 100.0, "d2": 500.0},
                          "tokens_per_s": {"d1": 150.0, "d2": 50.0}, "num_running": {"d1": 6.0, "d2": 2.0},
                          "num_waiting": {"d1": 1.0, "d2": 0.0}}}
    prefill = pool_loads(PrefillLoad, with_other_fields(metrics["prefill"], IDLE_PREFILL))
    decode = pool_loads(DecodeLoad, with_other_fields(metrics["decode"], IDLE_DECODE))
    assert [p.replica_id for p in prefill] == ["p1", "p2"] and decode[1].prompt_tokens_mean == 500.0
    o = observe(prefill, decode, {"d1": [(6.0, 0.02), (0.0, 0.0)], "d2": [(2.0, 0.012)]})
    w = o.workload
    assert (w.arrival_rate, w.prompt_tokens, w.output_tokens) == (4.0, 200.0, 51.0)
    assert (w.queued_prompt_tokens, w.running_sequences, o.prefill_tokens_per_s) == (400.0, 9.0, 5000.0)
    assert [(s.batch_size, s.step_time_s) for s in o.step_samples] == [(6.0, 0.02), (2.0, 0.012)]
    assert w.prefix_hit_rate == pytest.approx(0.3) and w.computed_prompt_tokens == pytest.approx(140.0)
    assert not o.is_idle and observe([], [], {}).is_idle


def test_a_replica_metric_missing_from_the_report_fails_loudly():
    """A load field renamed on the replica's side must not read as zero load to the autoscaler."""
    metrics = with_other_fields({"num_running": {"d1": 6.0}}, IDLE_DECODE)
    del metrics["arrivals_per_s"]
    with pytest.raises(LoadReportError, match="arrivals_per_s"):
        pool_loads(DecodeLoad, metrics)


def with_other_fields(metrics: dict, idle) -> dict:
    """`metrics` plus every other numeric field of the load, at `idle`'s value, for the same replicas."""
    replicas = {r for per_replica in metrics.values() for r in per_replica}
    filled = {name: {r: float(value) for r in replicas} for name, value in dataclasses.asdict(idle).items()
              if name != "replica_id"}
    return {**filled, **metrics}


def test_both_pools_get_a_serve_autoscaling_config_when_one_autoscales():
    config = load_config({"decode": {"replicas": "1:2"}, "autoscaling": {"interval_s": 0.5}})
    assert serve_autoscaling_config(config, "prefill")["max_replicas"] == 1
    decode = serve_autoscaling_config(config, "decode")
    assert (decode["min_replicas"], decode["max_replicas"], decode["upscale_delay_s"]) == (1, 2, 0.0)
    assert serve_autoscaling_config(load_config({}), "decode") is None


def test_metrics_show_pool_sizes_and_decisions_by_reason():
    text = autoscaling_lines(NOTE)
    assert 'pdserve_pool_replicas{pool="decode"} 2' in text and 'pdserve_pool_target_replicas{pool="decode"} 3' in text
    assert 'pdserve_autoscaling_decisions_total{pool="decode",direction="up",reason="tpot_above_slo"} 2' in text
    assert autoscaling_lines(None) == ""


def test_status_says_sizes_targets_and_the_last_decision_in_words():
    text = format_status({"model": "m", "pools": {"decode": {"d1": {"num_running": 19}}}, "autoscaling": {"autoscaling": NOTE}})
    assert "decode: 2 running, target 3" in text and "prefill: 1 running, target 1" in text
    assert "last decision: decode: 2 → 3, predicted TPOT 71 ms > SLO 60 ms at 38 running sequences" in text
    assert "autoscaling: off" in format_status({"model": "m", "pools": {"decode": {"d1": {}}}, "autoscaling": {}})


def test_status_and_metrics_show_each_replicas_gpu_idle_share():
    from pdserve.router.metrics import RouterMetrics

    pools = {"decode": {"d1": {"num_running": 8, "gpu_idle_share": 0.64, "gpu_step_time_s": 0.0103, "mbu_busy": 0.6,
                               "mbu_wall": 0.21}},
             "prefill": {"p1": {"queued_requests": 3, "gpu_idle_share": 0.05}}}
    text = format_status({"model": "m", "pools": pools, "autoscaling": {}})
    assert "gpu_idle_share=0.64" in text and "gpu_idle_share=0.05" in text and "gpu_step_time_s=0.0103" in text
    metrics = RouterMetrics().render(pools)
    assert 'pdserve_decode_gpu_idle_share{pool="decode",replica="d1"} 0.64' in metrics
    assert 'pdserve_prefill_gpu_idle_share{pool="prefill",replica="p1"} 0.05' in metrics
    assert 'pdserve_decode_mbu_busy{pool="decode",replica="d1"} 0.6' in metrics
    assert 'pdserve_decode_mbu_wall{pool="decode",replica="d1"} 0.21' in metrics
