"""Copies between host and device that do not stop the host: the training loop queues a step,
and its batch's upload and its loss's download, and goes on to the next batch.

The kernels run on the legacy default stream, or replayed as a graph on a blocking stream,
which CUDA orders with it. Batches are uploaded on a stream of their own, created non-blocking
so that it waits for neither: the copy of batch k+1 overlaps step k. Events order the two: a
step waits for its batch's copy, and a copy into a device slot waits for the last step that
read that slot.
"""
import weakref

import numpy as np
from numba import config, cuda


def _upload_stream(owner):
    """A non-blocking stream (cuda.stream() makes blocking ones, which would wait for every
    kernel queued on the legacy default stream), destroyed with `owner` (numba does not own a
    stream it did not create); the simulator's stand-in where there is none."""
    if config.ENABLE_CUDASIM:
        return cuda.stream()
    from cuda.bindings import driver
    err, handle = driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING.value)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuStreamCreate failed: {err}")
    weakref.finalize(owner, driver.cuStreamDestroy, handle)
    return cuda.external_stream(int(handle))


def fetch(device_scalar):
    """Start copying a float64 device scalar to the host, behind the work queued before it:
    fetch_arrays' copy of one array, whose result() is the float."""
    return PendingScalar(fetch_arrays({"value": device_scalar}))


class PendingScalar:
    """fetch's pending copy; result() waits for it alone and gives its value as a float."""

    def __init__(self, pending):
        self._pending = pending

    def result(self):
        return float(self._pending.result()["value"][0])


class PendingArrays:
    """Device arrays on their way to the host: their copies into page-locked buffers queued
    behind the work queued so far, and one event after them. result() waits for that event
    alone (one synchronization for all the arrays, where a copy_to_host each waited for the
    whole device in turn) and gives NumPy copies, so that the buffers can be reused."""

    def __init__(self, arrays, pool):
        self._key = tuple((k, tuple(a.shape), a.dtype.str) for k, a in arrays.items())
        free = pool.setdefault(self._key, [])
        self._pool = free
        self._slot = free.pop() if free else (
            {k: cuda.pinned_array(a.shape, a.dtype) for k, a in arrays.items()}, cuda.event())
        hosts, event = self._slot
        for k, a in arrays.items():
            a.copy_to_host(hosts[k], stream=cuda.default_stream())
        event.record()
        self._value = None

    def result(self):
        if self._value is None:
            hosts, event = self._slot
            event.synchronize()
            self._value = {k: np.array(h) for k, h in hosts.items()}
            self._pool.append(self._slot)
        return self._value


_array_slots = {}


def fetch_arrays(arrays):
    """Start copying {key: device array} to the host, behind the work queued before."""
    return PendingArrays(arrays, _array_slots)


class Uploads:
    """Device copies of host batches, in `slots` sets of buffers used in turn.

    put(*host_arrays) queues their copies (page-locked host memory: truly asynchronous) and
    returns the device arrays; kernels queued after put() see the data. The host arrays must
    stay untouched until copied() returns; call used() once the step reading the device
    arrays is queued, so that the slot is not written over before that step has run."""

    def __init__(self, slots=2):
        self._slots = slots
        self._buffers = {}
        self._next = 0
        self._last = None
        self._stream = None
        self._copied = [cuda.event() for _ in range(slots)]
        self._used = [cuda.event() for _ in range(slots)]

    def put(self, *hosts):
        if self._stream is None:
            self._stream = _upload_stream(self)
        slot = self._next
        key = (slot,) + tuple(h.shape for h in hosts)
        if key not in self._buffers:
            self._buffers[key] = [cuda.device_array(h.shape, np.float32) for h in hosts]
        devices = self._buffers[key]
        self._used[slot].wait(self._stream)
        for dev, host in zip(devices, hosts):
            dev.copy_to_device(host, stream=self._stream)
        self._copied[slot].record(self._stream)
        self._copied[slot].wait()                # the legacy stream: the step waits for it
        self._last = slot
        self._next = (slot + 1) % self._slots
        return devices

    def copied(self):
        """Wait until the last put()'s copies are done (its host arrays may then be reused)."""
        self._copied[self._last].synchronize()

    def used(self):
        """The work queued so far is the last to read the last put()'s device arrays."""
        self._used[self._last].record()
