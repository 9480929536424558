"""Numerics §4 steps 3-5: fold float32 partials (N, T, K) in float64, tiles then images."""

import numpy as np
from numba import cuda, float32

from .arrays import as_device_array, launch_stream, scratch
from .codegen import Source, generator, load_module


FOLD_THREADS = 256
FOLD_ROUND = 128     # tiles a block stages per round, at least (FOLD_ROUND x chains partials)
FOLD_CHAINS = 32     # outputs (k) per block, one float64 chain each, on one warp's lanes
CHAIN_AHEAD = 8      # shared-memory loads issued before their additions (partial rounds)
CALL_TILES = 16      # a full round's additions per call of a generated device function (its
                     # 256 additions in one numba block: fold_tiles (32, 1) 7.5 CPU s of numba's
                     # front end, 3.3 in calls; codegen.Source.device_function)


def _chains(outputs):
    """Chains per block for `outputs` outputs: a power of two, so that it divides the block."""
    return min(FOLD_CHAINS, 1 << (outputs - 1).bit_length())


def _round(kc):
    """Tiles per round for kc chains: FOLD_ROUND, or more where each thread would load none."""
    return max(FOLD_ROUND, FOLD_THREADS // kc)


@generator
def _fold_tiles(kcs):
    """Step 3 for several jobs (partials, per_image; a one-output job also the partials' bits,
    for _exact_pass) in one launch: job j's outputs in blocks of kcs[j] chains (blockIdx.x counts the jobs' blocks in turn from start_j),
    blockIdx.y the image. Generated.

    Why so: each output's fold is a chain of T dependent float64 additions, ~11 ns each on an
    H100 (v22), so the loss's 4 chains of 1024 took 12 us however few partials they read. A
    block of one output (the loss's, a bias of one channel) first adds its partials in a tree
    (_exact_pass), and keeps that sum where no addition of the chain could have rounded. A
    block of many outputs always runs the chains (_fold_job): weight-gradient partials of
    both signs span wide ranges, so one of a block's 32 outputs may well fail the test, and
    a tree pass there (each thread's 128 tiles, a load latency each) took longer than the
    chains (v22).
    The chain: rounds of _round(kc) tiles x kc outputs: all the block's threads load them
    (kc divides the block, so each thread's loads share one output and step through the tiles
    by one address increment), then, with the next round's loads in flight, kc threads add
    this round's in tile order; a full round is written out (CALL_TILES additions a call of
    the module's device function `chain`, inlined), so that ptxas can issue the
    shared-memory loads ahead of the additions."""
    params = [f"partials{j}, bits{j}, per_image{j}" if kc == 1 else f"partials{j}, per_image{j}"
              for j, kc in enumerate(kcs)]
    params += [f"start{j}" for j in range(1, len(kcs))]
    src = Source().kernel(", ".join(params + ["tiles"] + (["span"] if 1 in kcs else [])))
    src("n = cuda.blockIdx.y")
    src("b = cuda.blockIdx.x")
    src("tid = cuda.threadIdx.x")
    src(f"buf = cuda.shared.array({max(_round(kc) * kc for kc in kcs)}, float32)")
    if 1 in kcs:
        src(f"sums = cuda.shared.array({FOLD_THREADS}, float64)")
        src(f"tops = cuda.shared.array({FOLD_THREADS}, float32)")     # small integers, exact
        src(f"lows = cuda.shared.array({FOLD_THREADS}, float32)")
    for j, kc in enumerate(kcs):
        if len(kcs) > 1:
            src(f"if b < start{j + 1}:" if j == 0 else
                f"elif b < start{j + 1}:" if j + 1 < len(kcs) else "else:").indent()
        src(f"partials, bits, per_image = partials{j}, bits{j}, per_image{j}" if kc == 1 else
            f"partials, per_image = partials{j}, per_image{j}")
        src("outputs = per_image.shape[1]")
        src(f"k = {f'(b - start{j})' if j else 'b'} * {kc} + tid % {kc}")
        src("live = k < outputs")
        src(f"row = tid // {kc}")
        if kc == 1:
            _exact_pass(src)
            src("if not exact:").indent()
        _fold_job(src, kc)
        if kc == 1:
            src.dedent()
        if len(kcs) > 1:
            src.dedent()
    called = Source().device_function("chain", "buf, tid, at, step, acc")
    for t in range(CALL_TILES):
        called(f"acc = acc + float64(buf[uint64(tid + (at + {t} * step))])")
    called("return acc")
    return load_module(f"fold_tiles_{'_'.join(map(str, kcs))}",
                       src.text() + called.text()).kernel


def _exact_pass(src):
    """Numerics §4 step 3's fast path into the kernel being written, for a block of one output
    (its FOLD_THREADS threads share the tiles): sets `exact` and, where it is true, has
    written the output.

    Why it gives the chain's bits: float32 partials are multiples of 2^low (the lowest set
    bit among them) and below 2^(top+1) in magnitude; a sum of any T of them is a multiple of
    2^low below 2^(top + 1 + ceil(log2 T)). Where that is at most 2^(low + 53), every sum is
    a float64 (an integer below 2^53 times 2^low), so no addition rounds, in the chain's order
    or any other, and all orders give the exact sum. -0.0 starts each partial sum: it is the
    identity of float64 addition (a chain of -0.0 partials stays -0.0, as the chain does).
    A non-finite partial, or a range wider than `span` = 52 - ceil(log2 T), takes the chain.
    A subnormal counts its top as the smallest normal's: wider, so never wrongly exact."""
    src("total = float64(-0.0)")
    src("top = -1000")       # no nonzero partial yet
    src("low = 1000")
    src("if live:").indent()
    src("address = uint64((n * tiles + row) * outputs + k)")
    src(f"for t in range(row, tiles, {FOLD_THREADS}):").indent()
    src("word = int(bits[address])")
    src("e = (word >> 23) & 255")
    src("m = word & 8388607")
    src("if e == 255:").indent()
    src("top = 1000").dedent()            # inf or nan: never exact
    src("elif e > 0:").indent()
    src("m = m | 8388608").dedent()
    src("else:").indent()
    src("e = 1").dedent()
    src("if m != 0:").indent()
    src("low = min(low, e - 151 + cuda.ffs(m))")
    src("top = max(top, e - 127)").dedent()
    src("total = total + float64(partials[address])")
    src(f"address += uint64({FOLD_THREADS} * outputs)").dedent().dedent()
    src("sums[tid] = total")
    src("tops[tid] = top")
    src("lows[tid] = low")
    half = FOLD_THREADS // 2
    while half >= 1:
        src("cuda.syncthreads()")
        src(f"if tid < {half}:").indent()
        src(f"sums[tid] = sums[tid] + sums[tid + {half}]")
        src(f"tops[tid] = max(tops[tid], tops[tid + {half}])")
        src(f"lows[tid] = min(lows[tid], lows[tid + {half}])").dedent()
        half //= 2
    src("exact = cuda.syncthreads_and(1 if tid >= 1 or not live or "
        "tops[tid] - lows[tid] <= span else 0)")
    src("if exact and tid < 1 and live:").indent()
    src("per_image[uint64(n), uint64(k)] = sums[tid]").dedent()


def _fold_job(src, kc):
    """The chain of numerics §4 step 3 into the kernel being written, for the outputs k of
    image n."""
    tiles_per_round = _round(kc)
    per_thread = tiles_per_round * kc // FOLD_THREADS   # loads per thread per round
    step = FOLD_THREADS // kc                           # tiles between a thread's loads
    src("address = uint64((n * tiles + row) * outputs + k)")
    src(f"stride = uint64({step} * outputs)")

    def loads(t0):
        for i in range(per_thread):
            src(f"p{i} = partials[address + uint64({i}) * stride] "
                f"if live and {t0} + row + {i * step} < tiles else float32(0)")

    loads("0")
    src("acc = float64(0)")
    src(f"for t0 in range(0, tiles, {tiles_per_round}):").indent()
    src("cuda.syncthreads()")
    for i in range(per_thread):
        src(f"buf[uint64(tid + {i * FOLD_THREADS})] = p{i}")
    src("cuda.syncthreads()")
    src(f"address += uint64({tiles_per_round} * outputs)")
    loads(f"t0 + {tiles_per_round}")
    src(f"if tid < {kc}:").indent()
    src(f"count = min({tiles_per_round}, tiles - t0)")
    # P_n starts from tile 0's partial, not from 0
    src(f"if count == {tiles_per_round}:").indent()       # a full round, written out
    for t in range(CALL_TILES):
        value = f"float64(buf[uint64(tid + {t * kc})])"
        src(f"acc = {value} if t0 == 0 else acc + {value}" if t == 0 else f"acc = acc + {value}")
    for t in range(CALL_TILES, tiles_per_round, CALL_TILES):     # the rest in calls
        src(f"acc = chain(buf, tid, int64({t * kc}), int64({kc}), acc)")
    src.dedent()
    src("else:").indent()
    src("t = 0")
    src("if t0 == 0:").indent()
    src("acc = float64(buf[uint64(tid)])")
    src("t = 1").dedent()
    src(f"while t + {CHAIN_AHEAD} <= count:").indent()
    for u in range(CHAIN_AHEAD):
        src(f"v{u} = buf[uint64((t + {u}) * {kc} + tid)]")
    for u in range(CHAIN_AHEAD):
        src(f"acc = acc + float64(v{u})")
    src(f"t += {CHAIN_AHEAD}").dedent()
    src("while t < count:").indent()
    src(f"acc = acc + float64(buf[uint64(t * {kc} + tid)])")
    src("t += 1").dedent().dedent().dedent().dedent()
    src(f"if tid < {kc} and live:").indent()
    src("per_image[uint64(n), uint64(k)] = acc").dedent()


@cuda.jit(cache=True)
def _fold_images(per_image, out32, out64):
    """Steps 4-5: images in order, then one rounding to float32 where asked."""
    j = cuda.grid(1)
    if j >= per_image.shape[1]:
        return
    total = per_image[0, j]
    for n in range(1, per_image.shape[0]):
        total = total + per_image[n, j]
    if out32.size > 0:
        out32[j] = float32(total)
    if out64.size > 0:
        out64[j] = total


_EMPTY = {}


def _empty(dtype):
    if dtype not in _EMPTY:
        _EMPTY[dtype] = cuda.device_array(0, dtype)
    return _EMPTY[dtype]


def fold_tiles(*jobs):
    """Step 3: for each job (float32 partials (N, T, K), float64 per_image (N, K)), each
    image's float64 sums into per_image; the jobs (same N and T) in one launch."""
    n, tiles = jobs[0][0].shape[:2]
    if any(p.shape[:2] != (n, tiles) or s.shape != (n, p.shape[2]) for p, s in jobs):
        raise ValueError(f"fold jobs differ in images or tiles: "
                         f"{[(p.shape, s.shape) for p, s in jobs]}")
    kcs = tuple(_chains(p.shape[2]) for p, _ in jobs)
    starts = np.cumsum([-(-p.shape[2] // kc) for (p, _), kc in zip(jobs, kcs)]).tolist()
    args = []
    for (p, s), kc in zip(jobs, kcs):
        flat = p.reshape(p.size)
        args += [flat, flat.view(np.uint32), s] if kc == 1 else [flat, s]
    span = [52 - (tiles - 1).bit_length()] if 1 in kcs else []   # 52 - ceil(log2 T): _exact_pass
    _fold_tiles(kcs)[(starts[-1], n), FOLD_THREADS, launch_stream()](*args, *starts[:-1],
                                                                       tiles, *span)


def fold_images(per_image, out32=None, out64=None):
    """Steps 4-5: per-image sums (N, K) -> totals, float32 into out32 and/or float64 into out64."""
    k = per_image.shape[1]
    _fold_images[-(-k // 128), 128, launch_stream()](
        per_image, _empty(np.float32) if out32 is None else out32,
        _empty(np.float64) if out64 is None else out64)


def fold_partials(partials, out32=None, out64=None):
    """Steps 3-5: the totals into out32 and/or out64 (length K)."""
    n, _, k = partials.shape
    per_image = scratch("fold_per_image", (n, k), np.float64)
    fold_tiles((partials, per_image))
    fold_images(per_image, out32, out64)


def sum_images(sums, out):
    """Steps 4-5 over per-image sums (N, ...) left by conv2d_backward_weights or
    mse_loss_and_grad (their `image_sums`): the total rounded once to out's dtype (float32
    gradients, float64 SSE), written into out (a device array) and returned."""
    sums, out = as_device_array(sums), as_device_array(out)
    n = sums.shape[0]
    k = int(np.prod(sums.shape[1:]))
    if out.size != k or sums.dtype != np.float64:
        raise ValueError(f"sums {sums.dtype} {sums.shape} do not fold into out {out.shape}")
    flat = out.reshape(k)
    if out.dtype == np.float32:
        fold_images(sums.reshape(n, k), out32=flat)
    else:
        fold_images(sums.reshape(n, k), out64=flat)
    return out
