"""A real headless browser for tests and docs: Debian ``chromium``, one process group per call.

:func:`screenshot` renders a local page to a PNG; :func:`dump_dom` prints the DOM after the page
ran (scripts included). Each call gets a fresh ``--user-data-dir`` in a temporary folder (no
profile shared between calls or with a user), runs in its own process group, and on timeout the
whole group (browser, zygote, renderers) is killed so no process outlives the call.

The browser is kept off the network (``--host-resolver-rules``, a dead proxy): a page that needed
a remote resource renders without it, which is what a radiologist opening the report offline sees.

As a script it writes the README screenshot of the HTML review from an existing scoring output:

    python tests/browser.py --scores work/demo/scores --data work/demo/data --to docs/report_index.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 900)


def chromium_path() -> str | None:
    """The browser executable (``LUMBAR_RAY_CHROMIUM`` or the first of CHROMIUM_NAMES on PATH), or None."""
    chosen = os.environ.get("LUMBAR_RAY_CHROMIUM")
    if chosen:
        return shutil.which(chosen)
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def run_chromium(args: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``chromium --headless ... args`` with a throwaway profile; its process group is killed on
    timeout (TimeoutError) and after exit (stray helpers)."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError(f"no headless browser found (looked for {', '.join(CHROMIUM_NAMES)})")
    with tempfile.TemporaryDirectory(prefix="lumbar-ray-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-extensions", "--disable-background-networking", "--disable-sync",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
               f"--user-data-dir={profile}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise TimeoutError(f"chromium did not finish in {timeout:.0f} s: {' '.join(args)}") from None
        finally:
            _kill_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def screenshot(page: str | os.PathLike, png: str | os.PathLike, *, window: tuple[int, int] = WINDOW,
               timeout: float = 60.0) -> Path:
    """Render the local file ``page`` at ``window`` (width, height) into ``png``."""
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    done = run_chromium([f"--screenshot={png}", f"--window-size={window[0]},{window[1]}",
                         Path(page).resolve().as_uri()], timeout=timeout)
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


def dump_dom(page: str | os.PathLike, *, timeout: float = 60.0) -> str:
    """The DOM of the local file ``page`` after it loaded, as HTML text."""
    done = run_chromium(["--dump-dom", Path(page).resolve().as_uri()], timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot the HTML review's index page of a scoring output.")
    parser.add_argument("--scores", required=True, help="Scoring output root.")
    parser.add_argument("--data", required=True, help="Data root the studies were scored from.")
    parser.add_argument("--to", required=True, help="PNG to write (e.g. docs/report_index.png).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model-version", default=None)
    parser.add_argument("--report-dir", default=None, help="Keep the HTML report here (default: a temporary folder).")
    args = parser.parse_args()

    from lumbar_ray.outputs.html_report import write_html_report

    with tempfile.TemporaryDirectory(prefix="lumbar-ray-report-") as tmp:
        report = write_html_report(args.scores, args.data, args.report_dir or tmp, split=args.split,
                                   model_version=args.model_version)
        print(screenshot(report.index, args.to))


if __name__ == "__main__":
    main()
