"""Typed replica loads for tests: an idle replica's, to `dataclasses.replace` what a test is about."""
from pdserve.engine.messages import DecodeLoad, PrefillLoad

IDLE_PREFILL = PrefillLoad(replica_id="p", queued_tokens=0, queued_requests=0, tokens_per_s=0.0, prefix_hit_rate=0.0,
                           prefix_cached_blocks=0, gpu_idle_share=1.0, gpu_batch_time_s=0.0, batch_period_s=0.0,
                           batch_tokens=0.0, launch_time_s=0.0)
IDLE_DECODE = DecodeLoad(replica_id="d", num_running=0, num_context_tokens=0, num_waiting=0, num_blocks_free=100,
                         num_blocks_total=100, step_time_s=0.0, batch_size=0.0, gpu_step_time_s=0.0, gpu_idle_share=1.0,
                         launch_time_s=0.0, max_running=64, tokens_per_s=0.0, prefill_tokens_per_s=0.0, host_s_per_seq=0.0, arrivals_per_s=0.0,
                         prompt_tokens_mean=0.0, is_draining=False, overlap_steps=False)
