"""The `pdserve` command line: serve, generate, bench, diagnose, export-default-model."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .config import ConfigError, PdserveConfig, load_config, load_config_file


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except ConfigError as e:
        print(f"pdserve: bad configuration: {e}", file=sys.stderr)
        return 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving on Ray.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve a model: prefill and decode pools behind HTTP and gRPC")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="a model directory or Hugging Face model id, as `vllm serve MODEL` takes it")
    serve.add_argument("--config", help="a config.yaml (flags below override it)")
    serve.add_argument("--model", help="a Hugging Face model directory, or a model id (ORG/NAME) found in the Hugging "
                                       "Face cache or fetched into it (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="the names clients send as `model` (responses carry the first; /v1/models lists "
                            "them all; any other name gets 404). Default: the --model value exactly as given, "
                            "or SmolLM2-135M-Instruct for the embedded model")
    serve.add_argument("--cache-dir", help="where the embedded default model is unpacked "
                                            "(default: $PDSERVE_CACHE, else ~/.cache/pdserve)")
    serve.add_argument("--prefill-replicas", help="N, or MIN:MAX to autoscale")
    serve.add_argument("--decode-replicas", help="N, or MIN:MAX to autoscale")
    serve.add_argument("--colocated", type=int, help="N replicas doing both phases instead (the baseline)")
    serve.add_argument("--prefill-tp", type=int, help="tensor-parallel GPUs per prefill replica (default 1)")
    serve.add_argument("--decode-tp", type=int, help="tensor-parallel GPUs per decode replica (default 1)")
    serve.add_argument("--colocated-tp", type=int, help="tensor-parallel GPUs per colocated replica (default 1)")
    serve.add_argument("--http-host", "--host", dest="http_host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--http-port", "--port", dest="http_port", type=int, help="the OpenAI API's port (default 8000)")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--router-replicas", type=int,
                       help="router processes, each listening on the HTTP and gRPC ports (default 1)")
    serve.add_argument("--stream-interval", type=int,
                       help="send each request's tokens every N (its first and last at once; default 1): "
                            "less work per token on the routers and decode replicas, N steps between chunks")
    _add_vllm_engine_arguments(serve)
    serve.add_argument("--address", help="join this Ray cluster instead of starting one")
    serve.add_argument("--api-key", help="require this bearer key (or set PDSERVE_API_KEY)")
    serve.add_argument("--slo-ttft-ms", type=float)
    serve.add_argument("--slo-tpot-ms", type=float)
    serve.add_argument("--upscale-delay-s", type=float)
    serve.add_argument("--downscale-delay-s", type=float)
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="stream a completion from a running server (or --offline)")
    generate.add_argument("prompt")
    generate.add_argument("--offline", action="store_true", help="run the engine in this process, no server")
    generate.add_argument("--model", help="model directory (offline only)")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--no-chat", action="store_true", help="send the prompt as is, without the chat template")
    generate.add_argument("--address", default="127.0.0.1:9000", help="gRPC address of the server")
    generate.add_argument("--api-key", help="bearer key, if the server wants one")
    generate.set_defaults(run=_generate)

    bench = commands.add_parser("bench", help="offer a load to a running server: throughput, latency, goodput")
    _add_load_arguments(bench)
    bench.add_argument("--rates", default="inf",
                       help="offered requests/s, comma-separated for a sweep ('inf': as fast as allowed)")
    bench.add_argument("--out", default="bench.json", help="JSON results; PNG plots go beside it")
    bench.set_defaults(run=_bench)

    diagnose = commands.add_parser("diagnose", help="which phase limits a deployment, and the best P:D ratio")
    _add_load_arguments(diagnose)
    diagnose.add_argument("--from", dest="source", help="read this bench JSON instead of running a sweep")
    diagnose.add_argument("--rates", help="the sweep's offered requests/s (default: found from one probe run)")
    diagnose.add_argument("--out", default="diagnose", help="stem of the PNG and JSON written")
    diagnose.add_argument("--confirm", action="store_true",
                          help="then offer the deployment the rate the model says it holds within both SLOs "
                               "(a Poisson run of --num-requests) and report whether it did")
    diagnose.set_defaults(run=_diagnose)

    status = commands.add_parser("status", help="pools, replicas, autoscaling targets and the last decision's reason")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    status.add_argument("--api-key", help="bearer key, if the server wants one")
    status.set_defaults(run=_status)

    export = commands.add_parser("export-default-model", help="write the embedded model as a Hugging Face directory")
    export.add_argument("directory")
    export.set_defaults(run=_export)
    return parser


# vLLM's spellings of the model and engine settings: `vllm serve` command lines run as they are.
_DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
           "float32": "float32"}
_KV_DTYPES = {"auto": "auto", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3"}


def _add_vllm_engine_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--max-model-len", type=int, help="the context the server allows (default: the model's)")
    serve.add_argument("--dtype", choices=sorted(_DTYPES), help="weights' and activations' dtype (default auto)")
    serve.add_argument("--kv-cache-dtype", choices=sorted(_KV_DTYPES), help="auto, or fp8 (e4m3): half the KV bytes")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int,
                       help="GPUs per replica of every pool (--prefill-tp / --decode-tp / --colocated-tp override)")
    serve.add_argument("--max-num-seqs", type=int, help="sequences in one decode batch (decode.max_running)")
    serve.add_argument("--max-num-batched-tokens", type=int, help="tokens in one prefill batch (prefill.max_batch_tokens)")
    serve.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    serve.add_argument("--gpu-memory-utilization", type=float,
                       help="share of the GPU memory free after the weights that the KV cache takes (default 0.8)")
    serve.add_argument("--chat-template", help="a Jinja chat template, or a file holding one, replacing the model's")
    serve.add_argument("--revision", help="a Hugging Face model id's branch, tag or commit (default: main)")
    serve.add_argument("--download-dir",
                       help="the Hugging Face cache a model id is read from and fetched into (default: HF_HOME's)")
    serve.add_argument("--trust-remote-code", action="store_true",
                       help="accepted as vLLM takes it; pdserve runs its own model code, never a checkpoint's")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs: every step launched from Python (engine.cuda_graphs: false)")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV of earlier prompts' full blocks (prefill.prefix_caching; default on)")
    serve.add_argument("--quantization", choices=["fp8"],
                       help="fp8: the checkpoint must be an FP8 one (its quantization_config); pdserve does not "
                            "quantize weights at load")
    serve.add_argument("--enable-chunked-prefill", action="store_true",
                       help="accepted as vLLM takes it; prompts past --max-num-batched-tokens are always chunked")
    serve.add_argument("--disable-log-requests", "--disable-log-stats", action="store_true",
                       help="accepted as vLLM takes them; pdserve logs no line per request")
    serve.add_argument("--tokenizer", help="a directory or model id to take the tokenizer from (default: the model's)")
    serve.add_argument("--seed", type=int,
                       help="accepted as vLLM takes it; a request's own `seed` decides its samples on any replica")
    serve.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                       help="1 only: pdserve splits a model across GPUs by tensor parallelism")
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="1 only: pdserve's replicas are its pools' (--prefill-replicas, --decode-replicas, "
                            "--colocated)")
    serve.add_argument("--generation-config",
                       help="accepted as vLLM takes it; pdserve's request defaults are the OpenAI API's (vLLM's "
                            "`--generation-config vllm`): a checkpoint's generation_config.json sampling defaults "
                            "are not applied")
    _add_vllm_no_ops(serve)


# vLLM flags that tune what pdserve does its own way: accepted, so `vllm serve` command lines start
# (flag, what it takes; None: a switch)
_VLLM_NO_OPS = {
    "--swap-space": float, "--cpu-offload-gb": float, "--load-format": str, "--tokenizer-mode": str,
    "--max-seq-len-to-capture": int, "--distributed-executor-backend": str, "--uvicorn-log-level": str,
    "--max-logprobs": int, "--disable-frontend-multiprocessing": None, "--disable-custom-all-reduce": None,
    "--disable-fastapi-docs": None, "--max-parallel-loading-workers": int,
}


def _add_vllm_no_ops(serve: argparse.ArgumentParser) -> None:
    for flag, kind in _VLLM_NO_OPS.items():
        if kind is None:
            serve.add_argument(flag, action="store_true", help="accepted as vLLM takes it; no effect in pdserve")
        else:
            serve.add_argument(flag, type=kind, help="accepted as vLLM takes it; no effect in pdserve")


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """What bench and diagnose share: the target, the workload, the SLOs."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    parser.add_argument("--grpc", help="send requests over gRPC to this address instead of HTTP")
    parser.add_argument("--api-key", help="bearer key, if the server wants one")
    parser.add_argument("--prompt-tokens", default="128", help="random prompt length: N or MIN:MAX")
    parser.add_argument("--output-tokens", default="64", help="output length: N or MIN:MAX")
    parser.add_argument("--dataset", help="a ShareGPT-style JSON file of conversations (instead of random ids)")
    parser.add_argument("--shared-prefix-tokens", type=int, default=0,
                        help="random prompts all start with the same N ids (a system prompt), then their own")
    parser.add_argument("--num-requests", type=int, default=100, help="requests per run")
    parser.add_argument("--concurrency", type=int, help="most requests in flight (default: unbounded)")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent (and discarded) first")
    parser.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO for goodput (default 1000; diagnose --from: the bench's)")
    parser.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO for goodput (default 100; diagnose --from: the bench's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1,
                        help="client processes sharing each run (one Python process reads some thousands of "
                             "streamed tokens/s; past that it measures itself)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def serve_config(args: argparse.Namespace) -> PdserveConfig:
    """The config `pdserve serve` runs with: --config's file (or the defaults), then the flags."""
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ConfigError(f"two models named: {args.model_tag!r} and --model {args.model!r}")
    if args.pipeline_parallel_size != 1:
        raise ConfigError("--pipeline-parallel-size: pdserve has no pipeline parallelism; split a model across "
                          "GPUs with --tensor-parallel-size")
    if args.data_parallel_size != 1:
        raise ConfigError("--data-parallel-size: pdserve's replicas are its pools'; set --prefill-replicas and "
                          "--decode-replicas (or --colocated N)")
    tp = args.tensor_parallel_size
    overrides = {
        "model.path": args.model or args.model_tag,
        "model.max_model_len": args.max_model_len,
        "model.chat_template": _chat_template(args.chat_template),
        "model.dtype": _DTYPES.get(args.dtype),
        "engine.cuda_graphs": False if args.enforce_eager else None,
        "prefill.prefix_caching": args.enable_prefix_caching,
        "kv_cache.dtype": _KV_DTYPES.get(args.kv_cache_dtype),
        "kv_cache.block_size": args.block_size,
        "kv_cache.memory_fraction": args.gpu_memory_utilization,
        "decode.max_running": args.max_num_seqs,
        "prefill.max_batch_tokens": args.max_num_batched_tokens,
        "model.served_model_name": args.served_model_name,
        "model.cache_dir": args.cache_dir,
        "model.revision": args.revision,
        "model.download_dir": args.download_dir,
        "model.tokenizer": args.tokenizer,
        "prefill.replicas": args.prefill_replicas,
        "decode.replicas": args.decode_replicas,
        "colocated.replicas": args.colocated,
        "prefill.tensor_parallel_size": args.prefill_tp or tp,
        "decode.tensor_parallel_size": args.decode_tp or tp,
        "colocated.tensor_parallel_size": args.colocated_tp or tp,
        "router.http_host": args.http_host,
        "router.http_port": args.http_port,
        "router.grpc_port": args.grpc_port,
        "router.replicas": args.router_replicas,
        "router.stream_interval": args.stream_interval,
        "router.api_key": args.api_key or os.environ.get("PDSERVE_API_KEY"),
        "slo.ttft_ms": args.slo_ttft_ms,
        "slo.tpot_ms": args.slo_tpot_ms,
        "autoscaling.upscale_delay_s": args.upscale_delay_s,
        "autoscaling.downscale_delay_s": args.downscale_delay_s,
    }
    return load_config_file(args.config, **overrides) if args.config else load_config(None, **overrides)


def _check_quantized(config: PdserveConfig, method: str) -> None:
    """`--quantization fp8` names what the checkpoint must already be: its weights are not quantized here."""
    from pathlib import Path

    from pdserve.engine.fp8 import Fp8Checkpoint, Fp8FormatError
    from pdserve.engine.loader import load_hf_config
    from pdserve.engine.model_spec import UnsupportedModel

    from .rank_process import model_dir

    try:  # no path: the embedded model, a bf16 one
        fp8 = config.model.path and Fp8Checkpoint.of(load_hf_config(Path(model_dir(config))))
    except Fp8FormatError:  # another quantization: not FP8 either
        fp8 = None
    if not fp8:
        raise UnsupportedModel(f"--quantization {method}: the checkpoint is not an FP8 one (no FP8 "
                               "quantization_config); pdserve serves FP8 checkpoints as they ship and does "
                               "not quantize weights at load")


def _chat_template(given: str | None) -> str | None:
    """`--chat-template`'s text: the file's when it names one (read here: replicas may run elsewhere)."""
    from pathlib import Path

    if given is None:
        return None
    return Path(given).read_text() if Path(given).is_file() else given


def _serve(args: argparse.Namespace) -> int:
    # A process started in the background inherits SIGINT ignored; Ctrl-C or kill -INT while it
    # loads or deploys must still stop it (serve_forever then takes down what was deployed).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _serve_until_stopped(args)
    except KeyboardInterrupt:  # before anything was deployed
        print("pdserve: interrupted", file=sys.stderr)
        return 130


def _serve_until_stopped(args: argparse.Namespace) -> int:
    from pdserve.engine.loader import ModelLoadError
    from pdserve.engine.model_spec import UnsupportedModel
    from pdserve.router.ingress import PortTaken

    from .server import serve_forever

    config = serve_config(args)
    try:
        if args.quantization:
            _check_quantized(config, args.quantization)
        serve_forever(config, args.address)
    except (ModelLoadError, UnsupportedModel) as e:  # read before anything is deployed
        print(f"pdserve: cannot serve {config.model.path or 'the default model'}: {e}", file=sys.stderr)
        return 2
    except PortTaken as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate_cmd import generate_offline, generate_remote

    if args.offline:
        return generate_offline(args)
    return generate_remote(args)


def _bench(args: argparse.Namespace) -> int:
    from .bench.run import main as bench_main

    return bench_main(args)


def _diagnose(args: argparse.Namespace) -> int:
    from .bench.diagnose import main as diagnose_main

    return diagnose_main(args)


def _status(args: argparse.Namespace) -> int:
    from .status_cmd import show_status

    return show_status(args)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.engine.loader import export_default_model

    export_default_model(Path(args.directory))
    print(args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
