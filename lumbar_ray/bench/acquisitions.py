"""`make bench-acquisitions` / ``python -m lumbar_ray.bench.acquisitions``: the measurement of
issue #15 item 4 — a benchmark, not a test.

One run: synthesize ``--train`` realistic training studies and a labelled holdout of
``--holdout`` studies twice, realistic and its ``--acquisitions simple`` twin (same seed, so the
same patients, study ids and labels; both as split "train" in roots of their own, because
:func:`lumbar_ray.outputs.evaluation.evaluate_scores` reads the labels from ``{root}/train.csv``);
train on Ray with demo-like sizes into a registry (or take ``--models``); score both holdouts with
the full path (:func:`lumbar_ray.scoring.pipeline.run_scoring`: detections -> crops ->
DeepScoreNet) and print, side by side, the RSNA score and its terms, the weighted prior of the
model card's training labels, realistic - simple, and the issue's targets with PASS/MISS; then the
axial slices per study before/after the reader change and the CV detector table of the model card.
Everything also goes to ``{workdir}/acquisitions.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from lumbar_ray import storage
from lumbar_ray.config import (
    DetectorConfig,
    ResourceConfig,
    ScoreConfig,
    ScorerConfig,
    TrainConfig,
    detector_job,
)
from lumbar_ray.dicom.errors import DEFAULT_LIMITS
from lumbar_ray.dicom.files import load_folder_slices
from lumbar_ray.dicom.read import list_studies, load_descriptions, read_study
from lumbar_ray.dicom.stacks import filter_localizers, split_stacks
from lumbar_ray.metrics.rsna import (
    ALL,
    ANY_SEVERE,
    baseline_predictions,
    rsna_score,
    weighted_prior_from_card,
)
from lumbar_ray.models.registry import ModelRegistry, parse_model_spec
from lumbar_ray.outputs.evaluation import evaluate_scores
from lumbar_ray.outputs.store import select_scores
from lumbar_ray.runtime import ray_session
from lumbar_ray.synth import writer as synth
from lumbar_ray.targets import AXIAL_T2, FAMILIES

# Issue #15, "Done when".
TWIN_GAP = 0.03  # realistic holdout within this of its simple twin
PRIOR_RATIO = 0.5  # realistic holdout at most this times the weighted prior
AXIAL_WITHIN_5MM_3D = 0.95  # axial detector: targets within 5 mm in 3-D (CV)
HOLDOUT_SEED_OFFSET = 1000  # holdout patients apart from the training ones (as the demo's test split)
# The reader before #15 never chose a stack smaller than this (read_study's min_slices default).
OLD_MIN_SLICES = 4
GROUPS = (*FAMILIES, ANY_SEVERE, ALL)


@dataclass
class AxialSlices:
    """Axial T2 slices of one study: on disk (localizers left out), kept by the reader before #15
    (the largest single-orientation stack of one Axial T2 folder), read now (every slice of every
    Axial T2 series) and run through the axial detector (scoring runs every series of the type)."""

    study_id: str
    on_disk: int
    before: int
    after: int
    detector: int


@dataclass
class Verdict:
    target: str
    value: float
    threshold: float
    met: bool

    def line(self) -> str:
        # A NaN value (nothing measured) is a MISS too: never a silent pass.
        return f"{'PASS' if self.met else 'MISS'}  {self.target}: {self.value:.4f} (target {self.threshold:.4f})"


def axial_slice_counts(root: str, study_id: str, split: str = "train", descriptions=None) -> AxialSlices:
    """:class:`AxialSlices` of one study of a data root."""
    descriptions = load_descriptions(root, split) if descriptions is None else descriptions
    if descriptions is None:  # the old reader's choice is per described folder: nothing to count without
        raise FileNotFoundError(f"{root}: no {split}_series_descriptions.csv; cannot tell the Axial T2 folders")
    own = descriptions[(descriptions["study_id"].astype(str) == str(study_id))
                       & (descriptions["series_description"] == AXIAL_T2)]
    on_disk, before = 0, 0
    for series_id in own["series_id"].astype(str):
        fs, folder = storage.filesystem_for(storage.join(root, f"{split}_images", str(study_id), series_id))
        slices, _, _ = load_folder_slices(fs, folder.rstrip("/"), DEFAULT_LIMITS)
        slices, _ = filter_localizers(slices)
        on_disk += len(slices)
        stacks = split_stacks(slices)  # without merge_slabs: the old reader's folder series was stacks[0]
        if stacks and len(stacks[0]) >= OLD_MIN_SLICES:
            before = max(before, len(stacks[0]))  # one series per type: the largest stack won
    study = read_study(root, str(study_id), split, descriptions)
    after = sum(s.n_slices for s in study.series_of_type(AXIAL_T2))
    return AxialSlices(str(study_id), on_disk, before, after, detector=after)


def slice_table(root: str, split: str = "train") -> pd.DataFrame:
    descriptions = load_descriptions(root, split)
    rows = [asdict(axial_slice_counts(root, sid, split, descriptions)) for sid in list_studies(root, split)]
    return pd.DataFrame(rows, columns=list(AxialSlices.__dataclass_fields__))


def format_slice_table(table: pd.DataFrame, name: str) -> str:
    total = table[["on_disk", "before", "after", "detector"]].sum()
    share = lambda n: f"{n / total['on_disk']:.0%}" if total["on_disk"] else "-"
    return (f"Axial T2 slices per study, {name} holdout (before = the old reader's largest single-orientation "
            f"stack; after = every slice of every Axial T2 series; detector = slices run through the axial "
            f"detector):\n{table.to_string(index=False)}\n"
            f"total: {total['on_disk']} on disk, before {total['before']} ({share(total['before'])}), "
            f"after {total['after']} ({share(total['after'])}), through the detector {total['detector']}")


def score_terms(table: pd.DataFrame, model: str) -> dict[str, float]:
    """{group: RSNA log loss} of one model of an :func:`evaluate_scores` table."""
    rows = table[table["model"] == model].set_index("group")["rsna_log_loss"]
    return {g: float(rows.get(g, float("nan"))) for g in GROUPS}


def weighted_prior_terms(priors: dict | None, labels: pd.DataFrame) -> dict[str, float]:
    """The RSNA terms of the card's weighted prior (fitted on the training labels, so out of
    sample) on the holdout's labels."""
    score = rsna_score(baseline_predictions(weighted_prior_from_card(priors), labels))
    return {**score.terms(), ALL: score.score}


