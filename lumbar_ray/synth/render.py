"""The phantom's tissue map: MR intensities of a :class:`PatientModel` at patient points, painted
structure by structure (body wall and organs, then canal, foramina, discs and bone near the spine).

Each structure is a signed distance field (mm, negative inside) in the spine's arc coordinates
or the sacral frame; its occupancy (a ramp across the boundary) blends its tissue over what was
painted before, so later structures lie on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from lumbar_ray.synth.anatomy import SAC_AP_MARGIN, SAC_SHIFT, SAC_W_MARGIN, PatientModel

__all__ = ["render_points"]

f32 = np.float32


# ---------------------------------------------------------------------------------------- shapes
def _ellipse(a, b, ra, rb):
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipse."""
    return (np.sqrt((a / ra) ** 2 + (b / rb) ** 2) - 1.0) * np.minimum(ra, rb)


def _interp(xq, knots, *tables):
    """np.interp of several tables at the same query points (one search), float32 out."""
    k = np.asarray(knots, dtype=np.float32)
    i = np.clip(np.searchsorted(k, xq) - 1, 0, len(k) - 2)
    w = np.clip((xq - k[i]) / (k[1:] - k[:-1])[i], 0, 1).astype(np.float32, copy=False)
    out = []
    for t in tables:
        t = np.asarray(t, dtype=np.float32)
        out.append(t[i] + w * (t[1:] - t[:-1])[i])
    return out


def _intersect(*fs):
    """Signed distance of the intersection of shapes (their maximum)."""
    out = fs[0]
    for f in fs[1:]:
        out = np.maximum(out, f)
    return out


def _union(*fs):
    """Signed distance of the union of shapes (their minimum)."""
    out = fs[0]
    for f in fs[1:]:
        out = np.minimum(out, f)
    return out


# ---------------------------------------------------------------------------------------- canvas
class _Canvas:
    """(contrasts, points) float32 intensities; :meth:`paint` blends one tissue in by occupancy."""

    def __init__(self, values: list[dict[str, float]], img: np.ndarray, inv_ramp: np.float32):
        self.values = values  # per contrast: tissue name -> intensity
        self.img = img
        self.inv_ramp = inv_ramp

    @property
    def n_contrasts(self) -> int:
        return len(self.values)

    def occupancy(self, f):
        """0..1 share of each point inside a shape of signed distance ``f`` (a ramp of 1/inv_ramp mm)."""
        return np.clip(0.5 - f * self.inv_ramp, 0.0, 1.0).astype(np.float32, copy=False)

    def paint(self, o, tissue: str, scale: list | None = None, idx=None) -> None:
        """img <- img + o * (value - img), in place; ``scale``: a per-contrast factor on the value,
        ``idx``: paint only these points (``o`` is then given for them)."""
        img = self.img
        for c in range(self.n_contrasts):
            v = self.values[c][tissue]
            if scale is not None:
                v = v * scale[c]
            if idx is None:
                tmp = np.subtract(np.float32(v) if np.isscalar(v) else v, img[c], dtype=np.float32)
                tmp *= o
                img[c] += tmp
            else:
                img[c, idx] += o * (v - img[c, idx])

    def region(self, idx) -> "_Canvas":
        """A canvas of a copy of points ``idx`` (write it back with ``img[:, idx] = region.img``)."""
        return _Canvas(self.values, self.img[:, idx], self.inv_ramp)


@dataclass
class _Points:
    """Points in the frames structures are defined in (float32, one entry per point)."""

    x: np.ndarray  # lateral offset from the midline (+ = patient left)
    ax: np.ndarray  # |x|
    s: np.ndarray  # arc length along the centreline (caudal +)
    b: np.ndarray  # arc offset towards posterior
    us: np.ndarray  # along the sacral axis, from the S1 endplate (caudal +)
    vs: np.ndarray  # across the sacral axis, towards posterior
    tex: np.ndarray  # texture field in [-1, 1]

    def subset(self, idx) -> "_Points":
        return _Points(*(getattr(self, f.name)[idx] for f in fields(self)))


def _point_frames(model: PatientModel, X, Y, Z, tex) -> _Points:
    s, b, _ = model.arc_coords(Y, Z, np.float32)
    x = X - f32(model.x0)
    ys, zs, phs = model.sacrum_frame()
    ts_y, ts_z = f32(math.sin(phs)), f32(-math.cos(phs))
    ns_y, ns_z = f32(math.cos(phs)), f32(math.sin(phs))
    us = (Y - f32(ys)) * ts_y + (Z - f32(zs)) * ts_z
    vs = (Y - f32(ys)) * ns_y + (Z - f32(zs)) * ns_z
    if tex is None:
        tex = model.texture_at(X, Y, Z)
    return _Points(x=x, ax=np.abs(x), s=s, b=b, us=us, vs=vs, tex=tex)


