"""The one configuration schema of a pdserve deployment.

`config.yaml`, the `pdserve serve` flags and the Helm chart's `serveConfigV2` all
land here: a tree of dataclasses, checked whole (unknown keys, types, ranges)
before anything starts. `load_config(mapping)` is the only way in.

    model:        {path, served_model_name, dtype, max_model_len, cache_dir, chat_template, revision,
                   download_dir, tokenizer}
    prefill:      {replicas: 2 | "1:4", gpus_per_replica, tensor_parallel_size, max_batch_tokens,
                   max_queued_requests, ray_resources}
    decode:       {replicas, gpus_per_replica, tensor_parallel_size, max_running, max_waiting,
                   overlap_steps, ray_resources}
    colocated:    {replicas, gpus_per_replica, tensor_parallel_size}  # replicas > 0: one pool doing both phases
A replica of tensor_parallel_size N holds N x gpus_per_replica GPUs of one node (N ranks).
    kv_cache:     {block_size, num_blocks, memory_fraction, dtype}
    transfer:     {backend, timeout_s, interface}
    router:       {http_host, http_port, grpc_port, prefill_policy, decode_policy,
                   short_prompt_tokens, stream_interval, api_key, ray_resources, replicas, call_secret}
    slo:          {ttft_ms, tpot_ms}
    autoscaling:  {upscale_delay_s, downscale_delay_s, drain_timeout_s, interval_s, max_gpus}
    limits:       {max_body_bytes, max_prompt_tokens, max_tokens, max_n, max_stop,
                   request_timeout_s}
    engine:       {gemv_max_rows, gil_switch_interval_s}

Every default is written once, here: the parts' own settings (PrefillSettings,
DecodeSettings, PipelineSettings, RequestLimits, PolicySettings) have none for
what this tree sets, and cluster/settings.py builds them from it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that pdserve refuses, with the key path that is wrong."""


@dataclass(frozen=True)
class ReplicaRange:
    """A pool size: fixed when min == max, autoscaled between them otherwise."""

    min: int
    max: int

    @property
    def is_autoscaled(self) -> bool:
        return self.min != self.max

    @classmethod
    def parse(cls, value: Any, where: str) -> "ReplicaRange":
        """Accept 3, "3" or "1:4"."""
        if isinstance(value, ReplicaRange):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a count or 'MIN:MAX', got {value!r}")
        if isinstance(value, int):
            low = high = value
        elif isinstance(value, str):
            parts = value.split(":")
            try:
                numbers = [int(p) for p in parts]
            except ValueError:
                raise ConfigError(f"{where}: expected a count or 'MIN:MAX', got {value!r}") from None
            if len(numbers) == 1:
                low = high = numbers[0]
            elif len(numbers) == 2:
                low, high = numbers
            else:
                raise ConfigError(f"{where}: expected a count or 'MIN:MAX', got {value!r}")
        else:
            raise ConfigError(f"{where}: expected a count or 'MIN:MAX', got {value!r}")
        if low < 0 or high < 0:
            raise ConfigError(f"{where}: replica counts must be >= 0, got {value!r}")
        if low > high:
            raise ConfigError(f"{where}: min {low} is above max {high}")
        return cls(low, high)

    def __str__(self) -> str:
        return str(self.min) if not self.is_autoscaled else f"{self.min}:{self.max}"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    # names clients may send as `model` (the first is the one responses carry); empty: `path` as given
    served_model_name: tuple[str, ...] = ()
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None: the model's own context length
    # where the embedded default model is unpacked; None: $PDSERVE_CACHE, else ~/.cache/pdserve
    cache_dir: str | None = None
    chat_template: str | None = None  # a Jinja chat template's text, replacing the tokenizer's (None: its own)
    # a Hugging Face model id as `path`: which revision, and the cache it is read from (None: HF_HOME's)
    revision: str | None = None
    download_dir: str | None = None
    tokenizer: str | None = None  # another directory or model id to take the tokenizer from (None: the model's)


@dataclass(frozen=True)
class PrefillPoolConfig:
    replicas: ReplicaRange = ReplicaRange(1, 1)
    gpus_per_replica: float = 1.0  # per TP rank
    tensor_parallel_size: int = 1  # ranks (GPUs) per replica, on one node
    max_batch_tokens: int = 2048  # token budget of one prefill batch; longer prompts are chunked
    max_queued_requests: int = 256  # beyond this, requests get 429
    prefix_caching: bool = True  # reuse the KV of earlier prompts' full blocks (vLLM's --enable-prefix-caching)
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources a replica needs


