"""Sentinel patient identity for synthetic studies, so that a scan can prove no PHI leaves the input.

Real studies carry a patient's name, id, birth date and accession number; the pipeline must never
copy them into its outputs (scores, errors, registry, reports) or logs. Synthetic studies carry
stand-ins for them instead of leaving the elements empty: values no code path produces by chance,
so a scan of every file a training and scoring run wrote finds them only if a value leaked.

:func:`patient_tags` gives the values for :func:`lumbar_ray.dicom.write.write_mr_series`'s
``patient`` argument; :data:`SENTINEL_MARKERS` are the substrings to search for (as text or bytes).
"""

from __future__ import annotations

__all__ = ["SENTINEL_MARKERS", "SENTINEL_BIRTH_DATE", "patient_tags"]

# Each prefix is a marker: it stays in any text made of the value (the study id appended to it
# only makes the values differ between studies). The birth date is a valid DICOM DA (1888-08-08,
# chosen so it cannot be mistaken for a real date near any run); its ISO form is scanned too, in
# case a reader turns the DA into a date before it leaks.
NAME_PREFIX = "SENTINEL^PHI^"
ID_PREFIX = "PHI-SENTINEL-"
ACCESSION_PREFIX = "PHIACC"
SENTINEL_BIRTH_DATE = "18880808"

SENTINEL_MARKERS: tuple[str, ...] = (
    "SENTINEL^PHI",
    ID_PREFIX.rstrip("-"),
    ACCESSION_PREFIX,
    SENTINEL_BIRTH_DATE,
    "1888-08-08",
)


def patient_tags(study_id: int | str) -> dict[str, str]:
    """The sentinel PatientName, PatientID, PatientBirthDate and AccessionNumber of one study.

    Every value fits its DICOM value representation: PatientID (LO) and AccessionNumber (SH, at
    most 16 characters) hold the study id (Kaggle ids have at most 10 digits).
    """
    sid = str(study_id)
    accession = f"{ACCESSION_PREFIX}{sid}"
    if len(accession) > 16:
        raise ValueError(f"study id {sid!r} is too long for an AccessionNumber (SH, 16 characters): {accession!r}")
    return {
        "PatientName": f"{NAME_PREFIX}{sid}",
        "PatientID": f"{ID_PREFIX}{sid}",
        "PatientBirthDate": SENTINEL_BIRTH_DATE,
        "AccessionNumber": accession,
    }
