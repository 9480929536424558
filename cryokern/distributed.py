"""Data-parallel ranks: who this process is, and the few collectives training needs.

A batch's images are split over the ranks in contiguous blocks of ceil(B / N) (`block`): rank r
holds images r*ceil(B/N) .. of the batch, the last ranks fewer or none in a ragged batch. Each
rank writes its images' float64 per-image sums (numerics §4) into rows of buffers that have
N * ceil(B/N) rows, at its own offset; `gather_rows` all-gathers those rows in place, so that
every rank holds every image's sums with images 0..B-1 in rows 0..B-1 (the blocks are full up
to the last non-empty one, so the padding lies behind row B). Every rank then folds rows 0..B-1
in image order, exactly as one process does: the same parameters, bit for bit, for any N.
Moving float64 rows changes no bit, so this is all the distribution the numerics need.

Implementations: `Single` (one process, the default: no MPI imported), `Mpi` (host arrays:
the NumPy reference; ranks launched by mpiexec or srun, through mpi4py) and `Nccl` (numba
device arrays, through CuPy's NCCL binding on the stream the kernels run on; MPI for launch
and the host's few collectives). NVLink multicast (NVLS) is never used: NCCL_NVLS_ENABLE=0 is
set before NCCL starts.
"""
import os
import sys

import numpy as np

# (rank, size, local rank) variables of the launchers: MPICH's hydra, Open MPI, SLURM's srun
_LAUNCHERS = (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
              ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
              ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


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
    """One process: every collective is the identity."""
    rank, size, local_rank = 0, 1, 0

    def block(self, images):
        return block(images, self.size, self.rank)

    def rows(self, images):
        """Rows of a per-image sum buffer for a batch of `images`: N blocks of ceil(B / N)."""
        return -(-images // self.size) * self.size

    def offset(self, images):
        """This rank's first row in such a buffer."""
        return self.rank * (-(-images // self.size))

    def gather_rows(self, arrays, images):
        pass

    def for_backend(self, backend):
        """The communicator that gathers `backend`'s arrays."""
        return self

    def minmax(self, lo, hi):
        return lo, hi

    def agree(self, error):
        """Every rank's error (a message, or None) in rank order."""
        return [error]

    def barrier(self):
        pass

    def stop(self, status, line, agreed):
        """Report an error that ends the run and return the exit status. `agreed`: every
        rank meets it (rank 0 alone prints); otherwise this rank names itself and stops every
        rank (MPI abort, within seconds, whatever collective the others wait in)."""
        if agreed or self.size == 1:
            if self.rank == 0:
                print(line, file=sys.stderr, flush=True)
            return status
        print(f"{line} [rank {self.rank} of {self.size}]", file=sys.stderr, flush=True)
        self.abort(status)

    def abort(self, status):
        sys.exit(status)


class Mpi(Single):
    """Ranks launched by mpiexec/srun; host (NumPy) arrays gathered through MPI."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()

    def for_backend(self, backend):
        return Nccl(self) if backend.name == "gpu" else self

    def gather_rows(self, arrays, images):
        """Each array's rows (N blocks of ceil(B / N) rows, this rank's block filled) gathered
        in place, bytes unchanged."""
        for a in arrays:
            self.comm.Allgather(self.MPI.IN_PLACE, a)

    def minmax(self, lo, hi):
        got = self.comm.allgather((lo, hi))
        return min(l for l, _ in got), max(h for _, h in got)

    def agree(self, error):
        return self.comm.allgather(error)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, status):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(status)


class Nccl(Mpi):
    """Ranks on GPUs: device arrays gathered by NCCL on the kernels' stream, device to device;
    launch, host collectives and aborts through MPI. Each rank uses the GPU of its local rank."""

    def __init__(self, host):
        self.MPI, self.comm = host.MPI, host.comm
        self.rank, self.size, self.local_rank = host.rank, host.size, host.local_rank
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError:
            raise RuntimeError("several ranks on GPUs exchange through NCCL, which needs CuPy: "
                               "pip install cryokern[cu12] or [cu13]") from None
        from numba import cuda
        self.nccl = nccl
        device = self.local_rank % len(cuda.gpus)
        cuda.select_device(device)
        cupy.cuda.Device(device).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.device_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def gather_rows(self, arrays, images):
        from .kernels.arrays import launch_stream
        stream = launch_stream()
        handle = int(stream.handle) if stream else 0
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
        super().abort(status)


def world():
    """The communicator of this process: Single unless a launcher started several ranks, then
    Mpi (for_backend gives the one that gathers the backend's arrays)."""
    return Single() if launched_size() <= 1 else Mpi()