def render_points(model: PatientModel, P: np.ndarray, contrasts, ramp: float = 0.8, tex: np.ndarray | None = None) -> np.ndarray:
    """Intensities (len(contrasts), N) float32 at patient points P (N, 3). ``tex``: the
    texture field at P if already computed (else it is computed here)."""
    P = np.asarray(P, dtype=np.float32)
    X, Y, Z = P[:, 0], P[:, 1], P[:, 2]
    canvas = _Canvas([model.tissue_values(c) for c in contrasts], np.zeros((len(contrasts), P.shape[0]), dtype=np.float32),
                     np.float32(1.0 / ramp))
    pts = _point_frames(model, X, Y, Z, tex)

    inside = _paint_trunk(canvas, model, pts, Y, Z)
    _paint_deep_muscles(canvas, model, pts, inside)
    _paint_kidneys(canvas, model, pts)
    _paint_great_vessels(canvas, model, pts)

    # everything below happens near the spine: evaluate it on that region only
    roi = _spine_region(model, pts)
    spine = canvas.region(roi)
    pts = pts.subset(roi)
    F = model.float32_tables()
    canal = _canal_geometry(model, F, pts)
    f_sac, o_sac = _paint_canal(spine, canal, pts)
    _paint_cauda_equina(spine, model, canal, pts, f_sac, o_sac, ramp)
    vert = _nearest_vertebra(model, F, pts.s)
    _paint_foramina(spine, model, F, pts, vert)
    _paint_discs(spine, model, F, pts)
    _paint_bones(spine, model, F, pts, vert, canal)
    canvas.img[:, roi] = spine.img
    return canvas.img


# ---------------------------------------------------------------------------------------- body wall and organs
def _paint_trunk(canvas: _Canvas, model: PatientModel, pts: _Points, Y, Z) -> np.ndarray:
    """Subcutaneous fat, viscera, abdominal wall and back muscles; returns the occupancy of the
    inside of the body wall. The outline is in patient (x, y) per axial level z, around the spine's
    centreline at that z (so the back follows the lordosis)."""
    x, b, tex = pts.x, pts.b, pts.tex
    C = canvas.n_contrasts
    y_sp = model.centreline_y(Z)
    y3 = f32(model.arc_to_patient(0.0, 0.0, 0.0)[1])
    y_back = f32(0.6) * y_sp + f32(0.4) * y3 + f32(model.b_skin)  # back follows the lordosis a bit
    z_l3 = model.centre[1] - model.radius * math.sin(model.phi_ref)
    y_front = y3 + f32(model.b_ant) - f32(12.0) * np.clip(f32(1.0) - ((Z - f32(z_l3)) / f32(220.0)) ** 2, 0, 1)
    Bb = (y_back - y_front) / 2
    f_out = np.maximum(_ellipse(x, Y - (y_back + y_front) / 2, f32(model.body_half_width), Bb), (Y - y_back) + f32(0.002) * x * x)
    canvas.paint(canvas.occupancy(f_out), "fat")
    f_in = f_out + f32(model.fat_t)
    o_in = canvas.occupancy(f_in)
    D3 = float(model.D[4])
    # posterior compartment (back muscles); laterally the viscera wrap around it
    post_comp = canvas.occupancy(-(b - f32(D3 / 2 + 4.0) - f32(0.006) * x * x))
    wall = canvas.occupancy(np.maximum(f_in, -(f_in + f32(9.0)))) * canvas.occupancy(b - f32(D3 / 2))
    vis_scale = [1.0 + 0.35 * tex * (1 if c != 2 else 0.8) for c in range(C)]
    canvas.paint(o_in * (1 - post_comp), "viscera", scale=vis_scale)
    canvas.paint(wall, "muscle")  # abdominal wall muscles
    canvas.paint(o_in * post_comp, "muscle", scale=[1.0 + 0.1 * tex] * C)
    return o_in


