"""`lumbar-ray` command line: one sub-command per stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

# Each command imports what it runs inside its own body, never here: `lumbar-ray --help` (and
# every command's --help) then loads only typer, not torch, Ray, pydicom or pyarrow.

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def synth(
    out: str = typer.Option(..., help="Output root (local folder or fsspec URL)."),
    studies: int = typer.Option(20, min=1, help="Number of studies."),
    seed: int = typer.Option(0, help="Random seed: same seed, same bytes."),
    split: str = typer.Option("train", help="train (images + labels) or test (images only)."),
    size: str = typer.Option("full", help="full (realistic sizes) or small (tests, demo)."),
    labels_csv: Optional[str] = typer.Option(None, help="train.csv to draw severity vectors from (default: the embedded real RSNA labels)."),
    workers: int = typer.Option(1, min=1, help="Processes."),
    acquisitions: str = typer.Option("realistic", help="realistic (angled axial slabs, split axial, repeated sagittal, "
                                     "missing slices, oblique planes in a share of studies) or simple (one plain stack per type)."),
    contact_sheet: Optional[Path] = typer.Option(None, help="Also write a PNG contact sheet of the first study here."),
    verbose: bool = False,
) -> None:
    """Write synthetic RSNA-layout studies whose anatomy shows their labels."""
    _logging(verbose)
    from lumbar_ray.synth import writer as synth_mod
    from lumbar_ray.synth.contact_sheet import write_contact_sheet

    if split not in ("train", "test"):
        raise typer.BadParameter("split must be 'train' or 'test'")
    if acquisitions not in ("realistic", "simple"):
        raise typer.BadParameter("acquisitions must be 'realistic' or 'simple'")
    summary = synth_mod.synthesize(out, n_studies=studies, seed=seed, split=split, size=size,
                                   labels_csv=labels_csv, workers=workers, acquisitions=acquisitions)
    typer.echo(f"wrote {summary.n_studies} {split} studies ({summary.n_series} series, {summary.n_images} images, "
               f"{summary.n_coordinates} labelled points) to {out} in {summary.seconds:.1f} s")
    if contact_sheet is not None:
        study_ids = synth_mod.study_ids_of(summary)
        png = write_contact_sheet(out, study_ids[0], contact_sheet, split=split)
        typer.echo(f"contact sheet: {png}")


@app.command("contact-sheet")
def contact_sheet_cmd(
    data: str = typer.Option(..., help="Data root."),
    study: str = typer.Option(..., help="Study id."),
    to: Path = typer.Option(..., help="PNG path."),
    split: str = "train",
) -> None:
    """Draw a study's three series with its labelled points (PNG)."""
    from lumbar_ray.synth.contact_sheet import write_contact_sheet

    typer.echo(str(write_contact_sheet(data, study, to, split=split)))


@app.command()
def inspect(
    data: str = typer.Option(..., help="Data root (local or fsspec URL)."),
    study: str = typer.Option(..., help="Study id."),
    split: str = "train",
) -> None:
    """Read one study and print its series geometry and any skipped files (JSON)."""
    from lumbar_ray.dicom.read import read_study

    study_obj = read_study(data, study, split=split)
    report = {
        "study_id": str(study_obj.study_id),
        "series": {kind: _series_report(s) for kind, s in study_obj.series.items()},
        "other_series": [_series_report(s) for s in study_obj.other_series],
        "skipped": [{"path": str(f.path), "reason": f.reason, "error_type": f.error_type} for f in study_obj.skipped],
    }
    typer.echo(json.dumps(report, indent=2))


