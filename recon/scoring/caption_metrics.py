"""Caption metrics that score a caption against its image or its references (not by reconstruction).

* Reference metrics are pycocoevalcap's own scorers, called as ``COCOEvalCap`` calls them: captions and
  references go through its PTB tokenizer (Java), then ``Bleu(4)``, ``Meteor()`` (Java), ``Rouge()``, ``Cider()``
  and ``Spice()`` (Java + Stanford CoreNLP jars) each compute the corpus score and per-item scores.
  CIDEr's document frequencies and the corpus BLEU come from the set they are given: one caption set at a time.
* CLIPScore (Hessel et al. 2021): ``w * max(cos(image, caption), 0)`` with ``w = 2.5``; RefCLIPScore: the
  harmonic mean of CLIPScore and ``max(max_ref cos(caption, ref), 0)``. Images and texts are embedded by
  recon.similarity modules built on the preset's first ``clip`` image metric, one model for both. Captions past
  CLIP's 77 tokens follow that metric's ``long_text`` policy: ``truncate`` (as Hessel et al.; the default) or
  ``chunk_mean``; ``scores`` says per caption whether it was truncated.
* :func:`max_similarity_to_refs`: any text similarity (SBERT, CLIP text) of a caption to its closest reference.

Result keys say the direction: all of these are similarities, higher is better.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recon import hub
from recon.config import Config, MetricConfig
from recon.hub import open_clip_source
from recon.similarity import ClipTextSimilarity, load_similarity

REFERENCE_METRICS: dict[str, tuple[str, ...]] = {
    "bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"),
    "meteor": ("meteor",),
    "rouge": ("rouge_l",),
    "cider": ("cider",),
    "spice": ("spice",),
}
JAVA_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")  # all go through the Java PTB tokenizer
CLIPSCORE_W = 2.5
SPICE_CORENLP = "stanford-corenlp-3.6.0"


@dataclass
class ReferenceScores:
    """Per-item scores ``{key: {metric: value}}`` and pycocoevalcap's corpus score per metric."""

    per_item: dict[Hashable, dict[str, float]] = field(default_factory=dict)
    corpus: dict[str, float] = field(default_factory=dict)
    # Per item, the sufficient statistics of corpus BLEU (see bleu_statistics): a corpus score of any subset of
    # items (a bootstrap resample) is corpus_bleu of their sum.
    bleu_stats: dict[Hashable, list[float]] = field(default_factory=dict)
    # Percentile bootstrap interval of a corpus score over items, where one was asked for (meteor: recomputed by
    # the METEOR jar from the resampled segments' statistics).
    corpus_ci: dict[str, tuple[float, float]] = field(default_factory=dict)


def bleu_statistics(
    gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]], ids: Sequence[Hashable]
) -> dict[Hashable, list[float]]:
    """Per item ``[testlen, reflen, guess_1..4, correct_1..4]`` as pycocoevalcap's BleuScorer counts them
    (tokenized text; ``reflen`` the closest reference length, its ``option='closest'``)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    out = {}
    for i in ids:
        scorer = BleuScorer(n=4)
        scorer += (res[i][0], gts[i])
        comps = scorer.ctest[0]
        reflen = scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])
        out[i] = [
            float(comps["testlen"]),
            float(reflen),
            *map(float, comps["guess"]),
            *map(float, comps["correct"]),
        ]
    return out


def corpus_bleu(stats) -> list[float]:
    """BLEU-1..4 of summed statistics ``[..., 10]`` (one row per item, or a leading resample axis: ``[R, n, 10]``
    -> ``[R, 4]``), with BleuScorer.compute_score's smoothing constants, so the full set gives pycocoevalcap's
    corpus BLEU exactly. Written here because pycocoevalcap recounts n-grams per call: a 1000-resample bootstrap
    through it would tokenize and count the corpus 1000 times."""
    import numpy as np

    total = np.asarray(stats, dtype=np.float64).sum(axis=-2)
    testlen, reflen, guess, correct = total[..., 0], total[..., 1], total[..., 2:6], total[..., 6:10]
    small, tiny = 1e-9, 1e-15
    cum = np.cumprod((correct + tiny) / (guess + small), axis=-1)
    bleus = cum ** (1.0 / np.arange(1, 5))
    ratio = (testlen + tiny) / (reflen + small)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, tiny)), 1.0)
    return (bleus * penalty[..., None]).tolist()


def spice_missing() -> str | None:
    """None when SPICE can run; otherwise one line saying which jars to place where."""
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).resolve().parent / "lib"
    missing = [
        f"{SPICE_CORENLP}{s}.jar" for s in ("", "-models") if not (lib / f"{SPICE_CORENLP}{s}.jar").is_file()
    ]
    if not missing:
        return None
    return (
        f"spice skipped: it needs Stanford CoreNLP 3.6.0 ({' and '.join(missing)}, from "
        f"stanford-corenlp-full-2015-12-09.zip) in {lib}; place them there to enable it"
    )


def check_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "BLEU, METEOR, ROUGE, CIDEr and SPICE need Java (pycocoevalcap's PTB tokenizer); "
            "install a Java runtime, or leave them out with --metrics recon,clipscore"
        )


@contextlib.contextmanager
def _quiet_fd2():
    """pycocoevalcap's Java tools write progress to stderr; keep the user's terminal clean."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _one_line(text: str) -> str:
    # PTB reads one sentence per line: any line break (\r, \u2028, ...) would shift every later caption
    return " ".join(str(text).split())


