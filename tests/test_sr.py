"""DICOM Structured Reports (lumbar_ray.outputs.sr, `lumbar-ray export-sr`): every SR written from
synthetic studies is read back with highdicom and pydicom and checked against its Parquet rows and
its source study."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from typer.testing import CliRunner

from lumbar_ray.cli import app
from lumbar_ray.dicom.read import list_studies, read_study
from lumbar_ray.dicom.series import id_sort_key
from lumbar_ray.outputs import sr as sr_mod
from lumbar_ray.outputs import sr_codes
from lumbar_ray.outputs.store import OutputWriter, select_scores
from lumbar_ray.synth import writer as synth
from lumbar_ray.synth.phi import SENTINEL_MARKERS, patient_tags
from lumbar_ray.targets import PROBABILITY_COLUMNS, SEVERITIES, TARGETS

VERSION = "v-sr-test"
UNDETECTED = {3, 11, 24}  # target indices scored without a localization (prior rows)
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


def _probabilities(target_index: int, study_rank: int) -> list[float]:
    """Distinct, unnormalised-looking values whose argmax cycles through the three classes."""
    grade = (target_index + study_rank) % 3
    p = np.array([0.15 + 0.001 * target_index, 0.2 + 0.0003 * study_rank, 0.1 + 1e-7 * target_index])
    p[grade] += 0.6
    return [float(v) for v in p / p.sum()]


def _rows_for(root: Path, study_id: str, rank: int) -> list[dict]:
    """25 rows pointing at real instances of the study: each localized target on a slice of its
    series type (instances chosen from the series, not assumed), at a point inside the image."""
    study = read_study(str(root), study_id, split="test")
    rows = []
    for t in TARGETS:
        series = study.series[t.series_type]
        detected = t.index not in UNDETECTED
        k = (t.index * 3 + rank) % len(series.instance_numbers)
        p = _probabilities(t.index, rank)
        rows.append({
            "study_id": study_id, "condition": t.condition.slug, "level": t.level,
            "normal_mild": p[0], "moderate": p[1], "severe": p[2], "detected": detected,
            "confidence": 0.5 + 0.01 * t.index if detected else None,
            "series_id": series.series_id if detected else None,
            "instance_number": int(series.instance_numbers[k]) if detected else None,
            "x": 3.25 + 1.5 * t.index if detected else None,
            "y": 40.0 - 0.75 * t.index if detected else None,
        })
    return rows


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(data root, scores output root, study ids): two synthetic test studies (sentinel PHI) and a
    predictions part with their 25 rows each, written by the real OutputWriter."""
    base = tmp_path_factory.mktemp("sr")
    root = base / "rsna"
    synth.synthesize(str(root), n_studies=2, seed=31, split="test", size="small")
    study_ids = list_studies(str(root), "test")
    out = base / "out"
    rows = [r for rank, sid in enumerate(study_ids) for r in _rows_for(root, sid, rank)]
    with OutputWriter(out, "run-sr", VERSION) as writer:
        writer.write(pd.DataFrame(rows))
    return root, out, study_ids


@pytest.fixture(scope="module")
def exported(scored, tmp_path_factory):
    root, out, _ = scored
    to = tmp_path_factory.mktemp("srs")
    result = sr_mod.export_srs(str(out), str(root), str(to))
    return to, result


def _source_header(root: Path, study_id: str, series_id: str, instance: int) -> pydicom.Dataset:
    # the synthetic writer names each file by its InstanceNumber
    return pydicom.dcmread(root / "test_images" / study_id / series_id / f"{instance}.dcm", stop_before_pixels=True)


