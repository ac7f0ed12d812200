"""Caption-set scoring: several caption files for one image folder -> per-item records, aggregates, leaderboard.

``score_caption_sets(config, [captions.json, ...], images_dir, out, refs=...)`` fills a run directory:

* ``results.jsonl``: one record per (system, image), ``"direction": "score"``, written whole and resumable like
  every recon run (:class:`recon.runs.RunDir`). A caption set's name (its *system*) is its file stem. A record's
  id is ``SYSTEM/IMAGE_ID``; problems of a file entry (unknown image id, a duplicate id -- the first caption is
  kept --, an empty or null caption, a missing key) are ``"status": "failed"`` records with the file and entry.
* ``aggregate.json``: ``{system: {metric: mean over its ok items}}``; ``corpus.json``: pycocoevalcap's corpus
  scores per system (corpus BLEU and METEOR differ from the mean of per-image scores; CIDEr and ROUGE-L do not);
  ``corpus_ci.json``: corpus METEOR with its bootstrap interval (the leaderboard computes corpus BLEU's itself).
* ``leaderboard.{md,html,json}`` and ``report.html`` (:mod:`recon.scoring.tables`, :mod:`recon.scoring.html`).

Score keys: ``recon_<image metric>`` (mean over the K reconstructions of the caption; their sample std is in
``recon_std``), ``clipscore``, ``refclipscore``, ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider``,
``spice``, ``sbert_similarity`` (highest SBERT cosine to a reference). All are higher-is-better except names
ending in ``_distance``. Reconstruction k of an image uses the seed ``derive_seed(run seed, image id, 0, k)``
whatever the system: systems are compared under common random numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon import fingerprint
from recon.config import Config
from recon.data import DataError, atomic_write_bytes, atomic_write_text, load_image
from recon.jobs import failed, make_cache, run_job
from recon.pipeline import Reconstructor, Timer, png_bytes, to_tensor
from recon.runs import RunDir, sha256_file
from recon.scoring import caption_metrics as cm
from recon.scoring.inputs import (
    ALL_METRICS,
    NEEDS_REFS,
    build_items,
    check_inputs,
    read_caption_set,
    read_references,
    system_names,
)
from recon.scoring.scorers import Scorers

SCORE = "score"  # the records' direction
CORPUS_CI = "corpus_ci.json"


def parse_metrics(spec: str | Sequence[str] | None, have_refs: bool) -> list[str]:
    """Metric names from ``"recon,bleu"`` (or a list); None: all that the inputs allow (with refs: all)."""
    if spec is None or spec == "all":
        return list(ALL_METRICS if have_refs else [m for m in ALL_METRICS if m not in NEEDS_REFS])
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown or not names:
        raise ValueError(
            f"--metrics: unknown metric(s) {unknown or names}; choose from {', '.join(ALL_METRICS)}"
        )
    if not have_refs and (need := [m for m in names if m in NEEDS_REFS]):
        raise ValueError(
            f"--metrics {','.join(need)} compare captions with references: pass --refs REFS.json"
        )
    return list(dict.fromkeys(names))


def finite(scores: dict) -> dict:
    return {k: float(v) for k, v in scores.items() if v is not None and math.isfinite(v)}


def aggregate_scores(records: Sequence[dict], systems: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{system: {metric: mean over its ok records}}`` (metrics in first-seen order)."""
    out: dict[str, dict[str, float]] = {}
    for s in systems:
        values: dict[str, list[float]] = {}
        for r in records:
            if r.get("system") == s and r.get("status") == "ok":
                for m, v in (r.get("scores") or {}).items():
                    values.setdefault(m, []).append(v)
        out[s] = {m: float(np.mean(vs)) for m, vs in values.items()}
    return out


@dataclass
class ScoreRun:
    path: Path
    systems: list[str]
    metrics: list[str]
    notes: list[str]
    timing: dict[str, float]
    aggregate: dict[str, dict[str, float]]
    records: list[dict]


