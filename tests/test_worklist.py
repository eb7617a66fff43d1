"""The triage worklist ({out}/studies/) and the series catalog ({out}/series/) (issue #18, items 3 and 5):
pure derivations on hand-made rows, then one scoring run on small synthetic studies."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.outputs.catalog import series_folder_of, skipped_summary
from lumbar_ray.outputs.schema import NOT_FOUND, SERIES, STUDIES, SchemaError, to_series_table, to_studies_table
from lumbar_ray.outputs.store import OutputWriter, part_paths, read_table
from lumbar_ray.outputs.worklist import (
    CONDITION_COLUMNS,
    LOW_CONFIDENCE,
    WORKLIST_COLUMNS,
    format_worklist,
    read_worklist,
    study_worklist,
)
from lumbar_ray.targets import PROBABILITY_COLUMNS, SEVERITY_WEIGHTS, TARGETS

SURE = {0: (1.0, 0.0, 0.0), 1: (0.0, 1.0, 0.0), 2: (0.0, 0.0, 1.0)}


def rows(study_id, grades: dict[int, int] | None = None, *, probs=None, flags: str = "", confidence=0.9,
         undetected=(), model_version="v1", run_id="r1") -> pd.DataFrame:
    """25 prediction rows of one study: every target surely Normal/Mild except ``grades``
    ({target index: class id}); ``probs`` replaces every target's probabilities."""
    out = []
    for t in TARGETS:
        p = probs if probs is not None else SURE[(grades or {}).get(t.index, 0)]
        found = t.index not in undetected
        out.append({"study_id": str(study_id), "condition": t.condition.slug, "level": t.level,
                    **dict(zip(PROBABILITY_COLUMNS, p)), "detected": found,
                    "confidence": confidence if found else None, "series_id": "1" if found else None,
                    "instance_number": 3 if found else None, "x": 10.0 if found else None,
                    "y": 20.0 if found else None, "flags": flags,
                    "model_version": model_version, "run_id": run_id})
    return pd.DataFrame(out)


def index_of(column: str) -> int:
    return next(t.index for t in TARGETS if t.column == column)


# ------------------------------------------------------------------------------ pure (fast)


def test_priority_weighs_as_the_metric_and_orders_the_worklist():
    spinal_severe = index_of("spinal_canal_stenosis_l4_l5")
    foraminal_severe = index_of("left_neural_foraminal_narrowing_l4_l5")
    frame = pd.concat([rows(1), rows(2, {foraminal_severe: 2}), rows(3, {spinal_severe: 2}),
                       rows(4, {spinal_severe: 1}), rows(5, probs=(0.0, 0.0, 1.0))])
    worklist = study_worklist(frame)
    assert list(worklist.columns) == list(WORKLIST_COLUMNS[:3]) + list(WORKLIST_COLUMNS[4:])  # no scored_at given
    assert list(worklist["study_id"]) == ["5", "3", "4", "2", "1"]
    priority = dict(zip(worklist["study_id"], worklist["priority"]))
    low, high = min(SEVERITY_WEIGHTS), max(SEVERITY_WEIGHTS)
    assert priority["1"] == pytest.approx(low) and priority["5"] == pytest.approx(high)
    # One sure Severe spinal level: the spinal term (4 + 4 x 1) / 5 and the any-severe term 4, of four terms.
    assert priority["3"] == pytest.approx((high + 4 * low) / 5 / 4 + (2 * low + high) / 4)
    # One sure Severe foraminal level: one of the 10 foraminal targets.
    assert priority["2"] == pytest.approx((3 * low + (high + 9 * low) / 10) / 4)


def test_an_uncertain_grade_counts_in_proportion_to_its_probability():
    target = index_of("right_subarticular_stenosis_l1_l2")
    frame = pd.concat([rows("a", {target: 1}), rows("b")])
    half = rows("c")
    half.loc[target, list(PROBABILITY_COLUMNS)] = (0.25, 0.0, 0.25)  # rescaled: half Normal/Mild, half Severe
    worklist = study_worklist(pd.concat([frame, half])).set_index("study_id")
    assert worklist.loc["c", "priority"] > worklist.loc["a", "priority"] > worklist.loc["b", "priority"]
    expected_c = (3 + (0.5 * 1 + 0.5 * 4 + 9) / 10) / 4
    assert worklist.loc["c", "priority"] == pytest.approx(expected_c)


def test_any_severe_spinal_is_the_max_over_spinal_levels_only():
    probs = {index_of("spinal_canal_stenosis_l1_l2"): (0.5, 0.2, 0.3),
             index_of("spinal_canal_stenosis_l3_l4"): (0.1, 0.2, 0.7),
             index_of("left_subarticular_stenosis_l3_l4"): (0.0, 0.0, 1.0)}  # not spinal: ignored
    frame = rows("7")
    for index, p in probs.items():
        frame.loc[index, list(PROBABILITY_COLUMNS)] = p
    row = study_worklist(frame).iloc[0]
    assert row["any_severe_spinal"] == pytest.approx(0.7)


