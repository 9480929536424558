"""Kernels whose hot loops are written out in full by a generator, then loaded from a file.

Why: numba has no `#pragma unroll`, and LLVM left the convolutions' tap loops rolled (shared
memory indexed at run time, ten integer instructions per fma). The generators in conv.py write
each specialization (channel counts, flags) as straight-line Python with named register
variables. The source is saved under the cache root (named by its hash, written once,
atomically) and imported from there, so numba's on-disk cache (`cache=True`) has a file to key
on and a second start compiles nothing.

The kernels index arrays with `uint64(...)`: numba wraps negative signed indices around (a
64-bit compare and select per access), which made half of the 16 -> 16 convolutions'
instructions in their hot loops (SASS, sm_90); an unsigned index is used as it is, and LLVM
then also merges neighbouring shared-memory loads into LDS.64/LDS.128.
"""
import functools
import hashlib
import importlib.util
import os
import sys
import tempfile

from numba import config

from ..cachedir import cache_root

_announced = False


def _announce_compiling(directory):
    """A kernel source new to the cache will be compiled at its first launch: the written-out
    kernels take minutes together on a first run (a 1-epoch run took 198 s with an empty
    cache, 3.5-4.2 s warm; H100), so say so once rather than sit silent. Only to a terminal:
    redirected stderr (logs, the error contract of one line) stays as it was."""
    global _announced
    if not _announced and not config.ENABLE_CUDASIM and sys.stderr.isatty():
        print(f"cryokern: compiling GPU kernels for these shapes (first run only, can take "
              f"minutes; cached under {directory})", file=sys.stderr, flush=True)
        _announced = True


def mark_announced():
    """Say nothing about compiling (a precompiling worker: its parent has said it)."""
    global _announced
    _announced = True


_generators = []


def generator(build):
    """A kernel generator, cached per its arguments (a kernel is written, loaded and compiled
    once a process); forget_generated clears every such cache at once."""
    cached = functools.lru_cache(maxsize=None)(build)
    _generators.append(cached)
    return cached


def forget_generated():
    """Forget every kernel the generators have loaded, so that the next calls write and load
    again (tests that move the kernel cache, or edit the generated sources)."""
    for cached in _generators:
        cached.cache_clear()


def load_module(name, source):
    """Import `source` as a module (saved as <cache>/kernels/<name>_<hash>.py)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    directory = cache_root() / "kernels"
    path = directory / f"{name}_{digest}.py"
    if not path.exists():
        _announce_compiling(directory.parent)
        _write_once(directory, path, source)
    spec = importlib.util.spec_from_file_location(f"cryokern_generated_{name}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_once(directory, path, source):
    """Write `path` unless another process has: linked from a complete temporary file, never
    replaced. numba's cache index keys on the source file's mtime and size, so a second
    writer replacing the file (the same text, a new mtime) would invalidate the kernels that
    the precompiling workers (precompile.py) had just cached from it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def select_load(array, index, test):
    """`array[index]` where `test` holds, else float32 0, written as two selects instead of a
    branch: where `test` fails the load reads element 0 (every array a kernel gets has one)
    and its value is dropped. `test` is an expression without branches (`&`, not `and`).

    Why: each branch of a written-out kernel is a few blocks of numba IR, and numba's front
    end (liveness, SSA reconstruction, rewrites) takes time growing with blocks times
    variables. Backward-data from one input channel had 287 branches (its 64 mask elements
    loaded, set as bits and applied, a branch each, and the stores' guards): 17.9 of its 18.4
    CPU s of compiling were numba's front end, NVVM and ptxas the rest (bench/compile_time.py,
    NOTES v28)."""
    return f"selp({test}, {array}[selp({test}, uint64({index}), uint64(0))], float32(0))"


class Source:
    """Lines of Python with indentation, for the generators."""

    def __init__(self):
        self.lines = []
        self.depth = 0

    def __call__(self, line=""):
        self.lines.append("    " * self.depth + line if line else "")
        return self

    def kernel(self, params, max_registers=None, types=()):
        """Start a module holding one `kernel(params)`, register-capped on a real GPU; numba
        `types` beyond float32, float64, int64 and uint64 imported too."""
        names = ("cuda", "float32", "float64", "int64", *types, "uint64")
        self(f"from numba import {', '.join(names)}")
        self()
        cap = "" if max_registers is None or config.ENABLE_CUDASIM else \
            f", max_registers={max_registers}"     # the simulator's jit takes no cap
        self(f"@cuda.jit(cache=True{cap})")
        self(f"def kernel({params}):").indent()
        # the intrinsics as locals: `fma(a, b, c)` is two statements of numba IR where
        # `cuda.fma(a, b, c)` is four (the module, its attribute); the generated kernels are
        # thousands of them, and numba's front end takes time growing with the statements
        # of a block times the variables assigned more than once (NOTES v32). The PTX is
        # the same (bench/compile_time.py --compare).
        self("fma = cuda.fma")
        self("selp = cuda.selp")
        return self

    def device_function(self, name, params):
        """Start a device function `name(params)` (to append to a kernel's module), inlined
        into each call on a real GPU (forceinline: NVVM's always-inliner, so that the PTX is
        that of the code written out at each call: bench/compile_time.py --compare).

        Why: numba's front end (typing, SSA reconstruction, lowering) runs once per function,
        and takes time growing with a function's statements times its variables assigned more
        than once (SSA reconstruction walks every statement once per such variable) and
        quadratic in a basic block's statements (lowering scans the block for each variable
        assigned in it). The written-out fmas, thousands of statements over dozens of chains,
        were most of it: the 48+48 -> 48 weight gradients took 9.9 CPU s of numba for 3,150
        lines, 3.8 as 16 calls of 4 columns (NOTES, branch gcold). Pass the constants that
        differ between calls as `int64(k)`: a literal argument is typed as its value, and
        numba would compile the function once per value."""
        self()
        inline = "" if config.ENABLE_CUDASIM else ", forceinline=True"  # (not a simulator option)
        self(f"@cuda.jit(device=True{inline})")
        self(f"def {name}({params}):").indent()
        self("fma = cuda.fma")
        self("selp = cuda.selp")
        return self

    def indent(self):
        self.depth += 1
        return self

    def dedent(self):
        self.depth -= 1
        return self

    def text(self):
        return "\n".join(self.lines) + "\n"
