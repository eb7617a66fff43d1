"""Make Ultralytics run fully offline, with its files in a place we choose.

Ultralytics reads its environment when ``ultralytics`` is first imported: ``YOLO_OFFLINE``
(skips the DNS "am I online" probe), ``YOLO_CONFIG_DIR`` (where ``settings.json`` and fonts
live), ``YOLO_VERBOSE``, ``YOLO_AUTOINSTALL``. It also downloads ``Arial.ttf`` on first use of
its plotting/dataset code unless a font already sits in ``$YOLO_CONFIG_DIR/Ultralytics/``.

:func:`configure` must therefore run before the first ``import ultralytics`` of a process
(every Ray worker is a fresh process: call it there too). Our modules never import
Ultralytics at import time; :mod:`lumbar_ray.models.detector` calls :func:`configure` before its
lazy imports, so using the detector API is enough.

Nothing happens at import of this module.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["configure", "default_config_dir", "SETTINGS_OVERRIDES"]

# Ultralytics settings we switch off: no telemetry/sync (sentry), no third-party loggers or
# Ray Tune callbacks hooking into its trainer (we run our own loop), no VS Code/OpenVINO
# nags. Directories point inside the config dir so nothing gets written into a repository.
SETTINGS_OVERRIDES: dict[str, bool] = {
    "sync": False,
    "raytune": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_lock = threading.Lock()
_configured: Path | None = None


def default_config_dir() -> Path:
    """``$YOLO_CONFIG_DIR`` if already set, else ``$LUMBAR_RAY_HOME/ultralytics``, else
    ``~/.cache/lumbar-ray/ultralytics``."""
    if env := os.environ.get("YOLO_CONFIG_DIR"):
        return Path(env).expanduser()
    home = os.environ.get("LUMBAR_RAY_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "lumbar-ray"
    return base / "ultralytics"


def _matplotlib_font() -> Path | None:
    """Matplotlib's bundled DejaVuSans.ttf, found without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        font = Path(loc) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if font.is_file():
            return font
    return None


def _install_fonts(user_dir: Path) -> None:
    font = _matplotlib_font()
    for name in _FONT_NAMES:
        dest = user_dir / name
        if dest.exists():
            continue
        if font is None:
            log.warning("matplotlib's DejaVuSans.ttf not found: Ultralytics may try to download %s", name)
            return
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(font, tmp)
        os.replace(tmp, dest)  # atomic: parallel workers may race here


def configure(config_dir: str | os.PathLike | None = None, *, verbose: bool = False) -> Path:
    """Prepare the process for an offline Ultralytics; idempotent. Returns the config dir.

    - ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=False`` (never pip-install), ``YOLO_CONFIG_DIR``;
      ``YOLO_VERBOSE=False`` unless already set or ``verbose`` (library code stays quiet).
    - Copies matplotlib's DejaVuSans.ttf to ``$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf`` and
      ``Arial.Unicode.ttf`` so no font is ever fetched.
    - Imports ``ultralytics.utils`` (now with that environment) and switches settings sync,
      Ray Tune and the other integrations off, moving datasets/weights/runs dirs into the
      config dir.

    If Ultralytics was already imported before this call, its offline flag and config dir are
    frozen: that is logged as a warning (call this first in every process / Ray worker).
    """
    global _configured
    with _lock:
        target = Path(config_dir).expanduser() if config_dir is not None else default_config_dir()
        if _configured is not None and _configured == target.resolve():
            return _configured
        already = "ultralytics" in sys.modules
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "False"
        os.environ["YOLO_CONFIG_DIR"] = str(target)
        if verbose:
            os.environ["YOLO_VERBOSE"] = "True"
        else:
            os.environ.setdefault("YOLO_VERBOSE", "False")
        user_dir = target / "Ultralytics"  # what Ultralytics calls USER_CONFIG_DIR
        user_dir.mkdir(parents=True, exist_ok=True)
        _install_fonts(user_dir)

        import ultralytics.utils as uu  # noqa: PLC0415  (lazy on purpose)

        if already:
            actual = Path(uu.USER_CONFIG_DIR).resolve()
            if actual != user_dir.resolve() or uu.ONLINE:
                log.warning(
                    "ultralytics was imported before lumbar_ray.models.ultralytics_env.configure(): its config dir "
                    "is %s (wanted %s) and ONLINE=%s; call configure() before importing ultralytics",
                    actual, user_dir, uu.ONLINE,
                )
                _install_fonts(actual)
        wanted = dict(SETTINGS_OVERRIDES)
        wanted["datasets_dir"] = str(target / "datasets")
        wanted["weights_dir"] = str(target / "weights")
        wanted["runs_dir"] = str(target / "runs")
        settings = uu.SETTINGS
        changes = {k: v for k, v in wanted.items() if k in settings and settings.get(k) != v}
        if changes:
            settings.update(**changes)
        _configured = target.resolve()
        log.debug("ultralytics configured offline in %s", target)
        return _configured
