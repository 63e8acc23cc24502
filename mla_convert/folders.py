"""Output folders: checked before any work, written beside their final place and renamed in at the end."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MLAConvertError


def check_output(output: Path, overwrite: bool) -> None:
    """Refuses an OUTPUT that would lose data or cannot be written, before anything expensive runs."""
    if output.exists() and not output.is_dir():
        raise MLAConvertError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise MLAConvertError(f"output folder {output} exists and is not empty (pass --overwrite to replace it)")
    if not output.parent.exists():
        raise MLAConvertError(f"the folder that should hold the output does not exist: {output.parent}")


def save_atomically(output: Path, write: Callable[[Path], None]) -> None:
    """Runs `write(staging)` in a folder beside `output`, then renames it into place.

    A failure at any point leaves `output` as it was (or absent) and removes the staging folder, so a
    half-written checkpoint never sits where a valid one is expected.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary, shareable folder
        write(staging)
        if output.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside, delete it once swapped.
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
