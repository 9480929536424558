"""Training-step benchmark: cryokern's step beside PyTorch's eager step of the same network with
the same weights and batch, same process.

Median of timed steps after warm-up (CUDA events on the GPU), each step bringing its loss to the
host before the next starts (cryokern's step(); PyTorch's loss.item()); then both pipelined as
the training loop runs them, each loss read only after the next step is queued (cryokern's
launch(); PyTorch's item() one step late). PyTorch (cryokern.torch_mirror, cuDNN) three ways:
fp32 with TF32 off (the peer of the acceptance), TF32 convolutions (PyTorch's default, what
Topaz gets) and bf16 autocast (TF32 allowed, the loss in fp32).

Networks: --arch chain (default: the seed's 1,16,16,1, SGD momentum 0.9 lr 0.01) or --arch unet
(--unet-widths, --residual; Adam lr 1e-3) or --arch n2n (the Noise2Noise paper's U-Net), or
--preset NAME (bench/nets.py: unet48, the 48-wide U-Net; n2n, the paper's; lean,
16,24,32,48,64; unets, all three in one run). A U-Net's kernels are compiled first, in
worker processes (cryokern.precompile), outside the timing.

Device memory: PyTorch's torch.cuda.max_memory_allocated() over the timed steps, after
reset_peak_memory_stats (its caching allocator's tensors: batch, weights, gradients, Adam's
state, activations, cuDNN workspaces; not the CUDA context). cryokern's two ways: "held", the
drop of the driver's free memory (cuMemGetInfo) from before the step was built to after it was
timed (every allocation in its granularity, the CUDA graphs and loaded modules included), and
"arrays", the bytes of the arrays the step holds (batch, parameters, gradients, optimizer
state, one pass's work arrays, per-image float64 sums). The table's GiB is "held" (cryokern)
and the peak (PyTorch).

The chain also times each kernel of its 16 -> 16 layer alone (TFLOP/s, 2 FLOP per
multiply-add) and prints their registers; every network gets a step breakdown (median ms per
kernel call, summed over calls of the same kernel and shape, largest first).

--device cpu runs the compiled CPU backend and PyTorch on the CPU (wall-clock times, no device
memory): a smoke test of this script at toy sizes, not a figure.
Usage: python bench/step.py [--preset unets] [--arch unet --unet-widths 16,24,32,48,64]
       [--batch 4] [--size 1024] [--steps N] [--json FILE] [--device gpu|cpu]
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time

import numpy as np
from numba import cuda

from cryokern import kernels as K
from cryokern.backends import Eager, get_backend
from cryokern.model import PooledNetwork, init_params
from cryokern.step import OptimizerConfig, TrainStep
from nets import add_network_options, chosen_networks, step_flops

TORCH_MODES = ("fp32", "tf32", "bf16")
TORCH_LABELS = {"fp32": "PyTorch eager fp32 (TF32 off)", "tf32": "PyTorch eager TF32",
                "bf16": "PyTorch eager bf16 autocast"}


def _device_name():
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else name


class CudaClock:
    """Marks on the legacy default stream (PyTorch queues its work there too)."""

    @staticmethod
    def mark():
        event = cuda.event(timing=True)
        event.record()
        return event

    @staticmethod
    def ms(start, stop):
        stop.synchronize()
        return cuda.event_elapsed_time(start, stop)

    synchronize = staticmethod(lambda: cuda.synchronize())


class HostClock:
    """Wall-clock marks, for the CPU backends (they compute before returning)."""
    mark = staticmethod(time.perf_counter)
    ms = staticmethod(lambda start, stop: (stop - start) * 1e3)
    synchronize = staticmethod(lambda: None)


def event_times(fn, steps, warmup=3, clock=CudaClock):
    """(median, min, max) ms of `steps` calls of fn() after `warmup`, each between two marks
    of `clock` (CUDA events on the legacy default stream by default)."""
    for _ in range(warmup):
        fn()
    clock.synchronize()
    times = []
    for _ in range(steps):
        start = clock.mark()
        fn()
        times.append(clock.ms(start, clock.mark()))
    return statistics.median(times), min(times), max(times)


def pipelined_ms(launch, steps, warmup=3, clock=CudaClock):
    """Mean ms per step when each step's loss is read only after the next step is queued, as
    the training loop does: marks around `steps` steps. launch() queues a step and returns an
    object whose result() waits for its loss."""
    for _ in range(warmup):
        launch().result()
    clock.synchronize()
    start = clock.mark()
    previous = launch()
    for _ in range(steps - 1):
        current = launch()
        previous.result()
        previous = current
    stop = clock.mark()
    previous.result()
    return clock.ms(start, stop) / steps


def resource_report():
    """Registers and local memory (spills) per thread of the 16 -> 16 kernels just compiled."""
    from cryokern.kernels import conv
    kernels = {"forward 16->16 relu": conv._forward_kernel(16, 16, True, False, False)[0],
               "backward-data 16->16 masked": conv._forward_kernel(16, 16, False, True, True)[0],
               "weight grads 16->16": conv._weights_kernel(16, 16, conv.weights_variant(16, 16))[0]}
    for name, k in kernels.items():
        for overload in k.overloads.values():
            print(f"  {name:30s} registers {overload.regs_per_thread:4d}  "
                  f"local bytes {overload.local_mem_per_thread:5d}")


class _TimedOps:
    """The GPU kernel functions, each call bracketed by CUDA events (for the step breakdown)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(K, name)

        def timed(*args, **kwargs):
            start, stop = cuda.event(timing=True), cuda.event(timing=True)
            start.record()
            out = fn(*args, **kwargs)
            stop.record()
            shape = "x".join(map(str, args[0].shape))
            if name in ("conv2d_forward", "conv2d_backward_data"):   # its weights: Co x Ci
                shape += " w" + "x".join(map(str, args[1].shape[:2]))
            self.calls.append((f"{name} {shape}", start, stop))
            return out
        return timed


