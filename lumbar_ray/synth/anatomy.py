"""One synthetic patient's lumbar anatomy: :class:`PatientModel`, its random sampling, the arc
geometry of its spine, the labelled point of each target and its tissue intensities.

The model describes T11 to the sacrum along a lordotic curve, vertebral bodies, discs, the bony
canal with the thecal sac (CSF, conus, cauda equina), posterior elements (pedicles, articular
pillars with facet joints, laminae, spinous and transverse processes), neural foramina with fat
and the exiting root, the body wall, paraspinal and psoas muscles, viscera, aorta/IVC and
kidneys (painted by :mod:`lumbar_ray.synth.render`). Every series of a study is rendered from the
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
tilted by the lumbosacral angle. Patient coordinates are DICOM LPS, in millimetres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from lumbar_ray.targets import LEVELS, SEVERITIES, TARGETS

__all__ = [
    "VERTEBRAE",
    "DISCS",
    "FIRST_LABELLED_DISC",
    "NARROWING_RANGES",
    "SEVERITY_PRIORS",
    "CONTRASTS",
    "TEXTURE_CELL_MM",
    "TEXTURE_CELLS",
    "SAC_AP_MARGIN",
    "SAC_W_MARGIN",
    "SAC_SHIFT",
    "PatientModel",
    "sample_narrowing",
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


# ---------------------------------------------------------------------------------------- sampling
# Each helper draws one part of the patient from ``rng``; PatientModel.sample calls them in a
# fixed order, which is what makes a seed give the same patient.
def _sample_disc_narrowing(amounts: np.ndarray, rng: np.random.Generator) -> dict:
    """Per disc (7): narrowing per family and side (unlabelled upper discs: mild random) and the
    disc degeneration that follows the worst of them."""
    u = rng.uniform
    n_disc = len(DISCS)
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
    return dict(n_spinal=n_spinal, n_foram=n_foram, n_sub=n_sub, degeneration=degeneration)


def _sample_vertebral_sizes(degeneration: np.ndarray, rng: np.random.Generator) -> dict:
    """Body heights, disc heights (lower where degenerate), body depth/width and bony canal size."""
    u = rng.uniform
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
    return dict(h=h, d=d, D=D, W=W, ca=ca, cw=cw)


def _sample_lordotic_arc(h: np.ndarray, d: np.ndarray, rng: np.random.Generator) -> dict:
    """Layout of bodies and discs along the arc (s = 0 at the centre of L3), its curvature and its
    place in the patient."""
    # T11 body, disc, T12 body, ..., L5 body, L5/S1 disc, S1 top.
    s_top = np.zeros(8)
    s = 0.0
    for i in range(7):
        s_top[i] = s
        s += h[i] + d[i]
    s_top[7] = s
    s_mid_L1 = s_top[2] + h[2] / 2
    s_mid_L3 = s_top[4] + h[4] / 2
    s_top = s_top - s_mid_L3

    # lordosis of the arc (L1 centre to S1) plus the lumbosacral kink gives a 30-60 deg Cobb angle
    lordosis = math.radians(rng.uniform(16.0, 34.0))
    kappa = lordosis / (s_top[7] - (s_mid_L1 - s_mid_L3))
    kappa = min(kappa, 1.0 / 280.0)
    radius = 1.0 / kappa
    phi_ref = math.radians(rng.uniform(-6.0, 8.0))
    x0 = rng.normal(0.0, 4.0)
    y_l3 = rng.normal(25.0, 15.0)
    z_l3 = rng.normal(0.0, 25.0)
    centre = np.array([y_l3 + radius * math.cos(phi_ref), z_l3 + radius * math.sin(phi_ref)])
    return dict(s_top=s_top, x0=float(x0), centre=centre, radius=float(radius), kappa=float(kappa), phi_ref=float(phi_ref))


def _sample_cauda_equina_roots(rng: np.random.Generator) -> np.ndarray:
    """(k, 3) normalised (xi, eta, radius_mm) of the roots in the sac."""
    n_roots = int(rng.integers(14, 22))
    ang = rng.uniform(-1.25, 1.25, n_roots)
    rad = np.sqrt(rng.uniform(0.15, 0.9, n_roots))
    roots = np.stack([np.sin(ang) * rad, np.abs(np.cos(ang)) * rad * 0.9 + 0.05, rng.uniform(0.6, 1.1, n_roots)], 1)
    # traversing roots, anterolateral in the sac (lateral recess side)
    return np.concatenate([roots, [[-0.8, -0.45, 1.4], [0.8, -0.45, 1.4]]])


def _sample_texture_volume(rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [-1, 1], TEXTURE_CELLS cubed (organ and marrow texture)."""
    tex = rng.standard_normal((TEXTURE_CELLS,) * 3).astype(np.float32)
    for axis in range(3):  # a little smoothing: [1, 2, 1] / 4 along each axis
        tex = (np.roll(tex, 1, axis) + 2 * tex + np.roll(tex, -1, axis)) / 4
    return np.clip(tex / (2.2 * tex.std()), -1, 1).astype(np.float32)


