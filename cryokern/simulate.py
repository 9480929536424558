"""Simulated cryo-EM micrographs with a true ground truth, for measuring whether a denoiser
denoises (the built-in demo, bench/quality.py).

Why a simulator: real micrographs have no clean reference, and Gaussian blobs under Gaussian
noise (the old demo) do not look like what a microscopist denoises. This model keeps the
features that decide how hard denoising is: particle-sized objects seen through a contrast
transfer function at a realistic electron dose, slowly varying ice, and shot noise.

Model (all lengths in Å, spatial frequencies k in 1/Å; NumPy float64 throughout):

1. Proteins. `PROTEINS` random 3-D models per seed. A model has 3-6 subunits, ellipsoids
   with semi-axes 0.25-0.5 R, centres within R - (largest semi-axis) of the origin, where the
   model's radius R is uniform in [50, 75] (so particles are 100-150 Å across). Pseudo-atoms
   fill each ellipsoid uniformly at the density of protein atoms, ATOM_DENSITY = 1/12 per Å³.
2. Projection. Each particle is one model under a uniform random rotation (a normalized
   Gaussian quaternion) at a uniform random position (Poisson(PARTICLES_PER_UM2) particles per
   (1000 Å)² of the padded frame; they may overlap); the projected phase is
   φ(r) = Σ_atoms w · G(r - r_atom), w = PHASE_PER_ANGSTROM / ATOM_DENSITY (rad·Å²), so a
   column of protein t Å thick shifts the phase by PHASE_PER_ANGSTROM · t (0.0015 rad/Å ≈
   σ_e(300 kV) 6.5e-4 rad/(V·Å) × 2.3 V, protein's potential over vitreous ice). Atoms are
   splatted bilinearly onto the pixel grid; their Gaussian profile G (σ ATOM_SIGMA) is applied
   in Fourier space together with the CTF.
3. CTF (weak-phase approximation). Electron wavelength λ = 12.2643 / sqrt(V (1 + 0.978476e-6
   V)) Å (V in volts; 0.01969 Å at 300 kV);
   χ(k) = π λ Δf k² − (π/2) C_s λ³ k⁴ (Δf > 0 underfocus, uniform in DEFOCUS_UM per micrograph);
   CTF(k) = −sin(χ(k) + arcsin A) = −(√(1−A²) sin χ + A cos χ), A = AMPLITUDE_CONTRAST;
   envelope E(k) = exp(−B k² / 4) (B = B_FACTOR Å², temporal and spatial coherence lumped).
   Its zeros lie where χ(k) = nπ − arcsin A (`ctf_zeros`). The contrast is
   c(r) = 2 · F⁻¹[CTF · E · exp(−2π² ATOM_SIGMA² k²) · F[φ]](r): protein is dark at low
   frequency (CTF(0) = −A).
4. Ice. A thickness factor t(r) = 1 + ICE_STD · g(r), g a unit-variance Gaussian random field
   with Gaussian correlation exp(−|Δr|²/(4 ℓ²)), ℓ = ICE_LENGTH Å: 3 % in all, of which a
   1024 Å field sees about half as variation (the rest as its offset).
5. Dose. Expected counts per pixel λ(r) = D p² t(r) (1 + c(r)), D = DOSE e⁻/Å², p the pixel
   size (40 e⁻/px per exposure at 1 Å/px), clipped at 0.
6. Noise2Noise halves. The exposure's frames split into even and odd sums, each an independent
   Poisson(λ(r)/2) image; the ground truth of either is λ(r)/2.

The image is computed on a frame padded by PAD_ANGSTROM on every side (particles there too)
and cropped, so that the CTF's delocalization (≈ λ Δf k) does not wrap around the edges.

Seeding: the models come from numpy.random.default_rng([seed, 0]) and micrograph i from
default_rng([seed, 1, i]), so a micrograph depends on (seed, i, settings) alone, whatever else
is generated. Speed (vectorized; FFT-based CTF): 0.3-0.7 s per 1024² micrograph on one core;
bench/quality.py made 44 in 2.4 s on a 16-core host, the demo's 56 of 40² in about a second.
"""
import math
from dataclasses import dataclass

import numpy as np

