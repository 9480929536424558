"""The default network's kernels as sm_90a SASS, on a machine without a GPU: registers, spills
and the instruction mix of each kernel's hot basic block (the most FFMA: its loop, written out).

How this found the signed-index wrap-around (NOTES v16): numba compiles each kernel to PTX
(`cuda.compile_ptx`, NVVM), ptxas assembles it for sm_90a, cuobjdump prints the SASS. Needs
ptxas on PATH (the CUDA toolkit's) and the wheels nvidia-cuda-nvrtc, nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm (cuobjdump -sass runs nvdisasm; development tools, not run-time
dependencies). The device JIT may allocate registers a little
differently; bench/step.py prints the device's figures.
With --wide, the 48-wide U-Net's hot convolutions instead (LeakyReLU 0.1 epilogues, the
concatenation 48+48 -> 48), and for each the mix of its innermost loop with the most FFMA
(nested loops left out: the edge tiles' rolled rows, the weight staging's loop), as static
counts of instructions (a loop's rarely taken branches, e.g. the next channel's staging
loads, are counted once like the rest), and its global loads after its last FFMA ("late
LDG": the next turn waits for them, NOTES v34). --geometry R,G,GB [--cap N] builds the forward and
backward-data kernels in that geometry (conv._forward_kernel's `geometry`) instead, and
--early-loads with the next channel's loads without a branch (`early_loads`); both leave the
weight gradients out.
With --phase, the decoders' convolutions of an upsampled input in phase form (phase_conv.py's
kernel and the forward that continues its chains over the skip's channels) with their mix.
Usage: python bench/inspect_sass.py [--keep DIR] [--only SUBSTRING..]
           [--wide [--geometry R,G,GB] [--cap N] [--early-loads]] [--phase]
       (DIR keeps the .ptx and .sass files; --only: the kernels whose label holds one)
"""
import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from numba import cuda, types

from cryokern.kernels import conv, loss, reduce

import offline  # bench/offline.py: device functions compiled without a GPU

F32 = types.float32[::1]
FORWARD_SIG = (F32, types.float32[:, :, :, ::1], F32, F32, F32, types.int64, types.int64,
               types.int64)
FORWARD_TWO_SIG = (F32, F32, types.float32[:, :, :, ::1], F32, F32, F32, F32, types.int64,
                   types.int64, types.int64)       # a concatenation's: x, x2, .., y, y2, ..
WEIGHTS_SIG = (F32, F32, types.float32[:, :, ::1], types.float32[:, :, ::1], types.int64,
               types.int64, types.int64)
WEIGHTS_TWO_SIG = (F32,) + WEIGHTS_SIG
PHASE_SIG = (F32, F32, F32, F32, types.int64, types.int64, types.int64)   # x, pw, b, y, ..
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


def wide_kernels(geometry=None, cap=None, early_loads=None):
    """(label, python function, signature, register cap) of the 48-wide U-Net's hot
    convolutions: its forward and backward-data kernels in `geometry` (with register cap
    `cap`) where given, else forward_variant's; `early_loads` where given, else the default's."""
    import numpy as np
    slope = np.float32(0.1)
    for cin, cout, masked, transposed, first, label in [
            (48, 48, False, False, None, "forward 48->48 leaky"),
            (96, 48, False, False, 48, "forward 48+48->48 leaky"),
            (48, 48, True, True, None, "backward-data 48->48 masked")]:
        variant = conv.forward_variant(cin, cout, transposed, masked, first)
        if geometry is not None:
            variant = geometry, cap
        kernel = conv._forward_kernel(cin, cout, False, masked, transposed, leaky_slope=slope,
                                      first=first, geometry=variant[0],
                                      max_registers=variant[1], early_loads=early_loads)[0]
        label += ("" if geometry is None else f" {geometry}") + (
            "" if early_loads is None else " early" if early_loads else " late")
        yield label, kernel.py_func, FORWARD_SIG if first is None else FORWARD_TWO_SIG, \
            variant[1]
    if geometry is not None or early_loads is not None:
        return              # (the weight gradients take neither)
    for cin, cout, first in [(48, 48, None), (96, 48, 48)]:
        variant = conv.weights_variant(cin, cout)
        block = conv.weights_block(cin, cout, variant)
        kernel = conv._weights_kernel(cin, cout, variant, first,
                                      None if block == (cout, cin) else block)[0]
        yield (f"weights {cin}->{cout}" if first is None else "weights 48+48->48",
               kernel.py_func, WEIGHTS_SIG if first is None else WEIGHTS_TWO_SIG,
               variant.max_registers)