def _any_source(root: Path, study_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(next((root / "test_images" / study_id).glob("*/*.dcm")), stop_before_pixels=True)


def _groups(document) -> list:
    report = document.content
    return [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]


@pytest.fixture(scope="module")
def read_back(scored, exported):
    """{study id: the SR read with highdicom} (read once: highdicom takes seconds per SR)."""
    _, _, study_ids = scored
    to, _ = exported
    return {study_id: hd.sr.srread(to / f"{study_id}.dcm") for study_id in study_ids}


def test_one_sr_per_study_with_the_source_identifiers(scored, exported, read_back):
    root, _, study_ids = scored
    to, result = exported
    assert result.failed == {}
    assert sorted(Path(p).name for p in result.written) == sorted(f"{s}.dcm" for s in study_ids)
    for study_id in study_ids:
        ds = pydicom.dcmread(to / f"{study_id}.dcm")
        source = _any_source(root, study_id)
        assert ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and ds.Modality == "SR"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        for keyword in PATIENT_KEYWORDS:
            assert str(ds[keyword].value) == str(source[keyword].value) == patient_tags(study_id)[keyword]
        # new UIDs for the SR's own series and instance
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
        assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert sr_codes.PRIVATE_SCHEME in [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence]
        evidence = read_back[study_id].get_evidence()
        assert {e[0] for e in evidence} == {source.StudyInstanceUID}


def test_each_finding_equals_its_parquet_row(scored, read_back):
    root, out, study_ids = scored
    frame = select_scores(str(out))
    for study_id in study_ids:
        rows = frame[frame["study_id"] == study_id].set_index("column")
        groups = _groups(read_back[study_id])
        assert len(groups) == len(TARGETS) == 25
        assert sorted(g.tracking_identifier for g in groups) == sorted(rows.index)
        for group in groups:
            row = rows.loc[group.tracking_identifier]
            probs = [float(group.get_measurements(name=name)[0].value) for name in sr_codes.PROBABILITY_NAMES]
            assert probs == [row[c] for c in PROBABILITY_COLUMNS]  # exact: stored as FloatingPointValue
            grade = int(np.argmax([row[c] for c in PROBABILITY_COLUMNS]))
            severity = group.get_qualitative_evaluations(name=sr_codes.SEVERITY)[0].value
            assert severity.meaning == SEVERITIES[grade]
            assert sr_codes.same_code(severity, sr_codes.SEVERITY_VALUES[grade])
            version = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
            name = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
            assert [v.value for v in version] == [VERSION] and [n.value for n in name] == [sr_codes.ALGORITHM_NAME]
            site = group.finding_sites[0]
            target = TARGETS[int(row["target_index"])]
            assert sr_codes.same_code(site.value, sr_codes.LEVEL_SITE[target.level])
            assert (site.laterality is None) == (target.side is None)
            if row["detected"]:
                source = _source_header(root, study_id, str(row["series_id"]), int(row["instance_number"]))
                ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
                assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
                assert ref.ReferencedSOPClassUID == source.SOPClassUID
                assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POINT
                np.testing.assert_allclose(group.roi.value.reshape(-1), [row["x"] + 0.5, row["y"] + 0.5])
                assert group.get_measurements(name=sr_codes.DETECTION_CONFIDENCE)[0].value == pytest.approx(row["confidence"])
            else:
                assert not isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
                for value_type in (hd.sr.ValueTypeValues.IMAGE, hd.sr.ValueTypeValues.SCOORD):
                    assert hd.sr.utils.find_content_items(group[0], value_type=value_type, recursive=True) == []
                localization = group.get_qualitative_evaluations(name=sr_codes.LOCALIZATION)[0].value
                assert sr_codes.same_code(localization, sr_codes.NOT_LOCALIZED)
        assert sum(not d for d in rows["detected"]) == len(UNDETECTED)


def test_read_sr_findings_round_trip(scored, exported):
    _, out, study_ids = scored
    to, _ = exported
    frame = select_scores(str(out))
    for study_id in study_ids:
        found = sr_mod.read_sr_findings(str(to / f"{study_id}.dcm"))
        rows = frame[frame["study_id"] == study_id].reset_index(drop=True)
        assert list(found["column"]) == list(rows["column"])
        for c in PROBABILITY_COLUMNS:
            assert found[c].tolist() == rows[c].tolist()
        assert found["grade"].tolist() == rows[list(PROBABILITY_COLUMNS)].to_numpy().argmax(axis=1).tolist()
        assert found["detected"].tolist() == rows["detected"].tolist()
        detected = rows["detected"].to_numpy()
        np.testing.assert_allclose(found.loc[detected, ["x", "y"]].to_numpy(float), rows.loc[detected, ["x", "y"]].to_numpy(float))
        assert found.loc[~detected, "sop_instance_uid"].isna().all()
        assert set(found["model_version"]) == {VERSION}


def test_no_patient_values_beyond_the_source(scored, exported):
    _, _, study_ids = scored
    to, _ = exported
    for study_id in study_ids:
        ds = pydicom.dcmread(to / f"{study_id}.dcm")
        own = patient_tags(study_id)
        leaked = [(e.keyword, str(e.value)) for e in ds.iterall()
                  if any(m in str(e.value) for m in SENTINEL_MARKERS)]
        # each sentinel value once, in its own element, and equal to the source study's
        assert sorted(leaked) == sorted(own.items())
        data = (to / f"{study_id}.dcm").read_bytes()
        for other in study_ids:
            if other != study_id:  # (every synthetic study has the same sentinel birth date)
                for keyword, value in patient_tags(other).items():
                    assert keyword == "PatientBirthDate" or value.encode() not in data


def test_a_source_without_patient_elements_gets_them_empty(scored):
    """An anonymised source (no birth date, accession, sex, study date): the SR gets those Type 2
    elements empty, never values of its own."""
    root, out, study_ids = scored
    study_id = study_ids[0]
    rows = select_scores(str(out))
    rows = rows[rows["study_id"] == study_id]
    sources = sr_mod.load_sources(str(root), study_id, rows, "test")
    stripped = copy.deepcopy(sources.representative)
    for keyword in ("PatientBirthDate", "AccessionNumber", "PatientSex", "StudyDate", "StudyTime"):
        if keyword in stripped:
            del stripped[keyword]
    sources.representative = stripped
    ds = sr_mod.build_study_sr(rows, sources)
    assert ds.PatientBirthDate in ("", None) and ds.AccessionNumber in ("", None)
    assert ds.PatientID == stripped.PatientID
    assert "PatientBirthDate" not in stripped  # the source header itself is left alone


@pytest.mark.parametrize("workers", [1, 3])
def test_unreadable_studies_are_recorded_not_dropped(scored, tmp_path, workers):
    root, out, study_ids = scored
    frame = select_scores(str(out))
    good = frame[frame["study_id"] == study_ids[0]]
    # a study whose folder does not exist, and one whose rows point at an instance its series lacks
    ghost = good.assign(study_id="999", row_id=lambda f: "999" + f["row_id"].str[len(study_ids[0]):])
    bad_instance = frame[frame["study_id"] == study_ids[1]].copy()
    first = bad_instance.index[bad_instance["detected"]][0]
    bad_instance.loc[first, "instance_number"] = 9999
    scores = pd.concat([good, ghost, bad_instance], ignore_index=True)
    result = sr_mod.export_srs(scores, str(root), str(tmp_path / "srs"), workers=workers)
    assert [Path(p).name for p in result.written] == [f"{study_ids[0]}.dcm"]
    # in study order, however many studies are read at once
    assert list(result.failed) == sorted({"999", study_ids[1]}, key=id_sort_key)
    assert "999" in result.failed["999"] and "does not exist" in result.failed["999"]
    assert "instance 9999" in result.failed[study_ids[1]]
    assert all("\n" not in reason for reason in result.failed.values())
    assert result.transient == []


def test_incomplete_study_is_refused(scored, tmp_path):
    root, out, study_ids = scored
    frame = select_scores(str(out))
    short = frame[frame["study_id"] == study_ids[0]].iloc[:24]
    result = sr_mod.export_srs(short, str(root), str(tmp_path / "srs"))
    assert result.written == [] and "24 prediction rows" in result.failed[study_ids[0]]


def test_cli_writes_and_counts(scored, tmp_path):
    root, out, study_ids = scored
    to = tmp_path / "srs"
    result = CliRunner().invoke(app, ["export-sr", "--scores", str(out), "--data", str(root), "--to", str(to),
                                      "--study", study_ids[1]])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote 1 SRs to {to}"
    assert [p.name for p in to.iterdir()] == [f"{study_ids[1]}.dcm"]
    assert len(_groups(hd.sr.srread(to / f"{study_ids[1]}.dcm"))) == 25


def test_cli_missing_scores_is_one_line(scored, tmp_path):
    root, _, _ = scored
    result = CliRunner().invoke(app, ["export-sr", "--scores", str(tmp_path / "nothing"), "--data", str(root),
                                      "--to", str(tmp_path / "srs")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no predictions under") and "Traceback" not in result.output
    assert not (tmp_path / "srs").exists()


def test_cli_failed_study_exits_data_error(scored, tmp_path):
    root, out, study_ids = scored
    result = CliRunner().invoke(app, ["export-sr", "--scores", str(out), "--data", str(root), "--to",
                                      str(tmp_path / "srs"), "--study", study_ids[0], "--study", "12345"])
    assert result.exit_code == 5
    assert result.stderr.strip() == "error: study 12345: no predictions in the scores"
    assert "wrote 1 SRs" in result.stdout


def test_cli_dicomweb_target_stores_every_sr(scored, monkeypatch):
    """--to dicomweb://… hands the SRs to lumbar_ray.dicomweb.store_instances (tested against a real
    Orthanc in tests/test_dicomweb.py); here a stand-in receives them."""
    dicomweb = pytest.importorskip("lumbar_ray.dicomweb")
    root, out, study_ids = scored
    received = {}

    def store(url, datasets):
        received[url] = list(datasets)
        return len(received[url])

    monkeypatch.setattr(dicomweb, "store_instances", store)
    url = "dicomweb://127.0.0.1:1/dicom-web"
    result = CliRunner().invoke(app, ["export-sr", "--scores", str(out), "--data", str(root), "--to", url])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"stored 2 SRs in {url}"
    assert sorted(ds.StudyInstanceUID for ds in received[url]) == sorted(
        _any_source(root, s).StudyInstanceUID for s in study_ids)
