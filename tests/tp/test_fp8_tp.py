"""FP8 checkpoints at tensor parallelism: each rank's slice of a weight keeps its own scales."""
import pytest
import torch

from fp8_models import LAYOUTS, quantize, save_fp8_model
from pdserve.engine.fp8 import Fp8Checkpoint, Fp8FormatError
from pdserve.engine.loader import ModelLoadError, load_model_dir
from pdserve.engine.weight_reader import WeightReader
from rank_bodies import generate_greedy
from ranks import run_ranks
from tiny_models import reference_tokens

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
MAX_TOKENS = 12
N, K = 96, 128  # three 32-row blocks, four 32-column blocks


def checkpoint_of(layout: str) -> tuple[Fp8Checkpoint, WeightReader]:
    _, scale_name, block, per_channel = LAYOUTS[layout]
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(weight, block, per_channel)
    return Fp8Checkpoint(block), WeightReader.of_tensors({"w.weight": q, f"w.{scale_name}": scale})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("rows, columns", [
    (slice(0, 48), None), (slice(48, 96), None),  # a row cut inside a block: per-row scales
    (slice(32, 64), None), (slice(64, 96), None),  # on block boundaries
    (None, slice(0, 64)), (None, slice(64, 128)),  # input columns, on block boundaries
])
def test_a_shard_dequantizes_to_the_same_slice_of_the_whole_weight(layout, rows, columns):
    checkpoint, reader = checkpoint_of(layout)
    whole = checkpoint.weight(reader, "w.weight").dequantize()
    shard = checkpoint.weight(reader, "w.weight", rows, columns)
    expected = whole[rows or slice(None), columns or slice(None)]
    assert shard.weight.shape == expected.shape
    assert torch.equal(shard.dequantize(), expected)


def test_a_column_cut_inside_a_scale_block_is_refused_with_the_reason():
    checkpoint, reader = checkpoint_of("fp8-block")
    with pytest.raises(Fp8FormatError, match="inside its 32-column scale blocks.*tensor_parallel_size"):
        checkpoint.weight(reader, "w.weight", None, slice(0, 48))


@pytest.mark.parametrize("arch, layout", [("llama", "fp8-block"), ("qwen2", "fp8-tensor")])
def test_fp8_checkpoint_at_tp2_gives_transformers_greedy_tokens(tmp_path, arch, layout):
    # 2 kv heads of 16 rows: each rank's k and v rows cut a 32-row block in half
    reference = save_fp8_model(arch, tmp_path, layout)
    reference.generation_config.eos_token_id = None
    expected = [reference_tokens(reference, p, MAX_TOKENS) for p in PROMPTS]
    for result in run_ranks(generate_greedy, 2, str(tmp_path), PROMPTS, MAX_TOKENS):
        assert result["outputs"] == expected


def test_an_fp8_block_checkpoint_whose_mlp_the_tp_size_cuts_inside_a_block_is_refused(tmp_path):
    save_fp8_model("llama", tmp_path, "fp8-block", intermediate_size=96)  # 48 down-projection columns a rank
    with pytest.raises(ModelLoadError, match="down_proj.*inside its 32-column scale blocks"):
        load_model_dir(tmp_path, rank=0, tp_size=2)
