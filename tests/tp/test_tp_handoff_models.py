"""Prefill and decode of different TP sizes, on real models in real processes: transformers' tokens."""
import multiprocessing
import threading


from pdserve.engine.loader import load_model_dir
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import SamplingParams, sample
from pdserve.engine.transfer import KvDestination, make_receiver, make_sender
from rank_bodies import decode_group, prefill_group
from ranks import run_ranks
from tiny_models import reference_tokens, save_tiny_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # 4 blocks of 4
MAX_TOKENS = 10
BLOCKS = (30, 3, 17, 9, 22, 5, 11, 28)  # out of order, enough for prompt + output


def greedy_decode(runner: ModelRunner, first: int) -> list[int]:
    tokens = [first]
    while len(tokens) < MAX_TOKENS:
        position = len(PROMPT) + len(tokens) - 1
        logits = runner.decode([DecodeInput(tokens[-1], position, BLOCKS)])
        tokens.append(sample(logits, [SamplingParams()], [position + 1]).token_ids[0])
    return tokens


def test_prefill_tp2_hands_off_to_decode_tp1(tmp_path):
    model = save_tiny_model("qwen2", tmp_path)  # 4 heads, 2 kv heads, q/k/v biases
    expected = reference_tokens(model, PROMPT, MAX_TOKENS)
    runner = ModelRunner(load_model_dir(tmp_path, "cpu", "float32"), 32, 4)
    receiver = make_receiver("gloo", runner.kv_cache, peer_id="decode", timeout_s=30.0)
    try:
        prompt_blocks = BLOCKS[:4]
        receiver.expect(1, prompt_blocks)
        first = run_ranks(prefill_group, 2, str(tmp_path), PROMPT, receiver.destination(1, prompt_blocks))[0]
        assert receiver.wait(1, 30.0).is_ok
        assert greedy_decode(runner, first) == expected
    finally:
        receiver.close()


def test_prefill_tp1_hands_off_to_decode_tp2_with_one_kv_head(tmp_path):
    model = save_tiny_model("llama", tmp_path, num_key_value_heads=1)  # both decode ranks hold the one kv head
    expected = reference_tokens(model, PROMPT, MAX_TOKENS)
    runner = ModelRunner(load_model_dir(tmp_path, "cpu", "float32"), 32, 4)
    sender = make_sender("gloo", runner.kv_cache, sender_id="prefill", timeout_s=30.0)
    context = multiprocessing.get_context("spawn")
    destinations, first_tokens = context.Queue(), context.Queue()
    results = []
    ranks = threading.Thread(target=lambda: results.append(run_ranks(
        decode_group, 2, str(tmp_path), BLOCKS, destinations, first_tokens, len(PROMPT), MAX_TOKENS)))
    ranks.start()
    try:
        parts = sorted(destinations.get(timeout=120) for _ in range(2))
        dest = KvDestination.of_ranks([d for _, d in parts])
        logits = runner.prefill([PrefillChunk(tuple(PROMPT), 0, (0, 1, 2, 3))])
        for layer in range(runner.spec.num_layers):
            sender.send_layer(dest, layer, (0, 1, 2, 3), 0)
        sender.finish(dest, 4, timeout_s=30.0)
        first_tokens.put(sample(logits, [SamplingParams()], [len(PROMPT)]).token_ids[0])
        ranks.join(180)
    finally:
        sender.close()
    leader, follower = results[0]
    assert leader["landed"] and follower["landed"]
    assert leader["tokens"] == expected