def score_caption_sets(
    config: Config,
    captions: Sequence[str | Path],
    images: str | Path,
    out: str | Path,
    refs: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    clip_prefix: str = "",
    reconstructor=None,
    n_resamples: int = 1000,
) -> ScoreRun:
    """Score caption files against an image folder (see the module docstring); returns the finished run."""
    from recon.scoring.html import write_score_report
    from recon.scoring.tables import coverage_notes, leaderboard, leaderboard_markdown

    if not captions:
        raise ValueError("give at least one captions file")
    systems = system_names(captions, names)
    sets = [read_caption_set(p, n) for p, n in zip(captions, systems)]
    references = read_references(refs) if refs else None
    metrics = parse_metrics(metrics, references is not None)
    notes = []
    if references is not None and references.problems:
        notes.append(
            f"{refs}: {len(references.problems)} reference entries skipped, e.g. "
            f"{references.problems[0].message}"
        )
    ref_metrics = [m for m in metrics if m in cm.JAVA_METRICS]
    if "spice" in ref_metrics and (missing := cm.spice_missing()):
        notes.append(missing)
        ref_metrics.remove("spice")
    items = build_items(sets, images, references, limit)
    if not items:
        raise DataError(f"no captions to score: {', '.join(map(str, captions))} hold no entries")
    check_inputs(
        Path(out),
        {
            "captions": [{"name": s, "sha256": sha256_file(p)} for s, p in zip(systems, captions)],
            "refs": sha256_file(refs) if refs else None,
            "images": str(Path(images).resolve()),
            "metrics": metrics,
            "limit": limit,
            "clip_prefix": clip_prefix,
        },
    )
    recon = reconstructor or Reconstructor(config, cache=make_cache(config))
    timer = Timer()
    scorers = Scorers(config, recon, metrics, clip_prefix, timer)
    process = ChunkScorer(
        config,
        Path(out),
        items,
        systems,
        metrics,
        ref_metrics,
        references,
        refs,
        scorers,
        recon,
        timer,
        n_resamples,
    )

    run = run_job(
        config,
        out,
        items,
        process,
        "score",
        retry_failed,
        report=False,
        progress=progress,
        preflight=scorers.preflight,
        reconstructor=recon,
        images_per_item=config.generator.images_per_caption,
    )
    records = run.records()
    aggregate = aggregate_scores(records, systems)
    atomic_write_text(run.path / "aggregate.json", json.dumps(aggregate, indent=1) + "\n")
    board = leaderboard(records, systems, seed=config.run.seed, n_resamples=n_resamples)
    if (run.path / CORPUS_CI).is_file():  # corpus METEOR, bootstrapped through the jar when it scored
        for s, rows in json.loads((run.path / CORPUS_CI).read_text()).items():
            if s in systems:
                board["corpus"].setdefault(s, {}).update(rows)
    notes += coverage_notes(board)
    footer = notes + [
        n for n in [fingerprint.summary_note(run.path)] if n
    ]  # the tables' footer, not the terminal's
    board["notes"] = footer
    atomic_write_text(run.path / "leaderboard.json", json.dumps(board, indent=1) + "\n")
    atomic_write_text(run.path / "leaderboard.md", leaderboard_markdown(board, footer))
    atomic_write_text(run.path / "timing.json", json.dumps({"seconds": timer.seconds}, indent=1) + "\n")
    write_score_report(run.path, records, config, board, footer)
    return ScoreRun(run.path, systems, metrics, notes, timer.seconds, aggregate, records)