def _sample_posterior_elements(rng: np.random.Generator) -> dict:
    """Spinous and transverse process lengths per vertebra, pedicle and articular pillar sizes."""
    u = rng.uniform
    sp_len = u(28.0, 38.0) + np.array([-6, -4, -2, 0, 1, 0, -3]) + rng.normal(0, 1.0, 7)
    tp_len = np.array([22.0, 24.0, 32.0, 38.0, 44.0, 40.0, 38.0]) + rng.normal(0, 2.0, 7)
    return dict(sp_len=sp_len, tp_len=tp_len, ped_h=u(13.0, 16.0), ped_w=u(7.0, 9.5), pillar_w=u(12.0, 16.0))


def _sample_sacrum_and_sac(s_mid_L1: float, rng: np.random.Generator) -> dict:
    """Lumbosacral angle, sacral length and curve, end of the thecal sac and level of the conus."""
    u = rng.uniform
    return dict(kink=math.radians(u(10.0, 22.0)), sac_len=u(90.0, 110.0), sac_curve=u(0.4, 1.2), sac_end=u(22.0, 38.0),
                conus_s=float(s_mid_L1 + u(-12.0, 28.0)))


def _sample_trunk(D: np.ndarray, ca: np.ndarray, sp_len: np.ndarray, rng: np.random.Generator) -> dict:
    """Body wall (skin, abdominal wall, width, subcutaneous fat), great vessels and kidneys."""
    u = rng.uniform
    return dict(
        b_skin=float(D[4] / 2 + ca[4] + sp_len[4] + u(12.0, 45.0)),
        b_ant=float(-(D[4] / 2 + u(95.0, 170.0))),
        body_half_width=u(130.0, 185.0),
        fat_t=u(6.0, 32.0),
        aorta=(u(10.0, 18.0), u(8.0, 11.0)),
        ivc=(-u(16.0, 24.0), u(9.0, 12.0)),
        kidney_x=u(65.0, 85.0),
    )


def _sample_narrowing_shares(rng: np.random.Generator) -> dict:
    """Per disc: the anterior share of spinal and (per side) foraminal narrowing."""
    n_disc = len(DISCS)
    return dict(a_spinal=rng.uniform(0.4, 0.7, n_disc), a_foram=rng.uniform(0.35, 0.65, (n_disc, 2)))


def _sample_contrast(rng: np.random.Generator) -> dict:
    """Per-study tissue contrast jitter and the smooth intensity bias terms."""
    return dict(
        tissue_gain=rng.uniform(0.9, 1.1, (len(_TISSUES), 3)),
        bias_params=np.stack([rng.normal(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.004, 0.012, 3)]),
    )