def phase_kernels():
    """(label, python function, signature, register cap) of the decoders' convolutions of an
    upsampled input (numerics §12): the phase part (phase_conv.py) and the continuation over
    the skip's channels (a forward from its output), for the 48-wide U-Net's 48 + 48 -> 48 and
    the N2N U-Net's 96 + 1 -> 64 and 96 + 48 -> 96."""
    import numpy as np

    from cryokern.kernels import phase_conv
    slope = np.float32(0.1)
    for up, skip, cout in [(48, 48, 48), (96, 1, 64), (96, 48, 96)]:
        kernel = phase_conv._phase_kernel(up, cout)[0]
        yield (f"phase {up} up -> {cout} {phase_conv.phase_geometry(up)}", kernel.py_func,
               PHASE_SIG, phase_conv.PHASE_MAX_REGISTERS)
        geometry, cap = conv.forward_variant(skip, cout, False, False, from_output=True)
        kernel = conv._forward_kernel(skip, cout, False, False, False, leaky_slope=slope,
                                      w_first=up, from_output=True)[0]
        yield (f"continuation {skip} -> {cout} from y {geometry}", kernel.py_func, FORWARD_SIG,
               cap)


def instructions(sass):
    """(address, opcode, line) of each SASS instruction."""
    return [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines()
            for m in [INSTRUCTION.search(line)] if m]


def with_width(op, line):
    """A memory opcode with its vector width (LDS.128), others as they are."""
    width = re.search(op + r"\S*?\.(64|128)\b", line) if op in ("LDS", "LDG", "STS", "STG") \
        else None
    return op + ("." + width.group(1) if width else "")


