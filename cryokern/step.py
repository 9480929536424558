"""One training step (forward, loss, backward, update), written once against a backend."""
from dataclasses import dataclass

import numpy as np

from .model import Network, forward


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
    """

    def __init__(self, backend, network: Network, params, optimizer: OptimizerConfig,
                 state=None, step=0):
        self.backend = backend
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
        self._sse = None
        self._recorder = backend.recorder()

    def _workspace(self, shape):
        """The activations acts[1..depth], allocated once per batch shape."""
        if shape not in self._workspaces:
            n, _, h, w = shape
            self._workspaces[shape] = [self.backend.empty((n, c, h, w))
                                       for c in self.network.channels[1:]]
        return self._workspaces[shape]

    def _forward(self, x, target):
        be, net = self.backend, self.network
        if x.shape[1] != net.channels[0] or target.shape != x.shape[:1] + (net.channels[-1],) + x.shape[2:]:
            raise ValueError(f"batch {x.shape} -> {target.shape} does not fit channels {net.channels}")
        acts = [x] + self._workspace(tuple(x.shape))
        forward(be, net, self.params, x, outs=acts[1:])
        return acts

    def loss(self, x, target):
        """(sse, count) of the network's output on a batch, without a step (validation)."""
        return self.backend.mse_loss(self._forward(x, target)[-1], target)

    def __call__(self, x, target):
        """One step on a batch; returns (sse, count) of the loss before the update."""
        pending, count = self.launch(x, target)
        return pending.result(), count

    def launch(self, x, target):
        """Queue one step on a batch; returns (pending, count), where pending.result() is the
        sse of the loss before the update. Only result() waits: the training loop queues the
        next step before it asks, so the device need not wait for the host between steps.

        The step's launches are replayed from a recording where the backend has one (a CUDA
        graph: one launch instead of ~24). Adam's update is launched as it is, since its
        scalars change every step; SGD's are constant and recorded with the rest."""
        count = int(np.prod(target.shape))
        if self._sse is None:           # one is enough: each fetch is queued before the next step
            self._sse = self.backend.empty64()
        recorded_update = self.optimizer.kind == "sgd"
        self._recorder.run((x, target), lambda: self._queue(x, target, count, recorded_update))
        self.step += 1
        if not recorded_update:
            self._update()
        return self.backend.fetch(self._sse), count

    def _queue(self, x, target, count, update):
        """Forward, loss, backward (and the update if `update`): kernel launches only.

        Each gradient overwrites the activation it is the gradient of (grad[j] is acts[j + 1]'s
        buffer), so the backward pass needs no memory of its own: the loss gradient overwrites
        the prediction and layer i's input gradient overwrites its ReLU output, which both
        kernels allow (each output element is written after its own input element is read,
        by the same thread), and an activation is written over only after its last reader, the
        weight gradient of the layer it feeds, has run."""
        be, net = self.backend, self.network
        acts = self._forward(x, target)
        grad = acts[1:]
        be.mse_loss_and_grad(acts[-1], target, count, out=grad[-1], sse_out=self._sse)
        for i in reversed(range(net.depth)):
            be.conv2d_backward_weights(grad[i], acts[i], out=(self.grads[f"layers.{i}.weight"],
                                                              self.grads[f"layers.{i}.bias"]))
            if i > 0:
                be.conv2d_backward_data(grad[i], self.params[f"layers.{i}.weight"],
                                        relu_output=acts[i], out=grad[i - 1])
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