def timed_backend():
    """A GPU backend whose kernel functions record each call between CUDA events (ops.calls),
    launched as they are (no graph)."""
    timed = get_backend("gpu")              # a new Backend object: its ops may be replaced
    timed.name, timed.ops, timed.recorder = "gpu-timed", _TimedOps(), Eager
    return timed


def breakdown(timed, run, repeats=10):
    """[(kernel and its first argument's shape, calls per run, median ms per run summed over
    those calls)] of run() on `timed` (timed_backend()), largest first (launch overhead
    included)."""
    ops = timed.ops
    run()
    per_call = None
    for _ in range(repeats):
        ops.calls.clear()
        run()
        cuda.synchronize()
        times = [cuda.event_elapsed_time(a, b) for _, a, b in ops.calls]
        per_call = [[t] for t in times] if per_call is None else \
            [acc + [t] for acc, t in zip(per_call, times)]
    grouped = {}
    for (name, _, _), t in zip(ops.calls, per_call):
        calls, ms = grouped.get(name, (0, 0.0))
        grouped[name] = (calls + 1, ms + statistics.median(t))
    return sorted(((name, c, ms) for name, (c, ms) in grouped.items()), key=lambda r: -r[2])


def step_breakdown(net, params, optimizer, x, y, steps=10):
    """breakdown() of the training step."""
    timed = timed_backend()
    trainer = TrainStep(timed, net, params, optimizer)
    return breakdown(timed, lambda: trainer(x, y), steps)


def array_bytes(*things):
    """Bytes of the arrays in nested dicts, lists and tuples (None and scalars count 0)."""
    total = 0
    for thing in things:
        if isinstance(thing, dict):
            total += array_bytes(*thing.values())
        elif isinstance(thing, (list, tuple)):
            total += array_bytes(*thing)
        elif hasattr(thing, "nbytes"):
            total += int(thing.nbytes)
    return total


def free_device_bytes():
    """The driver's free device memory, after numba has freed what it only queued to free
    (a previous network's arrays)."""
    gc.collect()
    context = cuda.current_context()
    if hasattr(context, "deallocations"):       # numba's CUDA simulator has none
        context.deallocations.clear()
    return context.get_memory_info()[0]


def optimizer_for(network):
    """The step's optimizer: train's defaults for the chain (SGD momentum), Adam lr 1e-3 for
    the U-Net (as the issue's PyTorch probe trained it)."""
    if isinstance(network, PooledNetwork):
        return OptimizerConfig("adam", 1e-3)
    return OptimizerConfig("sgd", 0.01, momentum=0.9)


