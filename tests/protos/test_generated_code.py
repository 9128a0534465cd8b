"""The committed generated code is what the .proto files generate today."""
import importlib.util
from pathlib import Path

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def test_generated_python_is_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_protos", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.generate(tmp_path)
    assert written, "nothing generated"
    for fresh in written:
        committed = PROTOS / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python protos/generate.py"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python protos/generate.py"


def test_public_contract_names():
    from pdserve.protos.pdserve.v1 import generate_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "pdserve.v1.Generation"
    assert set(service.methods_by_name) >= {"Generate", "Health"}
    assert service.methods_by_name["Generate"].server_streaming
    fields = {m: set(pb.DESCRIPTOR.message_types_by_name[m].fields_by_name) for m in
              ("GenerateRequest", "SamplingParams", "GenerateResponse", "Usage")}
    assert fields["GenerateRequest"] >= {"request_id", "prompt", "prompt_token_ids", "sampling"}
    assert fields["SamplingParams"] >= {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
    assert fields["GenerateResponse"] >= {"token_ids", "text", "finish_reason", "usage", "timings"}
    assert fields["Usage"] >= {"prompt_tokens", "completion_tokens"}
