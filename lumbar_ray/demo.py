"""`make demo`: the main job end to end on the embedded default (synthetic studies).

synthesize train + test splits -> cross-validated training on Ray (small) -> registry version
(champion) -> bulk scoring of the test split on Ray Data -> a sample query, the worklist, DICOM
SRs (one study's re-read and checked against its Parquet rows) and the HTML review.
Every step prints what it did and where it wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lumbar_ray.config import DetectorConfig, ResourceConfig, ScoreConfig, ScorerConfig, TrainConfig
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.outputs.html_report import write_html_report
from lumbar_ray.outputs.query import query
from lumbar_ray.outputs.sr import export_srs, read_sr_findings
from lumbar_ray.outputs.store import select_scores
from lumbar_ray.outputs.worklist import format_worklist, read_worklist
from lumbar_ray.runtime import ray_session
from lumbar_ray.scoring.pipeline import run_scoring
from lumbar_ray.synth import writer as synth
from lumbar_ray.synth.contact_sheet import write_contact_sheet
from lumbar_ray.training.cv import run_training
from lumbar_ray.training.cv_metrics import headline_line
from lumbar_ray.training.promotion import pin_champion


@dataclass
class DemoSizes:
    # Sized so the detectors find something: YOLOv8n trained from scratch finds almost nothing
    # with fewer than a few dozen studies per fold or fewer epochs
    # (docs/experiments/demo_detector_ab.py). Hence 64 studies (32 per fold) and 30 epochs.
    train_studies: int = 64
    test_studies: int = 6
    folds: int = 2
    detector_epochs: int = 30
    scorer_epochs: int = 10
    imgsz: int = 128
    # The full recipe (2 neighbouring negatives per series, 3-epoch warm-up), as in real runs.
    detector_negatives: int = 2
    detector_warmup_epochs: float = 3.0
    # A validation round runs each fold's detector over its 32 held-out studies: every 5th epoch
    # (6 rounds) keeps the best-epoch choice without doubling the demo's training time.
    detector_val_every: int = 5


def run_demo(workdir: Path, studies: int | None = None, seed: int = 7, echo: Callable[[str], None] = print,
             sizes: DemoSizes | None = None) -> dict:
    sizes = sizes or DemoSizes()
    if studies is not None:
        sizes.test_studies = studies
    workdir = Path(workdir).resolve()
    data = workdir / "data"
    registry = workdir / "models"
    scores = workdir / "scores"
    t0 = time.time()

    def step(msg: str) -> None:
        echo(f"[demo +{time.time() - t0:6.1f}s] {msg}")

    synthesize_data(data, workdir / "contact_sheet.png", sizes, seed, step)
    with ray_session(num_cpus=None):
        ensure_champion(data, registry, sizes, seed, step, echo)
        step("scoring the test split on Ray Data (read -> detector actors -> DeepScoreNet actors -> Parquet)")
        summary = run_scoring(ScoreConfig(input=str(data), models=str(registry), out=str(scores), split="test",
                                          flush_studies=4), echo=lambda m: step(m))
    show_outputs(scores, step, echo)
    srs = export_and_check_srs(data, scores, workdir / "sr", step)
    review = write_html_report(str(scores), str(data), str(workdir / "review"), split="test")
    step(f"scored {summary.n_scored} studies at {summary.studies_per_s:.2f} studies/s; outputs:")
    echo(f"  predictions: {scores / 'predictions'}")
    echo(f"  errors:      {scores / 'errors'}")
    echo(f"  worklist:    {scores / 'studies'}  (lumbar-ray worklist --scores {scores})")
    echo(f"  series:      {scores / 'series'}")
    echo(f"  DICOM SRs:   {workdir / 'sr'}  ({len(srs)} studies)")
    echo(f"  HTML review: {review.index}")
    step("done")
    return {"data": data, "registry": registry, "scores": scores, "srs": srs, "review": review, "summary": summary}


def synthesize_data(data: Path, contact_sheet: Path, sizes: DemoSizes, seed: int,
                    step: Callable[[str], None]) -> None:
    """The train and test splits (unless already there) and a contact sheet of a training study."""
    step(f"synthesizing {sizes.train_studies} train + {sizes.test_studies} test studies (small size) in {data}")
    if not (data / "train.csv").exists():
        synth.synthesize(str(data), n_studies=sizes.train_studies, seed=seed, split="train", size="small")
    if not (data / "test_series_descriptions.csv").exists():
        synth.synthesize(str(data), n_studies=sizes.test_studies, seed=seed + 1000, split="test", size="small")
    sheet = write_contact_sheet(str(data), synth.list_study_ids(str(data), "train")[0], contact_sheet, split="train")
    step(f"contact sheet of a training study: {sheet}")


def ensure_champion(data: Path, registry: Path, sizes: DemoSizes, seed: int, step: Callable[[str], None],
                    echo: Callable[[str], None]) -> None:
    """Train and promote a champion on Ray, unless the registry already has one."""
    reg = ModelRegistry(str(registry))
    if reg.champion() is not None:
        step(f"reusing champion {reg.champion()['version']} from {registry}")
        return
    cfg = TrainConfig(
        data=str(data), registry=str(registry), folds=sizes.folds, seed=seed, final_fit=False,
        scorer=ScorerConfig(epochs=sizes.scorer_epochs),
        detector=DetectorConfig(epochs=sizes.detector_epochs, imgsz=sizes.imgsz, negatives=sizes.detector_negatives,
                                warmup_epochs=sizes.detector_warmup_epochs, val_every=sizes.detector_val_every),
        resources=ResourceConfig(),
    )
    step(f"training {', '.join(cfg.jobs())} with {cfg.folds}-fold CV on Ray (folds in parallel)")
    outcome = run_training(cfg, echo=lambda m: step(m))
    echo(outcome.report)
    # the end-to-end figure first (or why there is none), the labelled-point one named a diagnostic
    step(outcome.headline or headline_line(outcome.metric_table))
    pin_champion(reg, outcome.version, reason="demo", by="demo")  # through the promotion lock, and recorded
    step(f"registry version {outcome.version} is the champion: {registry}/versions/{outcome.version}")


def show_outputs(scores: Path, step: Callable[[str], None], echo: Callable[[str], None]) -> None:
    """Print a sample query over the outputs and the worklist."""
    table = query(str(scores), "SELECT condition, "
                               "round(avg(severe), 3) AS mean_p_severe, "
                               "sum(CASE WHEN detected THEN 1 ELSE 0 END) AS detected, count(*) AS n "
                               "FROM predictions GROUP BY condition ORDER BY condition")
    step("sample query (DuckDB over the Parquet outputs):")
    echo(table.to_string(index=False))
    step("worklist (highest priority first):")
    echo(format_worklist(read_worklist(str(scores))))


def export_and_check_srs(data: Path, scores: Path, to: Path, step: Callable[[str], None]) -> list[str]:
    """One DICOM SR per scored study; the first one re-read with highdicom must hold its
    study's 25 Parquet rows (grade and probabilities), else the demo fails."""
    result = export_srs(str(scores), str(data), str(to), split="test")
    if result.failed or not result.written:
        raise RuntimeError(f"SR export failed for {result.failed or 'every study'}")
    findings = read_sr_findings(result.written[0])
    study_id = Path(result.written[0]).stem
    scored = select_scores(str(scores))
    rows = scored[scored["study_id"].astype(str) == study_id].set_index("column")
    probs = ["normal_mild", "moderate", "severe"]
    expected = rows.loc[findings["column"], probs].to_numpy(dtype=float)
    if len(findings) != 25 or not np.allclose(findings[probs].to_numpy(dtype=float), expected):
        raise RuntimeError(f"the SR of study {study_id} does not hold its 25 Parquet rows")
    step(f"wrote {len(result.written)} DICOM SRs; re-read {Path(result.written[0]).name} with highdicom: "
         f"25 findings equal to its Parquet rows")
    return result.written