@contextlib.contextmanager
def torch_mode(torch, mode, device):
    """PyTorch set for `mode`: fp32 (TF32 off), tf32 (TF32 convolutions and matmuls) or bf16
    (autocast to bfloat16, TF32 allowed); the flags restored after."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    tf32 = mode != "fp32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def torch_device(torch, on_gpu):
    return torch.device("cuda" if on_gpu else "cpu")


def torch_peak(torch, device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def torch_reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def torch_step_rows(network, params, optimizer, noisy, clean, steps, clock, on_gpu):
    """{mode: {median_ms, min_ms, max_ms, peak_bytes[, pipelined_ms]}} of PyTorch's eager step of
    the same network, weights, optimizer and batch, fresh weights and optimizer per mode."""
    import torch
    from cryokern.torch_mirror import torch_network
    device = torch_device(torch, on_gpu)
    x, y = torch.from_numpy(noisy).to(device), torch.from_numpy(clean).to(device)
    rows = {}
    for mode in TORCH_MODES:
        net = torch_network(network, params, device=device)
        if optimizer.kind == "adam":
            opt = torch.optim.Adam(net.parameters(), lr=optimizer.lr,
                                   betas=(optimizer.beta1, optimizer.beta2), eps=optimizer.eps)
        else:
            opt = torch.optim.SGD(net.parameters(), lr=optimizer.lr, momentum=optimizer.momentum)
        with torch_mode(torch, mode, device):
            def launch():
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(net(x).float(), y)
                loss.backward()
                opt.step()
                return loss.detach()

            def step():
                return launch().item()

            for _ in range(3):
                step()
            torch_reset_peak(torch, device)
            med, lo, hi = event_times(step, steps, warmup=0, clock=clock)
            rows[mode] = {"median_ms": med, "min_ms": lo, "max_ms": hi,
                          "peak_bytes": torch_peak(torch, device)}
            if mode == "fp32":
                class Pending:
                    def __init__(self):
                        self.loss = launch()

                    def result(self):
                        return self.loss.item()
                rows[mode]["pipelined_ms"] = pipelined_ms(Pending, steps, clock=clock)
        del net, opt
        torch_reset_peak(torch, device)
    return rows


def chain_kernel_rows(params, n, s, rng):
    """The 16 -> 16 layer's kernels alone: (name, median, min, max, TFLOP/s)."""
    a16 = cuda.to_device(rng.standard_normal((n, 16, s, s)).astype(np.float32))
    g16 = cuda.to_device(rng.standard_normal((n, 16, s, s)).astype(np.float32))
    w16 = cuda.to_device(params["layers.1.weight"])
    b16 = cuda.to_device(params["layers.1.bias"])
    out = cuda.device_array((n, 16, s, s), np.float32)
    gw, gb = cuda.device_array((16, 16, 3, 3), np.float32), cuda.device_array(16, np.float32)
    kernels = [
        ("conv 16->16 forward+relu", lambda: K.conv2d_forward(a16, w16, b16, relu=True, out=out)),
        ("conv 16->16 backward-data+mask",
         lambda: K.conv2d_backward_data(g16, w16, relu_output=a16, out=out)),
        ("conv 16->16 weight grads", lambda: K.conv2d_backward_weights(g16, a16, out=(gw, gb))),
    ]
    flops = 2 * n * s * s * 16 * 16 * 9
    rows = []
    for name, fn in kernels:
        med, lo, hi = event_times(fn, 20)
        rows.append((name, med, lo, hi, flops / med / 1e9))
    return rows


def bench_network(spec, args, on_gpu, torch_required):
    """One network's figures (a dict, also printed as they come)."""
    net = spec.network
    n, s = args.batch, args.size
    steps = args.steps or (20 if isinstance(net, PooledNetwork) else 40)
    clock = CudaClock if on_gpu else HostClock
    rng = np.random.default_rng(0)
    clean = rng.random((n, 1, s, s)).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    params = init_params(net, 0)
    optimizer = optimizer_for(net)
    backend = get_backend("gpu" if on_gpu else "cpu")
    if on_gpu:
        from cryokern import precompile
        precompile.start(net, optimizer).wait()
        free_before = free_device_bytes()
    trainer = TrainStep(backend, net, params, optimizer, pass_pixels=args.pass_pixels)
    x, y = backend.to_device(noisy), backend.to_device(clean)
    med, lo, hi = event_times(lambda: trainer(x, y), steps, clock=clock)
    result = {"network": spec.spec, "label": net.label(), "params": net.param_count(), "n": n,
              "optimizer": f"{optimizer.kind} lr {optimizer.lr:g}", "steps": steps,
              "step_gflop_per_image": step_flops(net, s, s) / 1e9,
              "passes": len(trainer._passes(x.shape)), "pass_pixels": trainer.pass_pixels,
              "cryokern": {"median_ms": med, "min_ms": lo, "max_ms": hi,
                           "pipelined_ms": pipelined_ms(lambda: trainer.launch(x, y)[0], steps,
                                                        clock=clock),
                           "array_bytes": array_bytes(x, y, trainer.params, trainer.grads,
                                                      trainer.state, trainer._workspaces,
                                                      trainer._sums, trainer._sse)}}
    if on_gpu:
        result["cryokern"]["held_bytes"] = free_before - free_device_bytes()
    print(f"  {spec.spec}: cryokern {med:.3f} ms/step", flush=True)
    try:
        result["pytorch"] = torch_step_rows(net, params, optimizer, noisy, clean, steps, clock,
                                            on_gpu)
        print(f"  {spec.spec}: PyTorch fp32 {result['pytorch']['fp32']['median_ms']:.3f} "
              "ms/step", flush=True)
    except ImportError:
        if torch_required:
            raise
    if on_gpu:
        result["breakdown"] = step_breakdown(net, params, optimizer, x, y)
        if not isinstance(net, PooledNetwork) and net.channels[1:3] == (16, 16):
            result["kernels"] = chain_kernel_rows(params, n, s, rng)
    return result