@dataclass(frozen=True)
class DecodePoolConfig:
    replicas: ReplicaRange = ReplicaRange(1, 1)
    gpus_per_replica: float = 1.0  # per TP rank
    tensor_parallel_size: int = 1  # ranks (GPUs) per replica, on one node
    max_running: int = 64  # sequences in one decode batch
    max_waiting: int = 256  # reservations waiting for KV or admission; beyond this, 429
    overlap_steps: bool | None = None  # queue step N+1 before reading step N's tokens; null: on a GPU only
    ray_resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ColocatedPoolConfig:
    replicas: int = 0  # > 0 replaces the two pools by N replicas doing both phases
    gpus_per_replica: float = 1.0  # per TP rank
    tensor_parallel_size: int = 1  # ranks (GPUs) per replica, on one node


@dataclass(frozen=True)
class KvCacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory_fraction of free device memory
    memory_fraction: float = 0.8  # on CUDA: share of free memory after weights for KV
    cpu_num_blocks: int = 2048  # on the CPU, where free memory says little
    dtype: str = "auto"  # auto (the model's dtype) | fp8_e4m3 (half the bytes per token; both pools must agree)


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "auto"  # auto | nccl | cuda_ipc | gloo | fake
    timeout_s: float = 30.0  # one handoff's bound, within the request's deadline
    # The network interface KV channels use on every node (a multi-homed host's fast NIC);
    # None: the address Ray reports for the node
    interface: str | None = None


@dataclass(frozen=True)
class RouterConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 9000
    prefill_policy: str = "prefix_aware"  # round_robin | least_loaded | prefix_aware
    decode_policy: str = "least_loaded"  # round_robin | least_loaded
    short_prompt_tokens: int = 0  # prompts shorter than this prefill on the decode replica
    # A request's tokens leave its decode replica every this many (its first and last at once): 1 streams
    # each token; more cuts the router's and the replica's work per token that many times (vLLM's
    # --stream-interval), at that many steps between a client's chunks.
    stream_interval: int = 1
    api_key: str | None = None
    ray_resources: dict[str, float] = field(default_factory=dict)
    replicas: int = 1  # each binds http_port and grpc_port too (SO_REUSEPORT): the kernel spreads connections
    call_secret: str = ""  # seals the routers' calls to the workers (engine/sealed.py); build_app draws one


@dataclass(frozen=True)
class SloConfig:
    ttft_ms: float = 1000.0
    tpot_ms: float = 100.0


@dataclass(frozen=True)
class AutoscalingConfig:
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    drain_timeout_s: float = 120.0
    interval_s: float = 5.0  # how often replicas report and the policy decides
    max_gpus: float | None = None  # the most GPUs both pools may hold together (None: only their replica bounds)


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int | None = None  # None: the model's context
    max_n: int = 16
    max_stop: int = 16
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class EngineConfig:
    """How each replica's process runs its engine."""

    # On CUDA, projections of at most this many rows (decode steps of few sequences) take the
    # Triton GEMV; 0 turns it off; None: the engine's own crossover (engine/linear.py)
    gemv_max_rows: int | None = None
    # The engine thread holds the GIL between GPU waits; at Python's default 5 ms each KV-channel
    # or stream-thread step behind it can wait that long, which the handoff pays per message.
    gil_switch_interval_s: float = 0.001
    cuda_graphs: bool = True  # on a GPU, decode steps and short prefills replay CUDA graphs (vLLM's --enforce-eager: off)