PROTEINS = 4
RADIUS_A = (50.0, 75.0)
SUBUNITS = (3, 6)
ATOM_DENSITY = 1.0 / 12.0
ATOM_SIGMA = 1.0
PHASE_PER_ANGSTROM = 0.0015
PARTICLES_PER_UM2 = 30.0            # particle centres per (1000 Å)² of padded frame
VOLTAGE_KV = 300.0
CS_MM = 2.7
AMPLITUDE_CONTRAST = 0.07
DEFOCUS_UM = (1.0, 2.0)
B_FACTOR = 80.0
ICE_STD = 0.03
ICE_LENGTH = 300.0
DOSE = 40.0
PAD_ANGSTROM = 128.0
_MODELS, _MICROGRAPH = 0, 1


def wavelength(voltage_kv=VOLTAGE_KV):
    """Relativistic electron wavelength in Å."""
    v = voltage_kv * 1e3
    return 12.2643 / math.sqrt(v * (1 + 0.978476e-6 * v))


def ctf(k2, defocus_a, voltage_kv=VOLTAGE_KV, cs_mm=CS_MM, amplitude=AMPLITUDE_CONTRAST):
    """CTF(k) = −sin(χ + arcsin A) at squared spatial frequencies k2 (1/Å²), defocus in Å."""
    lam = wavelength(voltage_kv)
    cs = cs_mm * 1e7
    chi = math.pi * lam * defocus_a * k2 - 0.5 * math.pi * cs * lam ** 3 * k2 * k2
    return -np.sin(chi + math.asin(amplitude))


