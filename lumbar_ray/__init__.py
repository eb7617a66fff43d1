"""lumbar-ray: distributed grading of lumbar spine degenerative conditions on MRI, on Ray."""

__version__ = "0.1.0"