def hot_loop(sass):
    """(opcode counts, global loads after the last FFMA) of the innermost loop (a backward
    branch's range) holding the most FFMA, without the loops nested in it, or (None, 0) where
    no loop holds an FFMA. Loads after the fmas wait out their latency at the next turn."""
    lines = instructions(sass)
    loops = [(int(t.group(1), 16), address) for address, op, line in lines if op == "BRA"
             for t in [re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", line)]
             if t and int(t.group(1), 16) <= address]
    best, late = None, 0
    for start, end in loops:
        nested = [(a, b) for a, b in loops if start <= a and b <= end and (a, b) != (start, end)]
        body = [(op, line) for address, op, line in lines if start <= address <= end
                and not any(a <= address <= b for a, b in nested)]
        mix = collections.Counter(with_width(op, line) for op, line in body)
        if mix["FFMA"] and (best is None or mix["FFMA"] > best["FFMA"]):
            last = max(i for i, (op, _) in enumerate(body) if op == "FFMA")
            best, late = mix, sum(op == "LDG" for op, _ in body[last:])
    return best, late


def hot_block(sass):
    """Opcode counts of the basic block (a run between branches and branch targets) with the
    most FFMA, or the longest where none has any."""
    lines = instructions(sass)
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
    ap.add_argument("--wide", action="store_true",
                    help="the 48-wide U-Net's convolutions, with their hot loops' mix")
    ap.add_argument("--phase", action="store_true",
                    help="the decoders' convolutions of an upsampled input (phase form), with "
                         "their hot loops' mix")
    ap.add_argument("--geometry", help="R,G,GB: --wide's forward and backward-data geometry")
    ap.add_argument("--cap", type=int, help="--geometry's register cap")
    ap.add_argument("--early-loads", choices=("on", "off"),
                    help="--wide's forward and backward-data with conv's early_loads on or off "
                         "(default: each kernel's default)")
    ap.add_argument("--only", nargs="+", default=[""], metavar="SUBSTRING",
                    help="the kernels whose label holds one of these (default: all)")
    args = ap.parse_args()
    geometry = None if args.geometry is None else tuple(int(v) for v in args.geometry.split(","))
    cuobjdump = find_cuobjdump()
    if shutil.which("ptxas") is None or cuobjdump is None:
        sys.exit("needs ptxas on PATH and cuobjdump (pip install nvidia-cuda-cuobjdump)")
    # nvdisasm from its wheel sits beside cuobjdump's
    beside_cuobjdump = dict(os.environ, PATH=os.pathsep.join(
        [str(pathlib.Path(cuobjdump).parent), os.environ.get("PATH", "")]))
    out = pathlib.Path(args.keep or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    if args.wide or args.phase:
        print(f"{'kernel':40s} {'regs':>4s} {'spill B':>7s} {'loop':>5s} {'FFMA':>5s} "
              f"{'FFMA %':>6s} {'LDS':>4s} {'FFMA/LDS':>8s} {'late LDG':>4s}  other")
    else:
        print(f"{'kernel':26s} {'regs':>4s} {'spill B':>7s} {'hot block':>9s} {'FFMA':>5s} "
              f"{'LDS':>4s}  other")
    early = None if args.early_loads is None else args.early_loads == "on"
    offline.without_device((9, 0))
    chosen = phase_kernels() if args.phase else \
        wide_kernels(geometry, args.cap, early) if args.wide else kernels()
    for label, fn, sig, cap in chosen:
        if not any(part in label for part in args.only):
            continue
        name = out / re.sub(r"\W+", "_", label)
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        name.with_suffix(".ptx").write_text(ptx)
        flags = ["-maxrregcount", str(cap)] if cap else []
        info = subprocess.run(["ptxas", "-arch=sm_90a", "-O3", "-v", *flags, str(name) + ".ptx",
                               "-o", str(name) + ".cubin"], capture_output=True, text=True,
                              check=True).stderr
        sass = subprocess.run([cuobjdump, "-sass", str(name) + ".cubin"], capture_output=True,
                              text=True, check=True, env=beside_cuobjdump).stdout
        name.with_suffix(".sass").write_text(sass)
        regs = re.search(r"Used (\d+) registers", info).group(1)
        spill = re.search(r"(\d+) bytes spill stores", info).group(1)
        if args.wide or args.phase:
            loop, late = hot_loop(sass)
            if loop is None:        # one input channel: no loop, its block written out
                loop, late = hot_block(sass), 0
            loads = sum(n for op, n in loop.items() if op.startswith("LDS"))
            other = ", ".join(f"{op} {n}" for op, n in loop.most_common(9) if op != "FFMA")
            print(f"{label:40s} {regs:>4s} {spill:>7s} {sum(loop.values()):5d} "
                  f"{loop['FFMA']:5d} {100 * loop['FFMA'] / sum(loop.values()):6.1f} "
                  f"{loads:4d} {loop['FFMA'] / max(loads, 1):8.1f} {late:4d}  {other}",
                  flush=True)
            continue
        block = hot_block(sass)
        other = ", ".join(f"{op} {n}" for op, n in block.most_common(6)
                          if op not in ("FFMA", "LDS"))
        print(f"{label:26s} {regs:>4s} {spill:>7s} {sum(block.values()):9d} {block['FFMA']:5d} "
              f"{block['LDS']:4d}  {other}")


if __name__ == "__main__":
    main()
