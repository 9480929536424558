"""The CPU backend's compiled functions that a training run needs, compiled at once in worker
processes before its first step (cryokern.precompile's machinery, with jobs of this backend).

Why: numba compiles each @njit function at its first call, one after another in the training
process: on a cold cache (a new checkout, numba's cache beside the sources still empty) that was
most of the no-argument demo's time on 2 cores (bench/demo_time.py). Each function is a
compilation of its own, so workers compile them side by side while the training process makes
or opens its data, filling numba's on-disk cache (cache=True) that the training process then
loads from.

Which functions, with which argument types: the operations of a training step, a validation
loss and a denoising forward pass (precompile.step_operations) are run through this package's functions on small zero
arrays, with every compiled function replaced by a recorder of its argument types: nothing is
computed or compiled. A job is one function with one signature (so no two workers write entries
of different signatures into one numba index at once); a worker compiles it with
Dispatcher.compile, which saves it to the cache. One more job compiles the data loader's image
math (precompile.HOST_JOB), which the first step needs too.

A marker file per network and sources (their numba stamps: mtime and size) says that all jobs
once succeeded with this cache: later runs start no workers.
"""
import hashlib
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

import numpy as np
from numba.core.registry import CPUDispatcher

from .. import cpu, precompile
from ..cachedir import cache_root


def _dispatchers():
    """(module, global name, dispatcher) of every compiled function that Python code of this
    package calls, once per module that holds it (conv imports activation's mask_elements,
    ...). Not the inlined ones: they are compiled into their callers only, which would find a
    replacement in their module's globals if they were compiled while it is there."""
    modules = [importlib.import_module(f"{cpu.__name__}.{m.name}")
               for m in pkgutil.iter_modules(cpu.__path__)]
    return [(module, name, value) for module in modules for name, value in vars(module).items()
            if isinstance(value, CPUDispatcher)
            and value.targetoptions.get("inline") != "always"]


def _key(dispatcher):
    return dispatcher.py_func.__module__, dispatcher.py_func.__name__


def jobs(network, optimizer):
    """(module, function, argument types) of each compiled function that a training step, a
    validation loss and a denoising forward pass of `network` (as precompile.step_operations takes it) with `optimizer`
    call, most costly first (see _cost); and precompile.HOST_JOB, the image math."""
    found = {}
    patched = _dispatchers()

    def recorder(dispatcher):
        def record(*args):
            types = tuple(dispatcher.typeof_pyval(a) for a in args)    # as a call types them
            found.setdefault(_key(dispatcher) + (types,), dispatcher)
        return record

    try:
        for module, name, dispatcher in patched:
            setattr(module, name, recorder(dispatcher))
        with np.errstate(all="ignore"):         # the recorders leave np.empty's garbage
            for name, args, kwargs in precompile.step_operations(network, optimizer):
                getattr(cpu, name)(*(precompile._materialize(a, np.asarray) for a in args),
                                   **{k: precompile._materialize(v, np.asarray)
                                      for k, v in kwargs})
    finally:
        for module, name, dispatcher in patched:
            setattr(module, name, dispatcher)
    return sorted(found, key=lambda job: _cost(found[job]), reverse=True) + [precompile.HOST_JOB]


def _cost(dispatcher, seen=None):
    """A proxy of a function's compile time, to start the longest jobs first: parallel ones
    first (numba's parfor lowering compiles a second function), then by bytecode size with the
    compiled functions it calls (inlined into it)."""
    seen = set() if seen is None else seen
    seen.add(dispatcher)
    code = dispatcher.py_func.__code__
    size = len(code.co_code)
    for name in code.co_names:
        callee = dispatcher.py_func.__globals__.get(name)
        if isinstance(callee, CPUDispatcher) and callee not in seen:
            size += _cost(callee, seen)[1]
    return bool(dispatcher.targetoptions.get("parallel")), size


def label(job):
    """'conv._conv_rows', ... for the progress line."""
    if job == precompile.HOST_JOB:
        return precompile.label(job)
    module, function, _ = job
    return f"{module.rpartition('.')[2]}.{function}"


def run_job(job):
    """Compile one function for one signature in this process (numba saves it to its on-disk
    cache); returns the seconds. HOST_JOB: precompile's run_job."""
    if job == precompile.HOST_JOB:
        return precompile.run_job(job)
    start = time.perf_counter()
    module, function, types = job
    getattr(importlib.import_module(module), function).compile(types)
    return time.perf_counter() - start


def _marker(job_list):
    """The marker file of `job_list` with this package's sources and numba's cache."""
    import llvmlite.binding
    import numba
    package = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(package.glob("*.py")):       # what numba's index checks: mtime and size
        stat = path.stat()
        h.update(f"{path.name} {stat.st_mtime_ns} {stat.st_size}\n".encode())
    h.update(f"{numba.__version__} {sys.version_info[:2]} {llvmlite.binding.get_host_cpu_name()} "
             f"{os.environ.get('NUMBA_CACHE_DIR', '')} {os.path.realpath(package)} "
             f"{job_list!r}".encode())
    return cache_root() / "cpu" / f"ready-{h.hexdigest()[:16]}.json"


def start(network, optimizer, processes=None):
    """Start compiling the CPU functions that training `network` (a model network or a chain's
    channel list) with `optimizer` calls, in worker processes; returns the handle to wait() on
    before the first step (a no-op one when an earlier run compiled them)."""
    network = precompile.as_network(network)
    job_list = jobs(network, optimizer)
    marker = _marker(job_list)
    if marker.exists():
        return precompile.Ready()
    processes = min(len(job_list), processes or os.cpu_count() or 1)
    print(f"cryokern: compiling the CPU backend for the {network.label()} ({len(job_list)} "
          f"jobs in {processes} processes, first run only)", flush=True)
    return precompile.Compiling(job_list, marker, processes, worker=__name__, label=label)


if __name__ == "__main__":
    precompile.main(*sys.argv[1:3], run=run_job)
