"""Independent float64 formulas of each operation, for tolerance checks (not the contract)."""
import numpy as np


def conv64(x, w, b):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, w.shape[0], h, wd)) + np.asarray(b, np.float64)[None, :, None, None]
    for ky in range(3):
        for kx in range(3):
            y += np.einsum("nchw,oc->nohw", xp[:, :, ky:ky + h, kx:kx + wd], w[:, :, ky, kx])
    return y


def conv_backward_data64(gy, w):
    gy, w = np.asarray(gy, np.float64), np.asarray(w, np.float64)
    n, _, h, wd = gy.shape
    gx = np.zeros((n, w.shape[1], h, wd))
    gxp = np.pad(gx, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for ky in range(3):
        for kx in range(3):
            gxp[:, :, ky:ky + h, kx:kx + wd] += np.einsum("nohw,oc->nchw", gy, w[:, :, ky, kx])
    return gxp[:, :, 1:-1, 1:-1]


def conv_backward_weights64(gy, x):
    gy, x = np.asarray(gy, np.float64), np.asarray(x, np.float64)
    _, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    gw = np.zeros((gy.shape[1], x.shape[1], 3, 3))
    for ky in range(3):
        for kx in range(3):
            gw[:, :, ky, kx] = np.einsum("nohw,nchw->oc", gy, xp[:, :, ky:ky + h, kx:kx + wd])
    return gw, gy.sum(axis=(0, 2, 3))


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def ssim64(x, y, data_range, sigma=1.5, radius=5, k1=0.01, k2=0.03):
    """SSIM as Wang et al. (2004) define it: Gaussian-weighted local statistics over every full
    (2 radius + 1)^2 window, population covariances, the map's mean."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    g = np.outer(g, g) / np.outer(g, g).sum()
    windows = lambda a: np.lib.stride_tricks.sliding_window_view(a, g.shape)
    mean = lambda a: np.einsum("ijkl,kl->ij", windows(a), g)
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()
