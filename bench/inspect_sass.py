"""The default network's kernels as sm_90 SASS, on a machine without a GPU: registers, spills
and the instruction mix of each kernel's hot basic block (the most FFMA: its loop, written out).

How this found the signed-index wrap-around (NOTES v16): numba compiles each kernel to PTX
(`cuda.compile_ptx`, NVVM), ptxas assembles it for sm_90, cuobjdump prints the SASS. Needs
ptxas on PATH (the CUDA toolkit's) and the wheels nvidia-cuda-nvrtc and nvidia-cuda-cuobjdump
(development tools, not run-time dependencies). The device JIT may allocate registers a little
differently; bench/step.py prints the device's figures.
Usage: python bench/inspect_sass.py [--keep DIR]   (DIR keeps the .ptx and .sass files)
"""
import argparse
import collections
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from numba import cuda, types

from cryokern.kernels import conv, loss, reduce

F32 = types.float32[::1]
FORWARD_SIG = (F32, types.float32[:, :, :, ::1], F32, F32, F32, types.int64, types.int64,
               types.int64)
WEIGHTS_SIG = (F32, F32, types.float32[:, :, ::1], types.float32[:, :, ::1], types.int64,
               types.int64, types.int64)
LOSS_SIG = (F32, F32, types.float32, F32, types.float32[:, :, ::1], types.int64, types.int64,
            types.int64, types.int64, types.int64, types.int64, types.boolean)
FOLD_SIG = (F32, types.float64[:, ::1], F32, types.float64[:, ::1], types.int64, types.int64)
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def kernels():
    """(label, python function, signature, register cap) of the default network's kernels."""
    for cin, cout, relu, masked, transposed, label in [
            (1, 16, True, False, False, "forward 1->16"),
            (16, 16, True, False, False, "forward 16->16"),
            (16, 1, False, False, False, "forward 16->1"),
            (16, 16, False, True, True, "backward-data 16->16"),
            (1, 16, False, True, True, "backward-data 16->1 layer")]:
        kernel = conv._forward_kernel(cin, cout, relu, masked, transposed)[0]
        cap = conv.forward_variant(cin, cout, transposed, masked)[1]
        yield label, kernel.py_func, FORWARD_SIG, cap
    for cin, cout in [(1, 16), (16, 16), (16, 1)]:
        variant = conv.weights_variant(cin, cout)
        kernel = conv._weights_kernel(cin, cout, variant)[0]
        yield f"weights {cin}->{cout}", kernel.py_func, WEIGHTS_SIG, variant.max_registers
    yield "loss", loss._loss_kernel().py_func, LOSS_SIG, None
    yield "fold tiles (32, 16)", reduce._fold_tiles((32, 16)).py_func, FOLD_SIG, None


def hot_block(sass):
    """Opcode counts of the basic block (a run between branches and branch targets) with the
    most FFMA, or the longest where none has any."""
    lines = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines()
             for m in [INSTRUCTION.search(line)] if m]
    cuts = {0}
    for address, op, line in lines:
        if op in ("BRA", "EXIT"):
            cuts.add(address + 16)
            target = re.search(r"BRA\s+(0x[0-9a-f]+)", line)
            if target:
                cuts.add(int(target.group(1), 16))
    blocks = collections.defaultdict(collections.Counter)
    edges = sorted(cuts)
    for address, op, _ in lines:
        start = max(e for e in edges if e <= address)
        blocks[start][op] += 1
    return max(blocks.values(), key=lambda c: (c["FFMA"], sum(c.values())))


def find_cuobjdump():
    """On PATH, or from the nvidia-cuda-cuobjdump wheel."""
    for directory in sys.path:
        candidate = pathlib.Path(directory) / "nvidia" / "cu13" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    return shutil.which("cuobjdump")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="directory for the .ptx and .sass files")
    args = ap.parse_args()
    cuobjdump = find_cuobjdump()
    if shutil.which("ptxas") is None or cuobjdump is None:
        sys.exit("needs ptxas on PATH and cuobjdump (pip install nvidia-cuda-cuobjdump)")
    out = pathlib.Path(args.keep or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'kernel':26s} {'regs':>4s} {'spill B':>7s} {'hot block':>9s} {'FFMA':>5s} "
          f"{'LDS':>4s}  other")
    for label, fn, sig, cap in kernels():
        name = out / re.sub(r"\W+", "_", label)
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        name.with_suffix(".ptx").write_text(ptx)
        flags = ["-maxrregcount", str(cap)] if cap else []
        info = subprocess.run(["ptxas", "-arch=sm_90", "-O3", "-v", *flags, str(name) + ".ptx",
                               "-o", str(name) + ".cubin"], capture_output=True, text=True,
                              check=True).stderr
        sass = subprocess.run([cuobjdump, "-sass", str(name) + ".cubin"], capture_output=True,
                              text=True, check=True).stdout
        name.with_suffix(".sass").write_text(sass)
        regs = re.search(r"Used (\d+) registers", info).group(1)
        spill = re.search(r"(\d+) bytes spill stores", info).group(1)
        block = hot_block(sass)
        other = ", ".join(f"{op} {n}" for op, n in block.most_common(6)
                          if op not in ("FFMA", "LDS"))
        print(f"{label:26s} {regs:>4s} {spill:>7s} {sum(block.values()):9d} {block['FFMA']:5d} "
              f"{block['LDS']:4d}  {other}")


if __name__ == "__main__":
    main()
