"""Data on which the order of a float64 fold decides the bits, for the fold-order tests.

Why: float32 partials of ordinary data (standard-normal values, sums of a few hundred of them)
add exactly in float64, so every order of addition gives the same bits and a test on them
cannot tell the contract's left fold from a reversed, pairwise or tile-dropping one. Here each
column (one output of one image) holds a large value B and, later or earlier, about -B, among
small values of full 24-bit mantissas over a range of exponents: what the small values lose
to rounding while B is in the running sum depends on when they are added (for the loss, whose
partials are squares, one large square per image). Each column is drawn until its left fold
differs from its reversed and its pairwise fold (`differs_in_order`), and the tests assert that
again, so the data cannot silently go easy.
"""
import numpy as np

BIG_EXPONENT = 40       # B ~ 2^40: float64 keeps 2^-12 of the small values while B is in


def left_fold(values, axis):
    """The contract's order: ((v0 + v1) + v2) + ..., float64, one addition at a time."""
    v = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    acc = v[0].copy()
    for item in v[1:]:
        acc = acc + item
    return acc


def reversed_fold(values, axis):
    return left_fold(np.flip(values, axis), axis)


def pairwise_fold(values, axis):
    """A tree, as a parallel reduction adds: value i plus value i + half, halving. (For 3
    values (v0 + v2) + v1, the one order of three neither fold takes.)"""
    v = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    while len(v) > 1:
        half = (len(v) + 1) // 2
        v = np.concatenate([v[:len(v) - half] + v[half:], v[len(v) - half:half]])
    return v[0]


def differs_in_order(values, axis, rounded=np.float64):
    """Where the left fold's bits (after rounding to `rounded`) differ from both the reversed
    and the pairwise fold's."""
    want = left_fold(values, axis).astype(rounded)
    return (want != reversed_fold(values, axis).astype(rounded)) & \
        (want != pairwise_fold(values, axis).astype(rounded))


def _wide(rng, length, dtype):
    """Small values of both signs over 2^-8 .. 2^9 and, at random places, B = 2^BIG_EXPONENT
    or a float32 step or two above it and -B' (B' = B or a step or two below 2^BIG_EXPONENT:
    the running sum's rounding step then changes as each comes and goes)."""
    v = rng.choice([-1.0, 1.0], length) * rng.uniform(1, 2, length) * \
        np.exp2(rng.integers(-8, 9, length))
    i, j = rng.choice(length, 2, replace=False)
    big = 2.0 ** BIG_EXPONENT
    v[i] = big * (1 + rng.integers(0, 3) * 2.0 ** -23)
    v[j] = -v[i] if rng.integers(2) else -big * (1 - rng.integers(1, 3) * 2.0 ** -24)
    return v.astype(dtype)


def order_sensitive_partials(rng, images, tiles, outputs, rounded=np.float64):
    """float32 partials (images, tiles, outputs) whose every image and output has a left fold
    over tiles that differs from the reversed and the pairwise fold, and whose total over
    images (tiles, then images, each a left fold), rounded to `rounded`, differs from the
    totals with either other tile order: a float32 gradient's bits must show the tile order,
    and a float64 difference may round away. (Image order: order_sensitive_sums.)"""
    if tiles < 3:
        raise ValueError("a fold of fewer than 3 values is the same in every order")
    partials = np.empty((images, tiles, outputs), np.float32)
    for k in range(outputs):
        for _ in range(1000):
            column = np.stack([_wide(rng, tiles, np.float32) for _ in range(images)])
            if _sensitive(column, rounded):
                break
        else:
            raise AssertionError("no order-sensitive column in 1000 draws")
        partials[:, :, k] = column
    return partials


def _sensitive(column, rounded):
    """column (images, tiles): each image's tile fold tells the orders apart, and so does
    the total over images rounded to `rounded`."""
    totals = total_in_other_orders(column).astype(rounded)
    return differs_in_order(column, 1).all() and (totals[1:3] != totals[0]).all()


def order_sensitive_sums(rng, images, outputs):
    """float64 per-image sums (images, outputs) whose left fold over images differs from the
    reversed and the pairwise fold, in float64 and after rounding to float32."""
    if images < 3:
        raise ValueError("a fold of fewer than 3 values is the same in every order")
    sums = np.empty((images, outputs))
    for k in range(outputs):
        for _ in range(1000):
            column = _wide(rng, images, np.float64)
            if differs_in_order(column, 0, np.float32):
                break
        else:
            raise AssertionError("no order-sensitive column in 1000 draws")
        sums[:, k] = column
    return sums


def order_sensitive_squares(rng, images, tiles):
    """float32 d (images, tiles) whose squares d*d (float32: a loss tile's partial when the
    tile holds one nonzero difference d) give a float64 total (tiles, then images, each a left
    fold) that differs from the totals with the tiles folded reversed or pairwise, or the
    images so. Squares have one sign, so the orders differ through rounding alone: each image
    holds one square of 2^40 .. 2^48 (a different binade per image) among squares of
    2^-8 .. 2^12."""
    if tiles < 3 or images < 3:
        raise ValueError("a fold of fewer than 3 values is the same in every order")
    for _ in range(1000):
        d = rng.uniform(1, 2, (images, tiles)) * np.exp2(rng.integers(-4, 6, (images, tiles)))
        d[np.arange(images), rng.integers(0, tiles, images)] = \
            rng.uniform(1, 2, images) * np.exp2(20 + rng.choice(4, images, replace=False))
        d = d.astype(np.float32)
        totals = total_in_other_orders(d * d)
        if (totals[1:] != totals[0]).all():
            return d
    raise AssertionError("no order-sensitive squares in 1000 draws")


def total_in_other_orders(partials):
    """float64 totals of partials (images, tiles): the contract's (left folds over tiles, then
    over images) first, then with the tiles folded reversed, pairwise, then with the images
    folded so."""
    per_image = left_fold(partials, 1)
    return np.array([left_fold(per_image, 0),
                     left_fold(reversed_fold(partials, 1), 0),
                     left_fold(pairwise_fold(partials, 1), 0),
                     reversed_fold(per_image, 0), pairwise_fold(per_image, 0)])