def _paint_deep_muscles(canvas: _Canvas, model: PatientModel, pts: _Points, o_in: np.ndarray) -> None:
    """Quadratus lumborum and psoas (growing towards the pelvis), inside the body wall."""
    ax, s, b = pts.ax, pts.s, pts.b
    D3 = float(model.D[4])
    f_ql = np.maximum(_ellipse(ax - f32(model.W[4] / 2 + 38.0), b - f32(D3 / 2 + 2.0), f32(20.0), f32(9.0)), f32(model.s_mid[1]) - s)
    canvas.paint(canvas.occupancy(f_ql) * o_in, "muscle")
    sm = model.s_mid
    grow = np.clip((s - f32(sm[1])) / f32(model.s_top[7] - sm[1]), 0, 1)
    rp = f32(5.0) + f32(17.0) * grow
    f_ps = _ellipse(ax - (f32(model.W[5] / 2) + rp * f32(0.7)), b + f32(0.15 * D3), rp * f32(1.15), rp)
    f_ps = np.maximum(f_ps, s - f32(model.s_top[7] + 60))
    canvas.paint(canvas.occupancy(f_ps) * o_in, "muscle")


def _paint_kidneys(canvas: _Canvas, model: PatientModel, pts: _Points) -> None:
    ax, s, b = pts.ax, pts.s, pts.b
    sm = model.s_mid
    f_k = _ellipse(np.hypot((ax - f32(model.kidney_x)) / f32(25.0), (b + f32(2.0)) / f32(20.0)), (s - f32(sm[1] + 15)) / f32(50.0),
                   f32(1.0), f32(1.0))
    canvas.paint(canvas.occupancy(f_k * f32(20.0)), "kidney", scale=[1.0 + 0.1 * pts.tex] * canvas.n_contrasts)


def _paint_great_vessels(canvas: _Canvas, model: PatientModel, pts: _Points) -> None:
    """Aorta and IVC (flow voids), anterior to the bodies."""
    sm = model.s_mid
    D3 = float(model.D[4])
    for (xo, r), s_end in ((model.aorta, sm[5]), (model.ivc, sm[6])):
        dxv = pts.x - f32(xo)
        dbv = pts.b + f32(D3 / 2 + 3.0 + r)
        f_v = np.maximum(np.sqrt(dxv * dxv + dbv * dbv) - f32(r), pts.s - f32(s_end))
        canvas.paint(canvas.occupancy(f_v), "vessel")


def _spine_region(model: PatientModel, pts: _Points) -> np.ndarray:
    """Indices of the points near the spine and sacrum (all that the painters below can touch)."""
    ax, s, b, us = pts.ax, pts.s, pts.b, pts.us
    s_lo = float(model.s_top[0]) - 20.0
    s_hi = float(model.s_top[7] + model.sac_len) + 20.0
    return np.nonzero((ax < f32(model.tp_len.max() + 8.0)) & (b > f32(-model.D.max() / 2 - 6.0))
                      & (b < f32(model.D.max() / 2 + model.ca.max() + model.sp_len.max() + 8.0))
                      & (s > f32(s_lo)) & ((s < f32(s_hi)) | (us < f32(model.sac_len + 10.0))))[0]


# ---------------------------------------------------------------------------------------- canal and sac
@dataclass
class _Canal:
    """The bony canal and the narrowed thecal sac at each point (canal frame: continues into the sacrum)."""

    s_eff: np.ndarray  # arc length along the canal (below S1: S1 + distance along the sacral axis)
    f_canal: np.ndarray  # signed distance to the bony canal
    bb: np.ndarray  # AP offset from the sac centre
    sa: np.ndarray  # sac AP size before narrowing
    sw: np.ndarray  # sac width before narrowing
    sw2: np.ndarray  # half width (at least 0.5 mm)
    A: np.ndarray  # anterior intrusion (disc bulge)
    Pp: np.ndarray  # posterior intrusion (ligamentum flavum)
    Ll: np.ndarray  # left lateral recess intrusion
    Lr: np.ndarray  # right lateral recess intrusion
    jd: np.ndarray  # nearest disc level along the canal
    bumpL: np.ndarray  # lateral recess narrowing profile around that level