def verdicts(realistic: float, simple: float, prior: float, axial_3d: float | None) -> list[Verdict]:
    out = [Verdict("|realistic - simple| RSNA score, within 0.03 of its simple twin", abs(realistic - simple),
                   TWIN_GAP, abs(realistic - simple) <= TWIN_GAP),
           Verdict("realistic RSNA score / weighted prior, <= 0.5x the weighted prior", realistic / prior,
                   PRIOR_RATIO, realistic / prior <= PRIOR_RATIO)]
    if axial_3d is not None:
        out.append(Verdict("axial detector CV within 5 mm in 3-D, >= 95 %", axial_3d, AXIAL_WITHIN_5MM_3D,
                           axial_3d >= AXIAL_WITHIN_5MM_3D))
    return out


def format_scores(terms: dict[str, dict[str, float]]) -> str:
    """Side by side: one column per holdout/baseline, one row per RSNA group, and realistic - simple."""
    frame = pd.DataFrame(terms).reindex(list(GROUPS))
    frame["realistic - simple"] = frame["realistic"] - frame["simple"]
    return frame.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")


def detector_cv_table(manifest: dict) -> pd.DataFrame:
    """The model card's out-of-fold detector table, all folds together (empty without one)."""
    rows = pd.DataFrame((manifest.get("metrics") or {}).get("detectors") or [])
    if rows.empty:
        return rows
    keep = [c for c in ("detector", "n_targets", "detected", "within_5mm", "within_5mm_3d", "within_10mm_3d")
            if c in rows]
    return rows[rows["fold"].astype(str) == "all"][keep].reset_index(drop=True)


