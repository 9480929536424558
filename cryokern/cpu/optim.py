"""SGD and Adam updates in place, compiled for the CPU, in the contract's float32 order
(numerics §6-7). Parameters are a few thousand values: one core, no threads to start."""
import numpy as np
from numba import njit

from ..contract import adam_scalars, sgd_scalars
from .arrays import operand
from .fma import fma32

ZERO = np.float32(0)


@njit(cache=True)
def _sgd(w, g, v, neg_lr, mom, wd, nesterov):
    for i in range(w.size):
        d = fma32(wd, w[i], g[i]) if wd != ZERO else g[i]
        if mom != ZERO:
            v[i] = fma32(mom, v[i], d)
            d = fma32(mom, v[i], d) if nesterov else v[i]
        w[i] = fma32(neg_lr, d, w[i])


@njit(cache=True)
def _adam(w, g, m, v, b1, c1, b2, c2, r, eps, k, wd):
    for i in range(w.size):
        d = fma32(wd, w[i], g[i]) if wd != ZERO else g[i]
        m[i] = fma32(b1, m[i], c1 * d)
        v[i] = fma32(b2, v[i], (c2 * d) * d)
        w[i] = fma32(k, m[i] / (np.sqrt(v[i]) / r + eps), w[i])


def _flat(names, arrays):
    """1-D views of the in-place arrays (they must be C-contiguous float32: a copy would not
    be updated) of one shape."""
    flat = []
    for name, a in zip(names, arrays):
        if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
            raise ValueError(f"{name} must be a C-contiguous NumPy array (updated in place)")
        flat.append(operand(name, a).reshape(-1))
    if len({a.size for a in flat}) != 1:
        raise ValueError(f"optimizer arrays differ in shape: {[np.shape(a) for a in arrays]}")
    return flat


def sgd_update(w, g, v, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """w -= lr * d, d from g with L2 weight decay, momentum buffer v and optional Nesterov;
    v is only touched when momentum != 0."""
    neg_lr, mom, wd = sgd_scalars(lr, momentum, weight_decay)
    if nesterov and mom == 0:
        raise ValueError("Nesterov momentum requires momentum > 0")
    _sgd(*_flat("wgv", (w, g, v)), neg_lr, mom, wd, bool(nesterov))


def adam_update(w, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """One Adam step (bias-corrected, L2 weight decay as torch.optim.Adam), in place."""
    scalars = adam_scalars(step, lr, beta1, beta2, eps)
    _adam(*_flat("wgmv", (w, g, m, v)), *scalars, np.float32(weight_decay))