def ctf_zeros(defocus_a, count, voltage_kv=VOLTAGE_KV, cs_mm=CS_MM,
              amplitude=AMPLITUDE_CONTRAST):
    """The first `count` zeros k (1/Å) of the CTF: χ(k) = nπ − arcsin A, n = 1, 2, ..., the
    smaller root of (π/2) C_s λ³ k⁴ − π λ Δf k² + (nπ − arcsin A) = 0 in k²."""
    lam = wavelength(voltage_kv)
    cs = cs_mm * 1e7
    a, b = 0.5 * math.pi * cs * lam ** 3, math.pi * lam * defocus_a
    zeros = []
    for n in range(1, count + 1):
        c = n * math.pi - math.asin(amplitude)
        zeros.append(math.sqrt((b - math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    return np.array(zeros)


def random_protein(rng):
    """(atoms, 3) pseudo-atom coordinates in Å of one random model, centred on its mass."""
    radius = rng.uniform(*RADIUS_A)
    parts = []
    for _ in range(rng.integers(SUBUNITS[0], SUBUNITS[1] + 1)):
        axes = rng.uniform(0.25, 0.5, 3) * radius
        centre = random_directions(rng, 1)[0] * rng.uniform(0, radius - axes.max())
        n = rng.poisson(ATOM_DENSITY * 4 / 3 * math.pi * axes.prod())
        # uniform in the unit ball (direction times radius u^(1/3)), stretched and turned
        ball = random_directions(rng, n) * rng.random((n, 1)) ** (1 / 3)
        parts.append(ball * axes @ rotations(rng, 1)[0].T + centre)
    atoms = np.concatenate(parts)
    return atoms - atoms.mean(axis=0)


def random_directions(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rotations(rng, n):
    """n uniform random rotation matrices (n, 3, 3), from normalized Gaussian quaternions."""
    q = rng.standard_normal((n, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)


def splat(shape, ys, xs, weights):
    """Bilinear splatting of point weights at (ys, xs) pixel coordinates onto a (h, w) grid
    (points outside are dropped)."""
    h, w = shape
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = ys - y0, xs - x0
    image = np.zeros(h * w)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            image += np.bincount(yy[inside] * w + xx[inside], (weights * wy * wx)[inside],
                                 minlength=h * w)
    return image.reshape(shape)


def frequencies_squared(shape, pixel_size):
    """k² (1/Å²) on numpy.fft.rfft2's grid of an image of `shape`."""
    ky = np.fft.fftfreq(shape[0], pixel_size)
    kx = np.fft.rfftfreq(shape[1], pixel_size)
    return ky[:, None] ** 2 + kx[None, :] ** 2


@dataclass(frozen=True)
class Micrograph:
    """One simulated exposure: the even and odd halves (float32 counts), their common ground
    truth (float32 expected counts), and the settings drawn for it."""
    even: np.ndarray
    odd: np.ndarray
    truth: np.ndarray
    defocus_a: float
    particles: int


class Simulator:
    """Micrographs of `shape` pixels of `pixel_size` Å from the models of `seed`."""

    def __init__(self, seed, shape=(1024, 1024), pixel_size=1.0, dose=DOSE):
        self.seed, self.shape, self.pixel_size, self.dose = seed, tuple(shape), pixel_size, dose
        rng = np.random.default_rng([seed, _MODELS])
        self.proteins = [random_protein(rng) for _ in range(PROTEINS)]
        self.pad = int(math.ceil(PAD_ANGSTROM / pixel_size))
        self.frame = (self.shape[0] + 2 * self.pad, self.shape[1] + 2 * self.pad)
        self.k2 = frequencies_squared(self.frame, pixel_size)

    def describe(self):
        return {"seed": self.seed, "shape": list(self.shape), "pixel_size_A": self.pixel_size,
                "dose_e_per_A2": self.dose, "proteins": PROTEINS, "voltage_kv": VOLTAGE_KV,
                "cs_mm": CS_MM, "amplitude_contrast": AMPLITUDE_CONTRAST,
                "defocus_um": list(DEFOCUS_UM), "b_factor_A2": B_FACTOR, "ice_std": ICE_STD,
                "ice_length_A": ICE_LENGTH, "model": "cryokern.simulate docstring"}

    def phase(self, rng):
        """(projected phase in rad on the padded frame, particle count)."""
        h, w = self.frame
        p = self.pixel_size
        area_um2 = h * w * p * p / 1e6
        n = rng.poisson(PARTICLES_PER_UM2 * area_um2)
        kinds = rng.integers(0, PROTEINS, n)
        turns = rotations(rng, n)
        centres = rng.random((n, 2)) * (h, w)
        ys, xs = [], []
        for kind, turn, (cy, cx) in zip(kinds, turns, centres):
            turned = self.proteins[kind] @ turn.T
            ys.append(cy + turned[:, 0] / p)
            xs.append(cx + turned[:, 1] / p)
        if n == 0:
            return np.zeros(self.frame), 0
        ys, xs = np.concatenate(ys), np.concatenate(xs)
        weight = PHASE_PER_ANGSTROM / ATOM_DENSITY / (p * p)   # rad per pixel per atom
        return splat(self.frame, ys, xs, np.full(len(ys), weight)), n

    def contrast(self, phase, defocus_a):
        """c(r) = 2 F⁻¹[CTF · E · atom profile · F[φ]] on the padded frame."""
        transfer = 2 * ctf(self.k2, defocus_a) * \
            np.exp(-(B_FACTOR / 4 + 2 * math.pi ** 2 * ATOM_SIGMA ** 2) * self.k2)
        return np.fft.irfft2(np.fft.rfft2(phase) * transfer, s=self.frame)

    def ice(self, rng):
        """1 + ICE_STD g(r): white noise through a unit-area Gaussian of σ = ℓ/p pixels, whose
        output variance is 1/(4π σ²): scaled by sqrt(4π) σ, g has unit variance."""
        sigma = ICE_LENGTH / self.pixel_size
        noise = rng.standard_normal(self.frame)
        smooth = np.fft.irfft2(np.fft.rfft2(noise) *
                               np.exp(-2 * math.pi ** 2 * ICE_LENGTH ** 2 * self.k2),
                               s=self.frame)
        return 1 + ICE_STD * math.sqrt(4 * math.pi) * sigma * smooth

    def expected(self, rng):
        """(expected counts λ(r) of the whole exposure, cropped; defocus; particles)."""
        defocus = rng.uniform(*DEFOCUS_UM) * 1e4
        phase, n = self.phase(rng)
        counts = self.dose * self.pixel_size ** 2 * self.ice(rng) * \
            (1 + self.contrast(phase, defocus))
        crop = counts[self.pad:self.pad + self.shape[0], self.pad:self.pad + self.shape[1]]
        return np.maximum(crop, 0.0), defocus, n

    def micrograph(self, index):
        rng = np.random.default_rng([self.seed, _MICROGRAPH, index])
        counts, defocus, n = self.expected(rng)
        half = counts / 2
        even = rng.poisson(half).astype(np.float32)
        odd = rng.poisson(half).astype(np.float32)
        return Micrograph(even, odd, half.astype(np.float32), defocus, n)