def _series_report(s) -> dict:
    """What ``inspect`` shows of one series read: every instance, and how many slice orientations
    (tilted per-level slabs read as one series have several)."""
    return {
        "series_id": str(s.series_id),
        "series_type": s.series_type,
        "description": s.description,
        "plane": s.plane,
        "shape": list(s.volume.shape),
        "pixel_spacing_mm": [float(v) for v in s.pixel_spacing],
        "slice_spacing_mm": float(s.slice_spacing),
        "orientations": 1 if s.orientations is None else len({tuple(o) for o in s.orientations.round(3)}),
        "instances": [int(i) for i in s.instance_numbers],
    }


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Cross-validated training on Ray -> a registry version (same flags as jobs/train.py; --help lists them)."""
    from lumbar_ray.training.job import run

    raise typer.Exit(run(list(ctx.args)))


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def score(ctx: typer.Context) -> None:
    """Bulk scoring on Ray Data -> Parquet (same flags as jobs/score.py; --help lists them)."""
    from lumbar_ray.scoring.job import run

    raise typer.Exit(run(list(ctx.args)))


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def retrain(ctx: typer.Context) -> None:
    """Train a challenger and promote it only if it beats the champion (same flags as jobs/retrain.py)."""
    from lumbar_ray.training.retrain_job import run

    raise typer.Exit(run(list(ctx.args)))


@app.command()
def champion(
    registry: str = typer.Option(..., help="Model registry (local dir or s3://…)."),
    set_version: Optional[str] = typer.Option(None, "--set", help="Pin this version as champion (promote or roll back)."),
    reason: str = typer.Option("set by an operator", help="Recorded with the pointer."),
) -> None:
    """Show the champion, the versions and the recorded decisions; --set pins or rolls back
    (under the promotion lock, recorded as a decision). Exit 3: lock held; 4: unknown version."""
    from lumbar_ray.models.registry import ModelRegistry
    from lumbar_ray.runtime import report_expected
    from lumbar_ray.training.promotion import decisions, pin_champion

    reg = ModelRegistry(registry)
    if set_version:
        try:
            decision = pin_champion(reg, set_version, reason=reason, by="champion --set")
        except Exception as exc:
            code = report_expected(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None
        typer.echo(f"champion -> {decision.challenger} ({decision.reason}; was {decision.champion})")
        return
    typer.echo(json.dumps({"champion": reg.champion(), "versions": reg.versions(), "decisions": decisions(reg)},
                          indent=2, default=str))


@app.command("export-kaggle")
def export_kaggle_cmd(
    scores: str = typer.Option(..., help="Scoring output root."),
    to: Path = typer.Option(..., help="submission.csv to write."),
    model_version: Optional[str] = typer.Option(None, help="Which model version's rows (needed when several)."),
    data: Optional[str] = typer.Option(None, help="Data root: the submission is every study of --split there."),
    split: str = typer.Option("test", help="With --data: which split's studies."),
    fill_prior: bool = typer.Option(False, "--fill-prior", help="Give the rows of failed or missing studies the "
                                    "weighted prior (counted on stderr) instead of refusing."),
    models: Optional[str] = typer.Option(None, help="With --fill-prior: the registry whose model card holds the "
                                         "version's priors (default: the uniform prior, weighted)."),
) -> None:
    """Write the exact Kaggle submission: row_id,normal_mild,moderate,severe; 25 rows a study.
    Refuses (exit 6) when a study lacks rows, unless --fill-prior."""
    from lumbar_ray.dicom.errors import DicomReadError
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.errors import EXIT_DATA, EXIT_USAGE, UserError, exit_code_of
    from lumbar_ray.outputs.kaggle import write_submission

    try:
        studies = list_studies(data, split=split) if data is not None else None
        result = write_submission(scores, str(to), model_version=model_version, studies=studies,
                                  fill_prior=fill_prior, registry=models)
    except (UserError, ValueError, DicomReadError) as exc:  # the user's to fix: one line, no traceback
        typer.echo(f"error: {exc}", err=True)
        # incomplete (6) and registry (4) errors carry their code; a bad --data is a data error,
        # any other ValueError here one of the arguments (a version or study not in the output)
        raise typer.Exit(exit_code_of(exc) or (EXIT_DATA if isinstance(exc, DicomReadError) else EXIT_USAGE)) from None
    if result.filled_rows:
        typer.echo(f"filled {result.filled_rows} rows of {len(result.filled_studies)} studies with "
                   f"{result.prior_source}", err=True)
    typer.echo(f"wrote {len(result.submission)} rows ({result.n_studies} studies) to {to}")


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL over the views `predictions`, `errors`, `studies` (the worklist) and `series` (the catalog)."),
    scores: str = typer.Option(..., help="Scoring output root."),
    csv: bool = typer.Option(False, help="Print CSV instead of a table."),
) -> None:
    """Run SQL (DuckDB) over the scoring outputs."""
    from lumbar_ray.outputs.query import query as run_query

    frame = run_query(scores, sql)
    typer.echo(frame.to_csv(index=False) if csv else frame.to_string(index=False))


@app.command()
def evaluate(
    scores: Optional[str] = typer.Option(None, help="Scoring output root to evaluate against --labels."),
    labels: Optional[str] = typer.Option(None, help="train.csv (or a data root holding it)."),
    models: Optional[str] = typer.Option(None, help="REGISTRY[@version]: print that version's cross-validation table."),
    model_version: Optional[str] = typer.Option(None, help="With --scores: which model version's rows."),
) -> None:
    """Metric tables: scored outputs vs labels, or a registry version's out-of-fold CV results."""
    if models:
        from lumbar_ray.models.registry import ModelRegistry, parse_model_spec

        root, version = parse_model_spec(models)
        registry = ModelRegistry(root)
        version = registry.resolve(version or "latest" if registry.champion() is None else version)
        with registry.fs.open(registry.version_path(version, "cv_report.txt"), "rb") as handle:
            typer.echo(handle.read().decode())
        return
    if not (scores and labels):
        raise typer.BadParameter("give --scores and --labels, or --models")
    from lumbar_ray.outputs.evaluation import evaluate_scores

    _, text = evaluate_scores(scores, labels, model_version=model_version)
    typer.echo(text)


