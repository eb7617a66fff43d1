"""Thousands of studies through `ray job submit`, killed half-way and resubmitted — an experiment,
not a test (the tests do the same on a few studies).

What it checks at a scale the tests cannot afford on 2 cores:
  * a head started like the README's (`ray start --head`, here on free ports in a private temp
    dir, always stopped), one `ray job submit ... python jobs/score.py` over every study;
  * the job's driver is SIGKILLed once ``--kill-at`` studies are in the output (a crash, not a
    polite `ray job stop`), then the same command is submitted again;
  * afterwards every study is in the output exactly once (25 rows, unique row ids) or in errors;
  * memory of every process of the head, sampled each second: the summed RSS, the job driver's,
    and the largest actor's, early in each run against late in it;
  * `lumbar-ray query` and `export-kaggle` over the whole output, timed.

    python docs/experiments/scale_run.py --data work/scale/test-small-seed5-n2000 \
        --models work/bench/models-imgsz128-seed3 --out work/scale/out --kill-at 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's head helper: free ports, always stopped

import psutil  # noqa: E402
from raycluster import _get_json, start_ray_head  # noqa: E402

from lumbar_ray.dicom.read import list_studies  # noqa: E402
from lumbar_ray.outputs.store import part_paths, read_errors, read_predictions  # noqa: E402
from lumbar_ray.targets import TARGETS  # noqa: E402


class Sampler(threading.Thread):
    """Each ``interval_s``: summed RSS of the head's processes, the job driver's RSS, the largest
    actor's RSS; kept as rows (t, total_mb, driver_mb, max_actor_mb)."""

    def __init__(self, head, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.head, self.interval_s, self.rows, self.stop_flag = head, interval_s, [], threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop_flag.is_set():
            total = driver = actor = 0.0
            for pid in self.head.processes():
                try:
                    proc = psutil.Process(pid)
                    rss = proc.memory_info().rss / 2**20
                    cmd = " ".join(proc.cmdline())
                except (psutil.Error, OSError):
                    continue
                total += rss
                if "jobs/score.py" in cmd and "ray::" not in cmd and "ray job" not in cmd:
                    driver = max(driver, rss)
                if cmd.startswith("ray::MapWorker"):
                    actor = max(actor, rss)
            self.rows.append((time.monotonic() - t0, total, driver, actor))
            self.stop_flag.wait(self.interval_s)


def studies_written(out: Path) -> int:
    """Studies in the output so far, from the part files' Parquet metadata (cheap)."""
    import pyarrow.parquet as pq

    rows = 0
    for path in part_paths(out):
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - a part being renamed into place
            continue
    return rows // len(TARGETS)


def job_status(head, submission_id: str) -> str:
    """The job's status from the dashboard's REST API (the `ray job status` CLI would cost this
    2-core machine ~1 s of CPU a poll)."""
    return _get_json(f"{head.dashboard_url}/api/jobs/{submission_id}", timeout=10).get("status", "")


def driver_pid(head) -> int | None:
    for pid in head.processes():
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except (psutil.Error, OSError):
            continue
        if "jobs/score.py" in cmd and "ray::" not in cmd and "ray job" not in cmd:
            return pid
    return None


def summarise(rows: list[tuple], started: float, ended: float) -> dict:
    """Peak memory in the first and the last fifth of a run's scoring (after start-up)."""
    inside = [r for r in rows if started <= r[0] <= ended]
    if len(inside) < 10:
        return {}
    k = max(1, len(inside) // 5)
    first, last = inside[:k], inside[-k:]
    return {f"{name}_{part}_mb": round(max(r[i] for r in rows_), 1)
            for part, rows_ in (("first_fifth", first), ("last_fifth", last))
            for i, name in ((1, "total"), (2, "driver"), (3, "max_actor"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL the first run's driver at this many studies (0: no)")
    p.add_argument("--object-store-mb", type=int, default=2048)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    # SIGTERM (e.g. `pkill`) must still run the `finally` that stops the head.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    n_listed = len(list_studies(args.data, "test"))
    head = start_ray_head(num_cpus=2, object_store_mb=args.object_store_mb)
    sampler = Sampler(head)
    sampler.start()
    t_origin = time.monotonic()
    report: dict = {"studies": n_listed, "runs": []}
    runtime_env = json.dumps({"env_vars": {"YOLO_OFFLINE": "1"}})
    try:
        for attempt in (1, 2):
            sub_id = f"scale-{os.getpid()}-{attempt}"
            cmd = ["job", "submit", "--address", head.dashboard_url, "--submission-id", sub_id, "--no-wait",
                   "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
                   "python", "jobs/score.py", "--input", str(Path(args.data).resolve()), "--models",
                   str(Path(args.models).resolve()), "--out", str(out), "--split", "test"]
            t0 = time.monotonic()
            submitted = head.ray(*cmd, timeout=120)
            if submitted.returncode != 0:
                raise RuntimeError(submitted.stdout + submitted.stderr)
            before = studies_written(out)
            killed = False
            first_part_t = None
            while True:
                status = job_status(head, sub_id)
                n = studies_written(out)
                if first_part_t is None and n > before:
                    first_part_t = time.monotonic()
                if attempt == 1 and args.kill_at and n >= args.kill_at:
                    pid = driver_pid(head)
                    if pid is not None:
                        # The whole entrypoint (Ray's job supervisor starts it in a session of its
                        # own: `sh -c python jobs/score.py …`). SIGKILL to the shell alone left the
                        # Python driver running on, orphaned.
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
                        killed = True
                        print(f"[scale] run 1: SIGKILL to the driver's process group (pid {pid}) at {n} studies",
                              flush=True)
                        time.sleep(5)
                        break
                if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                    break
                time.sleep(5)
            t1 = time.monotonic()
            status = head.ray("job", "status", "--address", head.dashboard_url, sub_id, timeout=60).stdout.strip()
            logs = head.ray("job", "logs", "--address", head.dashboard_url, sub_id, timeout=60).stdout
            after = studies_written(out)
            run = {"attempt": attempt, "killed": killed, "seconds": round(t1 - t0, 1), "studies_before": before,
                   "studies_after": after, "status": status.splitlines()[-1] if status else "",
                   "log_tail": logs.splitlines()[-3:],
                   **summarise(sampler.rows, (first_part_t or t1) - t_origin, t1 - t_origin)}
            if first_part_t is not None and after > before:
                run["studies_per_s_after_first_part"] = round((after - before) / max(t1 - first_part_t, 1e-9), 2)
            report["runs"].append(run)
            print(f"[scale] run {attempt}: {json.dumps(run)}", flush=True)
            if not killed:
                break
    finally:
        sampler.stop_flag.set()
        leftovers = head.stop()
        report["head_leftovers_killed"] = len(leftovers)
        shutil.rmtree(head.temp_dir, ignore_errors=True)

    preds, errs = read_predictions(out), read_errors(out)
    per_study = preds.groupby("study_id").size()
    report["check"] = {
        "studies_with_rows": int(per_study.size), "rows": len(preds), "row_ids_unique": bool(preds["row_id"].is_unique),
        "every_study_25_rows": bool((per_study == len(TARGETS)).all()),
        "studies_in_errors_only": len(set(errs["study_id"]) - set(per_study.index)) if len(errs) else 0,
        "missing": n_listed - len(set(per_study.index) | set(errs["study_id"] if len(errs) else [])),
        "part_files": len(part_paths(out)), "runs_in_output": int(preds["run_id"].nunique()),
    }
    lr = str(REPO / ".venv" / "bin" / "lumbar-ray")
    for name, argv in (("query_s", [lr, "query", "--scores", str(out),
                                    "SELECT condition, count(*), avg(severe) FROM predictions GROUP BY 1"]),
                       ("export_kaggle_s", [lr, "export-kaggle", "--scores", str(out), "--to", str(out / "submission.csv")])):
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True)
        report["check"][name] = round(time.monotonic() - t0, 2)
        if done.returncode != 0:
            report["check"][name + "_error"] = done.stderr[-500:]
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "memory_rows": sampler.rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
