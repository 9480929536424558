"""Compiling generated kernels to PTX on a machine without a GPU (bench/compile_time.py,
inspect_sass.py, shared_memory.py).

Why: a generated kernel calls device functions (codegen.Source.device_function), and numba
compiles a device function at its caller's typing for the current device's compute
capability, which it asks the CUDA driver for: without a GPU that fails. `without_device`
answers with the compute capability the script compiles for instead.
"""
from types import SimpleNamespace


def without_device(cc):
    """Compile device functions for compute capability `cc` (major, minor) without a device."""
    from numba.cuda import dispatcher
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=tuple(cc[:2]))
