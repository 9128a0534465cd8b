"""A decode replica's reports while it serves, as the deployment shell builds them, on the path a GPU takes.

On the H200 (2026-12-01) the decode and colocated replicas' stats raised on every report with sequences
running (they read `model` off the worker's TpRunner, which has none): the registry then held only
their idle reports, and diagnose saw batch 0 and no settled steps. The MBU branch runs only where a
roofline was measured (a GPU); here it runs on the CPU with a roofline given."""
import threading
import time

from pdserve.cluster.config import load_config
from pdserve.cluster.deployments import decode_stats, weight_bytes_per_gpu
from pdserve.cluster.settings import decode_settings
from pdserve.decode_worker.outbox import Outbox
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.messages import StreamStart
from pdserve.engine.loader import load_model_dir
from pdserve.engine.roofline import Roofline
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import SamplingParams
from pdserve.engine.tp_runner import TpRunner
from tiny_models import save_tiny_model


def test_a_colocated_replica_reports_its_batch_gpu_time_and_mbu_while_sequences_run(tmp_path):
    save_tiny_model("llama", tmp_path, max_position_embeddings=512)
    runner = ModelRunner(load_model_dir(tmp_path), 512, 4)
    settings = decode_settings(load_config({"decode": {"max_running": 8, "overlap_steps": True}}))  # one step ahead, as on a GPU
    worker = DecodeWorker(TpRunner(runner), None, settings, "colocated-test")  # as DecodeDeployment builds it
    ended = threading.Semaphore(0)
    outbox = Outbox(lambda batch: [ended.release() for _ in batch.endings])
    deadline = time.time() + 120
    try:
        for i in range(4):
            reservation = worker.reserve(f"r{i}", 8, 400, deadline)
            worker.open(StreamStart(reservation.transfer_id, f"r{i}", tuple(range(3, 11)), (), True, 400,
                                    SamplingParams(), frozenset(), deadline), outbox)
        roofline, weights = Roofline(matmul_flops_per_s=1e12, copy_bytes_per_s=1e12), weight_bytes_per_gpu(runner)
        stats = decode_stats(worker, roofline, weights)
        while not (stats["num_running"] and stats["batch_size"]) and time.time() < deadline:
            time.sleep(0.01)
            stats = decode_stats(worker, roofline, weights)
        assert stats["num_running"] > 0 and 1 <= stats["batch_size"] <= 4, stats
        assert stats["gpu_step_time_s"] > 0 and stats["step_time_s"] > 0 and 0 <= stats["gpu_idle_share"] <= 1
        assert 0 < stats["mbu_busy"] and 0 < stats["mbu_wall"] <= stats["mbu_busy"] * 1.001, stats
        assert stats["kv_block_size"] == 4 and stats["max_running"] == 8
        for _ in range(4):
            assert ended.acquire(timeout=120)
    finally:
        worker.close()
    assert "mbu_busy" not in decode_stats(worker, roofline, weights)  # nothing running: no MBU to speak of


def test_each_gpu_of_a_replica_reads_its_share_of_the_weights(tmp_path):
    save_tiny_model("llama", tmp_path)
    runner = ModelRunner(load_model_dir(tmp_path), 8, 4)
    assert weight_bytes_per_gpu(runner) == runner.spec.num_params * 4  # float32 on the CPU, TP 1
