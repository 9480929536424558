"""Training-step benchmark: cryokern's GPU step beside PyTorch's eager fp32 step, same process.

Median of CUDA-event-timed steps after warm-up, default network, SGD with momentum, each step
bringing its loss to the host before the next starts (cryokern's step(); PyTorch's
loss.item()); then both pipelined as the training loop runs them, each loss read only after the
next step is queued (cryokern's launch(); PyTorch's item() one step late). Also times each
kernel of the 16 -> 16 layer alone, with its achieved TFLOP/s (2 FLOP per multiply-add).
Usage: python bench/step.py [--batch 4] [--size 1024] [--steps 40]
"""
import argparse
import datetime
import statistics

import numpy as np
from numba import cuda

from cryokern.backends import Eager, get_backend
from cryokern import kernels as K
from cryokern.model import Network, init_params
from cryokern.step import OptimizerConfig, TrainStep


def _device_name():
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else name


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


def event_times(fn, steps, warmup=3):
    """(median, min, max) ms of `steps` calls of fn() after `warmup`, each between two CUDA
    events on the legacy default stream; PyTorch queues its work there too, so it is timed
    the same way."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(steps):
        start, stop = cuda.event(timing=True), cuda.event(timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop))
    return statistics.median(times), min(times), max(times)


def pipelined_ms(launch, steps, warmup=3):
    """Mean ms per step when each step's loss is read only after the next step is queued, as
    the training loop does: CUDA events around `steps` steps. launch() queues a step and
    returns an object whose result() waits for its loss."""
    for _ in range(warmup):
        launch().result()
    cuda.synchronize()
    start, stop = cuda.event(timing=True), cuda.event(timing=True)
    start.record()
    previous = launch()
    for _ in range(steps - 1):
        current = launch()
        previous.result()
        previous = current
    stop.record()
    previous.result()
    stop.synchronize()
    return cuda.event_elapsed_time(start, stop) / steps


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
            self.calls.append((f"{name} {shape}", start, stop))
            return out
        return timed


def step_breakdown(net, params, x, y, steps=10):
    """Median time of each kernel call in a step, in call order (includes launch overhead)."""
    ops = _TimedOps()
    timed = get_backend("gpu")              # a new Backend object: its ops may be replaced
    # each kernel bracketed by events, so launched as it is: no graph
    timed.name, timed.ops, timed.recorder = "gpu-timed", ops, Eager
    trainer = TrainStep(timed, net, params, OptimizerConfig("sgd", 0.01, momentum=0.9))
    trainer(x, y)
    per_call = None
    for _ in range(steps):
        ops.calls.clear()
        trainer(x, y)
        cuda.synchronize()
        times = [cuda.event_elapsed_time(a, b) for _, a, b in ops.calls]
        per_call = [[t] for t in times] if per_call is None else \
            [acc + [t] for acc, t in zip(per_call, times)]
    return [(name, statistics.median(t)) for (name, _, _), t in zip(ops.calls, per_call)]


def torch_step_times(noisy, clean, params, steps):
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 1, 3, padding=1)).cuda()
    with torch.no_grad():
        for i, layer in enumerate([net[0], net[2], net[4]]):
            layer.weight.copy_(torch.from_numpy(params[f"layers.{i}.weight"]))
            layer.bias.copy_(torch.from_numpy(params[f"layers.{i}.bias"]))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.from_numpy(noisy).cuda(), torch.from_numpy(clean).cuda()

    def launch():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    def step():
        return launch().item()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timing = event_times(step, steps, warmup=0)   # PyTorch queues on the same legacy stream
    peak = torch.cuda.max_memory_allocated()

    class Pending:
        def __init__(self):
            self.loss = launch()

        def result(self):
            return self.loss.item()
    return (*timing, peak, pipelined_ms(Pending, steps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pass-pixels", type=int,
                    help="cryokern's passes (fewer pixels: less memory, a little slower; "
                         "default train's)")
    args = ap.parse_args()
    n, s = args.batch, args.size
    rng = np.random.default_rng(0)
    clean = rng.random((n, 1, s, s)).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    net = Network()
    params = init_params(net, 0)
    free_before = cuda.current_context().get_memory_info()[0]
    trainer = TrainStep(get_backend("gpu"), net, params, OptimizerConfig("sgd", 0.01, momentum=0.9),
                        pass_pixels=args.pass_pixels)
    x, y = cuda.to_device(noisy), cuda.to_device(clean)
    rows = [("cryokern step",) + event_times(lambda: trainer(x, y), args.steps)]
    pipelined = [("cryokern step", pipelined_ms(lambda: trainer.launch(x, y)[0], args.steps))]
    # device memory the step holds: batch, activations, gradients, parameters, scratch (as the
    # driver counts it, in its allocation granularity)
    held = free_before - cuda.current_context().get_memory_info()[0]
    try:
        *t, peak, torch_pipelined = torch_step_times(noisy, clean, params, args.steps)
        rows.append(("pytorch eager fp32 step (tf32 off)",) + tuple(t))
        pipelined.append(("pytorch eager fp32 step (tf32 off)", torch_pipelined))
    except ImportError:
        peak = None
    a16 = cuda.to_device(rng.standard_normal((n, 16, s, s)).astype(np.float32))
    g16 = cuda.to_device(rng.standard_normal((n, 16, s, s)).astype(np.float32))
    w16 = cuda.to_device(params["layers.1.weight"])
    b16 = cuda.to_device(params["layers.1.bias"])
    out = cuda.device_array((n, 16, s, s), np.float32)
    gw, gb = cuda.device_array((16, 16, 3, 3), np.float32), cuda.device_array(16, np.float32)
    kernel_rows = [
        ("conv 16->16 forward+relu", lambda: K.conv2d_forward(a16, w16, b16, relu=True, out=out)),
        ("conv 16->16 backward-data+mask",
         lambda: K.conv2d_backward_data(g16, w16, relu_output=a16, out=out)),
        ("conv 16->16 weight grads", lambda: K.conv2d_backward_weights(g16, a16, out=(gw, gb))),
    ]
    flops = 2 * n * s * s * 16 * 16 * 9
    print(f"\n{datetime.date.today()}  {_device_name()}  "
          f"batch {n}x1x{s}x{s}, default network, SGD momentum, {args.steps} steps, "
          f"{len(trainer._passes(x.shape))} pass(es) of <= {trainer.pass_pixels} pixels")
    print(f"{'what':38s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'images/s':>9s}")
    for name, med, lo, hi in rows:
        print(f"{name:38s} {med:10.3f} {lo:8.3f} {hi:8.3f} {n / med * 1e3:9.0f}")
    if len(rows) == 2:
        print(f"ratio pytorch/cryokern: {rows[1][1] / rows[0][1]:.2f}x;  pytorch peak memory "
              f"{peak / 2**20:.0f} MiB")
    print(f"device memory held by the cryokern step: {held / 2**20:.0f} MiB")
    print(f"pipelined (each loss read after the next step is queued; mean of {args.steps}):")
    for name, ms in pipelined:
        print(f"  {name:36s} {ms:10.3f} ms {n / ms * 1e3:9.0f} images/s")
    if len(pipelined) == 2:
        print(f"  ratio pytorch/cryokern, pipelined: {pipelined[1][1] / pipelined[0][1]:.2f}x")
    for name, fn in kernel_rows:
        med, lo, hi = event_times(fn, 20)
        print(f"{name:38s} {med:10.3f} {lo:8.3f} {hi:8.3f} {flops / med / 1e9:7.1f} TFLOP/s")
    print("step breakdown (median ms per call, launch overhead included):")
    for name, ms in step_breakdown(net, params, x, y):
        print(f"  {name:60s} {ms:8.3f}")
    resource_report()


if __name__ == "__main__":
    main()
