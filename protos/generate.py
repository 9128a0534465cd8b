"""Regenerate the Python code of the .proto files beside this script.

    python protos/generate.py            # writes *_pb2.py, *_pb2.pyi, *_pb2_grpc.py in place
    python protos/generate.py --out DIR  # writes to DIR instead (the currency test compares)
"""
import argparse
import re
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out: Path) -> list[Path]:
    """Compile every .proto under protos/ into `out`, mirroring the folders."""
    protos = sorted(p.relative_to(HERE) for p in HERE.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, protos)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for path in sorted(Path(tmp).rglob("*.py*")):
            target = out / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_relative_imports(path.read_text()))
            written.append(target)
    return written


def _relative_imports(code: str) -> str:
    # protoc writes `from pdserve.v1 import x_pb2`, which would resolve against our
    # own top-level package; the generated modules sit beside each other, so import
    # them relatively. Likewise the message classes are named after the module
    # they really live in, so that pickle (Ray Serve's gRPC proxy) finds them.
    code = re.sub(r"^from pdserve\.\w+ import (\w+_pb2)", r"from . import \1", code, flags=re.M)
    return re.sub(r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '[\w.]+', _globals\)",
                  "BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)", code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
