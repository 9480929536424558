"""A training step's launches recorded once as a CUDA graph, then replayed by one launch.

numba spends 0.2-0.3 ms of host time on each kernel launch (the arguments are marshalled in
Python), and a step has 24 launches: on an H100 the host took 6.3 ms to queue a step that the
device ran in 6.8 ms. With no slack, any pause of the launching thread (the loader's threads
share its GIL) left the device idle. A replayed graph costs one launch, and the same kernels
with the same arguments give the same bits.

A graph holds raw addresses: it is keyed by the addresses and shapes of the arrays the caller
passes, recorded only for a key seen before (so that the first, eager run has compiled the
kernels and allocated every buffer), and keeps the scratch buffers of its time alive.
"""
from collections import OrderedDict

from numba import config, cuda

from .arrays import is_device_array, launching_on, scratch_buffers


def _checked(result):
    from cuda.bindings import driver
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA graph call failed: {result[0]}")
    return result[1] if len(result) > 1 else None


class _Graph:
    def __init__(self, queue, stream):
        from cuda.bindings import driver
        self._driver = driver
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        _checked(driver.cuStreamBeginCapture(stream.handle, mode))
        try:
            with launching_on(stream):
                queue()
        finally:
            graph = _checked(driver.cuStreamEndCapture(stream.handle))
        try:
            self._exec = _checked(driver.cuGraphInstantiate(graph, 0))
        finally:
            _checked(driver.cuGraphDestroy(graph))
        self._stream = stream
        self._keep = scratch_buffers()

    def launch(self):
        _checked(self._driver.cuGraphLaunch(self._exec, self._stream.handle))

    def __del__(self):
        if hasattr(self, "_exec"):
            self._driver.cuGraphExecDestroy(self._exec)


def _address(a):
    return a.__cuda_array_interface__["data"][0], tuple(a.shape)


class Recorder:
    """run(arrays, queue, kind): queue() launches kernels that read or write `arrays` (and
    buffers that stay put); `kind` names what it does (a step, a validation loss), so that
    different work on the same arrays has graphs of its own. The first time these arrays are
    seen it runs as it is; the second time it is recorded as a graph, which that call and
    every later one with the same arrays launch. Graphs run on one stream of their own (all
    kinds on one, so they are ordered among themselves), which (being a blocking stream) is
    ordered with the work queued on the legacy default stream before and after. The `keep`
    most recently used graphs are kept. Host arrays (copied to the device by each call) and
    the simulator have no graphs: queue() runs as it is."""

    def __init__(self, keep=4):
        self._keep = keep
        self._seen = set()
        self._graphs = OrderedDict()
        self._stream = None

    def run(self, arrays, queue, kind="step"):
        if config.ENABLE_CUDASIM or not all(is_device_array(a) for a in arrays):
            queue()
            return
        key = (kind,) + tuple(_address(a) for a in arrays)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen:
                if len(self._seen) > 64:            # callers passing new arrays every time
                    self._seen.clear()
                self._seen.add(key)
                queue()
                return
            if self._stream is None:
                self._stream = cuda.stream()
            graph = self._graphs[key] = _Graph(queue, self._stream)
            if len(self._graphs) > self._keep:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph.launch()
