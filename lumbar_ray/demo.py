"""`make demo`: the main job end to end on the embedded default (synthetic studies).

synthesize train + test splits -> cross-validated training on Ray (small) -> registry version
(champion) -> bulk scoring of the test split on Ray Data -> metrics, a sample query, an overlay.
Every step prints what it did and where it wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lumbar_ray.config import DetectorConfig, ResourceConfig, ScoreConfig, ScorerConfig, TrainConfig
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.outputs.overlays import write_study_report
from lumbar_ray.outputs.query import query
from lumbar_ray.runtime import ray_session
from lumbar_ray.scoring.pipeline import run_scoring
from lumbar_ray.synth import writer as synth
from lumbar_ray.synth.contact_sheet import write_contact_sheet
from lumbar_ray.training.cv import run_training


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
    overlays = show_outputs(data, scores, workdir / "report", step, echo)
    step(f"scored {summary.n_scored} studies at {summary.studies_per_s:.2f} studies/s; outputs:")
    echo(f"  predictions: {scores / 'predictions'}")
    echo(f"  errors:      {scores / 'errors'}")
    for png in overlays:
        echo(f"  overlay:     {png}")
    step("done")
    return {"data": data, "registry": registry, "scores": scores, "overlays": overlays, "summary": summary}


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
                                warmup_epochs=sizes.detector_warmup_epochs),
        resources=ResourceConfig(),
    )
    step(f"training {', '.join(cfg.jobs())} with {cfg.folds}-fold CV on Ray (folds in parallel)")
    outcome = run_training(cfg, echo=lambda m: step(m))
    echo(outcome.report)
    reg.set_champion(outcome.version, reason="demo")
    step(f"registry version {outcome.version} is the champion: {registry}/versions/{outcome.version}")


def show_outputs(data: Path, scores: Path, report_dir: Path, step: Callable[[str], None],
                 echo: Callable[[str], None]) -> list:
    """Print a sample query over the outputs; draw the overlays of the first scored study."""
    table = query(str(scores), "SELECT condition, "
                               "round(avg(severe), 3) AS mean_p_severe, "
                               "sum(CASE WHEN detected THEN 1 ELSE 0 END) AS detected, count(*) AS n "
                               "FROM predictions GROUP BY condition ORDER BY condition")
    step("sample query (DuckDB over the Parquet outputs):")
    echo(table.to_string(index=False))
    first_study = str(query(str(scores), "SELECT min(study_id) AS s FROM predictions")["s"].iloc[0])
    return write_study_report(str(scores), str(data), first_study, report_dir, split="test")