def axial_within_5mm_3d(cv: pd.DataFrame) -> float | None:
    rows = cv[cv["detector"] == detector_job(AXIAL_T2)] if "detector" in cv else cv
    return float(rows["within_5mm_3d"].iloc[0]) if len(rows) and "within_5mm_3d" in rows else None


# ---------------------------------------------------------------------------------------------
# The run (Ray)
# ---------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lumbar_ray.bench.acquisitions", add_help=add_help,
        description="Issue #15 item 4: the same models on a realistic holdout and on its simple twin "
                    "(RSNA score, weighted prior, PASS/MISS), axial slices before/after, the CV detector table.")
    p.add_argument("--train", type=int, default=64, help="realistic training studies")
    p.add_argument("--holdout", type=int, default=30, help="labelled holdout studies (each twice)")
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", default="work/bench-acquisitions")
    p.add_argument("--models", default=None, help="REGISTRY[@version] to score with (default: train one under --workdir)")
    g = p.add_argument_group("training (without --models; defaults as the demo's)")
    g.add_argument("--folds", type=int, default=2)
    g.add_argument("--detector-epochs", type=int, default=30)
    g.add_argument("--scorer-epochs", type=int, default=10)
    g.add_argument("--imgsz", type=int, default=128)
    # Each detector validation round runs over every held-out study of the fold, so with 200
    # studies a round every 2nd epoch (DetectorConfig's default) costs more than the training.
    g.add_argument("--detector-val-every", type=int, default=5,
                   help="epochs between the detectors' validation rounds (each fold ships its best round)")
    p.add_argument("--synth-workers", type=int, default=2)
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local runtime)")
    p.add_argument("--num-cpus", type=int, default=None)
    return p


def ensure_data(root: Path, n: int, seed: int, size: str, acquisitions: str, workers: int,
                echo: Callable[[str], None]) -> str:
    """A labelled split "train" of ``n`` studies at ``root`` (kept for reuse; refused if it differs)."""
    if (root / "train.csv").exists():
        have = len(list_studies(str(root), "train"))
        if have != n:
            raise SystemExit(f"{root} holds {have} studies, not {n}: remove it or pass another --workdir")
        echo(f"[acq] reusing {n} {acquisitions} studies in {root}")
    else:
        echo(f"[acq] synthesizing {n} {acquisitions} studies (size {size}, seed {seed}) in {root}")
        synth.synthesize(str(root), n_studies=n, seed=seed, split="train", size=size, workers=workers,
                         acquisitions=acquisitions)
    return str(root)


def training_config(args: argparse.Namespace, train_root: str | None, registry_root: str) -> TrainConfig:
    """The CV run the bench trains when no ``--models`` is given: the flags, else the demo's sizes."""
    return TrainConfig(
        data=train_root, registry=registry_root, folds=args.folds, seed=args.seed, final_fit=False,
        scorer=ScorerConfig(epochs=args.scorer_epochs),
        detector=DetectorConfig(epochs=args.detector_epochs, imgsz=args.imgsz, val_every=args.detector_val_every),
        resources=ResourceConfig())


def ensure_models(args: argparse.Namespace, train_root: str | None, echo: Callable[[str], None]) -> str:
    """``--models``, else the champion of ``{workdir}/models`` (trained now if it has none)."""
    if args.models:
        return args.models
    # heavy: Ray Train/Tune; --models runs do without them
    from lumbar_ray.training.cv import run_training
    from lumbar_ray.training.promotion import champion_after_training

    registry = ModelRegistry(str(Path(args.workdir).resolve() / "models"))
    if registry.champion() is None:
        cfg = training_config(args, train_root, registry.root)
        echo(f"[acq] training {', '.join(cfg.jobs())} with {cfg.folds}-fold CV on Ray")
        outcome = run_training(cfg, echo=echo)
        echo(outcome.report)
        champion_after_training(registry, outcome.version, pinned=False)
    echo(f"[acq] scoring with the champion of {registry.root}: {registry.champion()['version']}")
    return f"{registry.root}@{registry.champion()['version']}"


