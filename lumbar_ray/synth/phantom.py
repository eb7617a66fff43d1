"""A numpy lumbar spine phantom in patient coordinates (DICOM LPS, millimetres).

One :class:`PatientModel` (sampled per study) describes the anatomy: T11 to the sacrum along a
lordotic curve, vertebral bodies, discs, the bony canal with the thecal sac (CSF, conus, cauda
equina), posterior elements (pedicles, articular pillars with facet joints, laminae, spinous and
transverse processes), neural foramina with fat and the exiting root, the body wall, paraspinal
and psoas muscles, viscera, aorta/IVC and kidneys. Every series of a study is rendered from the
same model, so a point labelled on the sagittal series and the same level's point on the axial
series map to nearby patient coordinates.

Severity is graded narrowing: each of the 25 targets gets a continuous closure fraction drawn
from its class range (:data:`NARROWING_RANGES`, overlapping between adjacent classes) and the
anatomy narrows accordingly at that level and side:

* spinal canal stenosis: a disc bulge (anterior) and ligamentum flavum (posterior) squeeze the
  thecal sac to ``1 - n`` of its AP size at the disc level; the cauda equina crowds the rest;
* neural foraminal narrowing: disc/osteophyte (anterior) and superior articular process
  (posterior) replace the foraminal fat around the exiting root (seen on parasagittal T1);
* subarticular stenosis: facet/ligament hypertrophy fills the lateral recess and pushes the
  sac's lateral wall medially (seen on axial T2).

Geometry: the spine's centreline (through the vertebral body centres) is a circular arc in the
mid-sagittal plane, so every point has exact "arc coordinates" (s: arc length, increasing
caudally; b: offset towards posterior; x: lateral, + = patient left). Structures are defined in
those coordinates and evaluated on whole pixel grids at once. The sacrum has its own rigid frame,
tilted by the lumbosacral angle.

Coordinates: slices use the conventions of ``docs/CONVENTIONS.md``; sagittal row cosine is
(≈0, 1, 0) (towards posterior), column cosine (0, 0, -1); axial row (1, 0, 0), column (0, 1, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lumbar_ray.targets import LEVELS, SEVERITIES, TARGETS

__all__ = [
    "VERTEBRAE",
    "DISCS",
    "FIRST_LABELLED_DISC",
    "NARROWING_RANGES",
    "SEVERITY_PRIORS",
    "PatientModel",
    "SliceStack",
    "sample_narrowing",
    "sample_series_geometry",
    "render_series",
    "CONTRASTS",
]

VERTEBRAE: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
DISCS: tuple[str, ...] = ("T11/T12", "T12/L1") + LEVELS  # DISCS[FIRST_LABELLED_DISC + j] == LEVELS[j]
FIRST_LABELLED_DISC = 2
assert DISCS[FIRST_LABELLED_DISC:] == LEVELS

# Lumen closure fraction per severity id (0 Normal/Mild, 1 Moderate, 2 Severe); ranges overlap.
NARROWING_RANGES: tuple[tuple[float, float], ...] = ((0.0, 0.35), (0.30, 0.65), (0.60, 0.95))
# Class balance of the real labels per family (used for missing labels, whose anatomy is random).
SEVERITY_PRIORS: dict[str, tuple[float, float, float]] = {
    "spinal": (0.877, 0.075, 0.048),
    "foraminal": (0.780, 0.181, 0.039),
    "subarticular": (0.714, 0.190, 0.096),
}
assert len(SEVERITIES) == 3

CONTRASTS = ("T1", "T2", "STIR")
TEXTURE_CELL_MM = 9.0  # cell of the coarse noise volume behind organ / marrow texture
TEXTURE_CELLS = 56
# Thecal sac inside the bony canal: AP and width margins (epidural space, PLL, ligamentum flavum)
# and the sac centre's offset towards anterior (the flavum is thicker than the PLL).
SAC_AP_MARGIN = 4.5
SAC_W_MARGIN = 5.0
SAC_SHIFT = -1.2

# Tissue intensities (T1, T2, STIR) on a 0..1 scale.
_TISSUES: dict[str, tuple[float, float, float]] = {
    "fat": (0.95, 0.78, 0.06),
    "muscle": (0.30, 0.20, 0.22),
    "viscera": (0.48, 0.42, 0.34),
    "vessel": (0.04, 0.05, 0.05),
    "kidney": (0.42, 0.58, 0.55),
    "cortex": (0.04, 0.04, 0.04),
    "marrow": (0.74, 0.50, 0.18),
    "annulus": (0.32, 0.13, 0.16),
    "nucleus": (0.38, 0.88, 0.85),
    "nucleus_degenerate": (0.33, 0.22, 0.22),
    "csf": (0.10, 1.00, 1.00),
    "neural": (0.42, 0.33, 0.33),
    "ligament": (0.27, 0.10, 0.12),
    "facet_fluid": (0.15, 0.75, 0.75),
}
_TISSUE_NAMES = tuple(_TISSUES)


def sample_narrowing(severity_ids, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per target (25): a severity id (missing ids -1 replaced by a draw from the family prior)
    and a continuous narrowing amount in that class's range."""
    ids = np.asarray(severity_ids, dtype=int).copy()
    if ids.shape != (len(TARGETS),):
        raise ValueError(f"expected {len(TARGETS)} severity ids, got shape {ids.shape}")
    amounts = np.zeros(len(TARGETS))
    for t in TARGETS:
        if ids[t.index] < 0:
            ids[t.index] = rng.choice(3, p=SEVERITY_PRIORS[t.family])
        lo, hi = NARROWING_RANGES[ids[t.index]]
        amounts[t.index] = rng.uniform(lo, hi)
    return ids, amounts


