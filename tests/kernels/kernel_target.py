"""Where the kernel tests run: Triton compiled on a GPU, or interpreted on CPU tensors elsewhere.

Without CUDA, TRITON_INTERPRET is set by tests/conftest.py before anything
imports triton. The tests call each `*_triton` launcher
directly, on DEVICE: the public dispatchers pick the torch reference for CPU
tensors. The interpreter patches below only touch interpreted runs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

try:
    import triton.runtime.interpreter as _interpreter
except ImportError:
    _interpreter = None


def _patch_interpreter_index() -> None:
    """triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)),
    which numpy >= 2.4 refuses; loops with tensor bounds (`range(start, end)`) need it."""
    original = _interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter keeps bf16 as raw uint16 bits and tl.dot multiplies those bits;
    widen bf16 operands to the fp32 values they stand for (exact) first."""
    original = _interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        as_fp32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return _interpreter.TensorHandle(as_fp32, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    _interpreter.InterpreterBuilder.create_dot = create_dot


def _patch_interpreter_bf16_rounding() -> None:
    """The interpreter truncates fp32 → bf16; GPUs (and torch) round to nearest even."""
    original = _interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original(self, src, dst_type)
        bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return _interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)

    _interpreter.InterpreterBuilder.cast_impl = cast_impl


def _patch_interpreter_fp8_rounding() -> None:
    """The interpreter's fp32 → e4m3 drops the carry of a mantissa that rounds up (125.9 becomes 64, not
    128); GPUs (and torch) round to nearest even: convert with torch."""
    original = _interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.float8e4nv:
            return original(self, src, dst_type, rounding_mode)
        values = torch.from_numpy(src.data.astype(np.float32))
        return _interpreter.TensorHandle(values.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), tl.float8e4nv)

    _interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp


if _interpreter is not None:
    import numpy as np
    import triton.language as tl

    _patch_interpreter_index()
    _patch_interpreter_bf16_dot()
    _patch_interpreter_bf16_rounding()
    _patch_interpreter_fp8_rounding()

requires_triton = pytest.mark.skipif(_interpreter is None, reason="triton is not installed")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; NaN anywhere in `out` makes it NaN (and fails the test)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def compile_for_hopper(cases: dict[str, tuple[str, str, dict[str, str], dict]]) -> dict[str, list[str] | str]:
    """Compile each case's kernel, (module, kernel, signature, constexprs), for sm_90 down to its cubin,
    without a GPU (triton ships ptxas), all in one fresh process (the interpreter patches triton in this
    one): what interpreted runs never check (globals a kernel may not read, types the compiler refuses)
    fails here. Per case: the stages compiled, e.g. [..., 'cubin'], or the compiler's error."""
    script = f"""
import importlib, json, traceback, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = {{}}
for name, (module, kernel, signature, constexprs) in {cases!r}.items():
    try:
        fn = getattr(importlib.import_module(module), kernel)
        source = ASTSource(fn=fn, signature={{**signature, **{{c: "constexpr" for c in constexprs}}}},
                           constexprs=constexprs)
        out[name] = list(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm)
    except Exception:
        out[name] = traceback.format_exc()[-3000:]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
