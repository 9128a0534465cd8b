"""What every process of a replica (a Serve replica, or one of its TP ranks' actors) starts from:
its device, its shard of the model in a process set up as the config's `engine` section says,
and where and how its KV channels run."""
from __future__ import annotations

import sys

import torch

from pdserve.engine.linear import set_gemv_max_rows
from pdserve.engine.loader import LoadedModel, default_model_dir, load_model_dir, resolve_model_path
from pdserve.engine.parallel import TensorParallel
from pdserve.engine.runner import ModelRunner
from pdserve.engine.transfer.addresses import interface_address

from .config import PdserveConfig


def model_dir(config: PdserveConfig) -> str:
    """The model's directory on this node: `model.path`, or a model id's snapshot in this node's
    Hugging Face cache (fetched when missing), or the embedded default model."""
    model = config.model
    if model.path is None:
        return str(default_model_dir(model.cache_dir))
    return str(resolve_model_path(model.path, model.revision, model.download_dir))


def tokenizer_dir(config: PdserveConfig) -> str:
    """Where the tokenizer is read: `model.tokenizer` (a directory or model id), else the model's directory."""
    model = config.model
    if model.tokenizer is None:
        return model_dir(config)
    return str(resolve_model_path(model.tokenizer, None, model.download_dir))


def rank_device() -> torch.device:
    """The GPU Ray gave this process (each sees only its own), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_rank_model(config: PdserveConfig, tp: TensorParallel) -> LoadedModel:
    """This TP rank's shard of the model (the whole model at TP 1), in a process set up as `engine` says."""
    sys.setswitchinterval(config.engine.gil_switch_interval_s)
    if config.engine.gemv_max_rows is not None:
        set_gemv_max_rows(config.engine.gemv_max_rows)
    return load_model_dir(model_dir(config), rank_device(), config.model.dtype, config.model.max_model_len,
                          rank=tp.rank, tp_size=tp.size)


def build_runner(config: PdserveConfig, loaded: LoadedModel, num_blocks: int, tp: TensorParallel) -> ModelRunner:
    """Every rank's runner alike (the leader's and its followers'): CUDA graphs for every batch size the
    decode loop may run, unless `engine.cuda_graphs` is off; the KV cache in `kv_cache.dtype`."""
    return ModelRunner(loaded, num_blocks, config.kv_cache.block_size, max_decode_batch=config.decode.max_running,
                       use_cuda_graphs=None if config.engine.cuda_graphs else False,
                       kv_cache_dtype=config.kv_cache.dtype, tp=tp)


def kv_host(config: PdserveConfig) -> str | None:
    """The address this replica's KV channels bind: `transfer.interface`'s, or None (each end decides)."""
    return interface_address(config.transfer.interface) if config.transfer.interface else None


def transfer_backend(config: PdserveConfig, runner: ModelRunner) -> str:
    """'auto': gloo on the CPU; on GPUs, CUDA IPC when the cluster has one GPU, NCCL otherwise."""
    if config.transfer.backend != "auto":
        return config.transfer.backend
    if runner.device.type != "cuda":
        return "gloo"
    import ray

    return "cuda_ipc" if ray.cluster_resources().get("GPU", 0) <= 1 else "nccl"