def _ell(a, b, ra, rb):
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipse."""
    return (np.sqrt((a / ra) ** 2 + (b / rb) ** 2) - 1.0) * np.minimum(ra, rb)


def _lerp(xq, knots, *tables):
    """np.interp of several tables at the same query points (one search), float32 out."""
    k = np.asarray(knots, dtype=np.float32)
    i = np.clip(np.searchsorted(k, xq) - 1, 0, len(k) - 2)
    w = np.clip((xq - k[i]) / (k[1:] - k[:-1])[i], 0, 1).astype(np.float32, copy=False)
    out = []
    for t in tables:
        t = np.asarray(t, dtype=np.float32)
        out.append(t[i] + w * (t[1:] - t[:-1])[i])
    return out


def _mx(*fs):
    out = fs[0]
    for f in fs[1:]:
        out = np.maximum(out, f)
    return out


def _mn(*fs):
    out = fs[0]
    for f in fs[1:]:
        out = np.minimum(out, f)
    return out


@dataclass
class PatientModel:
    """One patient's anatomy (all lengths in mm, angles in radians). Sample with :meth:`sample`."""

    severity_ids: np.ndarray  # (25,) 0/1/2, missing labels already replaced by a random class
    narrowing: np.ndarray  # (25,) lumen closure fraction per target
    labelled: np.ndarray  # (25,) bool: True where the severity came from a label
    x0: float
    centre: np.ndarray  # (2,) (y, z) centre of curvature of the lordotic arc
    radius: float
    kappa: float
    phi_ref: float  # tangent angle at s = 0 (centre of L3), towards posterior when going down
    s_top: np.ndarray  # (8,) top of T11..L5 bodies and of S1 (arc length)
    h: np.ndarray  # (7,) body heights T11..L5
    d: np.ndarray  # (7,) disc heights T11/T12..L5/S1
    D: np.ndarray  # (8,) body AP depth T11..S1
    W: np.ndarray  # (8,) body width T11..S1
    ca: np.ndarray  # (8,) bony canal AP
    cw: np.ndarray  # (8,) bony canal width (interpedicular)
    ped_h: float
    ped_w: float
    pillar_w: float
    sp_len: np.ndarray  # (7,) spinous process length
    tp_len: np.ndarray  # (7,) transverse process reach from the midline
    kink: float  # lumbosacral angle added to the arc at S1
    sac_len: float
    sac_curve: float
    sac_end: float  # thecal sac ends this far below the S1 endplate
    conus_s: float  # arc length of the conus tip
    b_skin: float  # posterior skin (arc b)
    b_ant: float  # anterior abdominal wall (arc b)
    body_half_width: float
    fat_t: float
    aorta: tuple[float, float]  # (x offset, radius)
    ivc: tuple[float, float]
    kidney_x: float
    # per disc (7): spinal narrowing, anterior share, foraminal (7, 2) [right, left], share,
    # subarticular (7, 2), degeneration
    n_spinal: np.ndarray
    a_spinal: np.ndarray
    n_foram: np.ndarray
    a_foram: np.ndarray
    n_sub: np.ndarray
    degeneration: np.ndarray
    roots: np.ndarray  # (k, 3) normalised (xi, eta, radius_mm) of cauda equina roots
    texture: np.ndarray  # (n, n, n) float32 smooth noise, cells of TEXTURE_CELL_MM
    tissue_gain: np.ndarray  # (n_tissues, 3) per-study contrast jitter
    stir: bool  # the "Sagittal T2/STIR" series is a STIR
    bias_params: np.ndarray  # (3, 3) amplitude, phase, frequency of the smooth bias terms
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ sampling
    @classmethod
    def sample(cls, rng: np.random.Generator, severity_ids=None) -> "PatientModel":
        """A random patient. ``severity_ids``: (25,) ids with -1 for missing (None: all random)."""
        if severity_ids is None:
            severity_ids = -np.ones(len(TARGETS), dtype=int)
        severity_ids = np.asarray(severity_ids, dtype=int)
        labelled = severity_ids >= 0
        ids, amounts = sample_narrowing(severity_ids, rng)
        u = rng.uniform
        n_disc = len(DISCS)

        # per-disc narrowing tables (unlabelled upper discs: mild random)
        n_spinal = u(0.0, 0.2, n_disc)
        n_foram = u(0.0, 0.2, (n_disc, 2))
        n_sub = u(0.0, 0.2, (n_disc, 2))
        for t in TARGETS:
            j = FIRST_LABELLED_DISC + t.level_index
            side = 1 if t.side == "left" else 0
            if t.family == "spinal":
                n_spinal[j] = amounts[t.index]
            elif t.family == "foraminal":
                n_foram[j, side] = amounts[t.index]
            else:
                n_sub[j, side] = amounts[t.index]
        worst = np.maximum.reduce([n_spinal, n_foram.mean(1), n_sub.mean(1)])
        degeneration = np.clip(worst * u(0.6, 1.1, n_disc) + rng.normal(0, 0.12, n_disc), 0, 1)

        base_h = u(25.0, 30.0)
        h = base_h + np.array([-4.0, -2.5, -1.2, -0.5, 0.0, 0.3, 0.0]) + rng.normal(0, 0.7, 7)
        base_d = u(8.0, 12.0)
        d = base_d + np.array([-3.5, -3.0, -1.8, -0.8, 0.2, 0.8, 0.2]) + rng.normal(0, 0.6, 7)
        d = np.clip(d * (1.0 - 0.4 * degeneration), 3.5, None)
        base_D = u(30.0, 37.0)
        D = base_D + np.array([-5.0, -3.5, -2.0, -1.0, 0.0, 0.8, 1.0, 1.0]) + rng.normal(0, 0.5, 8)
        base_W = u(40.0, 50.0)
        W = base_W + np.array([-11.0, -8.0, -5.0, -2.5, 0.0, 2.0, 4.0, 6.0]) + rng.normal(0, 0.7, 8)
        ca = u(15.0, 19.0) + np.array([0.5, 0.3, 0.0, -0.2, -0.4, -0.5, -0.2, -1.5]) + rng.normal(0, 0.5, 8)
        cw = u(20.0, 26.0) + np.array([-2.5, -2.0, -1.5, -1.0, -0.2, 0.8, 2.0, 2.5]) + rng.normal(0, 0.5, 8)

        # Layout along the arc: T11 body, disc, T12 body, ..., L5 body, L5/S1 disc, S1 top.
        s_top = np.zeros(8)
        s = 0.0
        for i in range(7):
            s_top[i] = s
            s += h[i] + d[i]
        s_top[7] = s
        s_mid_L1 = s_top[2] + h[2] / 2
        s_mid_L3 = s_top[4] + h[4] / 2
        s_top = s_top - s_mid_L3  # s = 0 at the centre of L3

        # lordosis of the arc (L1 centre to S1) plus the lumbosacral kink gives a 30-60 deg Cobb angle
        lordosis = math.radians(u(16.0, 34.0))
        kappa = lordosis / (s_top[7] - (s_mid_L1 - s_mid_L3))
        kappa = min(kappa, 1.0 / 280.0)
        radius = 1.0 / kappa
        phi_ref = math.radians(u(-6.0, 8.0))
        x0 = rng.normal(0.0, 4.0)
        y_l3 = rng.normal(25.0, 15.0)
        z_l3 = rng.normal(0.0, 25.0)
        centre = np.array([y_l3 + radius * math.cos(phi_ref), z_l3 + radius * math.sin(phi_ref)])

        n_roots = int(rng.integers(14, 22))
        ang = rng.uniform(-1.25, 1.25, n_roots)
        rad = np.sqrt(rng.uniform(0.15, 0.9, n_roots))
        roots = np.stack([np.sin(ang) * rad, np.abs(np.cos(ang)) * rad * 0.9 + 0.05, rng.uniform(0.6, 1.1, n_roots)], 1)
        # traversing roots, anterolateral in the sac (lateral recess side)
        roots = np.concatenate([roots, [[-0.8, -0.45, 1.4], [0.8, -0.45, 1.4]]])

        tex = rng.standard_normal((TEXTURE_CELLS,) * 3).astype(np.float32)
        for axis in range(3):  # a little smoothing: [1, 2, 1] / 4 along each axis
            tex = (np.roll(tex, 1, axis) + 2 * tex + np.roll(tex, -1, axis)) / 4
        tex = np.clip(tex / (2.2 * tex.std()), -1, 1).astype(np.float32)
        stir = bool(rng.random() < 0.25)

        sp_len = u(28.0, 38.0) + np.array([-6, -4, -2, 0, 1, 0, -3]) + rng.normal(0, 1.0, 7)
        tp_len = np.array([22.0, 24.0, 32.0, 38.0, 44.0, 40.0, 38.0]) + rng.normal(0, 2.0, 7)

        l1 = s_top[2] + h[2] / 2
        return cls(
            severity_ids=ids,
            narrowing=amounts,
            labelled=labelled,
            x0=float(x0),
            centre=centre,
            radius=float(radius),
            kappa=float(kappa),
            phi_ref=float(phi_ref),
            s_top=s_top,
            h=h,
            d=d,
            D=D,
            W=W,
            ca=ca,
            cw=cw,
            ped_h=u(13.0, 16.0),
            ped_w=u(7.0, 9.5),
            pillar_w=u(12.0, 16.0),
            sp_len=sp_len,
            tp_len=tp_len,
            kink=math.radians(u(10.0, 22.0)),
            sac_len=u(90.0, 110.0),
            sac_curve=u(0.4, 1.2),
            sac_end=u(22.0, 38.0),
            conus_s=float(l1 + u(-12.0, 28.0)),
            b_skin=float(D[4] / 2 + ca[4] + sp_len[4] + u(12.0, 45.0)),
            b_ant=float(-(D[4] / 2 + u(95.0, 170.0))),
            body_half_width=u(130.0, 185.0),
            fat_t=u(6.0, 32.0),
            aorta=(u(10.0, 18.0), u(8.0, 11.0)),
            ivc=(-u(16.0, 24.0), u(9.0, 12.0)),
            kidney_x=u(65.0, 85.0),
            n_spinal=n_spinal,
            a_spinal=u(0.4, 0.7, n_disc),
            n_foram=n_foram,
            a_foram=u(0.35, 0.65, (n_disc, 2)),
            n_sub=n_sub,
            degeneration=degeneration,
            roots=roots,
            texture=tex,
            tissue_gain=rng.uniform(0.9, 1.1, (len(_TISSUES), 3)),
            stir=stir,
            bias_params=np.stack([rng.normal(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.004, 0.012, 3)]),
        )

    # ------------------------------------------------------------------ geometry helpers
    @property
    def s_junction(self) -> float:
        """Above this arc length (centre of T12) the centreline is straight (thoracolumbar junction)."""
        return float(self.s_top[1] + self.h[1] / 2)

    def phi(self, s):
        return self.phi_ref + self.kappa * np.maximum(np.asarray(s, dtype=float), self.s_junction)

    def arc_to_patient(self, s, b, x) -> np.ndarray:
        """Arc coordinates (s, b, x) -> patient LPS point(s), shape (..., 3)."""
        s, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (s, b, x)))
        sj = self.s_junction
        ph = self.phi(s)
        rho = self.radius - b
        extra = np.minimum(s - sj, 0.0)  # straight part above the junction, along its tangent
        y = self.centre[0] - rho * np.cos(ph) + extra * np.sin(ph)
        z = self.centre[1] - rho * np.sin(ph) - extra * np.cos(ph)
        return np.stack([self.x0 + x, y, z], axis=-1)

    def _arc_coords(self, Y, Z, dtype=np.float64):
        """(s, b, valid) of points (any shape), piecewise: straight above the junction, arc below."""
        f = dtype
        cy, cz = f(self.centre[0]), f(self.centre[1])
        dy = Y - cy
        dz = Z - cz
        cr, sr = f(math.cos(self.phi_ref)), f(math.sin(self.phi_ref))
        front = -(dy * cr + dz * sr)
        s = np.arctan2(dy * sr - dz * cr, front) / f(self.kappa)
        b = f(self.radius) - np.sqrt(dy * dy + dz * dz)
        valid = front > 0
        sj = self.s_junction
        pj = self.arc_to_patient(sj, 0.0, 0.0)
        phj = float(self.phi(sj))
        ty, tz = f(math.sin(phj)), f(-math.cos(phj))
        ny, nz = f(math.cos(phj)), f(math.sin(phj))
        ry = Y - f(pj[1])
        rz = Z - f(pj[2])
        along = ry * ty + rz * tz
        above = along < 0
        s = np.where(above, f(sj) + along, s)
        b = np.where(above, ry * ny + rz * nz, b)
        valid = valid | above
        s = np.where(valid, s, f(1e4))
        return s.astype(dtype, copy=False), b.astype(dtype, copy=False), valid

    def patient_to_arc(self, P):
        P = np.asarray(P, dtype=float)
        s, b, _ = self._arc_coords(P[..., 1], P[..., 2])
        return s, b, P[..., 0] - self.x0

    @property
    def s_mid(self) -> np.ndarray:  # body centres T11..L5
        return self.s_top[:7] + self.h / 2

    @property
    def s_bot(self) -> np.ndarray:
        return self.s_top[:7] + self.h

    @property
    def s_disc_mid(self) -> np.ndarray:  # disc centres on the centreline
        return (self.s_bot + self.s_top[1:]) / 2

    def _sacrum_frame(self):
        if "sac" not in self._cache:
            s1 = self.s_top[7]
            p = self.arc_to_patient(s1, 0.0, 0.0)
            phs = float(self.phi(s1)) + self.kink
            self._cache["sac"] = (p[1], p[2], phs)
        return self._cache["sac"]

    def sacrum_to_patient(self, u, v, x) -> np.ndarray:
        ys, zs, phs = self._sacrum_frame()
        u, v, x = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (u, v, x)))
        y = ys + u * math.sin(phs) + v * math.cos(phs)
        z = zs - u * math.cos(phs) + v * math.sin(phs)
        return np.stack([self.x0 + x, y, z], axis=-1)

    @property
    def s_level(self) -> np.ndarray:
        """Arc length of each disc's centre at the posterior wall (the canal's disc level)."""
        if "s_level" not in self._cache:
            out = self.s_disc_mid.copy()
            # L5/S1: halfway between L5's endplate and S1's (tilted) endplate at the posterior wall.
            p = self.sacrum_to_patient(0.0, self.D[7] / 2, 0.0)
            s_s1_post, _, _ = self.patient_to_arc(p)
            out[-1] = (self.s_bot[-1] + float(s_s1_post)) / 2
            self._cache["s_level"] = out
        return self._cache["s_level"]

    def foramen_s(self) -> np.ndarray:
        """Arc length of each disc level's foramen centre (between the pedicles)."""
        return (self.s_top[:7] + self.ped_h + 1.0 + self.s_top[1:]) / 2

    def canal_centre_b(self, i: int) -> float:
        """Arc b of the bony canal centre next to vertebra/disc i (approx.)."""
        return float(self.D[i] / 2 + 0.3 + self.ca[i] / 2)

    def label_point(self, target) -> np.ndarray:
        """Patient coordinates (mm) of the labelled structure of one target."""
        j = FIRST_LABELLED_DISC + target.level_index
        Dj = (self.D[j] + self.D[j + 1]) / 2
        caj = (self.ca[j] + self.ca[j + 1]) / 2
        cwj = (self.cw[j] + self.cw[j + 1]) / 2
        sign = 1.0 if target.side == "left" else -1.0
        if target.family == "spinal":
            return self.arc_to_patient(self.s_level[j], Dj / 2 + 0.3 + caj / 2 + SAC_SHIFT, 0.0)
        if target.family == "foraminal":
            xf = cwj / 2 + self.ped_w / 2 + 1.0
            return self.arc_to_patient(self.foramen_s()[j] + 1.5, Dj / 2 + 0.3 * caj + 0.5, sign * xf)
        sa, sw = caj - SAC_AP_MARGIN, cwj - SAC_W_MARGIN
        return self.arc_to_patient(self.s_level[j] - 1.0, Dj / 2 + 0.3 + caj / 2 + SAC_SHIFT - 0.2 * sa, sign * (sw / 2 - 1.5))

    # ------------------------------------------------------------------ rendering
    def tissue_values(self, contrast: str) -> dict[str, float]:
        c = CONTRASTS.index(contrast)
        return {name: _TISSUES[name][c] * self.tissue_gain[k, c] for k, name in enumerate(_TISSUE_NAMES)}

    def _f32(self):
        """float32 copies of the per-vertebra / per-disc tables (gathers then stay float32)."""
        if "f32" not in self._cache:
            from types import SimpleNamespace

            names = ("s_top", "h", "d", "D", "W", "ca", "cw", "sp_len", "tp_len", "n_spinal", "a_spinal", "n_foram",
                     "a_foram", "n_sub", "degeneration")
            ns = SimpleNamespace(**{k: np.asarray(getattr(self, k), dtype=np.float32) for k in names})
            ns.s_level = self.s_level.astype(np.float32)
            ns.s_bot = self.s_bot.astype(np.float32)
            ns.s_mid = self.s_mid.astype(np.float32)
            ns.foramen_s = self.foramen_s().astype(np.float32)
            self._cache["f32"] = ns
        return self._cache["f32"]

    def render_points(self, P: np.ndarray, contrasts, ramp: float = 0.8, tex: np.ndarray | None = None) -> np.ndarray:
        """Intensities (len(contrasts), N) float32 at patient points P (N, 3). ``tex``: the
        texture field at P if already computed (else it is computed here)."""
        P = np.asarray(P, dtype=np.float32)
        F = self._f32()
        X, Y, Z = P[:, 0], P[:, 1], P[:, 2]
        N = P.shape[0]
        vals = [self.tissue_values(c) for c in contrasts]
        C = len(contrasts)
        img = np.zeros((C, N), dtype=np.float32)
        inv_ramp = np.float32(1.0 / ramp)

        def occ(f):
            return np.clip(0.5 - f * inv_ramp, 0.0, 1.0).astype(np.float32, copy=False)

        def paint(o, name, scale=None, idx=None):
            # img <- img + o * (value - img), in place
            for c in range(C):
                v = vals[c][name] if isinstance(name, str) else name[c]
                if scale is not None:
                    v = v * (scale[c] if isinstance(scale, (list, tuple)) else scale)
                if idx is None:
                    tmp = np.subtract(np.float32(v) if np.isscalar(v) else v, img[c], dtype=np.float32)
                    tmp *= o
                    img[c] += tmp
                else:
                    img[c, idx] += o * (v - img[c, idx])

        f32 = np.float32
        # ---- arc coordinates
        s, b, valid = self._arc_coords(Y, Z, np.float32)
        x = X - f32(self.x0)
        ax = np.abs(x)

        # sacral frame
        ys, zs, phs = self._sacrum_frame()
        ts_y, ts_z = f32(math.sin(phs)), f32(-math.cos(phs))
        ns_y, ns_z = f32(math.cos(phs)), f32(math.sin(phs))
        us = (Y - f32(ys)) * ts_y + (Z - f32(zs)) * ts_z
        vs = (Y - f32(ys)) * ns_y + (Z - f32(zs)) * ns_z

        # texture field in [-1, 1]
        if tex is None:
            tex = self._texture(X, Y, Z)

        # ---- body wall, muscles, viscera: the outline is in patient (x, y) per axial level z,
        # around the spine's centreline at that z (so the back follows the lordosis).
        y_sp = self._centreline_y(Z)
        y3 = f32(self.arc_to_patient(0.0, 0.0, 0.0)[1])
        y_back = f32(0.6) * y_sp + f32(0.4) * y3 + f32(self.b_skin)  # back follows the lordosis a bit
        y_front = y3 + f32(self.b_ant) - f32(12.0) * np.clip(f32(1.0) - ((Z - f32(self.centre[1] - self.radius * math.sin(self.phi_ref))) / f32(220.0)) ** 2, 0, 1)
        Bb = (y_back - y_front) / 2
        f_out = np.maximum(_ell(x, Y - (y_back + y_front) / 2, f32(self.body_half_width), Bb), (Y - y_back) + f32(0.002) * x * x)
        paint(occ(f_out), "fat")
        f_in = f_out + f32(self.fat_t)
        o_in = occ(f_in)
        D3 = float(self.D[4])
        ca3, cw3 = float(self.ca[4]), float(self.cw[4])
        # posterior compartment (back muscles); laterally the viscera wrap around it
        post_comp = occ(-(b - f32(D3 / 2 + 4.0) - f32(0.006) * x * x))
        wall = occ(np.maximum(f_in, -(f_in + f32(9.0)))) * occ(b - f32(D3 / 2))
        vis_scale = [1.0 + 0.35 * tex * (1 if c != 2 else 0.8) for c in range(C)]
        paint(o_in * (1 - post_comp), "viscera", scale=vis_scale)
        paint(wall, "muscle")  # abdominal wall muscles
        paint(o_in * post_comp, "muscle", scale=[1.0 + 0.1 * tex] * C)
        # quadratus lumborum
        f_ql = np.maximum(_ell(ax - f32(self.W[4] / 2 + 38.0), b - f32(D3 / 2 + 2.0), f32(20.0), f32(9.0)), f32(self.s_mid[1]) - s)
        paint(occ(f_ql) * o_in, "muscle")
        # psoas
        sm = self.s_mid
        grow = np.clip((s - f32(sm[1])) / f32(self.s_top[7] - sm[1]), 0, 1)
        rp = f32(5.0) + f32(17.0) * grow
        f_ps = _ell(ax - (f32(self.W[5] / 2) + rp * f32(0.7)), b + f32(0.15 * D3), rp * f32(1.15), rp)
        f_ps = np.maximum(f_ps, s - f32(self.s_top[7] + 60))
        paint(occ(f_ps) * o_in, "muscle")
        # kidneys
        f_k = _ell(np.hypot((ax - f32(self.kidney_x)) / f32(25.0), (b + f32(2.0)) / f32(20.0)), (s - f32(sm[1] + 15)) / f32(50.0), f32(1.0), f32(1.0))
        paint(occ(f_k * f32(20.0)), "kidney", scale=[1.0 + 0.1 * tex] * C)
        # aorta / IVC (flow voids), anterior to the bodies
        for (xo, r), s_end in ((self.aorta, sm[5]), (self.ivc, sm[6])):
            dxv = x - f32(xo)
            dbv = b + f32(D3 / 2 + 3.0 + r)
            f_v = np.maximum(np.sqrt(dxv * dxv + dbv * dbv) - f32(r), s - f32(s_end))
            paint(occ(f_v), "vessel")

        # ---- everything below happens near the spine: evaluate it on that region only
        s_lo = float(self.s_top[0]) - 20.0
        s_hi = float(self.s_top[7] + self.sac_len) + 20.0
        roi = np.nonzero((ax < f32(self.tp_len.max() + 8.0)) & (b > f32(-self.D.max() / 2 - 6.0))
                         & (b < f32(self.D.max() / 2 + self.ca.max() + self.sp_len.max() + 8.0))
                         & (s > f32(s_lo)) & ((s < f32(s_hi)) | (us < f32(self.sac_len + 10.0))))[0]
        full_img = img
        img = img[:, roi]
        x, ax, s, b, us, vs, tex = (a[roi] for a in (x, ax, s, b, us, vs, tex))
        sm = self.s_mid

        # ---- canal frame (continues into the sacral canal)
        below = us > 0
        s_eff = np.where(below, f32(self.s_top[7]) + us, s)
        b_eff = np.where(below, vs, b)
        L = self.sac_len
        knots_s = np.concatenate([sm, [self.s_top[7] + 1.0, self.s_top[7] + 0.5 * L, self.s_top[7] + L]])
        tk = np.array([0.0, 0.5, 1.0])
        q = -self.sac_curve * tk**2 * 25.0
        sac_post = self.D[7] / 2 * (1 - 0.35 * tk) + q
        knots_wall = np.concatenate([self.D[:7] / 2, sac_post])
        knots_ca = np.concatenate([self.ca[:7], self.ca[7] * (1 - 0.7 * tk)])
        knots_cw = np.concatenate([self.cw[:7], self.cw[7] * (1 - 0.5 * tk)])
        wall, cav, cwv = _lerp(s_eff, knots_s, knots_wall, knots_ca, knots_cw)
        bb = b_eff - (wall + f32(0.3) + cav / 2)
        f_canal = _ell(bb, x, cav / 2, cwv / 2)
        f_canal = np.where(s_eff < f32(self.s_top[7] + L), f_canal, f32(50.0))

        # nearest disc level along the canal
        s_lev = self.s_level
        jd = np.clip(np.searchsorted((s_lev[1:] + s_lev[:-1]) / 2, s_eff), 0, 6)
        g = s_eff - s_lev[jd].astype(np.float32)
        taper = np.clip((f32(self.s_top[7] + self.sac_end) - s_eff) / f32(10.0), 0, 1)
        sa = (cav - f32(SAC_AP_MARGIN)) * np.sqrt(taper)
        sw = (cwv - f32(SAC_W_MARGIN)) * np.sqrt(taper)
        bb = bb - f32(SAC_SHIFT)  # from here on: relative to the sac centre
        sw2 = np.maximum(sw / 2, f32(0.5))
        dj = F.d[jd]
        bumpA = np.exp(-((g / (f32(0.55) * dj + f32(2.5))) ** 2))
        bumpP = np.exp(-(((g + f32(2.0)) / f32(6.5)) ** 2))
        bumpL = np.exp(-(((g + f32(1.0)) / f32(6.5)) ** 2))
        nsp = F.n_spinal[jd]
        al = F.a_spinal[jd]
        xr2 = (x / sw2) ** 2
        A = nsp * al * sa * bumpA * (f32(1.0) - f32(0.3) * np.minimum(xr2, 1))
        Pp = nsp * (f32(1) - al) * sa * bumpP * (f32(1.0) + f32(0.4) * np.minimum(xr2, 1))
        Ll = F.n_sub[jd, 1] * sw2 * f32(0.55) * bumpL
        Lr = F.n_sub[jd, 0] * sw2 * f32(0.55) * bumpL

        in_canal = occ(f_canal)
        paint(in_canal, "fat")
        f_A = bb - (-sa / 2 + A)
        f_P = (sa / 2 - Pp) - bb
        f_Ll = np.maximum((sw / 2 - Ll) - x, f32(0.6) - Ll)
        f_Lr = np.maximum((sw / 2 - Lr) + x, f32(0.6) - Lr)
        paint(in_canal * occ(_mn(f_A, f_P, f_Ll, f_Lr)), "ligament")
        f_sac = _mx(_ell(bb, x, np.maximum(sa / 2, f32(0.3)), sw2), -f_A, -f_P, x - (sw / 2 - Ll), -x - (sw / 2 - Lr))
        f_sac = np.maximum(f_sac, f_canal)
        o_sac = occ(f_sac)
        paint(o_sac, "csf")
        # cord / conus and cauda equina roots, evaluated only inside the sac
        idx = np.nonzero(f_sac < ramp)[0]
        if idx.size:
            xi, bbi, si = x[idx], bb[idx], s_eff[idx]
            sai, swi = sa[idx], sw[idx]
            Ai, Pi, Lli, Lri = A[idx], Pp[idx], Ll[idx], Lr[idx]
            c_ap = (Ai - Pi) / 2
            half_ap = np.maximum((sai - Ai - Pi) / 2, f32(0.2))
            lo_x = -(swi / 2 - Lri)
            hi_x = swi / 2 - Lli
            f_n = np.full(idx.size, 50.0, dtype=np.float32)
            for xi_k, eta_k, r_k in self.roots:
                r_k = f32(r_k)
                xk = np.clip(f32(xi_k) * swi / 2, lo_x + r_k * f32(0.5), hi_x - r_k * f32(0.5))
                bk = c_ap + f32(eta_k) * np.maximum(half_ap - r_k * f32(0.5), f32(0.0))
                f_n = np.minimum(f_n, np.hypot(xi - xk, bbi - bk) - r_k)
            conus = np.sqrt(np.clip((f32(self.conus_s) - si) / f32(14.0), 0, 1))
            f_cord = np.maximum(_ell(bbi - c_ap, xi, f32(3.6) * conus + f32(0.05), f32(4.8) * conus + f32(0.05)), si - f32(self.conus_s))
            f_n = np.minimum(f_n, f_cord)
            o_n = occ(f_n) * o_sac[idx]
            paint(o_n, "neural", idx=idx)

        # ---- foramina: fat lateral to the canal between body and pillar, then intruders
        ip_all = np.clip(np.searchsorted(self.s_disc_mid, s), 0, 7)  # nearest vertebra incl. S1
        Dp = F.D[ip_all]
        cap = F.ca[ip_all]
        cwp = F.cw[ip_all]
        knots8 = np.concatenate([sm, [self.s_top[7] + 5]])
        bw, ca_s, cw_s, W_s = _lerp(s, knots8, self.D / 2, np.r_[self.ca[:7], self.ca[6]], np.r_[self.cw[:7], self.cw[6]],
                                    np.r_[self.W[:7], self.W[6]])
        # the posterolateral body/disc wall at this x (ellipse of the body cross-section)
        fa_b0 = np.minimum(bw, (bw + f32(1.5)) * np.sqrt(np.clip(f32(1.0) - (ax / (W_s / 2 + f32(1.0))) ** 2, 0, 1))) - f32(0.5)
        fa_b1 = bw + f32(0.55) * ca_s + f32(1.0)
        f_fz = _mx(_ell(ax - (cw_s / 2 + f32(1.0)), b - fa_b1 * f32(0.5), f32(11.0), fa_b1 * f32(0.5) + f32(1.0)),
                   b - fa_b1, (cw_s / 2 - f32(1.0)) - ax, s - f32(self.s_top[7] + 6))
        o_fz = occ(f_fz)
        paint(o_fz, "fat")
        jf = np.clip(np.searchsorted((self.foramen_s()[1:] + self.foramen_s()[:-1]) / 2, s), 0, 6)
        side = (x > 0).astype(np.int64)
        nf = F.n_foram[jf, side]
        af = F.a_foram[jf, side]
        prof = np.exp(-(((s - F.foramen_s[jf] - f32(2.0)) / f32(9.5)) ** 2))
        fa = fa_b1 - fa_b0
        adv_a = nf * af * fa * prof * f32(1.05)
        adv_p = nf * (f32(1) - af) * fa * prof * f32(1.05)
        f_int = np.minimum(np.maximum(b - (fa_b0 + adv_a), f32(0.4) - adv_a), np.maximum((fa_b1 - adv_p) - b, f32(0.4) - adv_p))
        paint(o_fz * occ(f_int), "ligament")
        # exiting root below the upper pedicle
        iu = np.clip(jf, 0, 6)
        xp_up = (self.cw[iu] / 2 + self.ped_w / 2).astype(np.float32)
        s_root = (self.s_top[iu] + self.ped_h + 3.0).astype(np.float32) + f32(0.35) * np.maximum(ax - xp_up, 0)
        r_root = f32(2.6) * (f32(1.0) - f32(0.3) * nf)
        f_root = np.maximum(np.hypot(s - s_root, b - (bw + f32(0.28) * ca_s)) - r_root, (cw_s / 2 - f32(2.0)) - ax)
        f_root = np.maximum(f_root, ax - (cw_s / 2 + f32(30.0)))
        paint(occ(f_root), "neural")

        # ---- discs
        jdd = np.clip(np.searchsorted(sm[1:], s), 0, 6)
        Dd = ((self.D[jdd] + self.D[jdd + 1]) / 2 + 1.0).astype(np.float32)
        Wd = ((self.W[jdd] + self.W[jdd + 1]) / 2 + 1.0).astype(np.float32)
        top = F.s_bot[jdd]
        is_last = jdd == 6
        lower = np.where(is_last, us, s - F.s_top[np.minimum(jdd + 1, 7)])
        f_u = np.maximum(top - s - f32(0.6), lower - f32(0.6))
        f_cs = np.maximum(_ell(b, x, Dd / 2 + f32(1.5), Wd / 2), b - (Dd / 2 + f32(2.5) * (x / (Wd / 2)) ** 2))
        f_disc = np.maximum(f_u, f_cs)
        paint(occ(f_disc), "annulus")
        dmid = ((self.s_bot + np.concatenate([self.s_top[1:7], [self.s_top[7]]])) / 2)[jdd].astype(np.float32)
        dh = F.d[jdd]
        f_nuc = np.maximum(_ell(b - f32(1.0), x, f32(0.3) * Dd, f32(0.33) * Wd), np.abs(s - dmid) - f32(0.3) * dh)
        f_nuc = np.where(is_last, np.maximum(f_nuc, us + f32(1.5)), f_nuc)
        gdeg = F.degeneration[jdd]
        nuc_vals = [vals[c]["nucleus"] * (1 - gdeg) + vals[c]["nucleus_degenerate"] * gdeg for c in range(C)]
        o_nuc = occ(f_nuc * f32(1.5))
        for c in range(C):
            img[c] += o_nuc * (nuc_vals[c] - img[c])

        # ---- bones: bodies, posterior elements, sacrum (cortex shell + marrow)
        iv = np.clip(np.searchsorted(self.s_disc_mid[:6], s), 0, 6)
        u = s - sm[iv].astype(np.float32)
        Dv = F.D[iv]
        Wv = F.W[iv]
        r2 = (b / (Dv / 2 + f32(1.5))) ** 2 + (x / (Wv / 2)) ** 2
        f_bcs = np.maximum((np.sqrt(r2) - f32(1.0)) * (Dv / 2 + f32(1.5)), b - (Dv / 2 + f32(2.5) * (x / (Wv / 2)) ** 2))
        f_body = np.maximum(f_bcs, np.abs(u) - F.h[iv] / 2 + f32(0.8) * np.clip(f32(1.0) - r2, 0, 1))

        st = F.s_top[ip_all]
        jl = np.clip(np.searchsorted((self.s_level[1:] + self.s_level[:-1]) / 2, s), 0, 6)
        xp = cwp / 2 + f32(self.ped_w / 2)
        f_ped = np.maximum(
            _ell(s - (st + f32(self.ped_h / 2 + 0.5)), ax - xp, f32(self.ped_h / 2), f32(self.ped_w / 2)),
            np.maximum(f32(0.3) * Dp - b, b - (Dp / 2 + f32(0.7) * cap + f32(2.0))),
        )
        sap = np.exp(-(((s - F.s_level[jl]) / f32(6.0)) ** 2))
        pil_b0 = bw + f32(0.55) * ca_s - f32(0.22) * ca_s * sap
        hyp = np.where(x > 0, self.n_sub[jd, 1], self.n_sub[jd, 0]).astype(np.float32) * f32(3.0) * bumpL
        pb1 = bw + ca_s + f32(7.0)
        pil_in = cw_s / 2 - f32(1.0) - hyp
        pil_out = cw_s / 2 + f32(self.pillar_w)
        f_pil = _mx(_ell(ax - (pil_in + pil_out) / 2, b - (pil_b0 + pb1) / 2, (pil_out - pil_in) / 2 + f32(1.5), (pb1 - pil_b0) / 2),
                    pil_in - ax, pil_b0 - b, s - f32(self.s_top[7] + 14))
        # facet joint: oblique-sagittal gap between the superior (anterolateral) and inferior
        # (posteromedial) articular processes, around each disc level
        near_joint = np.abs(s - (F.s_level[jl] - f32(3.0))) - f32(9.0)
        lf_ = ax - (cw_s / 2 + f32(0.45 * self.pillar_w) - hyp * f32(0.5) + f32(0.8) * (b - (bw + f32(0.78) * ca_s)))
        f_facets = np.maximum(f_pil, f32(0.9) - np.abs(lf_))
        f_pil_split = np.where(near_joint < 0, f_facets, f_pil)
        ipv = np.minimum(ip_all, 6)
        lam_top = F.s_top[ipv] + f32(5.0)
        lam_bot = F.s_bot[ipv] + f32(3.0)
        b_lam = bw + ca_s + f32(3.2) - f32(0.4) * ca_s * ax / (cw_s / 2 + f32(5.0))
        f_lam = _mx(ax - (cw_s / 2 + f32(6.0)), np.abs(b - b_lam) - f32(2.6), lam_top - s, s - lam_bot)
        f_lam = np.where(ip_all < 7, f_lam, f32(50.0))
        b_sp0 = bw + ca_s + f32(2.0)
        slope = f32(0.3)
        s_sp = s - slope * np.maximum(b - b_sp0, 0)
        isp = np.clip(np.searchsorted(self.s_disc_mid[:6], s_sp), 0, 6)
        sp_mid = (self.s_top[isp] + self.h[isp] * 0.45).astype(np.float32)
        f_sp = _mx(ax - f32(3.4) + f32(0.04) * (b - b_sp0), b_sp0 - b, b - (bw + ca_s + F.sp_len[isp]), np.abs(s_sp - sp_mid) - F.h[isp] * f32(0.36))
        f_tp = _mx(ax - F.tp_len[ipv], (cwp / 2 + f32(self.ped_w * 0.5)) - ax, np.abs(b - (Dp / 2 + f32(0.45) * cap)) - f32(4.0), np.abs(s - (st + f32(7.0))) - f32(5.0))
        f_tp = np.where(ip_all < 7, f_tp, f32(50.0))
        f_post = _mn(f_ped, f_pil_split, f_lam, f_sp, f_tp)

        # sacrum
        t = np.clip(us / f32(L), 0, 1)
        qv = -f32(self.sac_curve * 25.0) * t * t
        v_ant = -(f32(self.D[7] / 2 + 1.0)) * (f32(1) - f32(0.55) * t) + qv
        v_post = f32(self.D[7] / 2) * (f32(1) - f32(0.35) * t) + qv
        ca_sac = f32(self.ca[7]) * (f32(1) - f32(0.7) * t)
        cw_sac = f32(self.cw[7]) * (f32(1) - f32(0.5) * t)
        ws = f32(self.W[7] / 2 + 24.0) * (f32(1) - f32(0.7) * t)
        back = v_post + ca_sac + f32(4.0) + f32(3.0) * (f32(1) - t)
        vmid = (v_ant + v_post) / 2
        wb_ = f32(self.W[7] / 2) * (f32(1) - f32(0.5) * t)
        f_sb = _ell(ax, vs - vmid, wb_, (v_post - v_ant) / 2 + f32(1.0))  # sacral bodies
        ala_x = wb_ + f32(10.0) * (f32(1) - t)
        f_ala = _ell(ax - ala_x, vs - (vmid + f32(3.0)), ws - ala_x + f32(2.0), (v_post - v_ant) / 2 + f32(2.0))
        f_ala = np.maximum(f_ala, us - f32(0.55 * L))
        f_arch = _ell(ax, vs - (v_post + ca_sac / 2 + f32(1.0)), cw_sac / 2 + f32(9.0) * (f32(1) - f32(0.5) * t), ca_sac / 2 + f32(4.0))
        f_lat = _mx(np.abs(vs - (v_post + ca_sac / 2)) - ca_sac / 2 - f32(1.0), ax - (cw_sac / 2 + f32(14.0)) * (f32(1.0) - f32(0.3) * t))
        f_sbox = np.maximum(_mn(f_sb, f_ala, f_arch, f_lat), _mx(-us, us - f32(L)))
        f_scan = _mx(v_post + f32(0.3) - vs, vs - (v_post + ca_sac), ax - cw_sac / 2)
        f_sacrum = np.maximum(f_sbox, -f_scan)

        f_bone = _mn(f_body, f_post, f_sacrum)
        o_bone = occ(f_bone)
        paint(o_bone, "cortex")
        marrow_scale = [1.0 + 0.1 * tex] * C
        paint(occ(f_bone + f32(1.3)), "marrow", scale=marrow_scale)
        # facet joints (thin fluid line, oblique-sagittal), at each disc level
        paint(occ(_mx(np.abs(lf_) - f32(0.6), near_joint, f_pil)) * f32(0.8), "facet_fluid")
        # rudimentary sacral discs
        for tk_, w in ((0.27, 1.4), (0.47, 1.1), (0.65, 0.9), (0.8, 0.7)):
            f_sd = _mx(np.abs(us - f32(tk_ * L)) - f32(w), (v_ant + f32(1.5)) - vs, vs - (v_post - f32(1.5)), ax - ws * f32(0.45))
            paint(occ(f_sd) * f32(0.8), "annulus")
        full_img[:, roi] = img
        return full_img

    # ------------------------------------------------------------------ series
    def render_stack(self, stack: "SliceStack", contrasts, rng: np.random.Generator, *, acq_factor: float = 0.7,
                     noise: float = 0.03, bias: float = 0.5, gain: float = 1000.0, max_pixels: int = 600_000) -> np.ndarray:
        """Render a series: (len(contrasts), n, rows, cols) float32 in scanner units, with MR-like
        acquisition: low-res grid -> Rician noise, posterior-coil bias -> k-space zero-fill
        upsampling (sinc interpolation with some ringing)."""
        rows, cols = stack.rows, stack.cols
        ar = max(16, min(rows, int(round(rows * acq_factor))))
        ac = max(16, min(cols, int(round(cols * acq_factor))))
        rs, cs = stack.pixel_spacing
        # acquisition sample k sits at recon coordinate k * rows / ar (zero-fill interpolation)
        rr = np.arange(ar) * (rows / ar)
        cc = np.arange(ac) * (cols / ac)
        ramp = max(0.45, 0.6 * max(rs * rows / ar, cs * cols / ac))
        C = len(contrasts)
        out = np.empty((C, stack.n, rows, cols), dtype=np.float32)
        per_chunk = max(1, max_pixels // (ar * ac))
        row_c = np.asarray(stack.row_cosine, dtype=float)
        col_c = np.asarray(stack.col_cosine, dtype=float)
        offs = (cc[None, :, None] * cs * row_c + rr[:, None, None] * rs * col_c).reshape(-1, 3)
        ri = np.unique(np.r_[np.arange(0, ar, 4), ar - 1])
        ci = np.unique(np.r_[np.arange(0, ac, 4), ac - 1])
        Lr, Lc = _linear_matrix(ar, ri), _linear_matrix(ac, ci)
        for k0 in range(0, stack.n, per_chunk):
            ks = range(k0, min(stack.n, k0 + per_chunk))
            pts = np.concatenate([stack.positions[k][None, :] + offs for k in ks]).astype(np.float32)
            # smooth fields (texture, coil bias) on a coarse grid, linearly interpolated
            cpts = pts.reshape(len(ks), ar, ac, 3)[:, ri][:, :, ci].reshape(-1, 3)
            xx, yy, zz = cpts[:, 0], cpts[:, 1], cpts[:, 2]
            tex = _lin_up(self._texture(xx, yy, zz).reshape(len(ks), len(ri), len(ci)), Lr, Lc)
            yref = self.arc_to_patient(0.0, self.b_skin, 0.0)[1]
            f32 = np.float32
            bias_c = np.exp(f32(bias) * np.clip((yy - f32(yref)) / f32(120.0), -2.0, 0.3) + self._bias_terms(xx, yy, zz))
            bias_f = _lin_up(bias_c.reshape(len(ks), len(ri), len(ci)), Lr, Lc)
            vals = self.render_points(pts, contrasts, ramp=ramp, tex=tex.reshape(-1)).reshape(C, len(ks), ar, ac)
            for c in range(C):
                sig = vals[c] * bias_f
                n1 = rng.standard_normal(sig.shape, dtype=np.float32) * f32(noise)
                n2 = rng.standard_normal(sig.shape, dtype=np.float32) * f32(noise)
                sig += n1
                sig *= sig
                n2 *= n2
                sig += n2
                np.sqrt(sig, out=sig)
                up = _fourier_upsample(sig, rows, cols)
                out[c, k0 : k0 + len(ks)] = np.clip(up, 0, None) * gain
        return out

    def _texture(self, X, Y, Z):
        """Smooth random field in about [-1, 1]: trilinear lookup in a coarse noise volume."""
        vol = self.texture
        n = vol.shape[0]
        f32 = np.float32
        centre = self.arc_to_patient(0.0, 0.0, 0.0)
        idx, frac = [], []
        for a, c0 in ((X, centre[0]), (Y, centre[1]), (Z, centre[2])):
            g = np.clip((a - f32(c0)) * f32(1.0 / TEXTURE_CELL_MM) + f32(n / 2), 0, n - 1.001)
            i = g.astype(np.int32)
            idx.append(i)
            frac.append((g - i).astype(np.float32))
        (ix, iy, iz), (fx, fy, fz) = idx, frac
        flat = vol.reshape(-1)
        base = (ix * n + iy) * n + iz
        out = np.zeros(X.shape, dtype=np.float32)
        for dx, wx in ((0, 1 - fx), (1, fx)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                k = base + (dx * n + dy) * n
                out += wx * wy * ((1 - fz) * flat[k] + fz * flat[k + 1])
        return out

    def _centreline_y(self, Z):
        """y of the spine's centreline (arc above S1, sacral axis below) at height(s) Z."""
        z = np.asarray(Z, dtype=np.float32)
        f32 = np.float32
        sinp = np.clip((f32(self.centre[1]) - z) / f32(self.radius), -0.99, 0.99)
        y_arc = f32(self.centre[0]) - f32(self.radius) * np.sqrt(f32(1.0) - sinp * sinp)
        ys, zs, phs = self._sacrum_frame()
        y_sac = f32(ys) + (f32(zs) - z) * f32(math.tan(min(phs, math.radians(75.0))))
        pj = self.arc_to_patient(self.s_junction, 0.0, 0.0)
        phj = float(self.phi(self.s_junction))
        y_top = f32(pj[1]) - (z - f32(pj[2])) * f32(math.tan(phj))
        return np.where(z < f32(zs), y_sac, np.where(z > f32(pj[2]), y_top, y_arc)).astype(np.float32)

    def _bias_terms(self, xx, yy, zz):
        amp, ph, fr = (np.asarray(v, dtype=np.float32) for v in self.bias_params)
        return amp[0] * np.cos(fr[0] * xx + ph[0]) + amp[1] * np.cos(fr[1] * zz + ph[1]) + amp[2] * np.cos(fr[2] * (yy + zz) + ph[2])


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


@dataclass
class SliceStack:
    """The geometry of one series (DICOM terms). Slice k of the arrays is at ``positions[k]``."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient
    row_cosine: np.ndarray  # (3,)
    col_cosine: np.ndarray  # (3,)
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, col spacing)
    slice_thickness: float
    instance_numbers: np.ndarray  # (n,)

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def orientation(self) -> list[float]:
        return [float(v) for v in np.concatenate([self.row_cosine, self.col_cosine])]

    def pixel_to_patient(self, k: int, x: float, y: float) -> np.ndarray:
        rs, cs = self.pixel_spacing
        return self.positions[k] + x * cs * self.row_cosine + y * rs * self.col_cosine

    def project(self, P) -> tuple[int, float, float, float]:
        """Nearest slice to patient point P and P's pixel (x, y) on it: (k, x, y, distance mm)."""
        P = np.asarray(P, dtype=float)
        dist = (P - self.positions) @ self.normal
        k = int(np.argmin(np.abs(dist)))
        rel = P - self.positions[k]
        rs, cs = self.pixel_spacing
        return k, float(rel @ self.row_cosine / cs), float(rel @ self.col_cosine / rs), float(dist[k])


_SIZES = {
    # series kind -> size -> parameter ranges
    "sagittal": {
        "full": dict(n=(15, 20), spacing=(3.5, 4.5), matrix=(320, 352, 384, 416, 448), pixel=(0.6, 0.8), fov=(250.0, 300.0)),
        "small": dict(n=(9, 11), spacing=(4.6, 5.4), matrix=(128,), pixel=(1.9, 2.3), fov=(245.0, 295.0)),
    },
    "axial": {
        "full": dict(n=(20, 60), per_level=(4, 6), spacing=(3.0, 4.5), matrix=(256, 288, 320, 352, 384), pixel=(0.5, 0.8), fov=(170.0, 230.0)),
        "small": dict(n=(15, 20), per_level=(3, 4), spacing=(3.5, 4.5), matrix=(128,), pixel=(1.3, 1.75), fov=(170.0, 225.0)),
    },
}


def _matrix_and_pixel(rng, p):
    m = int(rng.choice(p["matrix"]))
    lo = max(p["pixel"][0], p["fov"][0] / m)
    hi = min(p["pixel"][1], p["fov"][1] / m)
    if lo > hi:
        lo = hi = float(np.clip(sum(p["fov"]) / 2 / m, *p["pixel"]))
    return m, float(rng.uniform(lo, hi))


def sample_series_geometry(model: PatientModel, kind: str, size: str, rng: np.random.Generator,
                           like: SliceStack | None = None) -> SliceStack:
    """A realistic acquisition for ``kind`` in {"sagittal", "axial"} at ``size`` {"full", "small"}.

    Sagittal: slices across the midline covering both foramina, FOV from T11/T12 to the sacrum;
    instance 1 is the patient's right in ~64% of series (as in the real data), else the left.
    Axial: either one contiguous stack from above L1/L2 to below L5/S1, or groups of slices through
    each disc; instance 1 is the most superior slice in ~79% of series.
    ``like``: reuse this stack's slice positions (a T1 and T2 sharing geometry).
    """
    p = _SIZES[kind][size]
    if kind == "sagittal":
        if like is not None:
            return SliceStack(like.positions.copy(), like.row_cosine.copy(), like.col_cosine.copy(), like.rows, like.cols,
                              like.pixel_spacing, like.slice_thickness, like.instance_numbers.copy())
        n = int(rng.integers(p["n"][0], p["n"][1] + 1))
        spacing = float(rng.uniform(*p["spacing"]))
        m, px = _matrix_and_pixel(rng, p)
        yaw = math.radians(rng.uniform(-2.0, 2.0))
        row_c = np.array([math.sin(yaw), math.cos(yaw), 0.0])
        col_c = np.array([0.0, 0.0, -1.0])
        across = np.array([math.cos(yaw), -math.sin(yaw), 0.0])  # towards patient left
        # FOV centre: a little posterior of the L3/L4 disc centre, vertically between T12 and S2
        s_c = 0.5 * (model.s_mid[1] + model.s_top[7] + 25.0) + rng.uniform(-12.0, 12.0)
        c = model.arc_to_patient(s_c, rng.uniform(10.0, 40.0), 0.0)
        c[0] = model.x0 + rng.normal(0.0, 2.0)
        offsets = (np.arange(n) - (n - 1) / 2) * spacing
        centres = c[None, :] + offsets[:, None] * across[None, :]
        ipp = centres - (m - 1) / 2 * px * row_c - (m - 1) / 2 * px * col_c
        order = np.arange(1, n + 1) if rng.random() < 0.64 else np.arange(n, 0, -1)
        thick = float(spacing - rng.uniform(0.0, 0.5))
        return SliceStack(ipp, row_c, col_c, m, m, (px, px), thick, order)

    if kind != "axial":
        raise ValueError(f"unknown series kind {kind!r}")
    m, px = _matrix_and_pixel(rng, p)
    row_c = np.array([1.0, 0.0, 0.0])
    col_c = np.array([0.0, 1.0, 0.0])
    lev = [model.label_point(t) for t in TARGETS if t.family == "spinal"]
    zl = np.array([pt[2] for pt in lev])
    mode = "levels" if rng.random() < 0.5 else "stack"
    if mode == "levels":
        zs = []
        for j in range(len(LEVELS)):
            k = int(rng.integers(p["per_level"][0], p["per_level"][1] + 1))
            sp = float(rng.uniform(*p["spacing"]))
            zc = zl[j] + rng.uniform(-1.0, 1.0)
            zs.extend(zc + (np.arange(k) - (k - 1) / 2) * sp)
        zs = np.array(zs)
        thick = float(rng.uniform(3.0, 4.0))
        # keep the count within range (small sizes)
        if len(zs) > p["n"][1]:
            zs = zs[: p["n"][1]]
    else:
        n = int(rng.integers(p["n"][0], p["n"][1] + 1))
        z_top = zl[0] + rng.uniform(6.0, 14.0)
        z_bot = zl[-1] - rng.uniform(6.0, 14.0)
        zs = np.linspace(z_top, z_bot, n)
        thick = float(min(4.0, abs(zs[0] - zs[1]) * rng.uniform(0.85, 1.0)))
    zs = np.sort(zs)[::-1]  # superior first
    n = len(zs)
    canal = model.arc_to_patient(0.0, model.canal_centre_b(4), 0.0)
    cx = model.x0 + rng.normal(0.0, 5.0)
    cy = canal[1] + rng.uniform(-15.0, 5.0)
    half = (m - 1) / 2 * px
    ipp = np.stack([np.full(n, cx - half), np.full(n, cy - half), zs], axis=1)
    order = np.arange(1, n + 1) if rng.random() < 0.79 else np.arange(n, 0, -1)
    return SliceStack(ipp, row_c, col_c, m, m, (px, px), thick, order)


def render_series(model: PatientModel, stack: SliceStack, contrasts, rng: np.random.Generator, size: str = "full") -> np.ndarray:
    """Render a stack with per-series random acquisition settings; (C, n, rows, cols) float32."""
    if size == "full":
        # acquisition matrix ~ 0.5-0.7 of the reconstructed one (e.g. 256-320 acquired, 448 shown)
        acq = float(rng.uniform(0.5, 0.7)) if stack.rows > 300 else float(rng.uniform(0.6, 0.8))
    else:
        acq = float(rng.uniform(0.8, 1.0))
    noise = float(rng.uniform(0.012, 0.04))
    bias = float(rng.uniform(0.15, 0.45))
    gain = float(rng.uniform(700.0, 2500.0))
    return model.render_stack(stack, contrasts, rng, acq_factor=acq, noise=noise, bias=bias, gain=gain)