def _canal_geometry(model: PatientModel, F, pts: _Points) -> _Canal:
    x, s, b, us, vs = pts.x, pts.s, pts.b, pts.us, pts.vs
    sm = model.s_mid
    below = us > 0
    s_eff = np.where(below, f32(model.s_top[7]) + us, s)
    b_eff = np.where(below, vs, b)
    L = model.sac_len
    knots_s = np.concatenate([sm, [model.s_top[7] + 1.0, model.s_top[7] + 0.5 * L, model.s_top[7] + L]])
    tk = np.array([0.0, 0.5, 1.0])
    q = -model.sac_curve * tk**2 * 25.0
    sac_post = model.D[7] / 2 * (1 - 0.35 * tk) + q
    knots_wall = np.concatenate([model.D[:7] / 2, sac_post])
    knots_ca = np.concatenate([model.ca[:7], model.ca[7] * (1 - 0.7 * tk)])
    knots_cw = np.concatenate([model.cw[:7], model.cw[7] * (1 - 0.5 * tk)])
    wall, cav, cwv = _interp(s_eff, knots_s, knots_wall, knots_ca, knots_cw)
    bb = b_eff - (wall + f32(0.3) + cav / 2)
    f_canal = _ellipse(bb, x, cav / 2, cwv / 2)
    f_canal = np.where(s_eff < f32(model.s_top[7] + L), f_canal, f32(50.0))

    # nearest disc level along the canal; the sac narrows around it
    s_lev = model.s_level
    jd = np.clip(np.searchsorted((s_lev[1:] + s_lev[:-1]) / 2, s_eff), 0, 6)
    g = s_eff - s_lev[jd].astype(np.float32)
    taper = np.clip((f32(model.s_top[7] + model.sac_end) - s_eff) / f32(10.0), 0, 1)
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
    return _Canal(s_eff=s_eff, f_canal=f_canal, bb=bb, sa=sa, sw=sw, sw2=sw2, A=A, Pp=Pp, Ll=Ll, Lr=Lr, jd=jd, bumpL=bumpL)


def _paint_canal(canvas: _Canvas, canal: _Canal, pts: _Points) -> tuple[np.ndarray, np.ndarray]:
    """Epidural fat, the intruding disc/ligaments and the CSF of the sac; returns the sac's signed
    distance and occupancy."""
    x = pts.x
    bb, sa, sw, sw2, A, Pp, Ll, Lr = canal.bb, canal.sa, canal.sw, canal.sw2, canal.A, canal.Pp, canal.Ll, canal.Lr
    in_canal = canvas.occupancy(canal.f_canal)
    canvas.paint(in_canal, "fat")
    f_A = bb - (-sa / 2 + A)
    f_P = (sa / 2 - Pp) - bb
    f_Ll = np.maximum((sw / 2 - Ll) - x, f32(0.6) - Ll)
    f_Lr = np.maximum((sw / 2 - Lr) + x, f32(0.6) - Lr)
    canvas.paint(in_canal * canvas.occupancy(_union(f_A, f_P, f_Ll, f_Lr)), "ligament")
    f_sac = _intersect(_ellipse(bb, x, np.maximum(sa / 2, f32(0.3)), sw2), -f_A, -f_P, x - (sw / 2 - Ll), -x - (sw / 2 - Lr))
    f_sac = np.maximum(f_sac, canal.f_canal)
    o_sac = canvas.occupancy(f_sac)
    canvas.paint(o_sac, "csf")
    return f_sac, o_sac


def _paint_cauda_equina(canvas: _Canvas, model: PatientModel, canal: _Canal, pts: _Points, f_sac, o_sac, ramp: float) -> None:
    """Cord / conus and cauda equina roots, crowded into what is left of the sac (evaluated only
    inside the sac)."""
    idx = np.nonzero(f_sac < ramp)[0]
    if not idx.size:
        return
    xi, bbi, si = pts.x[idx], canal.bb[idx], canal.s_eff[idx]
    sai, swi = canal.sa[idx], canal.sw[idx]
    Ai, Pi, Lli, Lri = canal.A[idx], canal.Pp[idx], canal.Ll[idx], canal.Lr[idx]
    c_ap = (Ai - Pi) / 2
    half_ap = np.maximum((sai - Ai - Pi) / 2, f32(0.2))
    lo_x = -(swi / 2 - Lri)
    hi_x = swi / 2 - Lli
    f_n = np.full(idx.size, 50.0, dtype=np.float32)
    for xi_k, eta_k, r_k in model.roots:
        r_k = f32(r_k)
        xk = np.clip(f32(xi_k) * swi / 2, lo_x + r_k * f32(0.5), hi_x - r_k * f32(0.5))
        bk = c_ap + f32(eta_k) * np.maximum(half_ap - r_k * f32(0.5), f32(0.0))
        f_n = np.minimum(f_n, np.hypot(xi - xk, bbi - bk) - r_k)
    conus = np.sqrt(np.clip((f32(model.conus_s) - si) / f32(14.0), 0, 1))
    f_cord = np.maximum(_ellipse(bbi - c_ap, xi, f32(3.6) * conus + f32(0.05), f32(4.8) * conus + f32(0.05)), si - f32(model.conus_s))
    f_n = np.minimum(f_n, f_cord)
    o_n = canvas.occupancy(f_n) * o_sac[idx]
    canvas.paint(o_n, "neural", idx=idx)


