"""Resumable studies: every finished row is appended to ``<json>.rows.jsonl`` with a fingerprint of everything
that changes its numbers, and ``--resume`` reuses the rows whose fingerprint matches."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .prepare import model_identity

__all__ = ["rows_path", "fingerprint", "row_key", "load_done_rows"]

#: Config fields that do not change a row's numbers (outputs, the grid's extent, display): a resumed run may
#: differ in these and still reuse the rows it shares with the earlier one.
_NOT_IN_FINGERPRINT = ("json", "markdown", "plot", "progress", "tier", "command", "resume", "seeds", "lrs",
                       "objectives", "methods", "samples")


def rows_path(cfg: StudyConfig) -> Path | None:
    """Where finished rows are appended as they complete (so an interrupted study loses at most one run)."""
    return Path(str(cfg.json) + ".rows.jsonl") if cfg.json else None


#: Settings added after rows were committed, with the value that reproduces those rows: left out of the hash
#: at that value, so the committed rows still resume.
_ADDED_LATER = {"refresh_tol": 0.0}


def fingerprint(cfg: StudyConfig, dhash: str) -> str:
    """A hash of every setting that changes a row's numbers, the data's hash and the model's identity."""
    blob = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT
            and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
    blob["data_hash"] = dhash
    blob["model_identity"] = model_identity(cfg)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_key(row: dict[str, Any]) -> tuple:
    """What names a row within a study: seed, objective, learning rate and method spec."""
    return (int(row["seed"]), str(row["objective"]), float(row["lr"]), str(row["spec"]))


def load_done_rows(path: Path | None, study_fingerprint: str) -> dict[tuple, dict[str, Any]]:
    """The rows of ``path`` written under ``study_fingerprint``, by :func:`row_key`."""
    if path is None or not path.is_file():
        return {}
    done: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the interruption
            continue
        if rec.get("fingerprint") == study_fingerprint and isinstance(rec.get("row"), dict):
            done[row_key(rec["row"])] = rec["row"]
    return done