_STUDY_WORKERS_HELP = "Studies read at once (threads; default 4): hides a PACS's or bucket's latency."


def _study_workers(workers: int | None) -> dict:
    # The default lives in lumbar_ray.outputs.parallel, which --help does not import.
    return {} if workers is None else {"workers": workers}


@app.command()
def report(
    scores: str = typer.Option(..., help="Scoring output root."),
    data: str = typer.Option(..., help="Data root the studies were scored from (for the overlays)."),
    to: str = typer.Option(..., help="Folder (or fsspec URL) for index.html, the study pages and their PNGs."),
    study: Optional[list[str]] = typer.Option(None, help="Only this study (repeatable); default every scored study."),
    split: str = "test",
    model_version: Optional[str] = typer.Option(None, help="Which model version's rows (needed when several)."),
    workers: Optional[int] = typer.Option(None, min=1, help=_STUDY_WORKERS_HELP),
) -> None:
    """HTML review: index.html (the worklist, highest priority first) and a page per study with its
    25 findings, flags and overlays (one PNG per series); self-contained, opens offline."""
    from lumbar_ray.errors import EXIT_USAGE, UserError, exit_code_of
    from lumbar_ray.outputs.html_report import write_html_report

    try:
        result = write_html_report(scores, data, to, split=split, model_version=model_version, studies=study,
                                   **_study_workers(workers))
    except (UserError, ValueError) as exc:  # a version or study not in the output: one line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_code_of(exc) or EXIT_USAGE) from None
    for page in result.pages:
        if study:  # the studies asked for by name: where each file went, as before
            typer.echo(page.path)
            for png in page.overlays:
                typer.echo(png)
        if page.overlay_note:
            typer.echo(f"study {page.study_id}: overlays not drawn: {page.overlay_note}", err=True)
    typer.echo(f"wrote {result.index} ({len(result.pages)} study pages, {len(result.without_overlays)} without overlays)")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("work/demo"), help="Where the demo writes data and outputs."),
    studies: int = typer.Option(6, min=1, help="Test studies to score."),
    seed: int = 7,
) -> None:
    """Run the main job on the embedded default (synthetic studies) and print where things went."""
    _logging(False)
    from lumbar_ray.demo import run_demo

    run_demo(workdir=workdir, studies=studies, seed=seed, echo=typer.echo)


