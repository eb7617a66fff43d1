"""MR acquisition of a phantom series: the tissue map sampled on a coarser acquisition grid, coil
bias, Rician noise, then k-space zero-fill upsampling to the reconstructed matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lumbar_ray.synth.anatomy import PatientModel
from lumbar_ray.synth.geometry import SliceStack
from lumbar_ray.synth.render import render_points

__all__ = ["render_series", "render_parts", "render_stack"]


def render_series(model: PatientModel, stack: SliceStack, contrasts, rng: np.random.Generator, size: str = "full") -> np.ndarray:
    """Render a stack with per-series random acquisition settings; (C, n, rows, cols) float32."""
    return render_stack(model, stack, contrasts, rng, **_series_settings(stack, size, rng))


def render_parts(model: PatientModel, parts: list[SliceStack], contrasts, rng: np.random.Generator, size: str = "full") -> np.ndarray:
    """Render a series made of several stacks (e.g. per-level slabs, each with its own
    orientation) with one set of acquisition settings; the parts' slices concatenated in order."""
    settings = _series_settings(parts[0], size, rng)
    return np.concatenate([render_stack(model, part, contrasts, rng, **settings) for part in parts], axis=1)


def _series_settings(stack: SliceStack, size: str, rng: np.random.Generator) -> dict:
    """Random acquisition settings of one series (drawn in this order: the seed's bytes depend on it)."""
    if size == "full":
        # acquisition matrix ~ 0.5-0.7 of the reconstructed one (e.g. 256-320 acquired, 448 shown)
        acq = float(rng.uniform(0.5, 0.7)) if stack.rows > 300 else float(rng.uniform(0.6, 0.8))
    else:
        acq = float(rng.uniform(0.8, 1.0))
    noise = float(rng.uniform(0.012, 0.04))
    bias = float(rng.uniform(0.15, 0.45))
    gain = float(rng.uniform(700.0, 2500.0))
    return dict(acq_factor=acq, noise=noise, bias=bias, gain=gain)


@dataclass
class _AcquisitionGrid:
    """The acquired (coarser) pixel grid of a stack and a still coarser grid for smooth fields."""

    rows: int  # acquired rows and columns
    cols: int
    offsets: np.ndarray  # (rows * cols, 3) patient offset of each acquired pixel from the slice position
    ramp: float  # boundary ramp of the tissue map (mm): about one acquired pixel
    coarse_rows: np.ndarray  # acquired row / column indices of the smooth-field grid
    coarse_cols: np.ndarray
    up_rows: np.ndarray  # linear interpolation from the smooth-field grid to the acquired grid
    up_cols: np.ndarray

    @classmethod
    def of(cls, stack: SliceStack, acq_factor: float) -> "_AcquisitionGrid":
        rows, cols = stack.rows, stack.cols
        ar = max(16, min(rows, int(round(rows * acq_factor))))
        ac = max(16, min(cols, int(round(cols * acq_factor))))
        rs, cs = stack.pixel_spacing
        # acquisition sample k sits at recon coordinate k * rows / ar (zero-fill interpolation)
        rr = np.arange(ar) * (rows / ar)
        cc = np.arange(ac) * (cols / ac)
        ramp = max(0.45, 0.6 * max(rs * rows / ar, cs * cols / ac))
        row_c = np.asarray(stack.row_cosine, dtype=float)
        col_c = np.asarray(stack.col_cosine, dtype=float)
        offs = (cc[None, :, None] * cs * row_c + rr[:, None, None] * rs * col_c).reshape(-1, 3)
        ri = np.unique(np.r_[np.arange(0, ar, 4), ar - 1])
        ci = np.unique(np.r_[np.arange(0, ac, 4), ac - 1])
        return cls(ar, ac, offs, ramp, ri, ci, _linear_matrix(ar, ri), _linear_matrix(ac, ci))


