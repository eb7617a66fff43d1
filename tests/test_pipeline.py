"""Pure parts of the scoring pipeline (no Ray)."""

from types import SimpleNamespace

import numpy as np

from lumbar_ray.pipeline import pack_volumes


def test_pack_volumes_is_lossless_or_leaves_the_volume_alone():
    rng = np.random.default_rng(0)
    integral = rng.integers(-1000, 4000, (3, 20, 20)).astype(np.float32)
    fractional = integral + 0.5
    too_wide = integral * 100.0  # beyond int16
    with_nan = integral.copy()
    with_nan[0, 0, 0] = np.nan
    already = integral.astype(np.int16)
    study = SimpleNamespace(series={name: SimpleNamespace(volume=v.copy()) for name, v in
                                    dict(integral=integral, fractional=fractional, too_wide=too_wide,
                                         with_nan=with_nan, already=already, empty=np.zeros((0, 4, 4), np.float32)).items()})
    assert pack_volumes(study) is study
    packed = study.series["integral"].volume
    assert packed.dtype == np.int16 and np.array_equal(packed.astype(np.float32), integral)
    for name in ("fractional", "too_wide", "with_nan", "empty"):
        assert study.series[name].volume.dtype == np.float32, name
    np.testing.assert_array_equal(study.series["fractional"].volume, fractional)
    assert study.series["already"].volume.dtype == np.int16
