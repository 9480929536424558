"""cryokern.simulate: seeded bits, Poisson statistics of the Noise2Noise halves, CTF zeros."""
import math

import numpy as np
import pytest

from cryokern import simulate as S


def small(seed=3, shape=(48, 64), pixel_size=3.0):
    return S.Simulator(seed, shape, pixel_size)


def test_a_micrograph_depends_on_the_seed_and_its_index_alone():
    first = small().micrograph(1)
    other = small()
    other.micrograph(0)                     # generating another one first changes nothing
    again = other.micrograph(1)
    for name in ("even", "odd", "truth"):
        a, b = getattr(first, name), getattr(again, name)
        assert a.dtype == np.float32 and a.shape == (48, 64)
        assert a.tobytes() == b.tobytes()
    assert small().micrograph(2).truth.tobytes() != first.truth.tobytes()
    assert small(seed=4).micrograph(1).truth.tobytes() != first.truth.tobytes()


def test_halves_are_independent_poisson_draws_around_the_truth():
    """Each half is Poisson(truth): integer counts, z = (half - truth)/sqrt(truth) of mean 0
    and variance 1, and the two halves' deviations uncorrelated. 5-sigma bounds."""
    m = S.Simulator(7, (160, 160), 2.0).micrograph(0)
    n = m.truth.size
    truth = m.truth.astype(np.float64)
    assert abs(truth.mean() - S.DOSE * 2.0 ** 2 / 2) < 0.1 * S.DOSE * 2.0 ** 2 / 2
    zs = []
    for half in (m.even, m.odd):
        assert np.array_equal(half, np.round(half)) and half.min() >= 0
        z = (half - truth) / np.sqrt(truth)
        assert abs(z.mean()) < 5 / math.sqrt(n)
        assert abs(z.var() - 1) < 5 * math.sqrt((2 + 1 / truth.min()) / n)
        zs.append(z)
    assert abs(np.mean(zs[0] * zs[1])) < 5 / math.sqrt(n)
    assert not np.array_equal(m.even, m.odd)


def test_truth_holds_particles_and_ice():
    """The ground truth is not flat: particles make contrast of a few % of the mean."""
    m = S.Simulator(1, (256, 256), 1.0).micrograph(0)
    assert m.particles > 0
    assert 0.005 < m.truth.std() / m.truth.mean() < 0.2


def test_wavelength_at_300_kv():
    assert S.wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)


@pytest.mark.parametrize("defocus", [10000.0, 20000.0])
def test_ctf_zeros_are_where_the_formula_puts_them(defocus):
    """The closed-form zeros are zeros of ctf() with a sign change, and the power spectrum of
    the simulator's contrast of a white phase object (|CTF|^2 E^2 in expectation) has its
    minima there: each predicted zero's ring holds < 2 % of the power of the rings midway."""
    zeros = S.ctf_zeros(defocus, 4)
    assert np.all(np.diff(zeros) > 0)
    for k in zeros:
        assert abs(S.ctf(k * k, defocus)) < 1e-9
        assert S.ctf((k * 0.99) ** 2, defocus) * S.ctf((k * 1.01) ** 2, defocus) < 0
    sim = S.Simulator(0, (448, 448), 1.0)
    phase = np.random.default_rng(0).standard_normal(sim.frame)
    power = np.abs(np.fft.rfft2(sim.contrast(phase, defocus))) ** 2
    k = np.sqrt(sim.k2)
    width = 1.0 / sim.frame[0]

    def ring(at):
        return power[np.abs(k - at) < width / 2].mean()
    for lower, upper in zip(zeros[:-1], zeros[1:]):
        assert ring(lower) < 0.02 * ring((lower + upper) / 2)
        assert ring(upper) < 0.02 * ring((lower + upper) / 2)


def test_splat_keeps_the_weight_of_points_inside():
    ys, xs = np.array([1.25, 3.5, 9.9]), np.array([2.75, 0.0, 1.0])
    image = S.splat((5, 6), ys, xs, np.array([1.0, 2.0, 5.0]))
    assert image.sum() == pytest.approx(3.0)          # the third point lies outside
    assert image[1, 2] == pytest.approx(0.75 * 0.25) and image[3, 0] == pytest.approx(1.0)


def test_rotations_are_rotations():
    r = S.rotations(np.random.default_rng(0), 5)
    assert np.allclose(r @ r.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(r), 1.0)
