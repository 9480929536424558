"""Where a cold start's compile time goes, kernel by kernel and stage by stage, on a machine
without a GPU.

Why: on a cold cache the first step waits for the longest single kernel compilation
(precompile.py runs the jobs side by side; NOTES v24: backward-data 1->16 took 21.0 s alone on
the H200 host). A numba kernel compiles in three stages, and each job is timed here as the
device's dispatcher runs them (numba-cuda's _Kernel): numba's front end (bytecode to numba IR,
its untyped passes such as SSA reconstruction, typing, lowering to LLVM IR: `compile_cuda`),
NVVM (LLVM IR to PTX, compute_90a as on an H100/H200) and the PTX's assembly for sm_90a. On
the GPU the last is the driver's JIT at the kernel's load; here ptxas stands in for it (when on
PATH), and also says whether the kernel keeps within its register cap without spills. Times are
the process's CPU seconds (ptxas's: its own), so that other work on a shared machine does not
count; with --compare, whether each kernel's PTX is that of an earlier run (a change of the
generated code's form that leaves the PTX alone cannot change the kernel's speed).

Needs NVVM (the CUDA toolkit's libnvvm) and the nvidia-cuda-nvrtc wheel (numba-cuda asks NVRTC
for the architecture); no GPU. Kernels are generated into a fresh cache directory.
Usage: python bench/compile_time.py [--channels 1,16,16,1 | --arch unet [--unet-widths 48,...]]
                                    [--only SUBSTRING] [--keep DIR] [--compare EARLIER_KEEP_DIR]
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import nets  # noqa: E402  (bench/nets.py: the networks a benchmark names)
import offline  # noqa: E402  (bench/offline.py: device functions compiled without a GPU)

CC = (9, 0, "a")      # what the dispatcher asks for on compute capability 9.0


def job_kernels(job):
    """(label, dispatcher, argument types, register cap) of the generated kernels that one of
    precompile.py's jobs launches, typed as the launches type them (conv.py, loss.py, reduce.py)."""
    from numba import types

    from cryokern import contract, precompile
    from cryokern.kernels import conv, loss, reduce
    f32, f64 = types.float32[::1], types.float64[:, ::1]
    part = types.float32[:, :, ::1]
    ints = lambda k: (types.int64,) * k
    name, args, kwargs = job[0]
    shapes = [a[1] for a in args if a[0] == "array"]
    kw = dict(kwargs)
    array = lambda key: kw[key][1] if kw.get(key, ("value", None))[0] == "array" else None
    value = lambda key, default=None: kw[key][1] if key in kw and kw[key][0] != "array" \
        else default
    label = precompile.label(job)
    if name in ("conv2d_forward", "conv2d_backward_data"):
        transposed = name == "conv2d_backward_data"
        masked = array("relu_output") is not None
        relu = value("relu", False)
        slope = value("leaky_slope")
        cin, cout = (shapes[0][1], shapes[1][1]) if transposed else (shapes[0][1], shapes[1][0])
        first = value("split") if transposed else (
            None if array("x2") is None else shapes[0][1])    # §12: channels in two arrays
        if not transposed and first is not None:
            cin = first + array("x2")[1]
        kernel = conv._forward_kernel(cin, cout, relu, masked, transposed,
                                      leaky_slope=None if slope is None else
                                      contract.leaky_slope(slope), first=first)[0]
        cap = conv.forward_variant(cin, cout, transposed, masked, first)[1]
        two = () if first is None else (f32,)
        yield label, kernel, (f32,) + two + (types.float32[:, :, :, ::1], f32, f32, f32) + two \
            + ints(3), cap
    elif name == "conv2d_backward_weights":
        cout, cin = shapes[0][1], shapes[1][1]
        first = None if array("x2") is None else cin
        if first is not None:
            cin += array("x2")[1]
        variant = conv.weights_variant(cin, cout)
        block = conv.weights_block(cin, cout, variant)
        kernel = conv._weights_kernel(cin, cout, variant, first,
                                      None if block == (cout, cin) else block)[0]
        two = () if first is None else (f32,)
        yield label, kernel, (f32, f32) + two + (part, part) + ints(3), variant.max_registers
    elif name == "reduce.fold_tiles":
        kcs = tuple(reduce._chains(sums[1][1]) for _, (_, sums) in args)
        fold_args = sum(((f32, types.uint32[::1], f64) if kc == 1 else (f32, f64) for kc in kcs),
                        ())
        yield (label, reduce._fold_tiles(kcs),
               fold_args + ints(len(kcs)) + ((types.int64,) if 1 in kcs else ()), None)
    elif name == "mse_loss_and_grad":
        yield (label, loss._loss_kernel(), (f32, f32, types.float32, f32, part) + ints(6) +
               (types.boolean,), None)


