"""SGD and Adam updates in place, with PyTorch's semantics and the contract's float32 order."""
import numpy as np

from ..contract import adam_scalars, sgd_scalars
from .fma import fma32


def sgd_update(w, g, v, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """w -= lr * d, d from g with L2 weight decay, momentum buffer v and optional Nesterov."""
    neg_lr, mom, wd = sgd_scalars(lr, momentum, weight_decay)
    if nesterov and mom == 0:
        raise ValueError("Nesterov momentum requires momentum > 0")
    d = fma32(wd, w, g) if wd != 0 else g
    if mom != 0:
        v[...] = fma32(mom, v, d)
        d = fma32(mom, v, d) if nesterov else v
    w[...] = fma32(neg_lr, d, w)


def adam_update(w, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """One Adam step (bias-corrected, L2 weight decay as torch.optim.Adam), in place."""
    b1, one_minus_b1, b2, one_minus_b2, sqrt_bias2, eps32, neg_step = adam_scalars(
        step, lr, beta1, beta2, eps)
    wd = np.float32(weight_decay)
    d = fma32(wd, w, g) if wd != 0 else g
    m[...] = fma32(b1, m, one_minus_b1 * d)
    v[...] = fma32(b2, v, (one_minus_b2 * d) * d)
    denom = np.sqrt(v) / sqrt_bias2 + eps32
    w[...] = fma32(neg_step, m / denom, w)
