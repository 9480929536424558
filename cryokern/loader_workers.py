"""Worker processes that read and normalize training images into shared host buffers.

Reading an image pair and normalizing it (several passes over each image) costs the host more
than the GPU spends on it; in threads of the training process those passes share its GIL with
the thread that launches the step's kernels. Here they run in worker processes, each filling
whole images (data.fill_image) straight into the batch buffers, which live in shared memory
(multiprocessing.shared_memory) and are uploaded from directly. On a GPU the buffers are also
page-locked (registered with the driver through numba's mempin), so uploads are DMA copies as
from backend.host_empty; where that fails (the simulator, no GPU) they stay pageable.

Workers are started as `python -m cryokern.loader_workers` and talk to the training process over
a local socket (localsocket.py): nothing of the user's __main__ is imported again (no
multiprocessing spawn). A worker ends when the training process tells it to, or dies (EOF on the
connection), so a killed rank leaves no workers behind. Every image is filled by the same code
into its own place whichever worker takes it: the bytes do not depend on the number of workers,
nor on workers against threads (data.BatchLoader with no pool).
"""
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from . import localsocket
from .mrcstack import DataError

ADDRESS = "CRYOKERN_LOADER"     # host:port:authkey of the training process, for its workers
START_TIMEOUT_S = 120


def default_workers(ranks_here=1):
    """A worker per core but two (the step's launching thread and the loader's filler), at
    most 12 (see data.BatchLoader for the measurements behind the cap); the node's cores shared
    by the `ranks_here` ranks running on it."""
    return min(12, max(1, (os.cpu_count() or 1) // ranks_here - 2))


class WorkerPool:
    """`workers` worker processes, and the shared buffers they fill (`empty`). fill() sends one
    image's job to the next worker in turn and returns a Future of its clean crop's (min,
    max); a worker's error comes back as the Future's exception (DataError as it was raised)."""

    def __init__(self, workers, pin=False):
        self.pin = pin
        self._segments = []     # (SharedMemory, base address, bytes, page-lock handle)
        self._jobs, self._next_job, self._turn = {}, 0, 0
        self._lock = threading.Lock()
        listener, address = localsocket.listen()
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, **{ADDRESS: address},
                   PYTHONPATH=os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH"))
                                              if p))
        self._procs = [subprocess.Popen([sys.executable, "-m", "cryokern.loader_workers",
                                         str(worker)], env=env, stdin=subprocess.DEVNULL)
                       for worker in range(workers)]
        self._connections = self._accept(listener)
        self._sent = [set() for _ in self._connections]     # segments each worker has attached
        self._send_locks = [threading.Lock() for _ in self._connections]
        for worker in range(len(self._connections)):
            threading.Thread(target=self._receive, args=(worker,), daemon=True).start()

    def _accept(self, listener):
        """The workers' connections, in the workers' order (each says its number first);
        RuntimeError if a worker ends first."""
        accepted = queue.Queue()

        def accept():
            try:
                for _ in self._procs:
                    connection = localsocket.accept(listener)
                    accepted.put((connection.recv(), connection))
            except (OSError, EOFError):
                pass
        threading.Thread(target=accept, daemon=True).start()
        connections = []
        try:
            for _ in range(START_TIMEOUT_S * 10):
                try:
                    connections.append(accepted.get(timeout=0.1))
                except queue.Empty:
                    pass
                if len(connections) == len(self._procs):
                    return [c for _, c in sorted(connections, key=lambda wc: wc[0])]
                ended = [p.returncode for p in self._procs if p.poll() is not None]
                if ended:
                    raise RuntimeError(f"a loader worker ended at start (status {ended[0]})")
            raise RuntimeError(f"the loader workers did not start in {START_TIMEOUT_S} s")
        except BaseException:
            self._end([c for _, c in connections])
            raise
        finally:
            listener.close()

    def empty(self, shape):
        """A float32 array of `shape` in shared memory (page-locked if the pool pins)."""
        nbytes = int(np.prod(shape)) * 4
        segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        array = np.ndarray(shape, np.float32, buffer=segment.buf)
        self._segments.append((segment, array.ctypes.data, nbytes, self._page_lock(segment,
                                                                                   array)))
        return array

    def _page_lock(self, segment, array):
        if not self.pin or array.nbytes == 0:
            return None
        try:
            from numba import cuda
            return cuda.current_context().mempin(segment, array.ctypes.data, array.nbytes)
        except Exception:   # no GPU, the simulator, or a driver that refuses: pageable
            return None

    def _where(self, array):
        """(segment name, byte offset) of a C-contiguous view into one of the buffers."""
        address = array.ctypes.data
        for segment, base, nbytes, _ in self._segments:
            if base <= address and address + array.nbytes <= base + nbytes:
                return segment.name, address - base
        raise ValueError("the loader's workers fill only buffers from WorkerPool.empty")

    def fill(self, subset, index, corner, normalize_mode, noisy_out, clean_out):
        """data.fill_image(subset.images, subset.image_shape, ...) in a worker: a Future."""
        targets = [self._where(noisy_out), self._where(clean_out)]
        images = tuple((n.path, c.path) for n, c in subset.images.pairs)
        future = Future()
        with self._lock:
            job, self._next_job = self._next_job, self._next_job + 1
            worker, self._turn = self._turn, (self._turn + 1) % len(self._connections)
            self._jobs[job] = (future, worker)
        sent = self._sent[worker]
        try:
            with self._send_locks[worker]:
                connection = self._connections[worker]
                for name, _ in targets:
                    if name not in sent:
                        connection.send(("segment", name))
                        sent.add(name)
                connection.send(("fill", job, images, tuple(subset.image_shape), int(index),
                                 tuple(int(c) for c in corner), normalize_mode,
                                 tuple(noisy_out.shape), targets))
        except OSError:     # the worker ended (unless its receiver has failed the job already)
            with self._lock:
                pending = self._jobs.pop(job, None)
            if pending is not None:
                future.set_exception(RuntimeError("a loader worker ended"))
        return future

    def _receive(self, worker):
        """A worker's results to their Futures; if it dies, its pending jobs fail."""
        try:
            while True:
                job, ok, value = self._connections[worker].recv()
                with self._lock:
                    future, _ = self._jobs.pop(job)
                if ok:
                    future.set_result(value)
                else:
                    kind, message = value
                    future.set_exception(DataError(message) if kind == "DataError" else
                                         RuntimeError(f"loader worker: {kind}: {message}"))
        except (EOFError, OSError):
            with self._lock:
                pending = [j for j, (_, w) in self._jobs.items() if w == worker]
                futures = [self._jobs.pop(j)[0] for j in pending]
            for future in futures:
                future.set_exception(RuntimeError("a loader worker ended"))

    def close(self):
        """End the workers (their connections closed), then free the buffers; arrays from
        `empty` must not be used after this."""
        self._end(self._connections)
        for segment, _, _, pinned in self._segments:
            segment.unlink()
            if pinned is None:      # page-locked: stays mapped (and registered) till exit,
                try:                # never unregistered after its unmapping
                    segment.close()
                except BufferError:     # views still held: the memory goes with them
                    pass
        self._segments = [s for s in self._segments if s[3] is not None]

    def _end(self, connections):
        for c in connections:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in connections:
            c.close()