def score_holdout(root: str, models: str, out: Path, echo: Callable[[str], None]) -> tuple[pd.DataFrame, dict]:
    # heavy: Ray Data
    from lumbar_ray.scoring.pipeline import run_scoring

    summary = run_scoring(ScoreConfig(input=root, models=models, out=str(out), split="train"), echo=echo)
    table, text = evaluate_scores(str(out), root, model_version=summary.model_version)
    echo(text)
    # Targets without a detection get the prior: a twin gap near 0 means little when few are detected.
    detected = float(select_scores(str(out), summary.model_version)["detected"].mean())
    return table, {"n_scored": summary.n_scored, "n_failed": summary.n_failed, "n_with_errors": summary.n_with_errors,
                   "seconds": summary.seconds, "detected_share": detected}


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    command = "python -m lumbar_ray.bench.acquisitions " + shlex.join(sys.argv[1:])
    work = Path(args.workdir).resolve()
    t0 = time.time()
    # With --models nothing is trained: no training studies needed.
    train = None if args.models else ensure_data(work / "train", args.train, args.seed, args.size, "realistic",
                                                  args.synth_workers, echo)
    holdouts = {kind: ensure_data(work / f"holdout-{kind}", args.holdout, args.seed + HOLDOUT_SEED_OFFSET, args.size,
                                  kind, args.synth_workers, echo) for kind in ("realistic", "simple")}
    with ray_session(address=args.address, num_cpus=args.num_cpus):
        models = ensure_models(args, train, echo)
        reg_root, version = parse_model_spec(models)
        registry = ModelRegistry(reg_root)
        version = registry.resolve(version)
        runs = {kind: score_holdout(root, f"{reg_root}@{version}", work / "scores" / version / kind, echo)
                for kind, root in holdouts.items()}
    manifest = registry.manifest(version)
    terms = {kind: score_terms(table, version) for kind, (table, _) in runs.items()}
    labels = pd.read_csv(Path(holdouts["realistic"]) / "train.csv")
    terms["weighted prior"] = weighted_prior_terms(manifest.get("priors"), labels)
    cv = detector_cv_table(manifest)
    checks = verdicts(terms["realistic"][ALL], terms["simple"][ALL], terms["weighted prior"][ALL],
                      axial_within_5mm_3d(cv))
    slices = {kind: slice_table(root) for kind, root in holdouts.items()}

    echo(f"\n=== #15 item 4: model {version}, {args.train} training / {args.holdout} holdout studies "
         f"({args.size}) ===\nRSNA log loss (lower is better; weighted prior = the model card's training priors, "
         f"weighted, on the holdout labels):\n{format_scores(terms)}\n")
    echo("targets detected (the rest scored from the prior): "
         + ", ".join(f"{k} {r['detected_share']:.0%}" for k, (_, r) in runs.items()))
    for v in checks:
        echo(v.line())
    for kind, table in slices.items():
        echo("\n" + format_slice_table(table, kind))
    echo("\nCV detector table of the model card (all folds; *_3d: within 5/10 mm of the labelled point in 3-D):\n"
         + (cv.to_string(index=False, float_format=lambda v: f"{v:.3f}") if not cv.empty else "(none in the card)"))
    out = work / "acquisitions.json"
    out.write_text(json.dumps({
        "command": command, "models": f"{reg_root}@{version}", "train_studies": args.train,
        "holdout_studies": args.holdout, "size": args.size, "seed": args.seed, "seconds": time.time() - t0,
        "rsna": terms, "runs": {k: r for k, (_, r) in runs.items()},
        "verdicts": [asdict(v) for v in checks],
        "axial_slices": {k: t.to_dict(orient="records") for k, t in slices.items()},
        "detector_cv": cv.to_dict(orient="records"),
    }, indent=2, default=str))
    echo(f"\n[acq] wrote {out} ({time.time() - t0:.0f} s). Command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