# ---------------------------------------------------------------------------------------- model
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

    @classmethod
    def sample(cls, rng: np.random.Generator, severity_ids=None) -> "PatientModel":
        """A random patient. ``severity_ids``: (25,) ids with -1 for missing (None: all random)."""
        if severity_ids is None:
            severity_ids = -np.ones(len(TARGETS), dtype=int)
        severity_ids = np.asarray(severity_ids, dtype=int)
        ids, amounts = sample_narrowing(severity_ids, rng)
        narrowing = _sample_disc_narrowing(amounts, rng)
        sizes = _sample_vertebral_sizes(narrowing["degeneration"], rng)
        arc = _sample_lordotic_arc(sizes["h"], sizes["d"], rng)
        roots = _sample_cauda_equina_roots(rng)
        texture = _sample_texture_volume(rng)
        stir = bool(rng.random() < 0.25)
        posterior = _sample_posterior_elements(rng)
        sacrum = _sample_sacrum_and_sac(arc["s_top"][2] + sizes["h"][2] / 2, rng)
        trunk = _sample_trunk(sizes["D"], sizes["ca"], posterior["sp_len"], rng)
        shares = _sample_narrowing_shares(rng)
        contrast = _sample_contrast(rng)
        return cls(severity_ids=ids, narrowing=amounts, labelled=severity_ids >= 0, roots=roots, texture=texture, stir=stir,
                   **narrowing, **sizes, **arc, **posterior, **sacrum, **trunk, **shares, **contrast)

    # ------------------------------------------------------------------ arc geometry
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

    def arc_coords(self, Y, Z, dtype=np.float64):
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
        s, b, _ = self.arc_coords(P[..., 1], P[..., 2])
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

    def sacrum_frame(self) -> tuple[float, float, float]:
        """(y, z) of the S1 endplate centre and the sacral axis angle (the arc's plus the kink)."""
        if "sac" not in self._cache:
            s1 = self.s_top[7]
            p = self.arc_to_patient(s1, 0.0, 0.0)
            phs = float(self.phi(s1)) + self.kink
            self._cache["sac"] = (p[1], p[2], phs)
        return self._cache["sac"]

    def sacrum_to_patient(self, u, v, x) -> np.ndarray:
        ys, zs, phs = self.sacrum_frame()
        u, v, x = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (u, v, x)))
        y = ys + u * math.sin(phs) + v * math.cos(phs)
        z = zs - u * math.cos(phs) + v * math.sin(phs)
        return np.stack([self.x0 + x, y, z], axis=-1)

    def centreline_y(self, Z):
        """y of the spine's centreline (arc above S1, sacral axis below) at height(s) Z."""
        z = np.asarray(Z, dtype=np.float32)
        f32 = np.float32
        sinp = np.clip((f32(self.centre[1]) - z) / f32(self.radius), -0.99, 0.99)
        y_arc = f32(self.centre[0]) - f32(self.radius) * np.sqrt(f32(1.0) - sinp * sinp)
        ys, zs, phs = self.sacrum_frame()
        y_sac = f32(ys) + (f32(zs) - z) * f32(math.tan(min(phs, math.radians(75.0))))
        pj = self.arc_to_patient(self.s_junction, 0.0, 0.0)
        phj = float(self.phi(self.s_junction))
        y_top = f32(pj[1]) - (z - f32(pj[2])) * f32(math.tan(phj))
        return np.where(z < f32(zs), y_sac, np.where(z > f32(pj[2]), y_top, y_arc)).astype(np.float32)

    # ------------------------------------------------------------------ levels and labelled points
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

    # ------------------------------------------------------------------ tissues and tables for rendering
    def tissue_values(self, contrast: str) -> dict[str, float]:
        c = CONTRASTS.index(contrast)
        return {name: _TISSUES[name][c] * self.tissue_gain[k, c] for k, name in enumerate(_TISSUE_NAMES)}

    def float32_tables(self) -> SimpleNamespace:
        """float32 copies of the per-vertebra / per-disc tables (gathers then stay float32)."""
        if "f32" not in self._cache:
            names = ("s_top", "h", "d", "D", "W", "ca", "cw", "sp_len", "tp_len", "n_spinal", "a_spinal", "n_foram",
                     "a_foram", "n_sub", "degeneration")
            ns = SimpleNamespace(**{k: np.asarray(getattr(self, k), dtype=np.float32) for k in names})
            ns.s_level = self.s_level.astype(np.float32)
            ns.s_bot = self.s_bot.astype(np.float32)
            ns.s_mid = self.s_mid.astype(np.float32)
            ns.foramen_s = self.foramen_s().astype(np.float32)
            self._cache["f32"] = ns
        return self._cache["f32"]

    def texture_at(self, X, Y, Z):
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
