"""One training step (forward, loss, backward, update), written once against a backend."""
from dataclasses import dataclass

import numpy as np

from .distributed import Single
from .model import N2NUNet, UNet, forward, n2n_forward, unet_forward

# A batch runs in passes of whole images (at least one per pass), so that the activations of
# a pass are held, not the batch's. By default a pass holds as many images as 1 GiB of
# activations allows (pass_pixels_for): 8.1M pixels for the chain 1,16,16,1, 0.67M for the
# 48-wide U-Net (~400 floats a pixel), so that a network of any width trains on a GPU of a
# few GiB. Smaller passes hold less and cost some speed (H100, chain, 4x1024^2: one pass
# 3.3 ms and 606 MiB; passes of 2 images 3.6 ms and 320 MiB); the bits are the same.
DEFAULT_PASS_BYTES = 1 << 30
# queue_loss(record=True) keeps this many recordings (CUDA graphs) of the validation's batches
LOSS_GRAPHS = 8

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

    def __init__(self, backend, network, params, optimizer: OptimizerConfig,
                 state=None, step=0, pass_pixels=None, comm=None):
        self.backend = backend
        self.comm = comm or Single()
        self.pass_pixels = pass_pixels or pass_pixels_for(network)
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
        self._layers = _pass_layers(network)(backend, network, self.params)
        self._workspaces = {}
        self._sums = {}
        self._sse = None
        # the step's graphs (a few: one per upload slot and batch shape) and the validation's;
        # with GPU ranks a graph holds NCCL's all-gather too (NCCL supports stream capture;
        # the first, eager run of each key has set up its connections)
        self._recorder = backend.recorder(keep=4 + LOSS_GRAPHS)

    def _passes(self, shape):
        """(first, stop) image ranges: the batch in passes of at most pass_pixels pixels."""
        n, _, h, w = shape
        per = max(1, self.pass_pixels // (h * w))
        return [(a, min(n, a + per)) for a in range(0, n, per)]

    def _workspace(self, shape):
        """The arrays of one pass, allocated once per batch shape."""
        if shape not in self._workspaces:
            _, _, h, w = shape
            self._workspaces[shape] = self._layers.workspace(self._passes(shape)[0][1], h, w)
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
        cin, cout = self._layers.channels()
        if x.shape[1] != cin or \
                tuple(target.shape) != tuple(x.shape[:1]) + (cout,) + tuple(x.shape[2:]):
            raise ValueError(f"batch {x.shape} -> {target.shape} does not fit the network's "
                             f"{cin} input and {cout} output channels")

    def _loss_sums(self, x, target, count, sums, first, stop):
        """Forward and loss of images first..stop-1: their loss sums, and their loss gradient
        over the prediction; returns the pass's activations."""
        acts = self._layers.forward(x[first:stop],
                                    self._workspace(tuple(x.shape)), stop - first)
        pred = self._layers.prediction(acts)
        self.backend.mse_loss_and_grad(pred, target[first:stop], count, out=pred,
                                       image_sums=sums["loss"][first:stop])
        return acts

    def loss(self, x, target, images=None):
        """(sse, count) of the network's output on a batch of `images` images (default: x's),
        of which x holds this rank's, without a step (validation)."""
        pending, count = self.queue_loss(x, target, images)
        return pending.result(), count

    def queue_loss(self, x, target, images=None, record=False):
        """Queue loss(): returns (pending, count), pending.result() the sse. With `record`,
        replayed from a recording (as launch() is) once these arrays have been seen: for
        arrays that stay put (the validation batches kept on the device), at most
        LOSS_GRAPHS of them, or each would be recorded anew every time."""
        self._check(x, target)
        images = x.shape[0] if images is None else images
        count = images * int(np.prod(target.shape[1:]))
        self._sse_scalar()

        def queue():
            sums = self._image_sums(images)
            mine = self._mine(sums, images, x.shape[0])
            for first, stop in self._passes(x.shape):
                self._loss_sums(x, target, count, mine, first, stop)
            self._fold(sums, images, {"loss": self._sse})
        if record:
            self._recorder.run((x, target), queue, kind="loss")
        else:
            queue()
        return self.backend.fetch(self._sse), count

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
        last reader, the weight gradient of the layer it feeds, has run. (The U-Net: the same
        rule, _UNetPass.backward.)"""
        sums = self._image_sums(images)
        mine = self._mine(sums, images, x.shape[0])
        for first, stop in self._passes(x.shape):
            acts = self._loss_sums(x, target, count, mine, first, stop)
            self._layers.backward(acts, {name: a[first:stop] for name, a in mine.items()})
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

    def snapshot(self):
        """The parameters and optimizer state as the steps queued so far leave them, on their
        way to the host behind those steps: result() is (params, state), NumPy copies, the
        same as host_params() and host_state() then, whatever was queued after. One wait for
        all of them (a checkpoint's state, read while the next steps run)."""
        return _Snapshot(self.backend.fetch_arrays(
            {**{("param", k): v for k, v in self.params.items()},
             **{("state", k): v for k, v in self.state.items()}}))


class _Snapshot:
    def __init__(self, pending):
        self._pending = pending

    def result(self):
        arrays = self._pending.result()
        return ({k: a for (kind, k), a in arrays.items() if kind == "param"},
                {k: a for (kind, k), a in arrays.items() if kind == "state"})


class _ChainPass:
    """The chain's part of a pass: its activations, forward and backward (numerics §8)."""

    def __init__(self, backend, network, params):
        self.backend, self.network, self.params = backend, network, params

    def channels(self):
        return self.network.channels[0], self.network.channels[-1]

    @staticmethod
    def workspace_shapes(network, per, h, w):
        """acts[1..depth]'s shapes for passes of up to `per` images."""
        return [(per, c, h, w) for c in network.channels[1:]]

    def workspace(self, per, h, w):
        return [self.backend.empty(s) for s in self.workspace_shapes(self.network, per, h, w)]

    def forward(self, x, workspace, m):
        acts = [x] + [a[:m] for a in workspace]
        forward(self.backend, self.network, self.params, acts[0], outs=acts[1:])
        return acts

    def prediction(self, acts):
        return acts[-1]

    def backward(self, acts, sums):
        """From the loss gradient over the prediction: grad[i] is acts[i + 1]'s buffer."""
        be, grad = self.backend, acts[1:]
        for i in reversed(range(self.network.depth)):
            weight, bias = f"layers.{i}.weight", f"layers.{i}.bias"
            be.conv2d_backward_weights(grad[i], acts[i], image_sums=(sums[weight], sums[bias]))
            if i > 0:
                be.conv2d_backward_data(grad[i], self.params[weight], relu_output=acts[i],
                                        out=grad[i - 1])


class _UNetPass:
    """The U-Net's part of a pass (numerics §14). Every gradient is written over the array it
    is the gradient of, after that array's last reader has run, except the skip connections'
    (skip.{l}: their gradient waits in its own array from the decoder to the encoder)."""

    def __init__(self, backend, network, params):
        self.backend, self.network, self.params = backend, network, params

    def channels(self):
        return self.network.in_channels, self.network.out_channels

    @staticmethod
    def workspace_shapes(network, per, h, w):
        """{name: shape}: the forward pass's arrays and the skip connections' gradients."""
        shapes = network.activation_shapes(per, h, w)
        for level in range(network.levels):
            shapes[f"skip.{level}"] = shapes[f"enc.{level}.1"]
        return shapes

    def workspace(self, per, h, w):
        return {name: self.backend.empty(shape) for name, shape in
                self.workspace_shapes(self.network, per, h, w).items()}

    def forward(self, x, workspace, m):
        acts = {name: a[:m] for name, a in workspace.items()}
        acts.setdefault("input", x)
        unet_forward(self.backend, self.network, self.params, x, acts)
        return acts

    def prediction(self, acts):
        return acts["pred"] if "pred" in acts else acts["out"]

    def backward(self, acts, sums):
        """From the loss gradient over the prediction (the residual passes it on unchanged)."""
        be, net, slope = self.backend, self.network, self.network.leaky_slope

        def weights(prefix, g, x, skip=None):
            be.conv2d_backward_weights(g, x, x2=skip, image_sums=(sums[f"{prefix}.weight"],
                                                                  sums[f"{prefix}.bias"]))

        def data(prefix, g, out, masked=True):
            be.conv2d_backward_data(g, self.params[f"{prefix}.weight"],
                                    relu_output=out if masked else None, out=out,
                                    leaky_slope=slope if masked else None)

        g = acts["out"]
        if "pred" in acts:
            be.pad_zeros(acts["pred"], *g.shape[2:], out=g)
        weights("out", g, acts["dec.0.1"])
        data("out", g, acts["dec.0.1"])
        for level in range(net.levels):
            d0, d1, up = (acts[f"dec.{level}.0"], acts[f"dec.{level}.1"], acts[f"up.{level}"])
            weights(f"dec.{level}.conv1", d1, d0)
            data(f"dec.{level}.conv1", d1, d0)
            weights(f"dec.{level}.conv0", d0, up, skip=acts[f"enc.{level}.1"])
            be.conv2d_backward_data(d0, self.params[f"dec.{level}.conv0.weight"],
                                    out=(up, acts[f"skip.{level}"]), split=up.shape[1])
            below = acts[net.level_output(level)]
            be.upsample2x_backward(up, out=below, relu_output=below, leaky_slope=slope)
        for level in reversed(range(net.levels + 1)):
            e0, g1 = acts[f"enc.{level}.0"], acts[f"enc.{level}.1"]
            if level < net.levels:
                skip = acts[f"skip.{level}"]
                be.maxpool2x2_backward(acts[f"pool.{level + 1}"], g1, out=skip, add=skip,
                                       relu_output=g1, leaky_slope=slope)
                g1 = skip
            weights(f"enc.{level}.conv1", g1, e0)
            data(f"enc.{level}.conv1", g1, e0)
            source = acts[f"pool.{level}"] if level > 0 else acts["input"]
            weights(f"enc.{level}.conv0", e0, source)
            if level > 0:
                data(f"enc.{level}.conv0", e0, source, masked=False)


class _N2NPass(_UNetPass):
    """The Noise2Noise U-Net's part of a pass (numerics §15). As the U-Net's: every gradient
    written over the array it is the gradient of, after that array's last reader, except the
    concatenations' gradients of the levels' inputs (skip.{l}: from the decoder, waiting for
    the encoder's part of pool.{l}'s gradient)."""

    @staticmethod
    def workspace_shapes(network, per, h, w):
        """{name: shape}: the forward pass's arrays and the skips' gradients."""
        shapes = network.activation_shapes(per, h, w)
        for level in range(1, network.levels):
            shapes[f"skip.{level}"] = shapes[f"pool.{level}"]
        return shapes

    def forward(self, x, workspace, m):
        acts = {name: a[:m] for name, a in workspace.items()}
        acts.setdefault("input", x)
        n2n_forward(self.backend, self.network, self.params, x, acts)
        return acts

    def backward(self, acts, sums):
        """From the loss gradient over the prediction (the residual passes it on unchanged):
        the head, the decoder levels 1..L-1, the bottom, the encoder levels L-1..0 (§15)."""
        be, net, slope = self.backend, self.network, self.network.leaky_slope
        head = [name for name, _ in net.head()]
        grads = dict(acts, **{head[-1]: acts["out"]})   # the last convolution's output is "out"

        def weights(prefix, x, skip=None):
            be.conv2d_backward_weights(grads[prefix], x, x2=skip, image_sums=(
                sums[f"{prefix}.weight"], sums[f"{prefix}.bias"]))

        def data(prefix, out, masked=True):
            be.conv2d_backward_data(grads[prefix], self.params[f"{prefix}.weight"],
                                    relu_output=out if masked else None, out=out,
                                    leaky_slope=slope if masked else None)

        def concatenation(prefix, level):
            """The first convolution after level l's concatenation (up.l, then level l's
            input): its weights, the gradient of up.l and of pool.l into skip.l (level 0: the
            input's, not computed), then up.l's through the upsampling into the level below's
            output, masked by it."""
            up = acts[f"up.{level}"]
            weights(prefix, up, skip=acts[f"pool.{level}" if level else "input"])
            be.conv2d_backward_data(grads[prefix], self.params[f"{prefix}.weight"],
                                    out=(up, acts[f"skip.{level}"] if level else None),
                                    split=up.shape[1])
            below = acts[net.level_output(level)]
            be.upsample2x_backward(up, out=below, relu_output=below, leaky_slope=slope)

        if "pred" in acts:
            be.pad_zeros(acts["pred"], *acts["out"].shape[2:], out=acts["out"])
        for name, before in reversed(list(zip(head[:-1], head[1:]))):
            weights(before, acts[name])
            data(before, acts[name])
        concatenation(head[0], 0)
        for level in range(1, net.levels):
            a, b = f"dec_conv{level + 1}a", f"dec_conv{level + 1}b"
            weights(b, acts[a])
            data(b, acts[a])
            concatenation(a, level)
        for level in reversed(range(1, net.levels + 1)):
            conv, pool = f"enc_conv{level + 1}", acts[f"pool.{level}"]
            weights(conv, pool)
            data(conv, pool, masked=False)
            if level < net.levels:       # pool.l's two parts: one float32 addition (§15)
                be.add(acts[f"skip.{level}"], pool, out=pool)
            source = acts[f"enc_conv{level}"]      # level l-1's output, pooled into pool.l
            be.maxpool2x2_backward(pool, source, out=source, relu_output=source,
                                   leaky_slope=slope)
        weights("enc_conv1", acts["enc_conv0"])
        data("enc_conv1", acts["enc_conv0"])
        weights("enc_conv0", acts["input"])


def _pass_layers(network):
    if isinstance(network, N2NUNet):
        return _N2NPass
    return _UNetPass if isinstance(network, UNet) else _ChainPass


def workspace_bytes(network, per, h, w):
    """Device bytes of one pass's work arrays (float32) for `per` images of h x w."""
    shapes = _pass_layers(network).workspace_shapes(network, per, h, w)
    if isinstance(shapes, dict):
        shapes = shapes.values()
    return 4 * sum(int(np.prod(s)) for s in shapes)


def pass_pixels_for(network, budget=DEFAULT_PASS_BYTES):
    """The default pass size: the pixels whose work arrays fit `budget` bytes (measured on a
    1024 x 1024 image, on every U-Net's pooling grid up to ten poolings)."""
    return max(1, budget * (1 << 20) // workspace_bytes(network, 1, 1024, 1024))
