"""Every kernel once on a small case, for compute-sanitizer (memcheck, racecheck, initcheck).

Usage: compute-sanitizer --tool memcheck python bench/sanitize_case.py
"""
import numpy as np
from numba import cuda

from cryokern import kernels as K

rng = np.random.default_rng(0)


def dev(*shape):
    return cuda.to_device(rng.standard_normal(shape).astype(np.float32))


x, w, b, gy = dev(2, 3, 37, 70), dev(5, 3, 3, 3), dev(5), dev(2, 5, 37, 70)
y = K.conv2d_forward(x, w, b, relu=True)
gx = K.conv2d_backward_data(gy, w, relu_output=x)
# the default network's two masked backward-data kernels (the mask read in turns), edge blocks
K.conv2d_backward_data(dev(1, 16, 37, 70), dev(16, 16, 3, 3), relu_output=dev(1, 16, 37, 70))
K.conv2d_backward_data(dev(1, 1, 37, 70), dev(1, 16, 3, 3), relu_output=dev(1, 16, 37, 70))
K.relu_backward(gy, y)
gw, gb = K.conv2d_backward_weights(gy, x)
sse, g = K.mse_loss_and_grad(y, gy, y.size)
K.mse_grad(y, gy, y.size)
K.mse_loss(y, gy)
K.sgd_update(w, gw, dev(5, 3, 3, 3), 0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
K.adam_update(w, gw, dev(5, 3, 3, 3), cuda.to_device(np.ones((5, 3, 3, 3), np.float32)), 1, 1e-3)
cuda.synchronize()
print("sanitize case ran: sse", sse)