def compile_stages(kernel, argtypes, cap, ptx_path):
    """CPU seconds of each stage ({'front end', 'NVVM', 'ptxas'}), the front end's three slowest
    passes, the PTX, and ptxas's registers and spill bytes (None without ptxas)."""
    from numba import types
    from numba.cuda import compiler
    from numba.cuda.cudadrv import nvvm
    offline.without_device(CC)      # the kernel's device functions compile at its typing
    seconds = {}
    start = time.process_time()
    cres = compiler.compile_cuda(kernel.py_func, types.void, argtypes,
                                 nvvm_options={"fastmath": False, "opt": 3}, cc=CC[:2],
                                 max_registers=cap)
    lib = cres.library
    entry = lib.get_function(cres.fndesc.llvm_func_name)
    compiler.kernel_fixup(entry, False)
    nvvm.set_launch_bounds(entry, None)
    seconds["front end"] = time.process_time() - start
    passes = sorted(((t.init + t.run + t.finalize, name.split("_", 1)[1])
                     for timings in cres.metadata["pipeline_times"].values()
                     for name, t in timings.items()), reverse=True)[:3]
    start = time.process_time()
    ptx = lib.get_asm_str(cc=CC)
    seconds["NVVM"] = time.process_time() - start
    ptx_path.write_text(ptx)
    registers = spills = None
    if shutil.which("ptxas"):
        start = os.times()
        info = subprocess.run(["ptxas", "-arch=sm_{}{}{}".format(*CC), "-O3", "-v",
                               *(["-maxrregcount", str(cap)] if cap else []), str(ptx_path),
                               "-o", str(ptx_path.with_suffix(".cubin"))],
                              capture_output=True, text=True, check=True).stderr
        end = os.times()
        seconds["ptxas"] = end.children_user + end.children_system - (
            start.children_user + start.children_system)
        registers = int(re.findall(r"Used (\d+) registers", info)[-1])
        spills = int(re.findall(r"(\d+) bytes spill stores", info)[-1])
    return seconds, passes, ptx, registers, spills


def normalized_ptx(ptx):
    """The PTX without what differs between two compilations of the same code: the kernel's
    mangled name (the generated module's hash is in it), numba's shared-array numbering, and
    numba's environment pointers (a `.common .global .u64` declared for each function, the
    kernel's and each inlined device function's, that no instruction reads: codegen.py's
    device functions add one each)."""
    ptx = re.sub(r"\.common \.global \.align 8 \.u64 _ZN08NumbaEnv\w+;\n", "", ptx)
    ptx = re.sub(r"_ZN\w*cryokern_generated_\w+", "KERNEL", ptx)
    return re.sub(r"_cudapy_smem_\d+", "SMEM", ptx)


def compared(ptx, earlier):
    """'same', or how many lines differ from the PTX kept in file `earlier`."""
    if not earlier.exists():
        return "-"
    a, b = normalized_ptx(ptx).splitlines(), normalized_ptx(earlier.read_text()).splitlines()
    if a == b:
        return "same"
    import difflib
    return str(sum(1 for line in difflib.unified_diff(a, b, n=0, lineterm="")
                   if line[:1] in "+-" and line[:3] not in ("+++", "---")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    nets.add_network_options(ap)     # --arch unet --unet-widths ...: a U-Net's jobs
    ap.add_argument("--only", help="jobs whose label contains this, e.g. 'backward_data 1->16'")
    ap.add_argument("--keep", help="directory for the generated sources, .ptx and .cubin files")
    ap.add_argument("--compare", help="a --keep directory of an earlier run: whether each "
                                      "kernel's PTX is the same (else how many lines differ)")
    args = ap.parse_args()
    out = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="compile_time-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ["CRYOKERN_CACHE"] = str(out / "cache")        # a cold cache: generated here
    started = time.process_time()
    from numba import config
    if config.ENABLE_CUDASIM:
        sys.exit("compile_time.py times the real compiler: unset NUMBA_ENABLE_CUDASIM")
    from cryokern import precompile
    from cryokern.step import OptimizerConfig
    spec, = nets.chosen_networks(ap, args)
    jobs = [job for job in precompile.jobs(spec.network, OptimizerConfig())
            if job != precompile.HOST_JOB and len(job) == 1 and
            (not args.only or args.only in precompile.label(job))]
    print(f"network {spec.spec}, sm_{''.join(map(str, CC))}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}; imports {time.process_time() - started:.1f} "
          f"CPU s; CPU seconds below; cache {out / 'cache'}")
    print(f"{'kernel':32s} {'lines':>5s} {'front':>6s} {'NVVM':>5s} {'ptxas':>5s} {'PTX KB':>6s} "
          f"{'regs':>4s} {'spill':>5s} {'PTX':>5s}  slowest front-end passes (wall s)")
    totals = []
    compiled = set()
    for job in jobs:
        total = 0.0
        for label, kernel, argtypes, cap in job_kernels(job):
            source = pathlib.Path(kernel.py_func.__code__.co_filename)
            name = source.stem.rsplit("_", 1)[0]   # the generated module's, without its hash
            if name in compiled:                   # (an older job list's duplicates)
                continue
            compiled.add(name)
            lines = len(source.read_text().splitlines())
            seconds, passes, ptx, registers, spills = compile_stages(
                kernel, argtypes, cap, out / f"{name}.ptx")
            total += sum(seconds.values())
            same = compared(ptx, pathlib.Path(args.compare) / f"{name}.ptx") if args.compare \
                else "-"
            print(f"{label:32s} {lines:5d} {seconds['front end']:6.1f} {seconds['NVVM']:5.1f} "
                  f"{seconds.get('ptxas', float('nan')):5.1f} {len(ptx) / 1024:6.0f} "
                  f"{registers or '-':>4} {'-' if spills is None else spills:>5} {same:>5}  " +
                  ", ".join(f"{n} {t:.1f}" for t, n in passes), flush=True)
        totals.append((total, precompile.label(job)))
    print("jobs, longest first (CPU s, all stages): " +
          ", ".join(f"{label} {t:.1f}" for t, label in sorted(totals, reverse=True)))


if __name__ == "__main__":
    main()
