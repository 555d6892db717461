"""The run folder (``--out``): checked before anything is loaded, written only once training
is ready to start, and replaced (``--overwrite``) only once the new run has a checkpoint.

A run starts in three moves, so that bad input never leaves a trace and never costs a run:

1. :func:`check_run_folder` (nothing written): ``--out`` must be a folder or creatable as
   one, and must not hold another run unless ``--overwrite`` is given.
2. :meth:`RunFolder.open`, once the data, tokenizer and model are ready: creates the folder;
   a new run in a folder that held one moves the old run's files (``checkpoints/``,
   ``metrics.jsonl``, ``loss.png``) aside into the hidden folder ``.replaced-run/``.
3. :meth:`RunFolder.commit` after the new run's first checkpoint: the old run is deleted.
   Until then :meth:`RunFolder.roll_back` (on any error or Ctrl-C) deletes what the new run
   wrote, puts the old run back and removes a folder that did not exist before.

A process killed between 2 and 3 leaves the old run in ``.replaced-run/``: the next run in
the folder counts it as the folder's run (so only ``--overwrite`` replaces it) and settles it
first: with no new checkpoint beside it, the old run is still the one to keep.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gatedfwa.errors import ConfigError
from gatedfwa.train.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from gatedfwa.train.metrics import METRICS_FILE

__all__ = ["check_run_folder", "RunFolder", "SET_ASIDE", "RUN_FILES"]

SET_ASIDE = ".replaced-run"
RUN_FILES = (CHECKPOINTS_DIR, METRICS_FILE, "loss.png")  # what a run writes in its folder


def existing_run(out: Path) -> Path | None:
    """The newest checkpoint of the run in ``out``, or of a run an interrupted --overwrite
    left set aside there; None when the folder holds no run."""
    return latest_checkpoint(out) or latest_checkpoint(out / SET_ASIDE)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_run_folder(out: Path, continuing: bool, overwrite: bool) -> None:
    """ConfigError when the run cannot go to ``out``; writes nothing. ``continuing``: the
    run resumes the run already in ``out``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder: name a folder for the run "
                          f"(it will hold checkpoints/ and metrics.jsonl)")
    ancestor = _nearest_existing(out)
    if not ancestor.is_dir():
        raise ConfigError(f"--out {out}: cannot create the run folder ({ancestor} is a file, not a folder)")
    existing = None if continuing else existing_run(out)
    if existing is not None and not overwrite:
        raise ConfigError(
            f"--out {out} already holds a run ({existing.name}); continue it with --resume {out}, "
            f"start over with --overwrite, or choose another --out"
        )


class RunFolder:
    """The folder a run writes to (see the module docstring). ``continuing``: the run
    resumes the run already in ``out``, whose files stay where they are."""

    def __init__(self, out: Path, continuing: bool):
        self.out = out
        self.continuing = continuing
        self.created: list[Path] = []  # folders this run made, innermost first
        self.set_aside: Path | None = None  # the old run, until commit()
        self.committed = False  # this run has written a checkpoint

    def open(self) -> None:
        """Creates the folder; a new run moves an old run's files aside."""
        self.created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # e.g. no permission, or a file appeared where a folder should be
            raise ConfigError(f"--out {self.out}: cannot create the run folder ({error.strerror})") from None
        if self.continuing:
            return
        aside = self.out / SET_ASIDE
        if aside.is_dir() and latest_checkpoint(self.out) is not None:
            shutil.rmtree(aside)  # a replacement killed after its first checkpoint: finish it
        if aside.is_dir():
            # A replacement killed before its first checkpoint: the run set aside is the one
            # to keep; what lies beside it is the unfinished new run's.
            self._delete_new_files()
        else:
            moved = [name for name in RUN_FILES if (self.out / name).exists()]
            if not moved:
                return
            aside.mkdir()
            for name in moved:
                (self.out / name).rename(aside / name)
        self.set_aside = aside

    @property
    def replacing(self) -> bool:
        """An old run waits in the hidden folder for this run's first checkpoint."""
        return self.set_aside is not None

    def commit(self) -> None:
        """The new run has a checkpoint: delete the old run set aside."""
        self.committed = True
        if self.set_aside is not None:
            shutil.rmtree(self.set_aside, ignore_errors=True)
            self.set_aside = None

    def roll_back(self) -> None:
        """Before the first checkpoint: delete what this run wrote and put back what was
        there (an old run set aside; nothing, for a folder this run created). Does nothing
        once a checkpoint is written, or when continuing a run."""
        if self.continuing or self.committed:
            return
        self._delete_new_files()
        if self.set_aside is not None:
            for item in self.set_aside.iterdir():
                item.rename(self.out / item.name)
            self.set_aside.rmdir()
            self.set_aside = None
        for folder in self.created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def _delete_new_files(self) -> None:
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