# ---------------------------------------------------------------------------------------- foramina and discs
@dataclass
class _Vertebra:
    """Per point: the nearest vertebra (T11..S1) and body/canal sizes interpolated along the arc."""

    index: np.ndarray  # nearest vertebra 0..7 (7 = S1)
    D: np.ndarray  # its body AP depth
    ca: np.ndarray  # its canal AP
    cw: np.ndarray  # its canal width
    bw: np.ndarray  # posterior body wall (arc b), interpolated
    ca_s: np.ndarray  # canal AP, interpolated
    cw_s: np.ndarray  # canal width, interpolated
    W_s: np.ndarray  # body width, interpolated


def _nearest_vertebra(model: PatientModel, F, s) -> _Vertebra:
    ip_all = np.clip(np.searchsorted(model.s_disc_mid, s), 0, 7)  # nearest vertebra incl. S1
    knots8 = np.concatenate([model.s_mid, [model.s_top[7] + 5]])
    bw, ca_s, cw_s, W_s = _interp(s, knots8, model.D / 2, np.r_[model.ca[:7], model.ca[6]], np.r_[model.cw[:7], model.cw[6]],
                                  np.r_[model.W[:7], model.W[6]])
    return _Vertebra(index=ip_all, D=F.D[ip_all], ca=F.ca[ip_all], cw=F.cw[ip_all], bw=bw, ca_s=ca_s, cw_s=cw_s, W_s=W_s)


def _paint_foramina(canvas: _Canvas, model: PatientModel, F, pts: _Points, vert: _Vertebra) -> None:
    """Fat lateral to the canal between body and pillar, the disc/osteophyte and superior articular
    process that narrow it, and the exiting root below the upper pedicle."""
    x, ax, s, b = pts.x, pts.ax, pts.s, pts.b
    bw, ca_s, cw_s = vert.bw, vert.ca_s, vert.cw_s
    # the posterolateral body/disc wall at this x (ellipse of the body cross-section)
    fa_b0 = np.minimum(bw, (bw + f32(1.5)) * np.sqrt(np.clip(f32(1.0) - (ax / (vert.W_s / 2 + f32(1.0))) ** 2, 0, 1))) - f32(0.5)
    fa_b1 = bw + f32(0.55) * ca_s + f32(1.0)
    f_fz = _intersect(_ellipse(ax - (cw_s / 2 + f32(1.0)), b - fa_b1 * f32(0.5), f32(11.0), fa_b1 * f32(0.5) + f32(1.0)),
                      b - fa_b1, (cw_s / 2 - f32(1.0)) - ax, s - f32(model.s_top[7] + 6))
    o_fz = canvas.occupancy(f_fz)
    canvas.paint(o_fz, "fat")
    jf = np.clip(np.searchsorted((model.foramen_s()[1:] + model.foramen_s()[:-1]) / 2, s), 0, 6)
    side = (x > 0).astype(np.int64)
    nf = F.n_foram[jf, side]
    af = F.a_foram[jf, side]
    prof = np.exp(-(((s - F.foramen_s[jf] - f32(2.0)) / f32(9.5)) ** 2))
    fa = fa_b1 - fa_b0
    adv_a = nf * af * fa * prof * f32(1.05)
    adv_p = nf * (f32(1) - af) * fa * prof * f32(1.05)
    f_int = np.minimum(np.maximum(b - (fa_b0 + adv_a), f32(0.4) - adv_a), np.maximum((fa_b1 - adv_p) - b, f32(0.4) - adv_p))
    canvas.paint(o_fz * canvas.occupancy(f_int), "ligament")
    # exiting root below the upper pedicle
    iu = np.clip(jf, 0, 6)
    xp_up = (model.cw[iu] / 2 + model.ped_w / 2).astype(np.float32)
    s_root = (model.s_top[iu] + model.ped_h + 3.0).astype(np.float32) + f32(0.35) * np.maximum(ax - xp_up, 0)
    r_root = f32(2.6) * (f32(1.0) - f32(0.3) * nf)
    f_root = np.maximum(np.hypot(s - s_root, b - (bw + f32(0.28) * ca_s)) - r_root, (cw_s / 2 - f32(2.0)) - ax)
    f_root = np.maximum(f_root, ax - (cw_s / 2 + f32(30.0)))
    canvas.paint(canvas.occupancy(f_root), "neural")


