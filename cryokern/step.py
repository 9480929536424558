"""One training step (forward, loss, backward, update), written once against a backend."""
from dataclasses import dataclass

import numpy as np

from .backends import Eager
from .distributed import Single
from .model import Network, forward

# A batch runs in passes of at most this many pixels (whole images, at least one per pass),
# so that the activations of a pass are held, not the batch's: 8M pixels are ~1 GiB of the
# default network's activations. Smaller passes hold less and cost some speed (H100, 4x1024^2:
# one pass 3.3 ms and 606 MiB; passes of 2 images 3.6 ms and 320 MiB); the bits are the same.
DEFAULT_PASS_PIXELS = 1 << 23


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD (momentum, weight decay, Nesterov) or Adam, with torch.optim's semantics."""
    kind: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.kind!r}: use 'sgd' or 'adam'")
        if self.nesterov and (self.kind != "sgd" or self.momentum <= 0):
            raise ValueError("Nesterov needs SGD with momentum > 0")

    def state_names(self, param):
        """Names of the optimizer's per-parameter buffers (as in torch's state_dict)."""
        if self.kind == "adam":
            return [f"exp_avg.{param}", f"exp_avg_sq.{param}"]
        return [f"momentum_buffer.{param}"] if self.momentum != 0 else []


class TrainStep:
    """Holds parameters, optimizer state and work buffers on a backend; call it with a batch.

    Buffers are allocated the first time a batch shape is seen and reused after that, so steady
    training allocates nothing per step; the only value returned to the host is the loss SSE,
    which launch() leaves on its way so that the host need not wait for it.

    With a communicator of several ranks (distributed.py), x holds this rank's block of a
    batch of `images` images; every rank gets every image's per-image sums and folds them all,
    so that each holds the parameters one process would.
    """

    def __init__(self, backend, network: Network, params, optimizer: OptimizerConfig,
                 state=None, step=0, pass_pixels=DEFAULT_PASS_PIXELS, comm=None):
        self.backend = backend
        self.comm = comm or Single()
        self.pass_pixels = pass_pixels
        self.network = network
        self.optimizer = optimizer
        self.step = step
        shapes = network.param_shapes()
        if set(params) != set(shapes):
            raise ValueError(f"parameters {sorted(params)} do not match network {sorted(shapes)}")
        for name, shape in shapes.items():
            if tuple(np.shape(params[name])) != shape:
                raise ValueError(f"{name} has shape {np.shape(params[name])}, network needs {shape}")
        self.params = {k: backend.to_device(params[k]) for k in shapes}
        self.grads = {k: backend.empty(shape) for k, shape in shapes.items()}
        state = state or {}
        self.state = {s: backend.to_device(state[s]) if s in state else backend.zeros(shape)
                      for k, shape in shapes.items() for s in optimizer.state_names(k)}
        self._workspaces = {}
        self._sums = {}
        self._sse = None
        # a recording would hold the collective too: not done yet, so ranks launch eagerly
        self._recorder = backend.recorder() if self.comm.size == 1 else Eager()

    def _passes(self, shape):
        """(first, stop) image ranges: the batch in passes of at most pass_pixels pixels."""
        n, _, h, w = shape
        per = max(1, self.pass_pixels // (h * w))
        return [(a, min(n, a + per)) for a in range(0, n, per)]

    def _workspace(self, shape):
        """The activations acts[1..depth] of one pass, allocated once per batch shape."""
        if shape not in self._workspaces:
            n, _, h, w = shape
            per = self._passes(shape)[0][1]
            self._workspaces[shape] = [self.backend.empty((per, c, h, w))
                                       for c in self.network.channels[1:]]
        return self._workspaces[shape]

    def _image_sums(self, images):
        """float64 per-image sums of the loss and of every gradient, for a batch of `images`
        images: comm.rows(images) rows, this rank's images from comm.offset(images) on."""
        if images not in self._sums:
            rows = self.comm.rows(images)
            shapes = self.network.param_shapes()
            self._sums[images] = {name: self.backend.empty64((rows,) + shape)
                                  for name, shape in shapes.items()}
            self._sums[images]["loss"] = self.backend.empty64((rows,))
        return self._sums[images]

    def _mine(self, sums, images, n):
        """The rows of this rank's n images in `sums` (none: a rank without images of a
        ragged batch runs no pass)."""
        first = self.comm.offset(images)
        return {name: a[first:first + n] for name, a in sums.items()} if n else {}

    def _fold(self, sums, images, outs):
        """Every rank's rows gathered, then each of `outs` (name -> array) the fold of its
        sums over the batch's images in image order (numerics §4)."""
        self.comm.gather_rows([sums[name] for name in outs], images)
        for name, out in outs.items():
            self.backend.sum_images(sums[name][:images], out)

    def _check(self, x, target):
        net = self.network
        if x.shape[1] != net.channels[0] or \
                tuple(target.shape) != tuple(x.shape[:1]) + (net.channels[-1],) + tuple(x.shape[2:]):
            raise ValueError(f"batch {x.shape} -> {target.shape} does not fit channels {net.channels}")

    def _forward(self, x, first, stop):
        """Images first..stop-1 of x through the network, into the workspace."""
        acts = [x[first:stop]] + [a[:stop - first] for a in self._workspace(tuple(x.shape))]
        forward(self.backend, self.network, self.params, acts[0], outs=acts[1:])
        return acts

    def _loss_sums(self, x, target, count, sums, first, stop):
        """Forward and loss of images first..stop-1: their loss sums, and their loss gradient
        over the prediction; returns the activations."""
        acts = self._forward(x, first, stop)
        self.backend.mse_loss_and_grad(acts[-1], target[first:stop], count, out=acts[-1],
                                       image_sums=sums["loss"][first:stop])
        return acts

    def loss(self, x, target, images=None):
        """(sse, count) of the network's output on a batch of `images` images (default: x's),
        of which x holds this rank's, without a step (validation)."""
        self._check(x, target)
        images = x.shape[0] if images is None else images
        count = images * int(np.prod(target.shape[1:]))
        sums = self._image_sums(images)
        mine = self._mine(sums, images, x.shape[0])
        for first, stop in self._passes(x.shape):
            self._loss_sums(x, target, count, mine, first, stop)
        self._fold(sums, images, {"loss": self._sse_scalar()})
        return self.backend.fetch(self._sse).result(), count

    def _sse_scalar(self):
        if self._sse is None:           # one is enough: each fetch is queued before the next use
            self._sse = self.backend.empty64((1,))
        return self._sse

    def __call__(self, x, target):
        """One step on a batch; returns (sse, count) of the loss before the update."""
        pending, count = self.launch(x, target)
        return pending.result(), count

    def launch(self, x, target, images=None):
        """Queue one step on a batch of `images` images (default: x's), of which x holds this
        rank's; returns (pending, count), where pending.result() is the
        sse of the loss before the update. Only result() waits: the training loop queues the
        next step before it asks, so the device need not wait for the host between steps.

        The step's launches are replayed from a recording where the backend has one (a CUDA
        graph: one launch instead of ~24). Adam's update is launched as it is, since its
        scalars change every step; SGD's are constant and recorded with the rest."""
        self._check(x, target)
        images = x.shape[0] if images is None else images
        count = images * int(np.prod(target.shape[1:]))
        self._sse_scalar()
        recorded_update = self.optimizer.kind == "sgd"
        self._recorder.run((x, target),
                           lambda: self._queue(x, target, images, count, recorded_update))
        self.step += 1
        if not recorded_update:
            self._update()
        return self.backend.fetch(self._sse), count

    def _queue(self, x, target, images, count, update):
        """Forward, loss, backward (and the update if `update`): kernel launches only.

        The batch runs in passes of at most pass_pixels pixels, so that the activations of one
        pass are held, not the batch's; each image's float64 sums of the loss and gradients
        are kept and added in image order at the end (numerics §4: the same bits as one pass).
        Within a pass, each gradient overwrites the activation it is the gradient of (grad[j]
        is acts[j + 1]'s buffer), so the backward pass needs no memory of its own: the loss
        gradient overwrites the prediction and layer i's input gradient overwrites its ReLU
        output, which both kernels allow (each output element is written after its own input
        element is read, by the same thread), and an activation is written over only after its
        last reader, the weight gradient of the layer it feeds, has run."""
        be, net = self.backend, self.network
        sums = self._image_sums(images)
        mine = self._mine(sums, images, x.shape[0])
        for first, stop in self._passes(x.shape):
            acts = self._loss_sums(x, target, count, mine, first, stop)
            grad = acts[1:]
            for i in reversed(range(net.depth)):
                weight, bias = f"layers.{i}.weight", f"layers.{i}.bias"
                be.conv2d_backward_weights(grad[i], acts[i], image_sums=(
                    mine[weight][first:stop], mine[bias][first:stop]))
                if i > 0:
                    be.conv2d_backward_data(grad[i], self.params[weight], relu_output=acts[i],
                                            out=grad[i - 1])
        self._fold(sums, images, dict(self.grads, loss=self._sse))
        if update:
            self._update()

    def _update(self):
        opt, be = self.optimizer, self.backend
        for name, w in self.params.items():
            g = self.grads[name]
            if opt.kind == "sgd":
                v = self.state.get(f"momentum_buffer.{name}", g)
                be.sgd_update(w, g, v, opt.lr, momentum=opt.momentum,
                              weight_decay=opt.weight_decay, nesterov=opt.nesterov)
            else:
                m, v = (self.state[s] for s in opt.state_names(name))
                be.adam_update(w, g, m, v, self.step, opt.lr, beta1=opt.beta1, beta2=opt.beta2,
                               eps=opt.eps, weight_decay=opt.weight_decay)

    def host_params(self):
        return {k: self.backend.to_host(v) for k, v in self.params.items()}

    def host_state(self):
        return {k: self.backend.to_host(v) for k, v in self.state.items()}