@dataclass
class ChunkScorer:
    """``run_job``'s step for a score run: a chunk of items -> their records, whole (ok or failed).

    Each metric family fills ``scores`` and ``extra`` (warnings, truncation, the reconstructions' details) for the
    chunk's loadable items; the reference metrics are computed once, over every valid item of the run (CIDEr's
    document frequencies are the whole set's), and their corpus scores written beside the records.
    """

    config: Config
    out: Path
    items: list
    systems: list[str]
    metrics: list[str]
    ref_metrics: list[str]
    references: object  # inputs.References or None
    refs: str | Path | None
    scorers: Scorers
    recon: object  # pipeline.Reconstructor
    timer: Timer
    n_resamples: int
    _reference_scores: dict | None = None

    def reference_scores(self) -> dict[str, cm.ReferenceScores]:
        if self._reference_scores is None:
            with self.timer("reference_metrics"):
                valid = [it for it in self.items if it.error is None]
                self._reference_scores = cm.reference_metrics(
                    {s: {it.key: it.caption for it in valid if it.system == s} for s in self.systems},
                    self.references.refs,
                    self.ref_metrics,
                    meteor_resamples=self.n_resamples,
                    seed=self.config.run.seed,
                )
            by_system = self._reference_scores
            atomic_write_text(
                self.out / "corpus.json",
                json.dumps({s: r.corpus for s, r in by_system.items()}, indent=1) + "\n",
            )
            corpus_ci = {  # corpus METEOR's interval, for the leaderboard
                s: {
                    m: {"value": r.corpus[m], "low": lo, "high": hi, "n": len(r.per_item)}
                    for m, (lo, hi) in r.corpus_ci.items()
                }
                for s, r in by_system.items()
            }
            atomic_write_text(self.out / CORPUS_CI, json.dumps(corpus_ci, indent=1) + "\n")
        return self._reference_scores

    def __call__(self, chunk, run: RunDir) -> list[dict]:

        records, good, originals = [], [], {}
        for it in chunk:
            if it.error:
                records.append(failed(it.id, it.error, **self.meta(it)))
                continue
            try:
                with self.timer("loading"):
                    load_original(it.path, originals)
                good.append(it)
            except (DataError, OSError) as e:
                records.append(failed(it.id, e, source=str(it.path), **self.meta(it)))
        if not good:
            return records
        scores: list[dict] = [{} for _ in good]
        extra: list[dict] = [{"warnings": []} for _ in good]
        refs_of = [list(self.references.refs.get(it.key) or []) if self.references else [] for it in good]
        if self.ref_metrics:
            self.add_reference_metrics(good, scores, extra)
        if self.references is not None:
            for i, it in enumerate(good):
                if not refs_of[i]:
                    extra[i]["warnings"].append(
                        f"image_id {it.key!r} has no references in {self.refs}: reference metrics not computed"
                    )
        if {"clipscore", "refclipscore"} & set(self.metrics):
            self.add_clipscore(good, originals, refs_of, scores, extra)
        if "sbert" in self.metrics:
            self.add_sbert(good, refs_of, scores, extra)
        if "recon" in self.metrics:
            self.add_reconstruction(good, originals, run, scores, extra)
        return records + [self.record(it, originals, run, scores[i], extra[i]) for i, it in enumerate(good)]

    @staticmethod
    def meta(it) -> dict:
        return dict(direction=SCORE, system=it.system, image_id=it.key, caption=it.caption)

    def add_reference_metrics(self, good, scores, extra) -> None:
        per_system = self.reference_scores()
        for i, it in enumerate(good):
            scores[i].update(per_system[it.system].per_item.get(it.key, {}))
            if it.key in per_system[it.system].bleu_stats:  # the leaderboard's corpus BLEU, from records
                extra[i]["bleu_stats"] = per_system[it.system].bleu_stats[it.key]

    def add_clipscore(self, good, originals, refs_of, scores, extra) -> None:
        with self.timer("clipscore"):
            cs = self.scorers.clip.scores(
                [originals[it.path][1] for it in good],
                [it.caption for it in good],
                refs_of if "refclipscore" in self.metrics else None,
            )
        for m in ("clipscore", "refclipscore"):
            if m in self.metrics:
                for i, v in enumerate(cs[m]):
                    scores[i][m] = v
        for i, cut in enumerate(cs.get("truncated", [])):  # CLIP's 77 tokens, under the truncate policy
            if cut:
                extra[i].setdefault("truncated", []).append("clipscore")

    def add_sbert(self, good, refs_of, scores, extra) -> None:
        captions = [it.caption for it in good]
        with self.timer("sbert"):
            for i, v in enumerate(cm.max_similarity_to_refs(self.scorers.sbert, captions, refs_of)):
                scores[i]["sbert_similarity"] = v
            for i, cut in enumerate(self.scorers.sbert.truncated(captions)):
                if cut:
                    extra[i].setdefault("truncated", []).append("sbert_similarity")

    def add_reconstruction(self, good, originals, run: RunDir, scores, extra) -> None:
        requests = [(it.id, it.key, originals[it.path][1], originals[it.path][2], it.caption) for it in good]
        results = self.recon.reconstruct_captions(requests, self.timer, prefix="recon_")
        for i, (it, r) in enumerate(zip(good, results)):
            scores[i] = {**r["scores"], **scores[i]}
            extra[i].update(
                recon_std=r["std"], scores_per_image=r["per_image"], seeds=r["seeds"], flagged=r["flagged"]
            )
            extra[i]["warnings"] += r["warnings"]
            if self.config.run.save_images:
                paths = [run.image_path(it.id, f"k{k}.png") for k in range(len(r["png"]))]
                for p, data in zip(paths, r["png"]):
                    atomic_write_bytes(p, data)
                extra[i]["images"] = [p.relative_to(run.path).as_posix() for p in paths]

    def record(self, it, originals, run: RunDir, scores: dict, extra: dict) -> dict:

        rec = {"id": it.id, "status": "ok", **self.meta(it), "source": str(it.path), "scores": finite(scores)}
        if self.config.run.save_images:
            path = run.image_path(f"@originals/{it.key}", "original.png")
            if not path.exists():
                atomic_write_bytes(path, png_bytes(originals[it.path][0]))
            rec["original"] = path.relative_to(run.path).as_posix()
        return {**rec, **extra}


def load_original(path: Path, cache: dict) -> tuple:
    """(PIL image, [3, H, W] tensor, sha256) of an image file, memoised per path within a batch."""
    if path not in cache:
        image = load_image(path)
        cache[path] = (image, to_tensor(image), sha256_file(path))
    return cache[path]
