"""SGD and Adam updates in place (numerics §6, §7): one thread per parameter element."""
import math

import numpy as np
from numba import cuda, float32

from ..contract import adam_scalars, sgd_scalars
from .arrays import Operand, launch_stream


@cuda.jit(cache=True)
def _sgd_kernel(w, g, v, neg_lr, momentum, weight_decay, use_momentum, nesterov):
    i = cuda.grid(1)
    if i >= w.size:
        return
    d = g[i]
    if weight_decay != float32(0):
        d = cuda.fma(weight_decay, w[i], d)
    if use_momentum:
        vi = cuda.fma(momentum, v[i], d)
        v[i] = vi
        d = cuda.fma(momentum, vi, d) if nesterov else vi
    w[i] = cuda.fma(neg_lr, d, w[i])


@cuda.jit(cache=True)
def _adam_kernel(w, g, m, v, b1, c1, b2, c2, root_bias2, eps, neg_step, weight_decay):
    i = cuda.grid(1)
    if i >= w.size:
        return
    d = g[i]
    if weight_decay != float32(0):
        d = cuda.fma(weight_decay, w[i], d)
    mi = cuda.fma(b1, m[i], c1 * d)
    vi = cuda.fma(b2, v[i], (c2 * d) * d)
    m[i] = mi
    v[i] = vi
    denom = float32(math.sqrt(vi)) / root_bias2 + eps   # float32(): the simulator's sqrt is float64
    w[i] = cuda.fma(neg_step, mi / denom, w[i])


def _flat(ops):
    size = int(np.prod(ops[0].shape))
    for op in ops[1:]:
        if op.shape != ops[0].shape:
            raise ValueError(f"optimizer arrays differ in shape: {[o.shape for o in ops]}")
    return size, [op.device.reshape(size) for op in ops]


def sgd_update(w, g, v, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """In place on w and v; v is only touched when momentum != 0."""
    neg_lr, mom, wd = sgd_scalars(lr, momentum, weight_decay)
    if nesterov and mom == 0:
        raise ValueError("Nesterov momentum requires momentum > 0")
    ops = [Operand("w", w), Operand("g", g), Operand("v", v)]
    size, (wd_, gd, vd) = _flat(ops)
    _sgd_kernel[-(-size // 256), 256, launch_stream()](wd_, gd, vd, neg_lr, mom, wd,
                                                       bool(mom != 0), bool(nesterov))
    ops[0].write_back()
    if mom != 0:
        ops[2].write_back()


def adam_update(w, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """In place on w, m and v; step counts from 1."""
    scalars = adam_scalars(step, lr, beta1, beta2, eps)
    ops = [Operand("w", w), Operand("g", g), Operand("m", m), Operand("v", v)]
    size, arrays = _flat(ops)
    _adam_kernel[-(-size // 256), 256, launch_stream()](*arrays, *scalars, np.float32(weight_decay))
    for op in (ops[0], ops[2], ops[3]):
        op.write_back()