def serve(connection):
    """A worker's loop: attach segments, fill images (their files opened once), until told to
    stop or the connection ends."""
    from .data import PairedImages, fill_image
    segments, datasets = {}, {}
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "segment":
            segment = shared_memory.SharedMemory(message[1])
            # the training process owns it: this process's tracker must not unlink it at exit
            resource_tracker.unregister(segment._name, "shared_memory")
            segments[message[1]] = segment
            continue
        _, job, images, shape, index, corner, mode, out_shape, targets = message
        try:
            if images not in datasets:      # opened once; an error goes to this job
                datasets[images] = PairedImages(images)
            noisy, clean = (np.ndarray(out_shape, np.float32, buffer=segments[name].buf,
                                       offset=offset) for name, offset in targets)
            result = (job, True, fill_image(datasets[images], shape, index, corner, mode,
                                            noisy, clean))
            del noisy, clean
        except Exception as e:
            result = (job, False, (type(e).__name__, str(e)))
        connection.send(result)


def warm_up():
    """Load the compiled passes fill_image uses (numba's cache: ~0.4 s on a busy host) before
    the worker reports ready, so the first batches do not wait for it."""
    from . import imagemath
    from .data import normalization, normalize, normalize_with_range
    x = np.ones((2, 2), np.float32)
    affine = normalization(x, "per-image")
    normalize(x, affine, out=np.empty_like(x))
    normalize_with_range(x, affine, np.empty_like(x))
    imagemath.sum_and_range(x)


def main():
    warm_up()
    connection = localsocket.connect(os.environ[ADDRESS])
    connection.send(int(sys.argv[1]))
    serve(connection)


if __name__ == "__main__":
    main()