def test_worst_grade_per_condition_and_counts():
    grades = {index_of("spinal_canal_stenosis_l1_l2"): 1, index_of("spinal_canal_stenosis_l5_s1"): 2,
              index_of("right_neural_foraminal_narrowing_l2_l3"): 1}
    row = study_worklist(rows("9", grades, undetected={0, 24})).iloc[0]
    assert {c: row[c] for c in CONDITION_COLUMNS} == {
        "spinal_canal_stenosis": "Severe", "left_neural_foraminal_narrowing": "Normal/Mild",
        "right_neural_foraminal_narrowing": "Moderate", "left_subarticular_stenosis": "Normal/Mild",
        "right_subarticular_stenosis": "Normal/Mild"}
    assert row["n_severe"] == 1 and row["n_detected"] == len(TARGETS) - 2


def test_levels_not_found_carry_no_grade():
    """An undetected row holds the weighted prior, whose argmax may be Severe: it is no finding.
    A condition with no level found reads NOT_FOUND; its probabilities still weigh in priority."""
    foramen = [t.index for t in TARGETS if t.condition.slug == "left_neural_foraminal_narrowing"]
    canal_l1 = index_of("spinal_canal_stenosis_l1_l2")
    severe_prior = {i: 2 for i in foramen} | {canal_l1: 2}
    row = study_worklist(rows("7", severe_prior, undetected=set(foramen) | {canal_l1})).iloc[0]
    assert row["left_neural_foraminal_narrowing"] == NOT_FOUND
    assert row["spinal_canal_stenosis"] == "Normal/Mild"  # the other four levels, found and normal
    assert row["n_severe"] == 0 and row["n_detected"] == len(TARGETS) - 6
    assert row["priority"] > study_worklist(rows("8")).iloc[0]["priority"]
    assert row["any_severe_spinal"] == pytest.approx(1.0)
    assert "LNFN=-" in format_worklist(study_worklist(rows("7", severe_prior, undetected=set(foramen))))
    stored = to_studies_table(study_worklist(rows("7", severe_prior, undetected=set(foramen))),
                              model_version="v1", run_id="r1")
    assert stored.column("left_neural_foraminal_narrowing").to_pylist() == [NOT_FOUND]


def test_flags_become_review_reasons():
    clean = rows("1")
    flagged = rows("2", flags="series_missing:Axial T2;skipped_files:2", undetected={20, 21})
    flagged.loc[flagged.index[:3], "flags"] = "series_missing:Axial T2;skipped_files:2;levels_out_of_order:spinal"
    low = rows("3", confidence=LOW_CONFIDENCE / 2)
    errors = pd.DataFrame({"study_id": ["2", "2", "2", "1"], "stage": ["read"] * 4,
                           "model_version": ["v1", "v1", "v1", "v1"], "run_id": ["r1", "r1", "r1", "r0"]})
    worklist = study_worklist(pd.concat([clean, flagged, low]), errors).set_index("study_id")
    assert worklist.loc["2", "flags"].split(";") == [
        "series_missing:Axial T2", "skipped_files:2", "levels_out_of_order:spinal", "undetected:2", "errors:3"]
    assert worklist.loc["3", "flags"] == f"low_confidence:{len(TARGETS)}"
    # study 1's error row is of another run: not counted
    assert worklist.loc["1", "flags"] == "" and not worklist.loc["1", "review"]
    assert worklist.loc["2", "review"] and worklist.loc["3", "review"]
    text = format_worklist(worklist.reset_index(), top=2)
    assert len(text.splitlines()) == 2 + 2 and "REVIEW" in text


