"""Counting what a reader kept and skipped, and why: malformed records never stop a run."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pixelllm.data.samples import Sample
from pixelllm.errors import DataError


class SkipReport:
    """Counts of kept records, skipped records by reason, and repairs by kind.

    A *skip* drops a record (a broken JSON line, a box outside the image); a *repair* keeps it
    after a documented fix (an unsorted trace that was sorted).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()

    def keep(self, count: int = 1) -> None:
        self.kept += count

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] += count

    def repair(self, kind: str, count: int = 1) -> None:
        self.repaired[kind] += count

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "repaired": dict(self.repaired)}

    def summary(self) -> str:
        """One line, e.g. ``vg: kept 5, skipped 2 (degenerate box: 2), repaired 0``."""

        def counts(counter: Counter[str]) -> str:
            total = sum(counter.values())
            detail = ", ".join(f"{reason}: {n}" for reason, n in counter.most_common())
            return f"{total} ({detail})" if total else "0"

        return (
            f"{self.name}: kept {self.kept}, skipped {counts(self.skipped)}, repaired {counts(self.repaired)}"
        )


class SkipRecord(Exception):
    """Raised while parsing one record to skip it; the message is the skip-report reason."""


class Reader:
    """Base of every dataset reader: iterate for ``Sample`` objects; ``report`` says what was skipped.

    Subclasses implement ``_samples``; each iteration starts a fresh report.
    """

    name = "reader"

    def __init__(self) -> None:
        self.report = SkipReport(self.name)

    def __iter__(self) -> Iterator[Sample]:
        self.report.reset()
        for sample in self._samples():
            self.report.keep()
            yield sample

    def _samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def summary(self) -> str:
        return self.report.summary()


class JsonFileReader(Reader):
    """Base of the readers of one JSON file (``json_path``) whose images lie under ``image_dir``."""

    def __init__(self, json_path: str | Path, image_dir: str | Path) -> None:
        super().__init__()
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)


def load_json_file(path: str | Path, what: str) -> Any:
    """Parse a whole JSON file, or raise ``DataError`` naming it (``what`` says what it should be)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def require(record: dict, key: str) -> Any:
    """``record[key]``, or skip the record as ``missing field 'key'``."""
    if not isinstance(record, dict) or key not in record:
        raise SkipRecord(f"missing field '{key}'")
    return record[key]
