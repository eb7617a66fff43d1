"""Predictions scored against ``train.csv`` labels: the RSNA metric and more, beside two baselines."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa

from lumbar_ray import storage
from lumbar_ray.metrics import rsna as metrics
from lumbar_ray.metrics.calibration import expected_calibration_error
from lumbar_ray.outputs.store import normalised_probabilities, select_scores
from lumbar_ray.targets import PROBABILITY_COLUMNS

__all__ = ["evaluate_scores"]

_PROBS = list(PROBABILITY_COLUMNS)


def _read_wide_labels(labels: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if isinstance(labels, pd.DataFrame):
        return labels, "the given labels"
    text = os.fspath(labels)
    path = text if text.lower().endswith((".csv", ".csv.gz")) else storage.join(text, "train.csv")
    return storage.read_csv(path), path


def evaluate_scores(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    labels_csv_or_root: str | os.PathLike | pd.DataFrame,
    model_version: str | None = None,
) -> tuple[pd.DataFrame, str]:
    """Score predictions against ``train.csv`` labels: the competition metric next to accuracy,
    balanced accuracy and per-class recall, for the model and two baselines.

    ``labels_csv_or_root``: a ``train.csv`` path (``.csv``/``.csv.gz``), a data root holding
    ``train.csv``, or the wide frame itself. Predictions are renormalised as in the Kaggle export
    and joined to the labels on (study, target); scored studies without labels are ignored (and
    counted in the text); missing labels (-1) are left out by the metric as on Kaggle.

    Baselines: ``majority`` and ``prior`` (:func:`lumbar_ray.metrics.rsna.majority_baseline` /
    :func:`~lumbar_ray.metrics.rsna.prior_baseline`) are fitted on the labels of the *evaluated
    studies themselves* — in-sample, so they see the answers and are favoured: a model that beats
    them here beats any honest constant predictor.

    Returns (:func:`lumbar_ray.metrics.rsna.metric_table` frame with model rows named after the model
    version, text = a header plus :func:`~lumbar_ray.metrics.rsna.format_metric_table`).
    """
    frame = select_scores(scores, model_version)
    if frame.empty:
        raise ValueError("no predictions to evaluate")
    version = model_version
    if version is None and "model_version" in frame.columns and frame["model_version"].nunique() == 1:
        version = str(frame["model_version"].iloc[0])
    wide, source = _read_wide_labels(labels_csv_or_root)
    long = metrics.long_labels(wide)
    long["study_id"] = long["study_id"].astype(str)
    probs = normalised_probabilities(frame)
    predicted = pd.DataFrame({"study_id": frame["study_id"].to_numpy(), "column": frame["column"].to_numpy()})
    predicted[_PROBS] = probs
    model_frame = predicted.merge(long, on=["study_id", "column"], how="inner")[metrics.PREDICTION_COLUMNS]
    scored = set(frame["study_id"])
    evaluated = set(model_frame["study_id"])
    unlabelled = scored - evaluated
    if not evaluated:
        raise ValueError(f"none of the {len(scored)} scored studies has labels in {source}")
    fit_on = long[long["study_id"].isin(evaluated)]
    rows = model_frame[metrics.LABEL_COLUMNS]
    name = version or "model"
    table = metrics.metric_table({
        name: model_frame,
        "majority": rows.join(metrics.majority_baseline(fit_on)[_PROBS], on="column"),
        "prior": rows.join(metrics.prior_baseline(fit_on)[_PROBS], on="column"),
    })
    labelled = model_frame[model_frame["label"] >= 0]
    n_labelled_rows = len(labelled)
    ece = expected_calibration_error(labelled[_PROBS].to_numpy(), labelled["label"].to_numpy())
    header = [
        f"model version: {name}",
        f"labels: {source}",
        f"studies: {len(scored)} scored, {len(evaluated)} evaluated, {len(unlabelled)} without labels (ignored)",
        f"rows: {len(model_frame)} joined, {n_labelled_rows} labelled",
        "baselines majority/prior are fitted in-sample on the evaluated studies' labels (favours the baselines)",
        "rsna_log_loss: lower is better; group 'all' is the competition score",
        f"expected calibration error (top label, 10 bins) of {name}: {ece:.4f} "
        "(the model card's 'calibration' holds its out-of-fold value before and after calibration)",
        "the version's own out-of-fold estimate of these figures, end to end as scored here: "
        "lumbar-ray evaluate --models REGISTRY@VERSION (its first line; the labelled-point figure there is a diagnostic)",
    ]
    text = "\n".join(header) + "\n\n" + metrics.format_metric_table(table)
    return table, text
