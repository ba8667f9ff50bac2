"""One results store per study: a SQLite file (standard library; transactional, offline, read by pandas/DuckDB).

Each run keeps its own JSON files, which stay the source of truth; the store collects them into one long table,

    results(run_id, factors, evaluation_id, protocol, metric, value, fingerprint, recorded_utc)

with one row per (run, evaluation, metric): writing the same result again replaces its rows, never duplicates
them. Several workers may write at once: every write is one transaction, and SQLite serialises them (a writer
waits up to `timeout` seconds for the lock).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import sqlite3
from pathlib import Path

from visrep.errors import ConfigError

STORE_VERSION = 1
# Numbers in an evaluation's JSON that describe the protocol, not a result.
_NOT_METRICS = {"seed", "k", "epochs", "batch_size", "image_size", "feature_dim", "num_classes", "bins", "episodes",
                "shots", "ways", "queries", "label_fraction", "train_subset", "test_subset", "temperature", "lr",
                "weight_decay", "l2", "held_out", "max_iter", "function_evals", "n_train", "n_test", "steps", "k_used",
                "top5_k"}


def metrics_of(result: dict) -> dict[str, float]:
    """The numeric results of one evaluation JSON: its top-level numbers (top1, top5, mae, ece, seconds, ...), and
    for `rank` each score and the truth of the (single) model, as score.<name> / truth."""
    out = {}
    for k, v in result.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_METRICS and math.isfinite(v):
            out[k] = float(v)
    if result.get("protocol") == "rank":
        for row in result.get("models", [])[:1]:
            out.update({f"score.{n}": float(v) for n, v in row.get("scores", {}).items() if v is not None})
            if row.get("truth") is not None:
                out["truth"] = float(row["truth"])
    return out


class ResultsStore:
    """The study's SQLite file; refuses a file written by another study or another store version."""

    def __init__(self, path: str | Path, study: str, timeout: float = 60.0):
        self.path, self.study, self.timeout = Path(path), study, timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute("INSERT OR IGNORE INTO meta VALUES ('study', ?)", (study,))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('store_version', ?)", (str(STORE_VERSION),))
                db.execute("CREATE TABLE IF NOT EXISTS results (run_id TEXT NOT NULL, factors TEXT NOT NULL, "
                           "evaluation_id TEXT NOT NULL, protocol TEXT NOT NULL, metric TEXT NOT NULL, value REAL, "
                           "fingerprint TEXT, recorded_utc TEXT NOT NULL, "
                           "PRIMARY KEY (run_id, evaluation_id, metric))")
                meta = dict(db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"'{self.path}' is not a readable results store ({e})") from None
        if meta.get("study") != study:
            raise ConfigError(f"the results store '{self.path}' belongs to study '{meta.get('study')}', not '{study}'; "
                              "give this study its own out_dir")
        if meta.get("store_version") != str(STORE_VERSION):
            raise ConfigError(f"the results store '{self.path}' has format {meta.get('store_version')}, this visrep "
                              f"writes {STORE_VERSION}; collect it again into a new file (`visrep study run` rebuilds "
                              "it from the runs' JSON files)")

    @contextlib.contextmanager
    def _connect(self):
        """One transaction on a fresh connection: committed on success, rolled back on error, always closed."""
        db = sqlite3.connect(str(self.path), timeout=self.timeout)
        try:
            with db:
                yield db
        finally:
            db.close()

    def record(self, run_id: str, factors: dict, evaluation_id: str, protocol: str, result: dict) -> int:
        """Replace the rows of (run, evaluation) by this result's metrics, in one transaction; returns their count."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        fingerprint = (result.get("model") or {}).get("fingerprint") if isinstance(result.get("model"), dict) else None
        rows = [(run_id, json.dumps(factors, sort_keys=True, default=str), evaluation_id, protocol, m, v,
                 fingerprint, now) for m, v in metrics_of(result).items()]
        with self._connect() as db:
            db.execute("DELETE FROM results WHERE run_id = ? AND evaluation_id = ?", (run_id, evaluation_id))
            db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def rows(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM results ORDER BY run_id, evaluation_id, metric")]

    def export_csv(self, path: str | Path, run_ids=None, evaluation_ids=None) -> Path:
        """The long table with one column per factor (factor values spelled out) instead of the JSON column;
        optionally only the given runs and evaluations."""
        rows = [r for r in self.rows() if (run_ids is None or r["run_id"] in run_ids)
                and (evaluation_ids is None or r["evaluation_id"] in evaluation_ids)]
        factor_keys: list[str] = []
        for r in rows:
            factor_keys += [k for k in json.loads(r["factors"]) if k not in factor_keys]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run_id", *factor_keys, "evaluation_id", "protocol", "metric", "value", "fingerprint"])
            for r in rows:
                fac = json.loads(r["factors"])
                w.writerow([r["run_id"], *[fac.get(k, "") for k in factor_keys], r["evaluation_id"], r["protocol"],
                            r["metric"], r["value"], r["fingerprint"] or ""])
        return path
