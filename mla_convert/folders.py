"""Output folders: checked before any work, written beside their final place and swapped in at the end.

Every verb writes through `prepare_output` (before the work) and `save_atomically` (after it), so the rules that keep
a user's files safe live here once:

- OUTPUT must be named (an empty string is not "the current folder"), and may not be, contain or lie inside any input
  of the command, compared after resolving symlinks and `..`.
- `--overwrite` replaces an existing folder only if it is empty or an mla-convert output: it holds `OUTPUT_MARKER`
  with the text only `save_atomically` writes (or, written before the marker existed, a report whose content is
  ours: `LEGACY_REPORTS`). A file's name alone proves nothing; anything else needs `--force` as well.
- The folder that holds OUTPUT must exist and be writable, and have room for the result, before the work starts.
- The result is built in a staging folder `.NAME.partial-*` beside OUTPUT (marked with `STAGING_MARKER`) and swapped
  in with one atomic rename, so at any moment OUTPUT is either the complete old folder or the complete new one.
  Staging folders left by a killed run are removed by the next run to the same OUTPUT: only folders with exactly
  the names `tempfile.mkdtemp` gives them, holding the staging marker's text for that OUTPUT or our output marker
  (an old OUTPUT swapped out just before the kill).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import MLAConvertError


# Written by `save_atomically` into every folder a verb produces (converted, pooled, healed, exported): what makes
# a folder one `--overwrite` may replace. Its text is checked, not only its name.
OUTPUT_MARKER = ".mla-convert-output"
OUTPUT_MARKER_TEXT = '{"written_by": "mla-convert", "what": "a folder written by mla-convert"}\n'
# Reports of folders written before the marker existed, with the keys every one of them has: a report of that name
# with other content is a user's file, and its folder is not ours.
LEGACY_REPORTS = {
    "conversion.json": ("source", "source_model_type", "kv_budget", "cache"),
    "healing.json": ("student", "teacher", "settings", "curve", "eval"),
}
# Inside every staging folder, so that cleaning up after a killed run never deletes a folder we did not make; its
# text names the OUTPUT the folder stages (`_staging_text`).
STAGING_MARKER = ".mla-convert-staging"
PARTIAL_INFIX = ".partial-"
RETIRED_INFIX = ".old-"
# What `tempfile.mkdtemp` appends to a prefix: 8 characters of its alphabet
_MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"
# The largest marker or legacy report read to decide whether a folder is ours
_MARKER_READ_LIMIT = 1 << 20

PathInputs = Mapping[str, "str | os.PathLike | None"] | Iterable["str | os.PathLike | None"]


def _named_inputs(inputs: PathInputs) -> list[tuple[str, Path]]:
    """The inputs that exist on this machine, resolved; hub ids and dataset names have nothing local to protect."""
    pairs = inputs.items() if isinstance(inputs, Mapping) else (("input", value) for value in inputs)
    named = []
    for name, value in pairs:
        if value is None or os.fspath(value) == "":
            continue
        path = Path(os.fspath(value)).expanduser()
        if path.exists():
            named.append((name, path.resolve()))
    return named


def check_disjoint(path: str | os.PathLike, inputs: PathInputs, what: str = "OUTPUT") -> None:
    """Refuses a path the command writes that is, contains or lies inside one of the command's inputs."""
    resolved = Path(os.fspath(path)).expanduser().resolve()
    for name, source in _named_inputs(inputs):
        if resolved == source:
            relation = "is"
        elif source in resolved.parents:
            relation = "lies inside"
        elif resolved in source.parents:
            relation = "contains"
        else:
            continue
        raise MLAConvertError(
            f"{what} {path} {relation} the {name} ({source}): writing there could destroy it; choose another folder"
        )