def test_bad_studies_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs its 25 targets once"):
        study_worklist(rows("1").iloc[:24])
    with pytest.raises(ValueError, match="needs its 25 targets once"):
        study_worklist(pd.concat([rows("1"), rows("1").iloc[:1]]))
    bad = rows("1")
    bad.loc[0, list(PROBABILITY_COLUMNS)] = (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not all 0"):
        study_worklist(bad)
    with pytest.raises(ValueError, match="lack columns"):
        study_worklist(rows("1").drop(columns="flags"))


def test_studies_and_series_schemas_refuse_values_out_of_range():
    good = study_worklist(rows("1"))
    table = to_studies_table(good, model_version="v1", run_id="r1")
    assert table.num_rows == 1 and table.column("review").to_pylist() == [False]
    for column, value, match in (("priority", 4.5, "priority"), ("any_severe_spinal", -0.1, "any_severe_spinal"),
                                 ("spinal_canal_stenosis", "Mild", "spinal_canal_stenosis"), ("n_detected", 26, "n_detected")):
        with pytest.raises(SchemaError, match=match):
            to_studies_table(good.assign(**{column: value}), model_version="v1", run_id="r1")
    with pytest.raises(SchemaError, match="one row per study"):
        to_studies_table(pd.concat([good, good]), model_version="v1", run_id="r1")
    series = pd.DataFrame([{"study_id": "1", "series_id": "2", "role": "unread", "n_slices": 0, "n_stacks": 0,
                            "n_skipped": 1, "skipped_reasons": "X: y (1 file)"}])
    assert to_series_table(series, model_version="v1", run_id="r1").column("plane").null_count == 1
    with pytest.raises(SchemaError, match="unread series has no slices"):
        to_series_table(series.assign(n_slices=3), model_version="v1", run_id="r1")
    with pytest.raises(SchemaError, match="role"):
        to_series_table(series.assign(role="spare"), model_version="v1", run_id="r1")
    with pytest.raises(SchemaError, match="series_type"):
        to_series_table(series.assign(series_type="Coronal T1"), model_version="v1", run_id="r1")


def test_skipped_records_are_counted_on_their_series_folder():
    assert series_folder_of("s3://b/p/test_images/11/22/3.dcm", "11", "NotDicomError") == "22"
    assert series_folder_of("/d/test_images/11/22", "11", "SeriesNotFoundError") == "22"
    assert series_folder_of("/d/test_images/11/junk.txt", "11", "UnexpectedFile") is None

    class Rec:
        def __init__(self, error_type, reason):
            self.error_type, self.reason = error_type, reason

    summary = skipped_summary([Rec("Localizer", "ignored"), Rec("NotDicomError", "no marker"), Rec("Localizer", "ignored")])
    assert summary == "Localizer: ignored (2 files);NotDicomError: no marker (1 file)"


def test_read_worklist_reads_studies_and_computes_what_is_missing(tmp_path):
    out = tmp_path / "scores"
    assert read_worklist(out).empty and list(read_worklist(out).columns) == list(WORKLIST_COLUMNS)
    spinal = index_of("spinal_canal_stenosis_l2_l3")
    with OutputWriter(out, "r1", "v1") as writer:  # an output from before the studies table: computed
        writer.write(rows(1, run_id="r1"))
    computed = read_worklist(out)
    assert list(computed["study_id"]) == ["1"] and computed["scored_at"].notna().all()
    with OutputWriter(out, "r2", "v1") as writer:
        preds = rows(2, {spinal: 2}, run_id="r2")
        stored = study_worklist(preds).assign(flags="stored", review=True)  # tells the stored row apart
        writer.write(preds, studies=stored)
    with OutputWriter(out, "r3", "v1") as writer:  # a run killed between its parts: a studies row alone
        writer.write(studies=study_worklist(rows(3, run_id="r3")))
    worklist = read_worklist(out)
    assert list(worklist["study_id"]) == ["2", "1"]  # study 3 has no predictions: not listed
    assert worklist.set_index("study_id").loc["2", "flags"] == "stored"
    assert len(part_paths(out, STUDIES)) == 2
    with OutputWriter(out, "r4", "v2") as writer:
        writer.write(rows(1, model_version="v2", run_id="r4"))
    with pytest.raises(ValueError, match="2 model versions"):
        read_worklist(out)
    assert list(read_worklist(out, model_version="v2")["model_version"]) == ["v2"]


# ------------------------------------------------------------------------ one scoring run (Ray)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_runtime):
    """(data root, output root, {name: study id}) after one run over 4 small synthetic studies:
    one intact, one with a series folder missing, one with a corrupt file, one with nothing
    readable (error rows only)."""
    from registries import untrained_registry

    from lumbar_ray.config import ScoreConfig
    from lumbar_ray.scoring.pipeline import run_scoring
    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("worklist")
    data = root / "data"
    synth.synthesize(str(data), n_studies=4, seed=18, split="test", size="small", acquisitions="simple")
    images = data / "test_images"
    ids = sorted(os.listdir(images))
    names = dict(zip(("intact", "missing", "corrupt", "unreadable"), ids))
    missing = images / names["missing"]
    shutil.rmtree(missing / sorted(os.listdir(missing))[0])
    corrupt = images / names["corrupt"]
    (corrupt / sorted(os.listdir(corrupt))[0] / "9999.dcm").write_bytes(b"not a DICOM file")
    for series in sorted((images / names["unreadable"]).iterdir()):
        for dcm in series.iterdir():
            dcm.write_bytes(b"garbage")
    out = root / "scores"
    summary = run_scoring(ScoreConfig(input=str(data), models=untrained_registry(root), out=str(out), split="test",
                                      flush_studies=2))
    assert summary.n_scored == 3 and summary.n_failed == 1
    return data, out, names


@pytest.mark.ray
@pytest.mark.slow
def test_scoring_writes_one_studies_row_per_scored_study(scored):
    from lumbar_ray.outputs.store import read_predictions

    _, out, names = scored
    studies = read_table(out, STUDIES).to_pandas()
    scored_ids = sorted(set(read_predictions(out)["study_id"]))
    assert sorted(studies["study_id"]) == scored_ids == sorted(v for k, v in names.items() if k != "unreadable")
    assert studies["study_id"].is_unique
    flags = studies.set_index("study_id")["flags"]
    assert "series_missing:" in flags[names["missing"]] and "skipped_files:1" in flags[names["corrupt"]]
    assert studies.set_index("study_id").loc[[names["missing"], names["corrupt"]], "review"].all()
    # the stored rows are what study_worklist makes of the stored predictions
    recomputed = study_worklist(read_predictions(out), read_table(out, "errors").to_pandas()).set_index("study_id")
    stored = studies.set_index("study_id").loc[recomputed.index]
    np.testing.assert_allclose(stored["priority"], recomputed["priority"])
    assert list(stored["flags"]) == list(recomputed["flags"])


@pytest.mark.ray
@pytest.mark.slow
def test_scoring_writes_the_series_catalog_without_phi(scored):
    from lumbar_ray.dicom.read import read_study
    from lumbar_ray.synth.phi import SENTINEL_MARKERS

    data, out, names = scored
    series = read_table(out, SERIES).to_pandas()
    assert set(series["study_id"]) == set(names.values())  # the failed study too
    for name in ("intact", "missing", "corrupt"):
        study = read_study(str(data), names[name], split="test")
        got = series[(series["study_id"] == names[name]) & (series["role"] != "unread")]
        expected = sorted((s.series_id, s.series_type, s.n_slices) for s in study.all_series())
        assert sorted(zip(got["series_id"], got["series_type"], got["n_slices"])) == expected, name
        assert (got["type_source"] == "csv").all() and got["row_spacing"].gt(0).all()
        assert got["plane"].isin(["sagittal", "axial"]).all() and got["n_stacks"].ge(1).all()
    missing = series[(series["study_id"] == names["missing"]) & (series["role"] == "unread")]
    assert len(missing) == 1 and "SeriesNotFoundError" in missing["skipped_reasons"].iloc[0]
    corrupt = series[series["study_id"] == names["corrupt"]]
    assert corrupt["n_skipped"].sum() == 1 and "9999" not in " ".join(corrupt["skipped_reasons"])
    unreadable = series[series["study_id"] == names["unreadable"]]
    assert len(unreadable) == 3 and (unreadable["role"] == "unread").all() and unreadable["n_skipped"].gt(0).all()
    text = " ".join(str(v) for v in series.astype(str).to_numpy().ravel())
    text += " ".join(str(v) for v in read_table(out, STUDIES).to_pandas().astype(str).to_numpy().ravel())
    assert not [m for m in SENTINEL_MARKERS if m in text]
    assert "SENTINEL" not in text.upper()


@pytest.mark.ray
@pytest.mark.slow
def test_worklist_command_and_sql_views(scored):
    from typer.testing import CliRunner

    from lumbar_ray.cli import app
    from lumbar_ray.outputs.query import query

    _, out, names = scored
    runner = CliRunner()
    result = runner.invoke(app, ["worklist", "--scores", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()[2:]
    expected = read_worklist(out)
    assert [line.split()[1] for line in lines] == list(expected["study_id"])
    assert expected["priority"].is_monotonic_decreasing
    assert names["unreadable"] in result.stderr and "1 studies failed" in result.stderr
    top = runner.invoke(app, ["worklist", "--scores", str(out), "--top", "1", "--csv"])
    assert top.exit_code == 0 and top.stdout.splitlines()[0].startswith("study_id,model_version")
    assert len(top.stdout.splitlines()) == 2 and top.stdout.splitlines()[1].startswith(expected["study_id"][0])
    wrong = runner.invoke(app, ["worklist", "--scores", str(out), "--model-version", "v9"])
    assert wrong.exit_code == 2 and "versions present: 'v1'" in wrong.stderr
    counts = query(out, "SELECT (SELECT count(*) FROM studies) AS s, (SELECT count(*) FROM series) AS c, "
                        "(SELECT count(DISTINCT p.study_id) FROM predictions p JOIN studies USING (study_id, run_id)) AS j")
    assert counts.iloc[0].tolist() == [3, len(read_table(out, SERIES)), 3]
