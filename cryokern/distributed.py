"""Data-parallel ranks: who this process is, and the few collectives training needs.

A batch's images are split over the ranks in contiguous blocks of ceil(B / N) (`block`): rank r
holds images r*ceil(B/N) .. of the batch, the last ranks fewer or none in a ragged batch. Each
rank writes its images' float64 per-image sums (numerics §4) into rows of buffers that have
N * ceil(B/N) rows, at its own offset; `gather_rows` all-gathers those rows in place, so that
every rank holds every image's sums with images 0..B-1 in rows 0..B-1 (the blocks are full up
to the last non-empty one, so the padding lies behind row B). Every rank then folds rows 0..B-1
in image order, exactly as one process does: the same parameters, bit for bit, for any N.
Moving float64 rows changes no bit, so this is all the distribution the numerics need.

Host communicators (launch, the host's few collectives, aborts): `Single` (one process, the
default: no MPI imported), `Mpi` (ranks started by mpiexec or srun, through mpi4py) and `Hub`
(ranks started by `launch`, train's --gpus N, no MPI needed: their host collectives pass through
the launching process over a local socket, localsocket.py). They gather host arrays (the NumPy
reference). `Nccl` gathers numba device arrays through CuPy's NCCL binding, device to device on
the stream the kernels run on, and leaves the rest to a host communicator. NVLink multicast
(NVLS) is never used: NCCL_NVLS_ENABLE=0 is set before NCCL starts (and NCCL_GRAPH_REGISTER=0:
steps are recorded as CUDA graphs with their all-gather, step.py).
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from . import localsocket
from .mrcstack import DataError

# (rank, size, local rank) variables of the launchers: MPICH's hydra, Open MPI, SLURM's srun
_LAUNCHERS = (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
              ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
              ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
              ("CRYOKERN_RANK", "CRYOKERN_RANKS", "CRYOKERN_RANK"))
HUB = "CRYOKERN_HUB"            # host:port:authkey of the launching process (launch)
KILL_AFTER_S = 10               # a launched rank that ignores SIGTERM this long is killed


def launched_size():
    """The number of ranks the launcher started (1 when none did)."""
    for _, size, _ in _LAUNCHERS:
        if os.environ.get(size, "").isdigit():
            return int(os.environ[size])
    return 1


def block(images, size, rank):
    """(first, stop): rank's contiguous block of a batch of `images` images."""
    per = -(-images // size)
    return min(images, rank * per), min(images, (rank + 1) * per)


class Single:
    """One process: every collective is the identity. The collectives of host communicators
    are written once here over allgather(); subclasses give allgather and abort."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allgather(self, obj):
        """Every rank's `obj` (picklable), in rank order."""
        return [obj]

    def block(self, images):
        return block(images, self.size, self.rank)

    def rows(self, images):
        """Rows of a per-image sum buffer for a batch of `images`: N blocks of ceil(B / N)."""
        return -(-images // self.size) * self.size

    def offset(self, images):
        """This rank's first row in such a buffer."""
        return self.rank * (-(-images // self.size))

    def gather_rows(self, arrays, images):
        """Each host array's rows (N blocks of ceil(B / N) rows, this rank's block filled)
        gathered in place, bytes unchanged."""
        if self.size == 1:
            return
        per, first = -(-images // self.size), self.offset(images)
        for a in arrays:
            a[...] = np.concatenate(self.allgather(a[first:first + per]))

    def for_backend(self, backend):
        """The communicator that gathers `backend`'s arrays: NCCL's for GPU ranks."""
        if backend.name != "gpu" or self.size == 1:
            return self
        return Nccl(self, self.gpu())

    def gpu(self):
        """This rank's GPU: the one of its local rank where each rank sees the node's GPUs,
        the only one where it sees one (srun --gpus-per-task=1). Ranks sharing a GPU are
        refused on every rank alike (DataError), before NCCL starts."""
        import socket

        from numba import cuda
        gpus = len(cuda.gpus)
        device = self.local_rank if self.local_size <= gpus else 0
        where = (socket.gethostname(), getattr(cuda.gpus[device], "uuid", device))
        placed = self.agree(where)
        if len(set(placed)) < len(placed):
            shared = max(set(placed), key=placed.count)
            raise DataError(f"{placed.count(shared)} ranks on {shared[0]} share a GPU "
                            f"({gpus} visible to each): each rank needs a GPU of its own")
        return device

    def minmax(self, lo, hi):
        """(min of lo, max of hi) over the ranks."""
        got = self.allgather((lo, hi))
        return min(l for l, _ in got), max(h for _, h in got)

    def agree(self, error):
        """Every rank's error (a message, or None) in rank order."""
        return self.allgather(error)

    def barrier(self):
        self.allgather(None)

    def stop(self, status, line, agreed):
        """Report an error that ends the run and return the exit status. `agreed`: every
        rank meets it (rank 0 alone prints); otherwise this rank names itself and stops every
        rank (within seconds, whatever collective the others wait in)."""
        if agreed or self.size == 1:
            if self.rank == 0:
                print(line, file=sys.stderr, flush=True)
            return status
        print(f"{line} [rank {self.rank} of {self.size}]", file=sys.stderr, flush=True)
        self.abort(status)

    def abort(self, status):
        sys.exit(status)


class Mpi(Single):
    """Ranks launched by mpiexec/srun, through mpi4py; an abort is MPI's (every rank ends)."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def gather_rows(self, arrays, images):
        for a in arrays:
            self.comm.Allgather(self.MPI.IN_PLACE, a)

    def abort(self, status):
        sys.stdout.flush()
        sys.stderr.flush()
        wait_until_read((1, 2))
        self.comm.Abort(status)


class Hub(Single):
    """Ranks started by launch() on one node: each allgather passes through the launching
    process (a local socket); an abort ends this process, and the launcher ends the others."""

    def __init__(self, rank, size, address):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, rank, size
        self.connection = localsocket.connect(address)
        self.connection.send(rank)

    def allgather(self, obj):
        try:
            self.connection.send(obj)
            return self.connection.recv()
        except (EOFError, OSError):     # the launcher ended: it ends the ranks itself
            self.abort(1)

    def abort(self, status):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


class Nccl(Single):
    """Ranks on GPUs: device arrays gathered by NCCL on the kernels' stream, device to device;
    host collectives and aborts through the host communicator. Each rank uses `device`
    (Single.gpu)."""

    def __init__(self, host, device):
        self.host = host
        self.rank, self.size = host.rank, host.size
        self.local_rank, self.local_size = host.local_rank, host.local_size
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        # no user-buffer registration in recorded graphs: a rank may record a step that
        # another runs eagerly, and NCCL forbids a collective whose ranks mix registered and
        # unregistered buffers
        os.environ["NCCL_GRAPH_REGISTER"] = "0"
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError:     # the same on every rank: reported once, exit status 2
            raise DataError("several ranks on GPUs exchange through NCCL, which needs CuPy: "
                            "pip install cryokern[cu12] or [cu13]") from None
        from numba import cuda
        self.nccl = nccl
        cuda.select_device(device)
        cupy.cuda.Device(device).use()
        uid = host.allgather(nccl.get_unique_id() if self.rank == 0 else None)[0]
        self.device_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def allgather(self, obj):
        return self.host.allgather(obj)

    def gather_rows(self, arrays, images):
        from .kernels.arrays import launch_stream
        stream = launch_stream()        # 0 (legacy default) or a numba stream
        handle = getattr(stream, "handle", 0)
        handle = int(getattr(handle, "value", handle) or 0)     # ctypes or cuda.bindings
        per = -(-images // self.size)
        self.nccl.groupStart()
        try:
            for a in arrays:
                count = a.size // a.shape[0] * per
                base = a.device_ctypes_pointer.value
                self.device_comm.allGather(base + self.rank * count * 8, base, count,
                                           self.nccl.NCCL_FLOAT64, handle)
        finally:
            self.nccl.groupEnd()

    def for_backend(self, backend):
        return self

    def abort(self, status):
        self.device_comm.abort()
        self.host.abort(status)


def wait_until_read(fds, limit_s=5.0):
    """Wait (at most limit_s) until the readers of those of `fds` that are pipes have read
    all that was written to them. mpiexec forwards a rank's output through a pipe; after an
    MPI abort it may kill its forwarder before that drained the pipe, losing the line that
    says why the run ended (seen under load on a 2-core machine)."""
    import fcntl
    import stat
    import termios
    deadline = time.monotonic() + limit_s
    for fd in fds:
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            while (time.monotonic() < deadline
                   and int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)):
                time.sleep(0.01)
        except OSError:     # closed, or a pipe without FIONREAD: nothing to wait for
            continue


def world():
    """The host communicator of this process: Single unless a launcher started several ranks
    (for_backend then gives the one that gathers the backend's arrays)."""
    if launched_size() <= 1:
        return Single()
    if HUB in os.environ:
        return Hub(int(os.environ["CRYOKERN_RANK"]), launched_size(), os.environ[HUB])
    return Mpi()


def launch(module, argv, ranks):
    """Run `python -m module argv` as `ranks` ranks on this node (one per GPU) and return
    the exit status: 0 when all end well, else the first failing rank's, the others ended
    (SIGTERM, then SIGKILL after KILL_AFTER_S) at once. This process is their hub."""
    listener, address = localsocket.listen()
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", CRYOKERN_RANKS=str(ranks), **{HUB: address})
    procs = [subprocess.Popen([sys.executable, "-m", module] + list(argv),
                              env=dict(env, CRYOKERN_RANK=str(rank)))
             for rank in range(ranks)]
    connections = [None] * ranks    # held open until the ranks have ended
    threading.Thread(target=_serve, args=(listener, connections), daemon=True).start()
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        failed = [130]
    if failed:
        _end(procs)
    return _status(failed[0]) if failed else 0


def relaunch(module, argv, gpus):
    """A command's --gpus N: `python -m module argv` again as N ranks (launch), without --gpus;
    its exit status. N < 1, or --gpus in ranks a launcher started: one line, exit status 2."""
    if gpus < 1 or launched_size() > 1:
        print(f"{module}: error: --gpus {gpus}: " + (
            "must be at least 1" if gpus < 1 else "ranks started by mpiexec or srun take no "
            "--gpus"), file=sys.stderr)
        return 2
    rest = [a for a, before in zip(argv, [None] + argv[:-1])
            if a != "--gpus" and before != "--gpus" and not a.startswith("--gpus=")]
    return launch(module, rest, gpus)


def _serve(listener, connections):
    """Each round, every rank's object, sent back to all in rank order; ends when a rank
    closes its connection (its end, or its failure, which launch() handles)."""
    for _ in connections:
        connection = localsocket.accept(listener)
        connections[connection.recv()] = connection
    try:
        while True:
            gathered = [c.recv() for c in connections]
            for c in connections:
                c.send(gathered)
    except (EOFError, OSError):
        pass


def _end(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + KILL_AFTER_S
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _status(code):
    """A child's exit status as a shell gives it (128 + n for a child killed by signal n)."""
    return 128 - code if code < 0 else code
