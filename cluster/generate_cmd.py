"""`pdserve generate`: stream one completion to the terminal, from a server or offline."""
from __future__ import annotations

import argparse
import sys
import time

import grpc

from pdserve.engine.tokenizer import IncrementalDetokenizer, load_tokenizer


def generate_offline(args: argparse.Namespace) -> int:
    """Run the engine in this process (no Ray, no server) and print tokens as they come."""
    import random

    import torch

    from pdserve.engine.loader import default_model_dir, load_model_dir, resolve_model_path
    from pdserve.engine.offline import OfflineEngine, OfflineSequence
    from pdserve.engine.sampler import SamplingParams

    directory = resolve_model_path(args.model) if args.model else default_model_dir()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model_dir(directory, device)
    tokenizer = load_tokenizer(directory)
    prompt = _encode(tokenizer, args.prompt, chat=not args.no_chat)
    params = SamplingParams(temperature=args.temperature,
                            seed=args.seed if args.seed is not None else random.getrandbits(63))
    max_tokens = min(args.max_tokens, loaded.spec.max_model_len - len(prompt))
    engine = OfflineEngine(loaded, num_blocks=-(-(len(prompt) + max_tokens) // 16) + 1)
    detok = IncrementalDetokenizer(tokenizer)
    started = time.monotonic()
    for _, token in engine.generate([OfflineSequence(prompt, max_tokens, params)]):
        print(detok.add([token]), end="", flush=True)
    print(detok.flush())
    print(f"[{time.monotonic() - started:.2f} s, {loaded.name} on {device}]", file=sys.stderr)
    return 0


def generate_remote(args: argparse.Namespace) -> int:
    """Stream from a running server over gRPC; print TTFT and time per output token."""
    from pdserve.protos.pdserve.v1 import generate_pb2 as pb
    from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb.GenerateRequest(prompt=args.prompt, sampling=sampling)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    started = time.monotonic()
    first_at, count, last = None, 0, None
    with grpc.insecure_channel(args.address) as channel:
        try:
            for response in pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata):
                if response.token_ids and first_at is None:
                    first_at = time.monotonic()
                count += len(response.token_ids)
                print(response.text, end="", flush=True)
                last = response
        except grpc.RpcError as e:
            print(f"\npdserve: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    end = time.monotonic()
    print()
    if first_at is not None:
        tpot = (end - first_at) / max(count - 1, 1)
        print(f"[TTFT {1000 * (first_at - started):.0f} ms, {1000 * tpot:.1f} ms per output token, "
              f"{count} tokens, finish: {last.finish_reason}]", file=sys.stderr)
    return 0


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt)
