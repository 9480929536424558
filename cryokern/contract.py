"""The numerics contract's constants and scalar derivations, shared by both backends.

Everything here is imported by `cryokern.reference` and `cryokern.kernels` alike, so the two
cannot drift apart: tile shapes of every reduction, and the float32 scalars that host code
derives from user hyper-parameters. docs/numerics.md explains each item.
"""
import math

import numpy as np

# Reductions over pixels (weight/bias gradients, loss SSE) run as one float32 chain per tile of
# TILE_H x TILE_W pixels of one image plane, in row-major order over the tile's in-image pixels.
TILE_H = 16
TILE_W = 64

f32 = np.float32


def tile_grid(height, width):
    """Number of reduction tiles along H and W for an image of `height` x `width` pixels."""
    return -(-height // TILE_H), -(-width // TILE_W)


def mse_grad_scale(count):
    """float32(2 / count): the factor turning (pred - target) into d(SSE/count)/d(pred)."""
    if count <= 0:
        raise ValueError(f"pixel count must be positive, got {count}")
    return f32(2.0 / count)


def sgd_scalars(lr, momentum, weight_decay):
    """(-lr, momentum, weight_decay) as float32; each rounded once from the user's value."""
    return f32(-f32(lr)), f32(momentum), f32(weight_decay)


def adam_scalars(step, lr, beta1, beta2, eps):
    """Float32 scalars of one Adam step, derived in float64 on the host and rounded once.

    Returns (beta1, 1-beta1, beta2, 1-beta2, sqrt(1-beta2**step), eps, -lr/(1-beta1**step)).
    """
    if step < 1:
        raise ValueError(f"Adam step counts from 1, got {step}")
    b1, b2 = float(beta1), float(beta2)
    bias1 = 1.0 - b1 ** step
    bias2 = 1.0 - b2 ** step
    return (f32(b1), f32(1.0 - b1), f32(b2), f32(1.0 - b2), f32(math.sqrt(bias2)),
            f32(eps), f32(-float(lr) / bias1))


def halved_shape(shape, what="2x2 max-pooling"):
    """(N, C, H/2, W/2) of an (N, C, H, W) array whose sides must be even: the output of a 2x2
    max-pooling, the gradient of a x2 upsampling (numerics §10, §11)."""
    n, c, h, w = shape
    if h % 2 or w % 2:
        raise ValueError(f"{what} needs even sides, got {h} x {w}")
    return n, c, h // 2, w // 2


def same_shape(name, a, shape):
    """`a` (anything with a shape: a NumPy array, a backend's operand), checked to have `shape`;
    the one wording of the check for every backend."""
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def concatenated_channels(x_shape, x2_shape, upsampled=False):
    """The channels of x followed by x2's (numerics §12), which must share batch and image
    size; with `upsampled`, x is read x2 nearest-upsampled and must be half x2's size. Without
    x2 (x2_shape None), x's channels: an upsampled x is read only beside a second input."""
    if x2_shape is None:
        if upsampled:
            raise ValueError("an upsampled x is read only beside x2 (a concatenation)")
        return x_shape[1]
    scale = 2 if upsampled else 1
    if x2_shape[0] != x_shape[0] or tuple(x2_shape[2:]) != tuple(scale * s for s in x_shape[2:]):
        raise ValueError(f"x {x_shape}{' upsampled x2' if upsampled else ''} and x2 {x2_shape} "
                         "differ in batch or image size")
    return x_shape[1] + x2_shape[1]


# A 3x3 convolution of a x2 nearest-upsampled input, for output row parity p, reads input rows
# i - 1 + p + a (a = 0, 1) of the level below (i = output row // 2); kernel rows
# UPSAMPLED_TAPS[p][a] all land on row a's pixel (columns likewise): numerics §12.
UPSAMPLED_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def phase_terms(p, q, a, b):
    """The (ky, kx) of the kernel taps whose weights sum to the phase weight of output parity
    (p, q) (row, column) and input offset (a, b), in the order they are added (row-major)."""
    return [(ky, kx) for ky in UPSAMPLED_TAPS[p][a] for kx in UPSAMPLED_TAPS[q][b]]


def phase_weights(w):
    """(Co, Ci, 2, 2, 2, 2) float32 [o, ci, p, q, a, b] of OIHW 3x3 weights w: the sum of
    w[o, ci]'s taps phase_terms(p, q, a, b), float32 additions in that order from the first
    term (numerics §12). On the host for the NumPy backends; the GPU kernel sums in staging."""
    w = np.asarray(w, np.float32)
    out = np.empty(w.shape[:2] + (2, 2, 2, 2), np.float32)
    for p, q, a, b in np.ndindex(2, 2, 2, 2):
        terms = [w[:, :, ky, kx] for ky, kx in phase_terms(p, q, a, b)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        out[:, :, p, q, a, b] = total
    return out


DEFAULT_LEAKY_SLOPE = 0.1


def leaky_slope(slope=DEFAULT_LEAKY_SLOPE):
    """LeakyReLU's negative slope as float32, rounded once; finite and > 0, so that the sign of
    the stored output decides the backward pass (numerics §9a)."""
    s = f32(slope)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"LeakyReLU slope must be finite and > 0 in float32, got {slope!r}")
    return s
