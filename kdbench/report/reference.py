"""kdbench vs a reference implementation on the same files: a seed table's reproduction verdicts.

A table with ``reproduces: <name>`` reads ``kdbench/reference/<name>.csv`` (runs of the reference
implementation, e.g. unmodified RepDistiller, on the suite's own synthetic files; one row per run:
experiment, teacher, student, method, run, acc_last, acc_best) and its provenance
``<name>.json`` (``data_sha256``: the files it read; written by
``benchmarks/repdistiller_reference.py``, docs/default_reference.md). Below the table it prints,
for each method the file has, Δ = kdbench's mean over its seeds − the reference's mean over its
runs, with the verdict of :func:`kdbench.stats.verdict.reproduction_verdict` against the table's
``margin`` δ. The reference's runs are repeated runs (RepDistiller has no seed option: they are
not paired with kdbench's seeds), so Δ's SE is Welch's over both sets of runs.

The verdict is only printed when the files on disk are those the reference read (their SHA-256
equal the provenance's): a changed synthetic task with a stale reference says so, and no verdict.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from kdbench.stats.verdict import published_sd, reproduction_verdict

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"
KEYS = ["teacher", "student", "method"]


def load_reference(name: str) -> tuple[pd.DataFrame, dict]:
    """The runs and provenance of reference ``name`` (kdbench/reference/<name>.csv and .json)."""
    csv, prov = REFERENCE_DIR / f"{name}.csv", REFERENCE_DIR / f"{name}.json"
    known = sorted(p.stem for p in REFERENCE_DIR.glob("*.csv") if p.with_suffix(".json").is_file())
    if not csv.is_file() or not prov.is_file():
        raise FileNotFoundError(f"reference {name!r}: {csv} and {prov} needed; known references: "
                                f"{', '.join(known) or 'none'} (benchmarks/repdistiller_reference.py writes them)")
    return pd.read_csv(csv), json.loads(prov.read_text())


def file_checksums(root: str | Path, names) -> dict[str, str | None]:
    """{relative path: sha256 or None when missing} of ``names`` under ``root``."""
    out = {}
    for n in names:
        p = Path(root) / n
        out[n] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def data_mismatch(prov: dict, root: str | Path) -> str | None:
    """Why the files under ``root`` are not those the reference read (None: they are)."""
    want = prov.get("data_sha256") or {}
    if not want:
        return "the reference records no data checksums"
    got = file_checksums(root, want)
    missing = [n for n, h in got.items() if h is None]
    if missing:
        return f"data files missing under {root}: {', '.join(missing)}"
    differ = [n for n in want if got[n] != want[n]]
    return f"the data files differ from those the reference read ({', '.join(differ)})" if differ else None


def reference_text(records: pd.DataFrame, table: dict, margin: float, data_root: str | Path) -> str:
    """The table's kdbench-vs-reference rows (``table['reproduces']`` names the reference)."""
    name = table["reproduces"]
    ref, prov = load_reference(name)
    impl = prov.get("implementation", "RepDistiller")
    commit = str((prov.get("repdistiller") or {}).get("commit", "?"))[:7]
    metric = "acc_best" if table.get("metric", "acc_last").endswith("_best") else "acc_last"
    ref = ref[ref.experiment.isin(table["experiments"])]
    mismatch = data_mismatch(prov, data_root)
    ok = records[records.experiment.isin(table["experiments"]) & (records.status == "ok")]
    body = []
    for key, g in ref.groupby(KEYS, sort=False):
        mine = ok[(ok[KEYS] == pd.Series(key, index=KEYS)).all(axis=1)][metric].astype(float).to_numpy()
        theirs = g[metric].astype(float).to_numpy()
        v = reproduction_verdict(mine, float(theirs.mean()), published_sd(_sd(theirs), "sd", len(theirs)), margin)
        if mismatch:
            verdict = f"no verdict: {mismatch}"
        elif v.verdict is None:
            verdict = v.reason
        else:
            verdict = f"Δ {_signed(v.delta)} [{_signed(v.ci90[0])}, {_signed(v.ci90[1])}] · {v.verdict}"
            if v.verdict == "inconclusive" and v.more_seeds:
                verdict += f" (+{v.more_seeds} seeds)"
        body.append([f"{key[0]} → {key[1]}", key[2], _cell(mine), _cell(theirs), verdict])
    return (f"\nkdbench vs {impl} on these files ({impl} {commit}, run by benchmarks/repdistiller_reference.py "
            f"on the same synthetic files and recipe; kdbench/reference/{name}.csv, provenance {name}.json, "
            f"docs/default_reference.md): Δ = kdbench − {impl} mean [90% CI], SE √(s_k²/n_k + s_r²/n_r) "
            f"(Welch: {impl}'s runs are repeated runs, not paired with kdbench's seeds); `reproduced (±δ)` = the "
            f"90% CI inside ±δ, δ = {margin:g} pp (TOST); `differs` = the 95% CI excludes 0 and |Δ| ≥ δ."
            f"{_teacher_note(prov)}\n\n"
            + tabulate(body, ["pair", "method", "kdbench", impl, "Δ, verdict"], tablefmt="github") + "\n")


def _teacher_note(prov: dict) -> str:
    """Which teacher the reference's distilled students learnt from (the provenance's ``teacher``)."""
    t = prov.get("teacher") or {}
    if t.get("source") != "kdbench":
        return ""
    return (f" Distilled rows: {prov.get('implementation', 'RepDistiller')}'s students distil from kdbench's teacher "
            f"(run {t['run']}, model.pt SHA-256 {t['model_sha256'][:12]}…, the same weights); its teacher row is its "
            f"own training of the teacher.")


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def _sd(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")


def _cell(x: np.ndarray) -> str:
    if len(x) == 0:
        return "—"
    if len(x) == 1:
        return f"{x[0]:.2f} (n=1)"
    return f"{x.mean():.2f} ± {np.std(x, ddof=1):.2f} sd (n={len(x)})"
