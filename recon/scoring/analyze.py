"""``recon analyze``: correlations of a score run's reconstruction score with its other metrics."""

from __future__ import annotations

import json
from pathlib import Path

from recon.config import read_yaml
from recon.data import atomic_write_text
from recon.runs import read_records
from recon.scoring.inputs import INPUTS
from recon.scoring.run import SCORE


def analyze_run(
    run_dir: str | Path, recon_metric: str | None = None, seed: int | None = None, n_resamples: int = 1000
) -> dict:
    """Correlations of a score run (``analysis.json``, ``analysis.md``; report.html gains the analysis)."""
    from recon.scoring.html import write_score_report
    from recon.scoring.tables import correlations, correlations_markdown, leaderboard

    run_dir = Path(run_dir)
    if not (run_dir / "results.jsonl").is_file():
        if (run_dir / INPUTS).is_file():
            raise ValueError(
                f"{run_dir}: this score run holds no items yet (its `recon score` stopped before the "
                "first one); rerun that command to fill it"
            )
        raise FileNotFoundError(f"{run_dir}: no results.jsonl (is this a recon score run directory?)")
    records = [r for r in read_records(run_dir / "results.jsonl") if r.get("direction") == SCORE]
    if not records:
        raise ValueError(f"{run_dir}: no score records; `recon analyze` reads the output of `recon score`")
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    seed = seed if seed is not None else int((config.get("run") or {}).get("seed", 0))
    res = correlations(records, recon_metric, seed=seed, n_resamples=n_resamples)
    atomic_write_text(run_dir / "analysis.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(run_dir / "analysis.md", correlations_markdown(res))
    board_path = run_dir / "leaderboard.json"
    board = (
        json.loads(board_path.read_text())
        if board_path.is_file()
        else leaderboard(
            records,
            list(dict.fromkeys(r.get("system") for r in records if r.get("system"))),
            seed,
            n_resamples,
        )
    )
    write_score_report(
        run_dir,
        records,
        config,
        board,
        board.get("notes", []),
        analysis=res,
        max_items=int((config.get("run") or {}).get("max_report_items", 200)),
    )
    return res