def _paint_discs(canvas: _Canvas, model: PatientModel, F, pts: _Points) -> None:
    """Annulus and nucleus of each disc (the nucleus darkens on T2 with degeneration)."""
    x, s, b, us = pts.x, pts.s, pts.b, pts.us
    sm = model.s_mid
    jdd = np.clip(np.searchsorted(sm[1:], s), 0, 6)
    Dd = ((model.D[jdd] + model.D[jdd + 1]) / 2 + 1.0).astype(np.float32)
    Wd = ((model.W[jdd] + model.W[jdd + 1]) / 2 + 1.0).astype(np.float32)
    top = F.s_bot[jdd]
    is_last = jdd == 6
    lower = np.where(is_last, us, s - F.s_top[np.minimum(jdd + 1, 7)])
    f_u = np.maximum(top - s - f32(0.6), lower - f32(0.6))
    f_cs = np.maximum(_ellipse(b, x, Dd / 2 + f32(1.5), Wd / 2), b - (Dd / 2 + f32(2.5) * (x / (Wd / 2)) ** 2))
    f_disc = np.maximum(f_u, f_cs)
    canvas.paint(canvas.occupancy(f_disc), "annulus")
    dmid = ((model.s_bot + np.concatenate([model.s_top[1:7], [model.s_top[7]]])) / 2)[jdd].astype(np.float32)
    dh = F.d[jdd]
    f_nuc = np.maximum(_ellipse(b - f32(1.0), x, f32(0.3) * Dd, f32(0.33) * Wd), np.abs(s - dmid) - f32(0.3) * dh)
    f_nuc = np.where(is_last, np.maximum(f_nuc, us + f32(1.5)), f_nuc)
    gdeg = F.degeneration[jdd]
    vals = canvas.values
    nuc_vals = [vals[c]["nucleus"] * (1 - gdeg) + vals[c]["nucleus_degenerate"] * gdeg for c in range(canvas.n_contrasts)]
    o_nuc = canvas.occupancy(f_nuc * f32(1.5))
    img = canvas.img
    for c in range(canvas.n_contrasts):
        img[c] += o_nuc * (nuc_vals[c] - img[c])


# ---------------------------------------------------------------------------------------- bone
def _paint_bones(canvas: _Canvas, model: PatientModel, F, pts: _Points, vert: _Vertebra, canal: _Canal) -> None:
    """Bodies, posterior elements and sacrum (cortex shell + marrow), facet joint fluid and the
    rudimentary sacral discs."""
    jl = np.clip(np.searchsorted((model.s_level[1:] + model.s_level[:-1]) / 2, pts.s), 0, 6)  # nearest disc level
    f_body = _vertebral_body_sdf(model, F, pts)
    pillars = _articular_pillars(model, F, pts, vert, canal, jl)
    f_post = _union(_pedicle_sdf(model, F, pts, vert), pillars.f_split, _lamina_sdf(F, pts, vert), _spinous_sdf(model, F, pts, vert),
                    _transverse_sdf(model, F, pts, vert))
    sacrum = _sacral_profile(model, pts.us)
    f_bone = _union(f_body, f_post, _sacrum_sdf(model, pts, sacrum))
    canvas.paint(canvas.occupancy(f_bone), "cortex")
    marrow_scale = [1.0 + 0.1 * pts.tex] * canvas.n_contrasts
    canvas.paint(canvas.occupancy(f_bone + f32(1.3)), "marrow", scale=marrow_scale)
    # facet joints (thin fluid line, oblique-sagittal), at each disc level
    canvas.paint(canvas.occupancy(_intersect(np.abs(pillars.joint) - f32(0.6), pillars.near_joint, pillars.f)) * f32(0.8), "facet_fluid")
    _paint_sacral_discs(canvas, model, pts, sacrum)


def _vertebral_body_sdf(model: PatientModel, F, pts: _Points):
    x, s, b = pts.x, pts.s, pts.b
    iv = np.clip(np.searchsorted(model.s_disc_mid[:6], s), 0, 6)
    u = s - model.s_mid[iv].astype(np.float32)
    Dv = F.D[iv]
    Wv = F.W[iv]
    r2 = (b / (Dv / 2 + f32(1.5))) ** 2 + (x / (Wv / 2)) ** 2
    f_bcs = np.maximum((np.sqrt(r2) - f32(1.0)) * (Dv / 2 + f32(1.5)), b - (Dv / 2 + f32(2.5) * (x / (Wv / 2)) ** 2))
    return np.maximum(f_bcs, np.abs(u) - F.h[iv] / 2 + f32(0.8) * np.clip(f32(1.0) - r2, 0, 1))