def render_stack(model: PatientModel, stack: SliceStack, contrasts, rng: np.random.Generator, *, acq_factor: float = 0.7,
                 noise: float = 0.03, bias: float = 0.5, gain: float = 1000.0, max_pixels: int = 600_000) -> np.ndarray:
    """Render a series: (len(contrasts), n, rows, cols) float32 in scanner units, with MR-like
    acquisition: low-res grid -> Rician noise, posterior-coil bias -> k-space zero-fill
    upsampling (sinc interpolation with some ringing)."""
    grid = _AcquisitionGrid.of(stack, acq_factor)
    ar, ac = grid.rows, grid.cols
    C = len(contrasts)
    out = np.empty((C, stack.n, stack.rows, stack.cols), dtype=np.float32)
    per_chunk = max(1, max_pixels // (ar * ac))
    for k0 in range(0, stack.n, per_chunk):
        ks = range(k0, min(stack.n, k0 + per_chunk))
        pts = np.concatenate([stack.positions[k][None, :] + grid.offsets for k in ks]).astype(np.float32)
        tex, bias_f = _smooth_fields(model, pts, grid, len(ks), bias)
        vals = render_points(model, pts, contrasts, ramp=grid.ramp, tex=tex.reshape(-1)).reshape(C, len(ks), ar, ac)
        for c in range(C):
            out[c, k0 : k0 + len(ks)] = _acquire(vals[c] * bias_f, rng, noise, stack.rows, stack.cols) * gain
    return out


def _smooth_fields(model: PatientModel, pts: np.ndarray, grid: _AcquisitionGrid, n_slices: int, bias: float):
    """Texture and coil bias at the acquired pixels of ``n_slices`` slices: evaluated on the coarse
    grid, linearly interpolated."""
    f32 = np.float32
    cpts = pts.reshape(n_slices, grid.rows, grid.cols, 3)[:, grid.coarse_rows][:, :, grid.coarse_cols].reshape(-1, 3)
    xx, yy, zz = cpts[:, 0], cpts[:, 1], cpts[:, 2]
    coarse_shape = (n_slices, len(grid.coarse_rows), len(grid.coarse_cols))
    tex = _lin_up(model.texture_at(xx, yy, zz).reshape(coarse_shape), grid.up_rows, grid.up_cols)
    # posterior coil: brighter towards the back, plus smooth ripples
    yref = model.arc_to_patient(0.0, model.b_skin, 0.0)[1]
    bias_c = np.exp(f32(bias) * np.clip((yy - f32(yref)) / f32(120.0), -2.0, 0.3) + _bias_terms(model, xx, yy, zz))
    bias_f = _lin_up(bias_c.reshape(coarse_shape), grid.up_rows, grid.up_cols)
    return tex, bias_f


def _bias_terms(model: PatientModel, xx, yy, zz):
    amp, ph, fr = (np.asarray(v, dtype=np.float32) for v in model.bias_params)
    return amp[0] * np.cos(fr[0] * xx + ph[0]) + amp[1] * np.cos(fr[1] * zz + ph[1]) + amp[2] * np.cos(fr[2] * (yy + zz) + ph[2])


def _acquire(sig: np.ndarray, rng: np.random.Generator, noise: float, rows: int, cols: int) -> np.ndarray:
    """Rician noise on the acquired magnitude (in place), then zero-fill upsampling to rows x cols,
    clipped at 0."""
    f32 = np.float32
    n1 = rng.standard_normal(sig.shape, dtype=np.float32) * f32(noise)
    n2 = rng.standard_normal(sig.shape, dtype=np.float32) * f32(noise)
    sig += n1
    sig *= sig
    n2 *= n2
    sig += n2
    np.sqrt(sig, out=sig)
    return np.clip(_fourier_upsample(sig, rows, cols), 0, None)


# ---------------------------------------------------------------------------------------- interpolation matrices
def _fourier_upsample(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(n, r, c) -> (n, rows, cols) by zero-filling k-space (what scanners do to interpolate)."""
    n, r, c = img.shape
    if (r, c) == (rows, cols):
        return img
    # zero-filling k-space is linear: apply it as two small matrix products (exact, and much
    # faster than FFTs of the full-size slices)
    t = np.matmul(img, _zero_fill_matrix(c, cols).T)
    return np.matmul(_zero_fill_matrix(r, rows), t)


_ZF_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _linear_matrix(n: int, idx: np.ndarray) -> np.ndarray:
    """(n, len(idx)) matrix of linear interpolation from samples at ``idx`` to 0..n-1."""
    eye = np.eye(len(idx))
    return np.stack([np.interp(np.arange(n), idx, eye[j]) for j in range(len(idx))], axis=1).astype(np.float32)


def _lin_up(a: np.ndarray, Lr: np.ndarray, Lc: np.ndarray) -> np.ndarray:
    return np.matmul(Lr, np.matmul(a, Lc.T))


def _zero_fill_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D Fourier (zero-fill) interpolation from n_in to n_out samples."""
    key = (n_in, n_out)
    if key not in _ZF_CACHE:
        F = np.fft.rfft(np.eye(n_in), axis=0)
        G = np.zeros((n_out // 2 + 1, n_in), dtype=complex)
        k = min(n_in // 2 + 1, n_out // 2 + 1)
        G[:k] = F[:k]
        if n_in % 2 == 0 and n_out > n_in:
            G[n_in // 2] *= 0.5  # split the input's Nyquist term symmetrically
        _ZF_CACHE[key] = (np.fft.irfft(G, n=n_out, axis=0) * (n_out / n_in)).astype(np.float32)
    return _ZF_CACHE[key]