def _read_small(path: Path) -> str | None:
    """The text of a small regular file (not a link), or None."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARKER_READ_LIMIT:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def mark_output(folder: Path) -> None:
    """Marks `folder` as written by mla-convert (see `looks_like_our_output`)."""
    (Path(folder) / OUTPUT_MARKER).write_text(OUTPUT_MARKER_TEXT, encoding="utf-8")


def _legacy_report_is_ours(folder: Path) -> bool:
    """A folder written before the marker existed: a config.json, and a report with every key ours carry."""
    if not (folder / "config.json").is_file():
        return False
    for name, keys in LEGACY_REPORTS.items():
        text = _read_small(folder / name)
        try:
            report = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and all(key in report for key in keys):
            return True
    return False


def looks_like_our_output(folder: Path, legacy: bool = True) -> bool:
    """Whether `folder` was written by mla-convert: it holds the marker with our text, or (older outputs, unless
    `legacy` is False) a report whose content is ours. Any file a user may have of the same name is not enough."""
    folder = Path(folder)
    return _read_small(folder / OUTPUT_MARKER) == OUTPUT_MARKER_TEXT or (legacy and _legacy_report_is_ours(folder))


def _staging_text(output: Path) -> str:
    return json.dumps({"written_by": "mla-convert", "what": "staging folder", "output": output.name}) + "\n"


def _mark_staging(folder: Path, output: Path) -> None:
    (folder / STAGING_MARKER).write_text(_staging_text(output), encoding="utf-8")


def _stale_staging(output: Path) -> list[Path]:
    """The staging folders a killed run to `output` may have left: our exact names, with our marker for `output`."""
    if not output.parent.is_dir():
        return []
    infixes = "|".join(re.escape(infix) for infix in (PARTIAL_INFIX, RETIRED_INFIX))
    pattern = re.compile(rf"\.{re.escape(output.name)}({infixes}){_MKDTEMP_SUFFIX}")
    return [
        path
        for path in output.parent.iterdir()
        if pattern.fullmatch(path.name)
        and path.is_dir()
        and not path.is_symlink()
        # an old OUTPUT that a kill right after the exchange left where the staging folder was carries only its own
        # output marker
        and (_read_small(path / STAGING_MARKER) == _staging_text(output) or looks_like_our_output(path, legacy=False))
    ]


def recover_staging(output: Path) -> None:
    """Cleans up after a run to `output` that was killed while saving.

    A retired folder holds the previous OUTPUT when a kill fell between the two renames of the fallback swap (on
    filesystems without an atomic exchange): it is moved back if OUTPUT is missing, so the old result survives.
    """
    for stale in _stale_staging(output):
        kept = stale / output.name
        if RETIRED_INFIX in stale.name and kept.is_dir() and not output.exists():
            os.replace(kept, output)
        shutil.rmtree(stale, ignore_errors=True)
    if output.is_dir() and not output.is_symlink():
        # left in a complete folder by a swap that was killed half-way
        (output / STAGING_MARKER).unlink(missing_ok=True)


def prepare_output(
    output: str | os.PathLike | None,
    *,
    inputs: PathInputs = (),
    overwrite: bool = False,
    force: bool = False,
    required_bytes: int = 0,
) -> Path:
    """Checks that OUTPUT can be written without losing anything, before the work starts; returns its absolute path.

    `inputs`: every path the command reads (a mapping from what it is, for the message, to the path; or a plain
    list), `required_bytes`: about how much the result takes on disk.
    """
    if output is None or not os.fspath(output).strip():
        raise MLAConvertError("OUTPUT is empty: name the folder to write the result to")
    output = Path(os.path.abspath(Path(os.fspath(output)).expanduser()))
    if output.parent == output:
        raise MLAConvertError(f"OUTPUT {output} is the root of the filesystem: name a folder to write to")
    if output.is_symlink():
        raise MLAConvertError(f"OUTPUT {output} is a symbolic link: name the folder it points to, or another one")
    check_disjoint(output, inputs)
    if output.exists() and not output.is_dir():
        raise MLAConvertError(f"OUTPUT {output} exists and is not a folder")
    parent = output.parent
    if not parent.exists():
        raise MLAConvertError(f"the folder that should hold OUTPUT does not exist: {parent}")
    if not parent.is_dir():
        raise MLAConvertError(f"the folder that should hold OUTPUT is not a folder: {parent}")
    _check_writable(parent)
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise MLAConvertError(f"OUTPUT folder {output} exists and is not empty (pass --overwrite to replace it)")
        if not force and not looks_like_our_output(output):
            raise MLAConvertError(
                f"OUTPUT folder {output} is not an mla-convert output (it has no {OUTPUT_MARKER} written by "
                "mla-convert), so --overwrite leaves it alone: pass --force as well to replace it and everything in it"
            )
        if not os.access(output, os.W_OK | os.X_OK):
            raise MLAConvertError(f"cannot replace {output} (permission denied)")
    free = shutil.disk_usage(parent).free
    if required_bytes > free:
        raise MLAConvertError(
            f"not enough free space in {parent}: the result needs about {_size(required_bytes)}, {_size(free)} free"
        )
    recover_staging(output)
    return output


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _check_writable(parent: Path) -> None:
    """Tries what the save will do, making a staging folder: permission bits alone say nothing for root, nor for a
    read-only filesystem mounted with writable-looking bits."""
    try:
        probe = tempfile.mkdtemp(prefix=f".mla-convert{PARTIAL_INFIX}", dir=parent)
    except OSError as e:
        raise MLAConvertError(f"cannot write in {parent} ({e.strerror}): choose another place for OUTPUT") from None
    os.rmdir(probe)


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two existing folders in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _replace(staging: Path, output: Path) -> None:
    """Puts the complete `staging` folder where `output` is; `output`'s old content ends in `staging` or is removed."""
    if not output.exists():
        os.replace(staging, output)
        (output / STAGING_MARKER).unlink()
        return
    if _exchange(staging, output):
        # `staging` now holds the old folder: marked, so that a kill before it is deleted leaves it to the next run
        _mark_staging(staging, output)
        (output / STAGING_MARKER).unlink()
        shutil.rmtree(staging, ignore_errors=True)
        return
    # os.replace cannot replace a non-empty folder: move the old one aside, then the new one in. A kill between the
    # two leaves the old folder in the retired one, which the next run's `recover_staging` moves back.
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}{RETIRED_INFIX}", dir=output.parent))
    _mark_staging(retired, output)
    os.replace(output, retired / output.name)
    os.replace(staging, output)
    (output / STAGING_MARKER).unlink()
    shutil.rmtree(retired, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """Gives the result the modes the user's umask asks for: mkdtemp makes the folder private, and some writers
    (transformers' safetensors save) make their files private, others not."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def scratch_folder(output: Path) -> Iterator[Path]:
    """A folder beside `output` for a conversion's intermediate files, removed when the block ends; named and marked
    as a staging folder, so that one a killed run leaves is removed by the next run to `output`."""
    output = Path(output)
    folder = Path(tempfile.mkdtemp(prefix=f".{output.name}{PARTIAL_INFIX}", dir=output.parent))
    try:
        _mark_staging(folder, output)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_atomically(output: Path, write: Callable[[Path], None]) -> None:
    """Runs `write(staging)` in a folder beside `output`, marks it as ours, then swaps it into place.

    A failure at any point leaves `output` as it was (or absent) and removes the staging folder, so a
    half-written checkpoint never sits where a valid one is expected.
    """
    output = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{PARTIAL_INFIX}", dir=output.parent))
    try:
        _mark_staging(staging, output)
        write(staging)
        mark_output(staging)
        _follow_umask(staging)
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_model_atomically(
    output: Path, model, tokenizer=None, reports: Mapping[str, dict] | None = None, max_shard_size: int | None = None
) -> None:
    """A model folder in `output`, atomically: the model (`save_pretrained` also writes generation_config.json), its
    tokenizer where there is one, and each of `reports` as a JSON file of that name (`conversion.json`).
    `max_shard_size`: the largest weights file, in bytes (None: transformers' default)."""

    def write(folder: Path) -> None:
        if max_shard_size is None:
            model.save_pretrained(folder)
        else:
            model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for name, report in (reports or {}).items():
            (folder / name).write_text(json.dumps(report, indent=2) + "\n")

    save_atomically(output, write)


def write_text_atomically(path: Path, text: str) -> None:
    """Writes a small file (a JSON report) so that it is either complete or absent."""
    path = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_INFIX}", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def check_output(output: Path, overwrite: bool) -> None:
    """Deprecated form of `prepare_output` without inputs, kept while callers move over."""
    prepare_output(output, overwrite=overwrite)
