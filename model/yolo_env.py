"""Make Ultralytics work without internet before it is imported anywhere."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def prepare_ultralytics(config_dir: Path, allow_downloads: bool) -> None:
    """Give Ultralytics its own config dir with fonts in place, so no train or val reaches for the network."""
    fonts = config_dir / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    missing = [name for name in _FONTS if not (fonts / name).is_file()]
    if missing:
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        for name in missing:
            shutil.copyfile(source, fonts / name)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    if not allow_downloads:
        os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # A missing optional package (a HEIF plugin for a file that is not an image, an export tool) is an error,
    # never a pip install in a serving process.
    os.environ["YOLO_AUTOINSTALL"] = "false"
    for name in ("ultralytics.utils", "ultralytics.utils.checks"):
        module = sys.modules.get(name)
        if module is not None:  # imported before this ran (a test, a notebook): it has read its environment already
            module.AUTOINSTALL = False
