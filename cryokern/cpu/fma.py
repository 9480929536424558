"""The exact float32 fma for compiled CPU code: LLVM's llvm.fma.f32, one rounding by definition.

Why an intrinsic: numba offers no fma (Python's math.fma arrives in 3.13), and numba never
contracts `a*b + c` on its own (fastmath is off, as everywhere in this package), so a fused
multiply-add has to be asked for. llvm.fma.f32 is correctly rounded by its definition: on a CPU
with FMA (numba compiles for the host CPU) it is one vfmadd instruction, which LLVM vectorizes;
on a CPU without it LLVM calls the C library's fmaf, still correctly rounded, only slower.
bench/cpu_backend.py measured this against an exact emulation in float64 (as
cryokern.reference.fma32 does it) and found the instruction faster: see bench/RESULTS.md.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

f32 = types.float32


@intrinsic
def fma32(typingctx, a, b, c):
    """round32(a*b + c) with one rounding; float32 operands only (a float64 operand would mean
    a float64 computation somewhere, which the contract forbids), so anything else fails to
    compile."""
    if (a, b, c) != (f32, f32, f32):
        return None

    def codegen(context, builder, signature, args):
        single = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [single],
                                              ir.FunctionType(single, [single] * 3))
        return builder.call(fn, args)

    return f32(f32, f32, f32), codegen