def ptb_tokenize(texts: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer on ``{key: [sentences]}`` (lower-cased, punctuation removed)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_java()
    expected = {k: len(v) for k, v in texts.items() if len(v)}
    if not expected:
        return {}
    with _quiet_fd2():
        out = PTBTokenizer().tokenize(
            {k: [{"caption": _one_line(s)} for s in v] for k, v in texts.items() if len(v)}
        )
    if {k: len(v) for k, v in out.items()} != expected:
        raise RuntimeError(
            "pycocoevalcap's PTB tokenizer returned a different number of sentences than it was "
            "given (is Java working? try `java -version`)"
        )
    return out


def reference_metrics(
    sets: Mapping[str, Mapping[Hashable, str]],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"),
    tokenized: bool = False,
    meteor_resamples: int = 0,
    seed: int = 0,
) -> dict[str, ReferenceScores]:
    """Reference metrics of each caption set: ``sets = {name: {key: caption}}``, ``references = {key: [refs]}``.

    Keys without references (or without a caption) are left out of that set. One PTB tokenizer run and one METEOR
    process serve all sets; every scorer is called on each set separately, as a COCO evaluation of that set
    would. ``tokenized=True`` skips the PTB tokenizer (inputs are already tokenized strings).
    ``meteor_resamples > 0``: also a bootstrap CI of corpus METEOR (``corpus_ci["meteor"]``), each resample scored
    by the jar (cost: resamples x items segment lines through its pipe).
    """
    unknown = [m for m in metrics if m not in REFERENCE_METRICS]
    if unknown:
        raise ValueError(f"unknown reference metric(s) {unknown}; known: {list(REFERENCE_METRICS)}")
    usable = {
        name: {k: c for k, c in cands.items() if c is not None and references.get(k)}
        for name, cands in sets.items()
    }
    out = {name: ReferenceScores() for name in sets}
    if not metrics or not any(usable.values()):
        return out
    keys = sorted({k for cands in usable.values() for k in cands}, key=str)
    if tokenized:
        gts = {k: list(references[k]) for k in keys}
        res = {(name, k): [c] for name, cands in usable.items() for k, c in cands.items()}
    else:
        joined: dict[Hashable, list[str]] = {("ref", k): list(references[k]) for k in keys}
        joined.update({("cand", name, k): [c] for name, cands in usable.items() for k, c in cands.items()})
        tok = ptb_tokenize(joined)
        gts = {k: tok[("ref", k)] for k in keys}
        res = {(name, k): tok[("cand", name, k)] for name, cands in usable.items() for k in cands}
    scorers = _scorers(metrics)
    try:
        for name, cands in usable.items():
            if not cands:
                continue
            ids = list(cands)
            g = {i: gts[i] for i in ids}
            r = {i: res[(name, i)] for i in ids}
            for metric, scorer in scorers:
                if metric == "meteor" and meteor_resamples > 0:
                    _meteor_with_ci(out[name], scorer, g, r, ids, meteor_resamples, seed)
                else:
                    _score_into(out[name], metric, scorer, g, r, ids)
    finally:
        for _, scorer in scorers:
            _close(scorer)
    return out


def _scorers(metrics: Sequence[str]) -> list:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    made = []
    for m in metrics:
        if m == "bleu":
            made.append((m, Bleu(4)))
        elif m == "rouge":
            made.append((m, Rouge()))
        elif m == "cider":
            made.append((m, Cider()))
        elif m == "meteor":
            from pycocoevalcap.meteor.meteor import Meteor

            check_java()
            made.append((m, Meteor()))
        elif m == "spice":
            if spice_missing():
                continue  # the caller reports spice_missing() once
            from pycocoevalcap.spice.spice import Spice

            made.append((m, Spice()))
    return made


def _score_into(out: ReferenceScores, metric: str, scorer, gts: dict, res: dict, ids: list) -> None:
    if metric == "bleu":
        corpus, per = scorer.compute_score(gts, res, verbose=0)
        out.bleu_stats.update(bleu_statistics(gts, res, ids))
    elif metric == "spice":
        with _quiet_fd2():
            corpus, per = scorer.compute_score(
                {str(i): v for i, v in gts.items()}, {str(i): v for i, v in res.items()}
            )
        order = sorted(str(i) for i in ids)  # Spice returns scores in sorted-key order
        by_key = dict(zip(order, (s["All"]["f"] for s in per)))
        per = [by_key[str(i)] for i in ids]
    else:
        corpus, per = scorer.compute_score(gts, res)
    names = REFERENCE_METRICS[metric]
    if len(names) == 1:
        corpus, per = [corpus], [per]
    for name, c, values in zip(names, corpus, per):
        out.corpus[name] = float(c)
        for i, v in zip(ids, values):
            out.per_item.setdefault(i, {})[name] = float(v)


def _meteor_eval(scorer, stats: Sequence[str]) -> tuple[float, list[float]]:
    """The jar's EVAL of segment statistics: (corpus METEOR, per-segment scores), as Meteor.compute_score reads
    them."""
    proc = scorer.meteor_p
    proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
    proc.stdin.flush()
    per = [float(proc.stdout.readline().strip()) for _ in stats]
    return float(proc.stdout.readline().strip()), per


def _meteor_with_ci(
    out: ReferenceScores, scorer, gts: dict, res: dict, ids: list, n_resamples: int, seed: int
) -> None:
    """Meteor.compute_score's protocol (one SCORE line per segment, then one EVAL of all), keeping the segment
    statistics, then one EVAL per bootstrap resample of the segments: the jar aggregates statistics into the
    corpus score, so the interval is of the score pycocoevalcap reports."""
    import numpy as np

    with scorer.lock:
        stats = [scorer._stat(res[i][0], gts[i]) for i in ids]
        corpus, per = _meteor_eval(scorer, stats)
        rng, samples = np.random.default_rng([seed, 77]), []
        if len(stats) > 1:
            for _ in range(n_resamples):
                samples.append(
                    _meteor_eval(scorer, [stats[j] for j in rng.integers(0, len(stats), len(stats))])[0]
                )
    out.corpus["meteor"] = corpus
    for i, v in zip(ids, per):
        out.per_item.setdefault(i, {})["meteor"] = v
    if samples:
        lo, hi = np.percentile(samples, [2.5, 97.5])
        out.corpus_ci["meteor"] = (float(lo), float(hi))


def _close(scorer) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- CLIPScore
def clip_metric_config(config: Config) -> tuple[str, MetricConfig]:
    """``(where, MetricConfig)`` of the preset's first ``clip`` image metric: the CLIP that CLIPScore uses."""
    for i, m in enumerate(config.similarity.image):
        if m.kind == "clip":
            return f"similarity.image.{i}", m
    raise ValueError(
        "clipscore and refclipscore use the preset's CLIP, but the preset lists no image metric of "
        "kind 'clip' under similarity.image; add one, e.g. --set similarity.image.0.kind=clip"
    )


def max_similarity_to_refs(
    metric, captions: Sequence[str], references: Sequence[Sequence[str]]
) -> list[float]:
    """Per caption, the highest ``metric`` cosine to any of its references (an ``EmbeddingSimilarity``).

    Captions and references are embedded in one batch each. A caption without references gets NaN.
    """
    flat = [r for refs in references for r in refs]
    if not captions:
        return []
    with torch.inference_mode():
        cap = metric.encode(list(captions)).float().cpu()
        ref = metric.encode(flat).float().cpu() if flat else cap[:0]
    out, pos = [], 0
    for i, refs in enumerate(references):
        sims = ref[pos : pos + len(refs)] @ cap[i]
        pos += len(refs)
        out.append(float(sims.max()) if len(refs) else float("nan"))
    return out


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


IMAGE_BATCH = 64  # images per CLIP image-tower call (as torchmetrics' CLIPScore batches)


class ClipScore:
    """CLIPScore and RefCLIPScore (Hessel et al. 2021) with one open_clip model; higher is better.

    ``clipscore = w * max(cos(E_img(image), E_txt(prefix + caption)), 0)`` in ``[0, w]``;
    ``refclipscore = H(clipscore, max(max_r cos(E_txt(prefix + caption), E_txt(prefix + r)), 0))`` (H: harmonic
    mean). Hessel et al. use ``prefix = "A photo depicts "`` with ViT-B/32; the default here is no prefix, which
    suits models trained on bare captions (the shapes CLIP). Images: ``[3, H, W]`` tensors in [0, 1], any size.
    Captions (and references) past CLIP's context follow ``text_metric.long_text`` (``truncate`` by default).
    """

    def __init__(self, image_metric, text_metric, w: float = CLIPSCORE_W, prefix: str = ""):
        self.image_metric, self.text_metric, self.w, self.prefix = image_metric, text_metric, w, prefix

    @classmethod
    def from_config(
        cls,
        config: Config,
        device: torch.device | str = "cpu",
        image_metric=None,
        w: float = CLIPSCORE_W,
        prefix: str = "",
    ) -> ClipScore:
        """Build on the preset's first ``clip`` image metric; pass its loaded module to share the weights."""
        import open_clip

        where, cfg = clip_metric_config(config)
        if image_metric is None:
            image_metric = load_similarity(cfg, device, where=where, role="image")
        name, _ = hub.open_clip_name(*open_clip_source(cfg, where), f"{where}.model")
        text_metric = ClipTextSimilarity(
            image_metric.clip, open_clip.get_tokenizer(name), long_text=cfg.long_text
        )
        return cls(image_metric, text_metric, w=w, prefix=prefix)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, D]`` unit vectors; images of one size are embedded in batches of :data:`IMAGE_BATCH` (they may
        differ in size: the preprocessing resizes each)."""
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        with torch.inference_mode():
            for idx in by_shape.values():
                for start in range(0, len(idx), IMAGE_BATCH):
                    part = idx[start : start + IMAGE_BATCH]
                    emb = self.image_metric.encode(torch.stack([images[i] for i in part])).float().cpu()
                    for j, i in enumerate(part):
                        out[i] = emb[j]
        return torch.stack(out) if out else torch.zeros(0, 0)

    def scores(
        self,
        images: Sequence[torch.Tensor],
        captions: Sequence[str],
        references: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, list[float]]:
        """``{"clipscore": [B], "truncated": [B] bools}`` and, with references, ``{"refclipscore": [B]}``.
        ``truncated[i]``: caption i (with the prefix) was scored on its first 77 tokens only."""
        if not captions:
            return {"clipscore": [], "truncated": []} | (
                {"refclipscore": []} if references is not None else {}
            )
        img = self.image_embeddings(images)
        with torch.inference_mode():
            txt = self.text_metric.encode([self.prefix + c for c in captions]).float().cpu()
        clip = [self.w * max(float(c), 0.0) for c in (img * txt).sum(-1)]
        out = {
            "clipscore": clip,
            "truncated": self.text_metric.truncated([self.prefix + c for c in captions]),
        }
        if references is not None:
            refs = max_similarity_to_refs(
                self.text_metric,
                [self.prefix + c for c in captions],
                [[self.prefix + r for r in rs] for rs in references],
            )
            out["refclipscore"] = [
                harmonic_mean(c, max(r, 0.0)) if r == r else float("nan") for c, r in zip(clip, refs)
            ]
        return out