def _pedicle_sdf(model: PatientModel, F, pts: _Points, vert: _Vertebra):
    ax, s, b = pts.ax, pts.s, pts.b
    Dp = vert.D
    st = F.s_top[vert.index]
    xp = vert.cw / 2 + f32(model.ped_w / 2)
    return np.maximum(
        _ellipse(s - (st + f32(model.ped_h / 2 + 0.5)), ax - xp, f32(model.ped_h / 2), f32(model.ped_w / 2)),
        np.maximum(f32(0.3) * Dp - b, b - (Dp / 2 + f32(0.7) * vert.ca + f32(2.0))),
    )


@dataclass
class _Pillars:
    """The articular pillars and the facet joint between their processes."""

    f: np.ndarray  # signed distance to the pillars
    f_split: np.ndarray  # the same with the joint gap cut out near each disc level
    joint: np.ndarray  # signed lateral distance to the joint surface
    near_joint: np.ndarray  # < 0 within reach of a disc level's joint


def _articular_pillars(model: PatientModel, F, pts: _Points, vert: _Vertebra, canal: _Canal, jl) -> _Pillars:
    """Pillars (superior articular process narrowing the foramen at the disc level, facet
    hypertrophy filling the lateral recess) and the facet joint: an oblique-sagittal gap between
    the superior (anterolateral) and inferior (posteromedial) articular processes."""
    x, ax, s, b = pts.x, pts.ax, pts.s, pts.b
    bw, ca_s, cw_s = vert.bw, vert.ca_s, vert.cw_s
    sap = np.exp(-(((s - F.s_level[jl]) / f32(6.0)) ** 2))
    pil_b0 = bw + f32(0.55) * ca_s - f32(0.22) * ca_s * sap
    hyp = np.where(x > 0, model.n_sub[canal.jd, 1], model.n_sub[canal.jd, 0]).astype(np.float32) * f32(3.0) * canal.bumpL
    pb1 = bw + ca_s + f32(7.0)
    pil_in = cw_s / 2 - f32(1.0) - hyp
    pil_out = cw_s / 2 + f32(model.pillar_w)
    f_pil = _intersect(_ellipse(ax - (pil_in + pil_out) / 2, b - (pil_b0 + pb1) / 2, (pil_out - pil_in) / 2 + f32(1.5), (pb1 - pil_b0) / 2),
                       pil_in - ax, pil_b0 - b, s - f32(model.s_top[7] + 14))
    near_joint = np.abs(s - (F.s_level[jl] - f32(3.0))) - f32(9.0)
    joint = ax - (cw_s / 2 + f32(0.45 * model.pillar_w) - hyp * f32(0.5) + f32(0.8) * (b - (bw + f32(0.78) * ca_s)))
    f_facets = np.maximum(f_pil, f32(0.9) - np.abs(joint))
    return _Pillars(f=f_pil, f_split=np.where(near_joint < 0, f_facets, f_pil), joint=joint, near_joint=near_joint)


def _lamina_sdf(F, pts: _Points, vert: _Vertebra):
    ax, s, b = pts.ax, pts.s, pts.b
    bw, ca_s, cw_s = vert.bw, vert.ca_s, vert.cw_s
    ipv = np.minimum(vert.index, 6)
    lam_top = F.s_top[ipv] + f32(5.0)
    lam_bot = F.s_bot[ipv] + f32(3.0)
    b_lam = bw + ca_s + f32(3.2) - f32(0.4) * ca_s * ax / (cw_s / 2 + f32(5.0))
    f_lam = _intersect(ax - (cw_s / 2 + f32(6.0)), np.abs(b - b_lam) - f32(2.6), lam_top - s, s - lam_bot)
    return np.where(vert.index < 7, f_lam, f32(50.0))


def _spinous_sdf(model: PatientModel, F, pts: _Points, vert: _Vertebra):
    """Spinous processes, sloping caudally as they reach back."""
    ax, s, b = pts.ax, pts.s, pts.b
    bw, ca_s = vert.bw, vert.ca_s
    b_sp0 = bw + ca_s + f32(2.0)
    slope = f32(0.3)
    s_sp = s - slope * np.maximum(b - b_sp0, 0)
    isp = np.clip(np.searchsorted(model.s_disc_mid[:6], s_sp), 0, 6)
    sp_mid = (model.s_top[isp] + model.h[isp] * 0.45).astype(np.float32)
    return _intersect(ax - f32(3.4) + f32(0.04) * (b - b_sp0), b_sp0 - b, b - (bw + ca_s + F.sp_len[isp]),
                      np.abs(s_sp - sp_mid) - F.h[isp] * f32(0.36))