def gib(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2 ** 30:.2f}"


def print_details(r):
    print(f"\n{r['label']} ({r['params']:,} parameters, {r['optimizer']}, "
          f"{r['step_gflop_per_image']:.1f} GFLOP per image per step), {r['steps']} steps, "
          f"{r['passes']} pass(es) of <= {r['pass_pixels']} pixels")
    c = r["cryokern"]
    print(f"  cryokern step median {c['median_ms']:.3f} ms (min {c['min_ms']:.3f}, max "
          f"{c['max_ms']:.3f}); pipelined {c['pipelined_ms']:.3f} ms; arrays "
          f"{gib(c['array_bytes'])} GiB, held {gib(c.get('held_bytes'))} GiB")
    for mode, t in r.get("pytorch", {}).items():
        print(f"  {TORCH_LABELS[mode]:32s} median {t['median_ms']:.3f} ms (min "
              f"{t['min_ms']:.3f}, max {t['max_ms']:.3f}); peak {gib(t['peak_bytes'])} GiB"
              + (f"; pipelined {t['pipelined_ms']:.3f} ms" if "pipelined_ms" in t else ""))
    for name, med, lo, hi, tflops in r.get("kernels", []):
        print(f"  {name:38s} {med:10.3f} {lo:8.3f} {hi:8.3f} {tflops:7.1f} TFLOP/s")
    if "breakdown" in r:
        rows = r["breakdown"]
        print(f"  step breakdown (median ms per step, launch overhead included; "
              f"{min(len(rows), 25)} largest of {len(rows)}):")
        for name, calls, ms in rows[:25]:
            print(f"    {name:60s} x{calls:<3d} {ms:9.3f}")


def print_table(results, header):
    """The short table: ms/step, speed relative to PyTorch fp32 (its ms / this ms), TFLOP/s,
    device memory (cryokern held, PyTorch peak)."""
    print(f"\n{header}")
    print(f"{'network':30s} {'what':34s} {'ms/step':>9s} {'x fp32':>7s} {'TFLOP/s':>8s} "
          f"{'GiB':>6s}")
    for r in results:
        fp32 = r.get("pytorch", {}).get("fp32", {}).get("median_ms")
        flop = r["step_gflop_per_image"] * 1e9 * r["n"]
        c = r["cryokern"]
        rows = [("cryokern step", c["median_ms"], c.get("held_bytes", c["array_bytes"])),
                ("cryokern pipelined", r["cryokern"]["pipelined_ms"], None)]
        rows += [(TORCH_LABELS[m], t["median_ms"], t["peak_bytes"])
                 for m, t in r.get("pytorch", {}).items()]
        for k, (what, ms, nbytes) in enumerate(rows):
            ratio = f"{fp32 / ms:.2f}" if fp32 else "-"
            print(f"{r['network'] if k == 0 else '':30s} {what:34s} {ms:9.3f} {ratio:>7s} "
                  f"{flop / ms / 1e9:8.1f} {gib(nbytes):>6s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_network_options(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, help="timed steps (default 40 chain, 20 U-Net)")
    ap.add_argument("--pass-pixels", type=int,
                    help="cryokern's passes (fewer pixels: less memory, a little slower; "
                         "default train's)")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="cpu: the compiled CPU backend and PyTorch on the CPU (a smoke test)")
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    specs = chosen_networks(ap, args)
    on_gpu = args.device == "gpu"
    torch_required = os.environ.get("CRYOKERN_REQUIRE_TORCH") == "1"
    results = []
    for spec in specs:
        results.append(bench_network(spec, args, on_gpu, torch_required))
        print_details(results[-1])
    if on_gpu and any(not isinstance(s.network, PooledNetwork) for s in specs):
        resource_report()
    device = _device_name() if on_gpu else "CPU (compiled CPU backend; a smoke test)"
    header = (f"{datetime.date.today()}  {device}  batch {args.batch}x1x{args.size}x"
              f"{args.size}; x fp32: PyTorch fp32's ms / this ms; GiB: cryokern's held device "
              "memory, PyTorch's peak")
    print_table(results, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(datetime.date.today()), "device": device,
                       "argv": sys.argv[1:] if argv is None else argv, "results": results}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
