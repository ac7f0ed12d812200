"""``recon metaeval``: how well does each caption metric agree with human judgments?

The judgment sets of the caption-metric literature, read in their released formats (:mod:`recon.scoring.metaeval_formats`),
or the shapes set whose truth is exact (:mod:`recon.shapes.judgments`), are scored with ``recon score``'s own
machinery and cache, then compared with the judgments by the statistic the literature uses for each set:

* Flickr8k-Expert and Composite: Kendall tau-c; Flickr8k-CF: Kendall tau-b (``scipy.stats.kendalltau``'s
  ``variant``), between a metric and the human ratings, over all judgments (Expert's three scores are three rows);
* PASCAL-50S: pairwise accuracy per category (HC, HI, HM, MM) and over all pairs; FOIL: pair accuracy. A metric is
  right on a pair when it scores the human-preferred caption higher; a tie counts 1/2 (a coin flip's expectation).

How a set is scored: its judged captions are grouped into *units*, one per image and reference list (so the
captions of one image share reconstruction noise); each unit's distinct captions go to slot files ``c00.json``,
``c01.json``, ... (``{unit: caption}``), its references and image file to a COCO-style ``refs.json``; then
:func:`recon.scoring.score_caption_sets` fills one run directory per metric family (``runs/<file>/<metric>``).
Adding a metric adds a run directory; the others resume without work, and reconstructions come from the cache.

One output directory holds the meta-evaluation of one set of inputs, as a ``recon score`` run does: a run over other
inputs, in another command's directory or in one a running process holds is refused before anything in it is
written, naming the user's file or option (:mod:`recon.scoring.metaeval_dir`).

Uncertainty: 95% percentile bootstrap intervals resampling images (a judged image's judgments move together):
for Kendall's tau each metric is recomputed on the same resamples, which also give paired differences
between metrics (two-sided bootstrap p); for accuracies :func:`recon.stats.bootstrap_mean` and
:func:`recon.stats.paired_test` (permutation p) run on per-image sums. p-values are Holm-adjusted per set.
A ``*_distance`` metric is negated first, so for every metric higher agreement is better.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon import fingerprint
from recon.config import metric_direction
from recon.data import atomic_write_text
from recon.hub import ModelNotAvailableError
from recon.jobs import make_cache
from recon.kendall import kendall_tau_resampled
from recon.run_args import add_run_args, config_from_args, count
from recon.scoring.inputs import ALL_METRICS, system_names
from recon.scoring.metaeval_dir import INPUTS_DIR, RUNS_DIR, judged_inputs, open_run_dir
from recon.scoring.metaeval_formats import (
    FORMAT,
    FORMATS,
    STATISTIC,
    Candidate,
    Judgments,
    Source,
    detect_format,
    read_judgments,
    read_references,
)
from recon.scoring.metaeval_report import metaeval_html, metaeval_markdown


def register(subparsers) -> None:
    """Add the ``metaeval`` command to an argparse subparsers object."""

    p = subparsers.add_parser(
        "metaeval",
        help="meta-evaluate caption metrics against human judgments (Flickr8k-Expert/CF, Composite, "
        "PASCAL-50S, FOIL) or the exact shapes judgment set",
        description="Kendall tau-c / tau-b, or pairwise accuracy, of every metric against human judgments, with "
        "bootstrap CIs, a leaderboard and paired comparisons. Reuses `recon score`'s cache.",
    )
    p.add_argument(
        "judgments",
        nargs="*",
        help="ExpertAnnotations.txt, CrowdFlowerAnnotations.txt, "
        "*_correctness.csv, pair_pascal.mat, FOIL json",
    )
    p.add_argument(
        "--images", action="append", default=[], help="image folder: once, or once per judgments file"
    )
    p.add_argument(
        "--refs",
        action="append",
        default=[],
        help="Flickr token file (Flickr8k.token.txt; Expert and CF need it for the caption text) or "
        "a references JSON: once, or once per file. PASCAL-50S and FOIL carry their own",
    )
    p.add_argument(
        "--format", choices=FORMATS, default=None, help="every file's format (default: from its name)"
    )
    built_in = p.add_mutually_exclusive_group()
    built_in.add_argument(
        "--shapes",
        type=count(1),
        default=None,
        metavar="N",
        help="write the shapes judgment set of N scenes to OUT/judgments, then evaluate it",
    )
    built_in.add_argument(
        "--scenes",
        type=count(1),
        default=None,
        metavar="N",
        help="write the compositional scenes judgment set (binding / relation swaps, counts, "
        "omissions, hallucinations, single attributes) of N scenes to OUT/judgments, then "
        "evaluate it (use it with --preset scenes)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all that the inputs allow)",
    )
    p.add_argument(
        "--pascal-refs",
        type=count(0),
        default=5,
        help="references per PASCAL-50S pair, drawn from its 48 (0: all)",
    )
    p.add_argument(
        "--clip-prefix", default="", help="text before captions for CLIPScore ('A photo depicts ')"
    )
    p.add_argument("--resamples", type=count(1), default=1000, help="bootstrap resamples")
    add_run_args(p, limit_help="use only the judgments of the first N images of each file")
    p.set_defaults(handler=run_metaeval)


def sources_from_args(files: list[str], images: list[str], refs: list[str], fmt: str | None) -> list[Source]:
    if not files:
        raise ValueError(
            "give judgment files (e.g. ExpertAnnotations.txt --images Flicker8k_Dataset --refs "
            "Flickr8k.token.txt), or --shapes N / --scenes N"
        )
    for name, given in (("--images", images), ("--refs", refs)):
        if len(given) > 1 and len(given) != len(files):
            raise ValueError(
                f"{name} is given {len(given)} times for {len(files)} judgment files: give it once, "
                "or once per file"
            )
    if not images:
        raise ValueError("pass --images DIR: the folder the judgment files' image names are relative to")
    out = []
    for i, f in enumerate(files):
        path = Path(f)
        if path.name == "consensus_pascal.mat":
            path = path.with_name("pair_pascal.mat")
        src = Source(
            path,
            fmt or detect_format(path),
            Path(images[i if len(images) > 1 else 0]),
            Path(refs[i if len(refs) > 1 else 0]) if refs else None,
        )
        if src not in out:
            out.append(src)
    return out


def set_names(paths: list[Path]) -> list[str]:
    """Folder names for judgment files: their stems, made unique. A file the user names is read even when hidden
    (``.hidden_correctness.csv``): its leading dots (and ``@``) are dropped from the name only."""

    return system_names([p.with_name(p.name.lstrip(".@") or "judgments") for p in paths])


BUILT_IN_SETS = {
    "shapes": "recon.shapes.judgments",
    "scenes": "recon.shapes.scenes_judgments",
}  # name -> module


def built_in_sources(name: str, folder: Path, n: int, seed: int) -> list[Source]:
    """Write (or reuse) the built-in judgment set ``name`` (:data:`BUILT_IN_SETS`) of ``n`` scenes in ``folder``;
    its files as sources (each module's ``write_judgment_set`` returns them by format)."""
    import importlib

    paths = importlib.import_module(BUILT_IN_SETS[name]).write_judgment_set(folder, n, seed)
    return [
        Source(paths[f], f, paths["images"], None if FORMAT[f].own_references else paths["refs"])
        for f in FORMATS
        if f in paths
    ]


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class Prepared:
    """A judgment file turned into ``recon score`` inputs: which (system, unit) holds each candidate."""

    name: str
    source: Source
    judgments: Judgments
    slot_of: dict[Candidate, tuple[str, str]]
    captions: list[Path]
    systems: list[str]
    refs: Path


def prepare(name: str, source: Source, judgments: Judgments, folder: Path) -> Prepared:

    units: dict[tuple[str, tuple[str, ...]], str] = {}
    per_image: dict[str, int] = {}
    slots: dict[str, dict[str, int]] = {}  # unit -> caption -> slot
    slot_of = {}
    for cand in judgments.candidates():
        key = (cand.image, cand.refs)
        if key not in units:  # the first reference list of an image keeps the image's name: its seeds
            n = per_image[cand.image] = per_image.get(cand.image, -1) + 1
            units[key] = cand.image if n == 0 else f"{cand.image}#{n}"
        unit = units[key]
        caps = slots.setdefault(unit, {})
        caps.setdefault(cand.caption, len(caps))
        slot_of[cand] = (f"c{caps[cand.caption]:02d}", unit)
    if not slots:
        raise ValueError(f"{judgments.path}: no judgments to score (all left out, or --limit 0)")
    n_slots = max(len(c) for c in slots.values())
    systems = [f"c{k:02d}" for k in range(n_slots)]
    files = []
    for k, system in enumerate(systems):
        entries = {u: cap for u, caps in slots.items() for cap, s in caps.items() if s == k}
        files.append(
            atomic_write_text(
                folder / f"{system}.json", json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
            )
        )
    coco = {
        "images": [{"id": u, "file_name": image} for (image, _), u in units.items()],
        "annotations": [{"image_id": u, "caption": r} for (_, refs), u in units.items() for r in refs],
    }
    refs = atomic_write_text(folder / "refs.json", json.dumps(coco, indent=1, ensure_ascii=False) + "\n")
    return Prepared(name, source, judgments, slot_of, files, systems, refs)


def score(
    prep: Prepared,
    config,
    families: list[str],
    out: Path,
    reconstructor,
    clip_prefix: str,
    progress: bool,
    retry_failed: bool,
    notes: list[str],
) -> dict[tuple[str, str], dict[str, float]]:
    """Score ``prep``'s slot files with each metric family in its own run; ``{(system, unit): scores}``."""
    from recon.scoring.run import score_caption_sets
    from recon.scoring.tables import truncation_note

    scores: dict[tuple[str, str], dict[str, float]] = {}
    for family in families:
        try:  # inner leaderboards are a by-product here: few resamples
            run = score_caption_sets(
                config,
                prep.captions,
                prep.source.images,
                out / family,
                refs=prep.refs,
                metrics=family,
                names=prep.systems,
                progress=progress,
                retry_failed=retry_failed,
                clip_prefix=clip_prefix,
                reconstructor=reconstructor,
                n_resamples=100,
            )
        except ModelNotAvailableError as e:
            notes.append(f"{prep.name}: {family} not scored: {e}")
            continue
        notes += [n for n in run.notes if n not in notes]
        failed = [r for r in run.records if r.get("status") != "ok"]
        if failed:
            notes.append(
                f"{prep.name}/{family}: {len(failed)} captions failed, e.g. {failed[0].get('error')}"
            )
        if cut := truncation_note(run.records, f"{prep.name}/{family}"):  # past a text encoder's context
            notes.append(cut)
        for r in run.records:
            if r.get("status") == "ok":
                scores.setdefault((r["system"], str(r["image_id"])), {}).update(r.get("scores") or {})
    return scores


# ---------------------------------------------------------------------------------------- statistics
def _interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None, None
    tail = 50 * (1 - confidence)
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def _clean(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def rating_table(
    values: dict[str, np.ndarray],
    human: np.ndarray,
    clusters: np.ndarray,
    variant: str,
    n_resamples: int,
    seed: int,
) -> dict:
    """Kendall tau (``variant`` "b" or "c") of each metric with ``human``; CIs and paired differences from one
    bootstrap over clusters (paired p: ``2 (1 + #{d* beyond 0}) / (B + 1)``). Each resample's tau is scipy's on the
    resampled rows, computed for all metrics and resamples at once (:func:`recon.kendall.kendall_tau_resampled`). Rows
    must be finite for every metric (the caller drops the others)."""
    from scipy.stats import kendalltau

    from recon import stats

    codes = np.unique(clusters, return_inverse=True)[1].ravel()
    n_clusters = int(codes.max(initial=-1)) + 1
    rng = np.random.default_rng([seed, 15])  # resample r draws n_clusters clusters with replacement
    counts = np.array(
        [
            np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)
            for _ in range(n_resamples)
        ],
        dtype=np.int64,
    ).reshape(n_resamples, n_clusters)
    taus = (
        kendall_tau_resampled(np.stack(list(values.values())), human, counts, codes, variant)
        if values and len(human)
        else np.full((len(values), n_resamples), np.nan)
    )
    reps = dict(zip(values, taus))
    rows = {}
    for m, x in values.items():
        with warnings.catch_warnings():  # constant inputs: NaN, reported as undefined
            warnings.simplefilter("ignore")
            res = kendalltau(x, human, variant=variant)
        lo, hi = _interval(reps[m], stats.CONFIDENCE)
        rows[m] = {
            "value": _clean(res.statistic),
            "low": lo,
            "high": hi,
            "n": int(len(x)),
            "p_value": _clean(res.pvalue),
        }
    paired = []
    for a, b in itertools.combinations(values, 2):
        d = reps[a] - reps[b]
        d = d[np.isfinite(d)]
        lo, hi = _interval(d, stats.CONFIDENCE)
        # two-sided bootstrap p, add-one so a finite number of resamples never claims p = 0
        p = 1.0 if not d.size else min(1.0, 2 * (1 + min(np.sum(d <= 0), np.sum(d >= 0))) / (d.size + 1))
        va, vb = rows[a]["value"], rows[b]["value"]
        paired.append(
            {
                "a": a,
                "b": b,
                "diff": None if va is None or vb is None else va - vb,
                "low": lo,
                "high": hi,
                "p_value": float(p),
            }
        )
    return {"rows": rows, "paired": paired}


def pair_table(
    correct: dict[str, np.ndarray],
    categories: np.ndarray,
    clusters: np.ndarray,
    names: list[str],
    n_resamples: int,
    seed: int,
) -> dict:
    """Accuracy per category and over all pairs. Per-image sums scaled by (images / pairs) make
    :func:`recon.stats.bootstrap_mean` and :func:`recon.stats.paired_tests` resample images while their mean
    stays the pooled accuracy (difference); the paired tests of all metric pairs share one set of draws."""
    from recon import stats

    def per_cluster(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        codes = np.unique(clusters[mask], return_inverse=True)[1].ravel()
        n_clusters = int(codes.max(initial=-1)) + 1
        return (
            np.bincount(codes, weights=x[mask], minlength=n_clusters) * n_clusters / max(int(mask.sum()), 1)
        )

    groups = {"all": np.ones(len(categories), bool), **{c: categories == c for c in names}}
    rows = {
        m: {
            g: stats.bootstrap_mean(per_cluster(x, mask), n_resamples, seed=[seed, j, k]).to_dict()
            for k, (g, mask) in enumerate(groups.items())
            if mask.any()
        }
        for j, (m, x) in enumerate(correct.items())
    }
    for m in rows:
        for g, mask in groups.items():
            if g in rows[m]:
                rows[m][g]["n"] = int(mask.sum())
    names_ = list(correct)
    pairs = list(itertools.combinations(range(len(names_)), 2))

    def paired(mask: np.ndarray) -> list[dict]:
        columns = (
            np.stack([per_cluster(correct[m], mask) for m in names_], axis=1) if names_ else np.zeros((0, 0))
        )
        return [
            {"a": names_[i], "b": names_[j], **t.to_dict()}
            for (i, j), t in zip(pairs, stats.paired_tests(columns, pairs, n_resamples, seed=[seed, 99]))
        ]

    # Per category too: a metric can win on swaps and lose on single errors while the pooled difference is ~0.
    by_category = {c: paired(groups[c]) for c in names if groups[c].any()} if len(names) > 1 else {}
    return {"rows": rows, "paired": paired(groups["all"]), "paired_by_category": by_category}


def evaluate_set(fmt: str, preps: list[Prepared], scores: list[dict], n_resamples: int, seed: int) -> dict:
    """The statistics of one judgment set (all its files pooled) from the score records."""
    from recon import stats

    def lookup(prep: Prepared, table: dict, cand: Candidate) -> dict:
        return table.get(prep.slot_of[cand], {})

    metrics = list(dict.fromkeys(m for t in scores for s in t.values() for m in s))
    sign = {m: -1.0 if metric_direction(m) == "lower" else 1.0 for m in metrics}
    notes = [n for p in preps for n in p.judgments.notes]
    out = {
        "format": fmt,
        "statistic": STATISTIC[fmt],
        "files": [str(p.source.path) for p in preps],
        "metrics": metrics,
        "notes": notes,
    }
    if FORMAT[fmt].pairs:
        items = [(p, t, pair) for p, t in zip(preps, scores) for pair in p.judgments.pairs]
        better = np.array(
            [[sign[m] * lookup(p, t, pr.better).get(m, np.nan) for m in metrics] for p, t, pr in items]
        )
        worse = np.array(
            [[sign[m] * lookup(p, t, pr.worse).get(m, np.nan) for m in metrics] for p, t, pr in items]
        )
        keep = np.isfinite(better).all(1) & np.isfinite(worse).all(1)
        values = (better > worse) + 0.5 * (better == worse)
        out["categories"] = list(dict.fromkeys(c for p in preps for c in p.judgments.categories))
        cats = np.array([pr.category for _, _, pr in items])[keep]
        clusters = np.array([f"{p.name}/{pr.cluster}" for p, _, pr in items])[keep]
        table = pair_table(
            {m: values[keep, j] for j, m in enumerate(metrics)},
            cats,
            clusters,
            out["categories"],
            n_resamples,
            seed,
        )
        headline = {m: table["rows"][m]["all"]["value"] for m in metrics}
    else:
        items = [(p, t, r) for p, t in zip(preps, scores) for r in p.judgments.ratings]
        x = np.array(
            [[sign[m] * lookup(p, t, r.candidate).get(m, np.nan) for m in metrics] for p, t, r in items]
        )
        keep = np.isfinite(x).all(1)
        human = np.array([r.human for _, _, r in items])[keep]
        clusters = np.array([f"{p.name}/{r.cluster}" for p, _, r in items])[keep]
        table = rating_table(
            {m: x[keep, j] for j, m in enumerate(metrics)},
            human,
            clusters,
            STATISTIC[fmt][-1],
            n_resamples,
            seed,
        )
        headline = {m: table["rows"][m]["value"] for m in metrics}
    if dropped := int((~keep).sum()):
        notes.append(
            f"{dropped} of {len(keep)} judgments left out: some metric has no score for them "
            "(a failed caption, or no references)"
        )
    for p, adj in zip(
        table["paired"],
        stats.holm([np.nan if p["p_value"] is None else p["p_value"] for p in table["paired"]]),
    ):
        p["p_holm"] = _clean(adj)
    order = sorted(metrics, key=lambda m: (headline[m] is None, -(headline[m] or 0.0)))
    return {
        **out,
        **table,
        "order": order,
        "headline": headline,
        "n": int(keep.sum()),
        "n_images": len({c for c in clusters}),
    }


def read_sources(
    sources: list[Source], limit: int | None, pascal_refs: int, seed: int, notes: list[str]
) -> list[Judgments]:
    """Every source's judgments (reference files read once each); readers' notes are added to ``notes``."""
    refs_by_path, loaded = {}, []
    for s in sources:
        if s.refs is not None and FORMAT[s.format].own_references:
            notes.append(f"{s.path.name}: --refs not used ({s.format} files carry their own references)")
        elif s.refs is not None and s.refs not in refs_by_path:
            refs_by_path[s.refs] = read_references(s.refs)
            notes += refs_by_path[s.refs].notes
        refs = None if FORMAT[s.format].own_references else refs_by_path.get(s.refs)
        loaded.append(read_judgments(s.path, s.format, refs, pascal_refs, seed).limit(limit))
    return loaded


def meta_evaluate(
    config,
    sources: list[Source] | None,
    out: str | Path,
    metrics: str | None = None,
    limit: int | None = None,
    pascal_refs: int = 5,
    clip_prefix: str = "",
    n_resamples: int = 1000,
    progress: bool = True,
    retry_failed: bool = False,
    reconstructor=None,
    shapes: int | None = None,
    scenes: int | None = None,
) -> dict:
    """Score every judgment file and compare each metric with the judgments; writes ``metaeval.{json,md,html}``
    into ``out`` and returns the json. ``shapes`` / ``scenes``: instead of ``sources``, that built-in judgment set
    of that many scenes, written to ``out/judgments``. The judgments are read, and ``out`` locked and checked
    (:func:`open_run_dir`), before anything is written there."""
    out = Path(out)
    settings = {"limit": limit, "pascal_refs": pascal_refs, "clip_prefix": clip_prefix}
    notes: list[str] = []
    built_in = {k: v for k, v in (("shapes", shapes), ("scenes", scenes)) if v is not None}
    if len(built_in) > 1:
        raise ValueError("pass one of --shapes N and --scenes N")
    if not built_in:
        loaded = read_sources(sources, limit, pascal_refs, config.run.seed, notes)
        lock = open_run_dir(out, config, {**judged_inputs(sources), **settings})
    else:
        lock = open_run_dir(out, config, {**built_in, **settings})
    try:
        if built_in:
            ((name, n),) = built_in.items()
            sources = built_in_sources(name, out / "judgments", n, config.run.seed)
            loaded = read_sources(sources, limit, pascal_refs, config.run.seed, notes)
        return _evaluate(
            config,
            sources,
            loaded,
            out,
            notes,
            metrics,
            limit,
            clip_prefix,
            n_resamples,
            progress,
            retry_failed,
            reconstructor,
        )
    finally:
        lock.close()


def _evaluate(
    config,
    sources: list[Source],
    loaded: list[Judgments],
    out: Path,
    notes: list[str],
    metrics: str | None,
    limit: int | None,
    clip_prefix: str,
    n_resamples: int,
    progress: bool,
    retry_failed: bool,
    reconstructor,
) -> dict:
    from recon import stats
    from recon.pipeline import Reconstructor
    from recon.scoring import caption_metrics as cm
    from recon.scoring.run import parse_metrics

    names = set_names([s.path for s in sources])
    preps = [prepare(n, s, j, out / INPUTS_DIR / n) for n, s, j in zip(names, sources, loaded)]
    have_refs = any(c.refs for j in loaded for c in j.candidates())
    families = parse_metrics(metrics, have_refs)
    if "spice" in families and metrics is None and (missing := cm.spice_missing()):
        families.remove("spice")
        notes.append(missing)
    recon = reconstructor or Reconstructor(config, cache=make_cache(config))
    scores = [
        score(p, config, families, out / RUNS_DIR / p.name, recon, clip_prefix, progress, retry_failed, notes)
        for p in preps
    ]
    if not any(scores):
        raise RuntimeError(f"no metric could be scored ({'; '.join(notes)})")
    if note := fingerprint.differences_note(sorted((out / RUNS_DIR).glob("*/*"))):
        notes.append(note)
    result = {
        "config": config.name,
        "seed": config.run.seed,
        "limit": limit,
        "n_resamples": n_resamples,
        "confidence": stats.CONFIDENCE,
        "families": families,
        "notes": notes,
        "sets": {},
    }
    for fmt in dict.fromkeys(s.format for s in sources):
        idx = [i for i, s in enumerate(sources) if s.format == fmt]
        result["sets"][fmt] = evaluate_set(
            fmt, [preps[i] for i in idx], [scores[i] for i in idx], n_resamples, config.run.seed
        )
    atomic_write_text(out / "metaeval.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "metaeval.md", metaeval_markdown(result))
    atomic_write_text(out / "metaeval.html", metaeval_html(result))
    return result


def run_metaeval(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = Path(args.out or f"runs/metaeval-{config.name}")
    if args.shapes is not None or args.scenes is not None:
        flag = "--shapes" if args.shapes is not None else "--scenes"
        if args.judgments or args.images or args.refs:
            raise ValueError(
                f"{flag} N writes its own judgment files, images and references; pass either "
                f"judgment files or {flag}"
            )
        sources = None
    else:
        sources = sources_from_args(args.judgments, args.images, args.refs, args.format)
    res = meta_evaluate(
        config,
        sources,
        out,
        args.metrics,
        args.limit,
        args.pascal_refs,
        args.clip_prefix,
        args.resamples,
        progress=not args.no_progress,
        retry_failed=args.retry_failed,
        shapes=args.shapes,
        scenes=args.scenes,
    )
    for note in res["notes"]:
        print(f"recon: {note}", file=sys.stderr)
    print(
        json.dumps(
            {
                "out": str(out),
                "sets": {
                    k: {
                        "statistic": s["statistic"],
                        "n": s["n"],
                        "best": s["order"][:3],
                        "values": {m: _clean(s["headline"][m]) for m in s["order"]},
                    }
                    for k, s in res["sets"].items()
                },
            }
        )
    )
    return 0
