"""A PACS in and out over DICOMweb: ``dicomweb://HOST:PORT/PATH`` as a data root that the reader
and the scoring pipeline read unchanged (:mod:`lumbar_ray.dicomweb.fs`, QIDO-RS and WADO-RS), and
:func:`store_instances` (STOW-RS) to store reports back."""

from lumbar_ray.dicomweb.stow import store_instances

__all__ = ["store_instances"]