@app.command()
def worklist(
    scores: str = typer.Option(..., help="Scoring output root."),
    top: Optional[int] = typer.Option(None, min=1, help="Only the N studies of highest priority."),
    model_version: Optional[str] = typer.Option(None, help="Which model version's studies (needed when several)."),
    csv: bool = typer.Option(False, help="Print CSV (every column) instead of one line per study."),
) -> None:
    """The scored studies by priority, highest first (expected severity weighted as the metric
    weights it), with worst grades and review flags; failed studies are counted on stderr."""
    from lumbar_ray.errors import EXIT_USAGE, UserError, exit_code_of
    from lumbar_ray.outputs.worklist import failed_studies, format_worklist, read_worklist

    try:
        frame = read_worklist(scores, model_version=model_version)
        failed = failed_studies(scores, model_version=model_version)
    except (UserError, ValueError) as exc:  # the user's to fix (several versions, storage down): one line
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_code_of(exc) or EXIT_USAGE) from None
    if frame.empty:
        typer.echo(f"no scored studies under {scores}", err=True)
    shown = frame.head(top) if top is not None else frame
    typer.echo(shown.to_csv(index=False) if csv else format_worklist(shown), nl=not csv)
    if failed:  # not on the worklist (nothing was graded), but never silently left off
        typer.echo(f"{len(failed)} studies failed and are not listed (see the errors table): "
                   f"{', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}", err=True)


@app.command("export-sr")
def export_sr_cmd(
    scores: str = typer.Option(..., help="Scoring output root."),
    data: str = typer.Option(..., help="Data root the studies were scored from (local, s3://, dicomweb://)."),
    to: str = typer.Option(..., help="Folder (or fsspec URL) for {study_id}.dcm, or dicomweb://HOST:PORT/PATH "
                           "to store the SRs there (STOW-RS)."),
    split: str = typer.Option("test", help="Which split's images the rows point at."),
    model_version: Optional[str] = typer.Option(None, help="Which model version's rows (needed when several)."),
    study: Optional[list[str]] = typer.Option(None, help="Only this study (repeatable); default every scored study."),
    workers: Optional[int] = typer.Option(None, min=1, help=_STUDY_WORKERS_HELP),
) -> None:
    """One DICOM Structured Report per study (TID 1500): the 25 findings with grade, probabilities
    and the point on the source image; patient and study identifiers from the source study.
    Studies without an SR are named on stderr (exit 5; 7 when storage alone kept them from being read)."""
    from lumbar_ray.errors import EXIT_DATA, EXIT_TRANSIENT, EXIT_USAGE, UserError, exit_code_of
    from lumbar_ray.outputs.sr import SRExport, built_srs, export_srs, study_srs

    try:
        if to.startswith(("dicomweb://", "dicomwebs://")):
            from lumbar_ray.dicomweb import store_instances  # optional: only for a PACS target

            result = SRExport()
            items = built_srs(study_srs(scores, data, split=split, model_version=model_version, studies=study,
                                        **_study_workers(workers)), result)
            stored = store_instances(to, (item.dataset for item in items))
            done = f"stored {stored} SRs in {to}"
        else:
            result = export_srs(scores, data, to, split=split, model_version=model_version, studies=study,
                                **_study_workers(workers))
            done = f"wrote {len(result.written)} SRs to {to}"
    except (UserError, ValueError) as exc:  # the user's to fix: one line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_code_of(exc) or EXIT_USAGE) from None
    for reason in result.failed.values():
        typer.echo(f"error: {reason}", err=True)
    typer.echo(done + (f"; {len(result.failed)} studies without an SR (named above)" if result.failed else ""))
    if result.failed:
        # transient only when every failure was: a rerun then does the rest
        raise typer.Exit(EXIT_TRANSIENT if len(result.transient) == len(result.failed) else EXIT_DATA)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