def _transverse_sdf(model: PatientModel, F, pts: _Points, vert: _Vertebra):
    ax, s, b = pts.ax, pts.s, pts.b
    Dp, cap = vert.D, vert.ca
    st = F.s_top[vert.index]
    ipv = np.minimum(vert.index, 6)
    f_tp = _intersect(ax - F.tp_len[ipv], (vert.cw / 2 + f32(model.ped_w * 0.5)) - ax, np.abs(b - (Dp / 2 + f32(0.45) * cap)) - f32(4.0),
                      np.abs(s - (st + f32(7.0))) - f32(5.0))
    return np.where(vert.index < 7, f_tp, f32(50.0))


@dataclass
class _SacralProfile:
    """Sacral sizes along its axis (tapering and curving towards the coccyx), per point."""

    t: np.ndarray  # 0..1 along the sacrum
    v_ant: np.ndarray  # anterior surface of the sacral bodies (sacral v)
    v_post: np.ndarray  # posterior surface of the sacral bodies
    ca_sac: np.ndarray  # sacral canal AP
    cw_sac: np.ndarray  # sacral canal width
    ws: np.ndarray  # half width of the sacrum including the alae


def _sacral_profile(model: PatientModel, us) -> _SacralProfile:
    t = np.clip(us / f32(model.sac_len), 0, 1)
    qv = -f32(model.sac_curve * 25.0) * t * t
    return _SacralProfile(
        t=t,
        v_ant=-(f32(model.D[7] / 2 + 1.0)) * (f32(1) - f32(0.55) * t) + qv,
        v_post=f32(model.D[7] / 2) * (f32(1) - f32(0.35) * t) + qv,
        ca_sac=f32(model.ca[7]) * (f32(1) - f32(0.7) * t),
        cw_sac=f32(model.cw[7]) * (f32(1) - f32(0.5) * t),
        ws=f32(model.W[7] / 2 + 24.0) * (f32(1) - f32(0.7) * t),
    )


def _sacrum_sdf(model: PatientModel, pts: _Points, sp: _SacralProfile):
    """Sacral bodies, alae and the arch around the sacral canal."""
    ax, us, vs = pts.ax, pts.us, pts.vs
    L = model.sac_len
    t, v_ant, v_post, ca_sac, cw_sac, ws = sp.t, sp.v_ant, sp.v_post, sp.ca_sac, sp.cw_sac, sp.ws
    vmid = (v_ant + v_post) / 2
    wb_ = f32(model.W[7] / 2) * (f32(1) - f32(0.5) * t)
    f_sb = _ellipse(ax, vs - vmid, wb_, (v_post - v_ant) / 2 + f32(1.0))  # sacral bodies
    ala_x = wb_ + f32(10.0) * (f32(1) - t)
    f_ala = _ellipse(ax - ala_x, vs - (vmid + f32(3.0)), ws - ala_x + f32(2.0), (v_post - v_ant) / 2 + f32(2.0))
    f_ala = np.maximum(f_ala, us - f32(0.55 * L))
    f_arch = _ellipse(ax, vs - (v_post + ca_sac / 2 + f32(1.0)), cw_sac / 2 + f32(9.0) * (f32(1) - f32(0.5) * t), ca_sac / 2 + f32(4.0))
    f_lat = _intersect(np.abs(vs - (v_post + ca_sac / 2)) - ca_sac / 2 - f32(1.0), ax - (cw_sac / 2 + f32(14.0)) * (f32(1.0) - f32(0.3) * t))
    f_sbox = np.maximum(_union(f_sb, f_ala, f_arch, f_lat), _intersect(-us, us - f32(L)))
    f_scan = _intersect(v_post + f32(0.3) - vs, vs - (v_post + ca_sac), ax - cw_sac / 2)
    return np.maximum(f_sbox, -f_scan)


def _paint_sacral_discs(canvas: _Canvas, model: PatientModel, pts: _Points, sp: _SacralProfile) -> None:
    """Rudimentary discs between the fused sacral bodies."""
    ax, us, vs = pts.ax, pts.us, pts.vs
    L = model.sac_len
    for tk_, w in ((0.27, 1.4), (0.47, 1.1), (0.65, 0.9), (0.8, 0.7)):
        f_sd = _intersect(np.abs(us - f32(tk_ * L)) - f32(w), (sp.v_ant + f32(1.5)) - vs, vs - (sp.v_post - f32(1.5)), ax - sp.ws * f32(0.45))
        canvas.paint(canvas.occupancy(f_sd) * f32(0.8), "annulus")
