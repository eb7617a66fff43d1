"""Scoring outputs: schemas, atomic part files, resume, Kaggle export, SQL, evaluation."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lumbar_ray
from lumbar_ray import storage
from lumbar_ray.metrics import rsna as metrics
from lumbar_ray.outputs.evaluation import evaluate_scores
from lumbar_ray.outputs.kaggle import IncompleteSubmissionError, export_kaggle, write_submission
from lumbar_ray.outputs.query import query
from lumbar_ray.outputs.schema import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, SchemaError, to_predictions_table
from lumbar_ray.outputs.store import OutputWriter, part_paths, read_errors, read_predictions, scored_studies, select_scores
from lumbar_ray.targets import PROBABILITY_COLUMNS, SEVERITY_WEIGHTS, TARGET_COLUMNS, TARGETS

LABELS_CSV = Path(lumbar_ray.__file__).parent / "data" / "rsna2024_train_labels.csv.gz"
PROBS = list(PROBABILITY_COLUMNS)


def study_rows(study_id, rng: np.random.Generator, *, detect_every: int = 2, flags: str = "") -> pd.DataFrame:
    """25 prediction rows of one study, as a pipeline would hand them to the writer."""
    rows = []
    for t in TARGETS:
        p = rng.dirichlet([4.0, 2.0, 1.0])
        detected = t.index % detect_every == 0
        rows.append({
            "study_id": study_id,
            "condition": t.condition.slug,
            "level": t.level,
            "normal_mild": p[0], "moderate": p[1], "severe": p[2],
            "detected": detected,
            "confidence": 0.9 if detected else None,
            "series_id": "111" if detected else None,
            "instance_number": 7 if detected else None,
            "x": 100.5 if detected else None,
            "y": 80.25 if detected else None,
            "flags": flags,
        })
    return pd.DataFrame(rows)


def many(study_ids, seed=0, **kw) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.concat([study_rows(s, rng, **kw) for s in study_ids], ignore_index=True)


def error_rows(study_ids, stage="read") -> pd.DataFrame:
    return pd.DataFrame({
        "study_id": [str(s) for s in study_ids],
        "series_id": [None] * len(study_ids),
        "stage": [stage] * len(study_ids),
        "error_type": ["InvalidDicomError"] * len(study_ids),
        "message": ["no DICOM preamble"] * len(study_ids),
    })


# --------------------------------------------------------------------------------------------
# Schemas and validation
# --------------------------------------------------------------------------------------------


def test_write_casts_to_schema_and_fills_identity(tmp_path):
    frame = many([4003253, 1000])  # int study ids, as in train.csv
    with OutputWriter(tmp_path, "run1", "v1") as w:
        paths = w.write(frame, error_rows([77]))
    assert [Path(p).name for p in paths] == ["part-run1-000000.parquet", "part-run1-000000.parquet"]
    assert pq.read_schema(paths[0]).remove_metadata().equals(PREDICTIONS_SCHEMA)
    assert pq.read_schema(paths[1]).remove_metadata().equals(ERRORS_SCHEMA)
    got = read_predictions(tmp_path)
    assert list(got.columns) == PREDICTIONS_SCHEMA.names
    assert len(got) == 50
    assert set(got["study_id"]) == {"4003253", "1000"}
    assert got.loc[0, "row_id"] == "4003253_spinal_canal_stenosis_l1_l2" == TARGETS[0].row_id(4003253)
    assert set(got["model_version"]) == {"v1"} and set(got["run_id"]) == {"run1"}
    assert str(got["scored_at"].dt.tz) == "UTC"
    assert got["instance_number"].isna().sum() == 2 * 12  # undetected rows stay null
    assert got.loc[got["detected"], "instance_number"].eq(7).all()
    errs = read_errors(tmp_path)
    assert list(errs.columns) == ERRORS_SCHEMA.names and errs["study_id"].tolist() == ["77"]
    assert errs["series_id"].isna().all()


def test_flags_lists_are_joined_and_null_flags_become_empty():
    frame = many(["1"])
    frame["flags"] = [["series_missing:Axial T2", "skipped_files:2"]] + [None] * 24
    table = to_predictions_table(frame, model_version="v", run_id="r")
    flags = table.column("flags").to_pylist()
    assert flags[0] == "series_missing:Axial T2;skipped_files:2" and set(flags[1:]) == {""}


def test_arrow_table_input_is_accepted():
    table = pa.Table.from_pandas(many(["1"]), preserve_index=False)
    out = to_predictions_table(table, model_version="v", run_id="r")
    assert out.schema.equals(PREDICTIONS_SCHEMA) and out.num_rows == 25


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f: f.drop(columns=["severe"]), r"missing columns \['severe'\]"),
        (lambda f: f.drop(columns=["x"]), r"missing columns \['x'\]"),
        (lambda f: f.rename(columns={"instance_number": "instance"}), r"unknown columns \['instance'\]"),
        (lambda f: f.assign(instance_number=f["instance_number"] + 0.5), r"'instance_number'.*cannot be cast"),
        (lambda f: f.assign(condition="spinal"), r"unknown conditions"),
        (lambda f: f.assign(level="L1-L2"), r"unknown levels"),
        (lambda f: f.assign(row_id="x"), r"row_id does not match"),
        (lambda f: f.assign(severe=-0.1), r"probabilities must be finite"),
        (lambda f: f.assign(moderate=np.nan), r"must not be null|probabilities"),
        (lambda f: f.assign(detected=True), r"detected rows need"),
        (lambda f: f.assign(confidence=0.5), r"confidence must be null"),
        (lambda f: pd.concat([f, f.iloc[:1]]), r"duplicate targets"),
        (lambda f: f.iloc[:24], r"all 25 targets.*1 \(24 rows\)"),
        (lambda f: f.assign(model_version="other"), r"this writer writes model_version 'v'"),
        (lambda f: f.assign(study_id=None), r"'study_id' must not be null"),
    ],
)
def test_bad_prediction_frames_are_refused(mutate, match):
    frame = mutate(many(["1"]))
    with pytest.raises(SchemaError, match=match):
        to_predictions_table(frame, model_version="v", run_id="r")


def test_incomplete_studies_allowed_when_asked():
    table = to_predictions_table(many(["1"]).iloc[:5], model_version="v", run_id="r", require_complete_studies=False)
    assert table.num_rows == 5


def test_bad_error_frames_are_refused(tmp_path):
    w = OutputWriter(tmp_path, "r", "v")
    with pytest.raises(SchemaError, match="unknown stages"):
        w.write(errors=error_rows(["1"], stage="decode"))
    with pytest.raises(SchemaError, match=r"missing columns \['message'\]"):
        w.write(errors=error_rows(["1"]).drop(columns="message"))
    # A refused call writes nothing, not even the valid half.
    with pytest.raises(SchemaError):
        w.write(many(["2"]), error_rows(["1"], stage="decode"))
    assert part_paths(tmp_path, "predictions") == [] and part_paths(tmp_path, "errors") == []


def test_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        OutputWriter(tmp_path, "2024-01-01T00:00", "v")
    with pytest.raises(ValueError, match="model_version"):
        OutputWriter(tmp_path, "r", "")


# --------------------------------------------------------------------------------------------
# Part files: atomic, numbered, never overwritten
# --------------------------------------------------------------------------------------------


def test_one_part_per_nonempty_table_per_call(tmp_path):
    with OutputWriter(tmp_path, "r1", "v") as w:
        w.write(many(["1"]))
        w.write(None, error_rows(["2"]))
        assert w.write(pd.DataFrame(), None) == []
        w.write(many(["3"]), error_rows(["4"]))
    preds = [Path(p).name for p in part_paths(tmp_path, "predictions")]
    errs = [Path(p).name for p in part_paths(tmp_path, "errors")]
    assert preds == ["part-r1-000000.parquet", "part-r1-000002.parquet"]
    assert errs == ["part-r1-000001.parquet", "part-r1-000002.parquet"]
    # Reopening the same run continues the numbering instead of overwriting.
    OutputWriter(tmp_path, "r1", "v").write(many(["5"]))
    assert Path(part_paths(tmp_path, "predictions")[-1]).name == "part-r1-000003.parquet"
    # Writers sharing a run id get their own names.
    OutputWriter(tmp_path, "r1", "v", writer_id="w7").write(many(["6"]))
    assert "part-r1-w7-000000.parquet" in [Path(p).name for p in part_paths(tmp_path, "predictions")]
    assert len(read_predictions(tmp_path)) == 4 * 25  # studies 1, 3, 5, 6
    assert not [n for n in os.listdir(tmp_path / "predictions") if not n.startswith("part-")]


def test_killed_write_leaves_whole_files_or_nothing(tmp_path, monkeypatch):
    w = OutputWriter(tmp_path, "r", "v")
    w.write(many(["1"]))

    def killed(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(storage.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        w.write(many(["2"]))
    monkeypatch.undo()
    names = os.listdir(tmp_path / "predictions")
    assert names == ["part-r-000000.parquet"], names  # no half file, no temporary left behind
    assert set(read_predictions(tmp_path)["study_id"]) == {"1"}
    assert scored_studies(tmp_path, "v") == {"1"}  # study 2 gets scored again on resume


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_scored_studies_for_resume(tmp_path):
    assert scored_studies(tmp_path / "nothing", "v1") == set()
    with OutputWriter(tmp_path, "a", "v1") as w:
        w.write(many(["1", "2"]), error_rows(["3"]))
    with OutputWriter(tmp_path, "b", "v2") as w:
        w.write(many(["4"]))
    assert scored_studies(tmp_path, "v1") == {"1", "2", "3"}
    assert scored_studies(tmp_path, "v1", include_errors=False) == {"1", "2"}
    assert scored_studies(tmp_path, "v2") == {"4"}
    assert scored_studies(tmp_path, "v3") == set()
    assert set(read_predictions(tmp_path, "v2")["study_id"]) == {"4"}
    assert len(read_predictions(tmp_path, run_id="a")) == 50


def test_empty_reads_have_the_schema_columns(tmp_path):
    preds = read_predictions(tmp_path / "missing")
    errs = read_errors(tmp_path / "missing")
    assert preds.empty and list(preds.columns) == PREDICTIONS_SCHEMA.names
    assert errs.empty and list(errs.columns) == ERRORS_SCHEMA.names


# --------------------------------------------------------------------------------------------
# Kaggle export
# --------------------------------------------------------------------------------------------


def test_export_kaggle_exact_format(tmp_path):
    with OutputWriter(tmp_path / "out", "r", "v1") as w:
        w.write(many(["10", "9"]))
        w.write(many(["100"], seed=1))
    # Unnormalised probabilities in one study: the export renormalises.
    frame = read_predictions(tmp_path / "out")
    csv = tmp_path / "sub" / "submission.csv"
    sub = export_kaggle(tmp_path / "out", csv)
    text = csv.read_text()
    assert text.splitlines()[0] == "row_id,normal_mild,moderate,severe"
    assert len(text.splitlines()) == 1 + 75 and text.endswith("\n")
    back = pd.read_csv(csv, dtype={"row_id": str})
    assert list(back.columns) == ["row_id", *PROBS]
    expected_ids = [t.row_id(s) for s in ("9", "10", "100") for t in TARGETS]  # numeric study order
    assert back["row_id"].tolist() == expected_ids == sub["row_id"].tolist()
    np.testing.assert_allclose(back[PROBS].sum(axis=1), 1.0, atol=1e-12)
    src = frame.set_index("row_id").loc[expected_ids, PROBS].to_numpy()
    np.testing.assert_allclose(back[PROBS].to_numpy(), src / src.sum(axis=1, keepdims=True), rtol=1e-12)


def test_export_kaggle_normalises_and_accepts_frames(tmp_path):
    frame = many(["5"])
    frame[PROBS] = frame[PROBS] * 3.0
    frame.loc[0, PROBS] = [2.0, 1.0, 1.0]
    sub = export_kaggle(frame, tmp_path / "s.csv")
    assert sub.loc[0, PROBS].tolist() == [0.5, 0.25, 0.25]
    np.testing.assert_allclose(sub[PROBS].sum(axis=1), 1.0)


def test_export_kaggle_refusals(tmp_path):
    out = tmp_path / "out"
    OutputWriter(out, "a", "v1").write(many(["1", "2"]))
    OutputWriter(out, "b", "v2").write(many(["1"]))
    with pytest.raises(ValueError, match=r"2 model versions \('v1', 'v2'\).*model_version="):
        export_kaggle(out, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()
    assert len(export_kaggle(out, tmp_path / "s.csv", model_version="v2")) == 25
    with pytest.raises(ValueError, match=r"no predictions of model version 'v3'.*'v1', 'v2'"):
        export_kaggle(out, tmp_path / "s.csv", model_version="v3")
    with pytest.raises(ValueError, match=r"incomplete studies: 7 \(24 of 25 rows\); study 7 lacks 'spinal_canal_stenosis_l1_l2'"):
        export_kaggle(pd.concat([many(["6"]), many(["7"]).iloc[1:]]), tmp_path / "s.csv")
    with pytest.raises(IncompleteSubmissionError, match=r"not scored: '3'"):
        export_kaggle(out, tmp_path / "s.csv", model_version="v1", studies=[1, 3])
    with pytest.raises(IncompleteSubmissionError, match=r"none of the 1 studies asked for has predictions"):
        export_kaggle(out, tmp_path / "s.csv", model_version="v1", studies=[3], fill_prior=True)
    assert len(export_kaggle(out, tmp_path / "s.csv", model_version="v1", studies=[2])) == 25
    with pytest.raises(ValueError, match="no predictions"):
        export_kaggle(tmp_path / "empty", tmp_path / "s.csv")


def test_export_kaggle_refuses_studies_with_only_error_rows(tmp_path):
    out = tmp_path / "out"
    with OutputWriter(out, "r", "v1") as w:
        w.write(many(["1", "2"]), error_rows(["2"]))  # study 2: scored, with a recorded problem
        w.write(None, error_rows(["30", "4"]))  # studies 30 and 4 failed as a whole
    OutputWriter(out, "r", "v0").write(None, error_rows(["5"]))  # another version's failure: not ours
    with pytest.raises(IncompleteSubmissionError) as info:
        export_kaggle(out, tmp_path / "s.csv", model_version="v1")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("2 studies lack their 25 prediction rows of model version 'v1': "
                              "only error rows: '4', '30';")
    assert "--fill-prior" in message and "'5'" not in message and "'2'" not in message
    assert not (tmp_path / "s.csv").exists()
    # The studies asked for (e.g. a split's) that the output never saw are named too.
    with pytest.raises(IncompleteSubmissionError, match=r"3 studies lack .*only error rows: '4', '30'; not scored: '6'"):
        export_kaggle(out, tmp_path / "s.csv", model_version="v1", studies=["1", "2", "4", "6", "30"])


def test_export_kaggle_fill_prior(tmp_path, caplog):
    out = tmp_path / "out"
    with OutputWriter(out, "r", "v1") as w:
        w.write(many(["10", "2"]), error_rows(["3"]))
    with caplog.at_level(logging.WARNING, logger="lumbar_ray.outputs.kaggle"):
        result = write_submission(out, tmp_path / "s.csv", studies=["2", "3", "10", "7"], fill_prior=True)
    assert "filled 50 rows of 2 studies" in caplog.text
    assert (result.filled_studies, result.filled_rows, result.n_studies) == (["3", "7"], 50, 4)
    assert result.model_version == "v1" and "uniform prior, weighted" in result.prior_source
    back = pd.read_csv(tmp_path / "s.csv", dtype={"row_id": str})
    assert back["row_id"].tolist() == [t.row_id(s) for s in ("2", "3", "7", "10") for t in TARGETS]
    filled = back[back["row_id"].str.startswith(("3_", "7_"))]
    weights = np.asarray(SEVERITY_WEIGHTS) / sum(SEVERITY_WEIGHTS)  # no card: the uniform prior, weighted
    np.testing.assert_allclose(filled[PROBS].to_numpy(), np.tile(weights, (50, 1)), rtol=1e-12)
    scored = back[back["row_id"].str.startswith("2_")][PROBS].to_numpy()
    src = select_scores(out).query("study_id == '2'")[PROBS].to_numpy()
    np.testing.assert_allclose(scored, src / src.sum(axis=1, keepdims=True), rtol=1e-12)


def test_fill_prior_uses_the_model_cards_weighted_prior(tmp_path):
    from lumbar_ray.models.registry import ModelRegistry

    labels = pd.read_csv(LABELS_CSV)
    priors = metrics.prior_baseline(labels)  # what training stores in the card
    # The card's prior, weighted, is exactly the weighted-prior baseline of the same labels.
    expected = metrics.weighted_prior_baseline(labels)
    pd.testing.assert_frame_equal(metrics.weighted_prior_from_card(
        {c: priors.loc[c].tolist() for c in priors.index}), expected, rtol=1e-12)
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish("v1", {}, {"priors": {c: priors.loc[c].tolist() for c in priors.index}})
    out = tmp_path / "out"
    with OutputWriter(out, "r", "v1") as w:
        w.write(many(["1"]), error_rows(["2"]))
    result = write_submission(out, tmp_path / "s.csv", fill_prior=True, registry=registry.root)
    assert result.filled_studies == ["2"] and result.prior_source == "the priors of model card v1, weighted"
    filled = result.submission[result.submission["row_id"].str.startswith("2_")]
    np.testing.assert_allclose(filled[PROBS].to_numpy(), expected.loc[list(TARGET_COLUMNS), PROBS].to_numpy(),
                               rtol=1e-12)


def test_export_kaggle_cli_refuses_or_fills(tmp_path):
    from typer.testing import CliRunner

    from lumbar_ray.cli import app

    out = tmp_path / "out"
    with OutputWriter(out, "r", "v1") as w:
        w.write(many(["1"]), error_rows(["2"]))
    (tmp_path / "data" / "test_images" / "1").mkdir(parents=True)
    (tmp_path / "data" / "test_images" / "9").mkdir()
    runner = CliRunner()
    csv = tmp_path / "s.csv"
    result = runner.invoke(app, ["export-kaggle", "--scores", str(out), "--to", str(csv)])
    assert result.exit_code == 6 and not csv.exists()  # EXIT_INCOMPLETE
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 1 study lacks") and "only error rows: '2'" in lines[0]
    result = runner.invoke(app, ["export-kaggle", "--scores", str(out), "--to", str(csv),
                                 "--data", str(tmp_path / "data"), "--split", "test"])
    assert result.exit_code == 6 and "not scored: '9'" in result.output and "'2'" not in result.output
    result = runner.invoke(app, ["export-kaggle", "--scores", str(out), "--to", str(csv), "--fill-prior"])
    assert result.exit_code == 0, result.output
    assert "filled 25 rows of 1 studies with no model card: the uniform prior, weighted" in result.output
    assert "wrote 50 rows (2 studies)" in result.output
    assert len(pd.read_csv(csv)) == 50


def test_rerun_without_resume_keeps_latest_run(tmp_path, caplog):
    out = tmp_path / "out"
    OutputWriter(out, "old", "v").write(many(["1"], seed=1))
    OutputWriter(out, "new", "v").write(many(["1"], seed=2))
    with caplog.at_level(logging.WARNING, logger="lumbar_ray.outputs.store"):
        sel = select_scores(out)
    assert "several runs" in caplog.text
    assert len(sel) == 25 and set(sel["run_id"]) == {"new"}
    assert len(export_kaggle(out, tmp_path / "s.csv")) == 25


# --------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------


def test_query_over_parts(tmp_path):
    out = tmp_path / "out"
    empty = query(out, "SELECT * FROM predictions")
    assert empty.empty and list(empty.columns) == PREDICTIONS_SCHEMA.names
    assert query(out, "SELECT count(*) AS n FROM errors")["n"].tolist() == [0]
    with OutputWriter(out, "r", "v1") as w:
        w.write(many(["1", "2"]))
        w.write(many(["3"]), error_rows(["4", "5"]))
    got = query(out, """
        SELECT study_id, count(*) AS n, sum(CASE WHEN detected THEN 1 ELSE 0 END) AS n_detected,
               min(scored_at) AS t
        FROM predictions GROUP BY study_id ORDER BY study_id""")
    assert got["study_id"].tolist() == ["1", "2", "3"] and got["n"].tolist() == [25] * 3
    assert got["n_detected"].tolist() == [13] * 3
    assert str(got["t"].dt.tz) == "UTC"
    errs = query(out, "SELECT stage, count(*) AS n FROM errors GROUP BY stage")
    assert errs.to_dict("records") == [{"stage": "read", "n": 2}]
    joined = query(out, "SELECT count(*) AS n FROM predictions p JOIN errors e USING (study_id)")
    assert joined["n"].tolist() == [0]


def test_remote_root_roundtrip_and_query():
    """A non-local fsspec root (memory://, standing in for s3://) goes through the same code."""
    out = f"memory://lumbar-ray-tests/{uuid.uuid4().hex}/out"
    assert query(out, "SELECT count(*) AS n FROM predictions")["n"].tolist() == [0]
    with OutputWriter(out, "r", "v1") as w:
        paths = w.write(many(["1", "2"]), error_rows(["3"]))
    assert all(p.startswith("memory://") for p in paths)
    assert scored_studies(out, "v1") == {"1", "2", "3"}
    got = query(out, "SELECT count(DISTINCT study_id) AS s, count(*) AS n FROM predictions")
    assert got.to_dict("records") == [{"s": 2, "n": 50}]
    assert query(out, "SELECT study_id FROM errors")["study_id"].tolist() == ["3"]
    with pytest.raises(IncompleteSubmissionError, match="only error rows: '3'"):  # study 3 failed
        export_kaggle(out, out + "/submission.csv")
    assert len(export_kaggle(out, out + "/submission.csv", fill_prior=True)) == 75
    assert storage.read_bytes(out + "/submission.csv").startswith(b"row_id,normal_mild,moderate,severe\n")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def test_evaluate_scores_agrees_with_rsna_score(tmp_path):
    wide = storage.read_csv(LABELS_CSV).head(40)
    labelled = wide["study_id"].astype(str).tolist()[:30]
    out = tmp_path / "out"
    OutputWriter(out, "r", "v1").write(many(labelled + ["1", "2", "3"], seed=3))
    csv = tmp_path / "train.csv"
    wide.to_csv(csv, index=False)

    table, text = evaluate_scores(out, tmp_path)  # a data root holding train.csv
    preds = read_predictions(out)
    direct = metrics.long_labels(wide).assign(study_id=lambda f: f["study_id"].astype(str))
    preds["column"] = preds["row_id"].str.split("_", n=1).str[1]
    frame = direct.merge(preds[["study_id", "column", *PROBS]], on=["study_id", "column"])
    frame[PROBS] = frame[PROBS].to_numpy() / frame[PROBS].to_numpy().sum(axis=1, keepdims=True)
    expected = metrics.rsna_score(frame)
    all_row = table[(table["model"] == "v1") & (table["group"] == "all")].iloc[0]
    assert all_row["rsna_log_loss"] == pytest.approx(expected.score, rel=1e-12)
    for fam in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        row = table[(table["model"] == "v1") & (table["group"] == fam)].iloc[0]
        assert row["rsna_log_loss"] == pytest.approx(getattr(expected, fam), rel=1e-12)
    assert set(table["model"]) == {"v1", "majority", "prior"}
    # The prior baseline is fitted on the evaluated studies' labels (in-sample).
    fit_on = direct[direct["study_id"].isin(labelled)]
    prior = metrics.rsna_score(fit_on.join(metrics.prior_baseline(fit_on)[PROBS], on="column"))
    prior_row = table[(table["model"] == "prior") & (table["group"] == "all")].iloc[0]
    assert prior_row["rsna_log_loss"] == pytest.approx(prior.score, rel=1e-12)
    assert "33 scored, 30 evaluated, 3 without labels" in text
    assert "in-sample" in text and "rsna_log_loss" in text
    # Same answer from the csv path and from the wide frame.
    assert evaluate_scores(out, csv)[0].equals(table)
    assert evaluate_scores(out, wide)[0].equals(table)


def test_evaluate_scores_without_any_labelled_study(tmp_path):
    wide = storage.read_csv(LABELS_CSV).head(3)
    with pytest.raises(ValueError, match="none of the 1 scored studies has labels"):
        evaluate_scores(many(["1"]), wide)