@dataclass(frozen=True)
class PdserveConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prefill: PrefillPoolConfig = field(default_factory=PrefillPoolConfig)
    decode: DecodePoolConfig = field(default_factory=DecodePoolConfig)
    colocated: ColocatedPoolConfig = field(default_factory=ColocatedPoolConfig)
    kv_cache: KvCacheConfig = field(default_factory=KvCacheConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def is_colocated(self) -> bool:
        return self.colocated.replicas > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `load_config` takes back (YAML, Serve args, Helm)."""
        return _to_plain(self)


def replica_gpus(config: PdserveConfig, pool: str) -> float:
    """The GPUs one replica of `pool` holds: its TP ranks x gpus_per_replica. A rank without a
    GPU (on the CPU) counts as one, so that goodput per GPU still compares deployments."""
    section = getattr(config, pool)
    return section.tensor_parallel_size * (section.gpus_per_replica or 1.0)


_CHOICES = {
    ("model", "dtype"): {"auto", "float32", "bfloat16", "float16"},
    ("kv_cache", "dtype"): {"auto", "fp8_e4m3"},
    ("transfer", "backend"): {"auto", "nccl", "cuda_ipc", "gloo", "fake"},
    ("router", "prefill_policy"): {"round_robin", "least_loaded", "prefix_aware"},
    ("router", "decode_policy"): {"round_robin", "least_loaded"},
}
_POSITIVE = {
    ("prefill", "max_batch_tokens"), ("prefill", "max_queued_requests"),
    ("prefill", "tensor_parallel_size"), ("decode", "tensor_parallel_size"), ("colocated", "tensor_parallel_size"),
    ("decode", "max_running"), ("decode", "max_waiting"),
    ("kv_cache", "block_size"), ("kv_cache", "num_blocks"), ("kv_cache", "cpu_num_blocks"),
    ("transfer", "timeout_s"), ("slo", "ttft_ms"), ("slo", "tpot_ms"),
    ("autoscaling", "interval_s"), ("autoscaling", "max_gpus"), ("limits", "max_body_bytes"), ("router", "replicas"),
    ("router", "stream_interval"), ("limits", "max_prompt_tokens"), ("limits", "max_tokens"), ("limits", "max_n"),
    ("limits", "request_timeout_s"), ("model", "max_model_len"), ("engine", "gil_switch_interval_s"),
}
_NON_NEGATIVE = {
    ("prefill", "gpus_per_replica"), ("decode", "gpus_per_replica"),
    ("colocated", "replicas"), ("colocated", "gpus_per_replica"),
    ("router", "short_prompt_tokens"), ("autoscaling", "upscale_delay_s"),
    ("autoscaling", "downscale_delay_s"), ("autoscaling", "drain_timeout_s"),
    ("limits", "max_stop"), ("engine", "gemv_max_rows"),
}
_PORTS = {("router", "http_port"), ("router", "grpc_port")}


def load_config(data: Mapping[str, Any] | None = None, **overrides: Any) -> PdserveConfig:
    """Build and check the whole tree; `overrides` are dotted keys ("prefill.replicas")."""
    merged = _deep_copy(data or {})
    for dotted, value in overrides.items():
        if value is None:
            continue
        _set_dotted(merged, dotted.replace("__", "."), value)
    config = _build(PdserveConfig, merged, "")
    _check(config)
    return config


def load_config_file(path: str | Path, **overrides: Any) -> PdserveConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return load_config(data, **overrides)


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is ReplicaRange:
        return ReplicaRange.parse(value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if typing.get_origin(hint) is dict:
        return _resources(value, where)
    if typing.get_origin(hint) is tuple:
        return _names(value, where)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: must be set")
    for option in options:
        if option is type(None):
            continue
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if option is bool and isinstance(value, bool):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


_UnionType = type(int | None)


def _resources(value: Any, where: str) -> dict[str, float]:
    """A mapping of Ray resource names to non-negative amounts."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of resource name to amount, got {value!r}")
    out = {}
    for name, amount in value.items():
        if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{where}: {name!r}: expected a resource name and an amount >= 0, got {amount!r}")
        out[name] = float(amount)
    return out


def _names(value: Any, where: str) -> tuple[str, ...]:
    """One name or a list of distinct, non-empty names."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: expected a name or a list of non-empty names, got {value!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: names must differ, got {value!r}")
    return tuple(names)


def _check_chat_template(template: str | None) -> None:
    """A template Jinja cannot compile is refused here, not at a user's first chat request."""
    import jinja2

    if template is not None:
        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"model.chat_template: does not compile: {e.message} (line {e.lineno})") from None


def _check(config: PdserveConfig) -> None:
    _check_chat_template(config.model.chat_template)
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {sorted(allowed)}")
    for section, key in _POSITIVE:
        value = getattr(getattr(config, section), key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key}: must be > 0, got {value}")
    for section, key in _NON_NEGATIVE:
        value = getattr(getattr(config, section), key)
        if value is not None and value < 0:
            raise ConfigError(f"{section}.{key}: must be >= 0, got {value}")
    for section, key in _PORTS:
        value = getattr(getattr(config, section), key)
        if not 1 <= value <= 65535:
            raise ConfigError(f"{section}.{key}: a port must be in 1..65535, got {value}")
    if config.router.http_port == config.router.grpc_port:
        raise ConfigError("router: http_port and grpc_port must differ")
    if not 0 < config.kv_cache.memory_fraction <= 1:
        raise ConfigError(f"kv_cache.memory_fraction: must be in (0, 1], got {config.kv_cache.memory_fraction}")
    if not config.is_colocated:
        for pool in ("prefill", "decode"):
            if getattr(config, pool).replicas.max < 1:
                raise ConfigError(f"{pool}.replicas: the pool needs at least one replica")
    budget = config.autoscaling.max_gpus
    if budget is not None and not config.is_colocated:
        floor = sum(getattr(config, p).replicas.min * replica_gpus(config, p) for p in ("prefill", "decode"))
        if floor > budget:
            raise ConfigError(f"autoscaling.max_gpus: {budget:g} GPUs do not hold the pools' minimum sizes "
                              f"({floor:g} GPUs at their tensor_parallel_size)")
    if config.prefill.max_batch_tokens % config.kv_cache.block_size:
        raise ConfigError(
            f"prefill.max_batch_tokens ({config.prefill.max_batch_tokens}) must be a multiple "
            f"of kv_cache.block_size ({config.kv_cache.block_size}): chunks of a long prompt "
            "end on block boundaries"
        )


def _to_plain(value: Any) -> Any:
    if isinstance(value, ReplicaRange):
        return value.min if not value.is_autoscaled else str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{name}: expected a mapping")
        node = child
    node[leaf] = value
