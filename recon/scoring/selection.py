"""Selection by reconstruction, the paper's experiments, against baselines on the same items.

* Caption selection: per image N candidates -- the first beam-search caption, then N - 1 nucleus samples -- each
  rendered K times under common random numbers; the candidate whose reconstructions are most similar to the
  image is chosen (``record["chosen"]`` of an image -> text -> image run). Baselines: the first beam, a random
  candidate, the highest captioner log-likelihood (summed over tokens), the highest CLIPScore; on shapes also the
  oracle (a candidate with every attribute right, when there is one).
* Image selection: per text K generated images, each captioned; the image whose caption is closest to the text
  (SBERT or CLIP text cosine) is chosen, against a random image (and the oracle on shapes).

The functions here read finished run directories (``jobs.reconstruct_images`` / ``reconstruct_texts``), so an
experiment is a resumable run plus a deterministic analysis of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from recon.config import best_index
from recon.data import load_image
from recon.pipeline import Reconstructor, to_tensor
from recon.runs import derive_seed
from recon.scoring import caption_metrics as cm
from recon.scoring.experiment_data import attribute_agreement, attribute_scores, stem

CAPTION_RULES = ("reconstruction", "first_beam", "random", "likelihood", "clipscore")


class _LazyCaptioner:
    """Hands the owner's captioner to a helper Reconstructor without loading it until a caption is missing."""

    def __init__(self, owner: Reconstructor):
        self.owner = owner

    def caption(self, *args, **kwargs):
        return self.owner.captioner.caption(*args, **kwargs)


def candidate_config(config, num_candidates: int, temperature: float, top_p: float):
    """The run's config: candidate 0 by beam search (``num_beams``), candidates 1.. by nucleus sampling."""
    c = config.captioner
    decoding = replace(c.decoding, method="nucleus", temperature=float(temperature), top_p=float(top_p))
    return replace(config, captioner=replace(c, num_candidates=int(num_candidates), decoding=decoding))


class CandidateReconstructor(Reconstructor):
    """A Reconstructor whose N candidates are one beam-search caption followed by N - 1 nucleus samples.

    Build it on :func:`candidate_config`; the samples are seeded per image (reproducible alone) and cached.
    """

    def caption(self, images, ids, hashes) -> list[list[str]]:
        c = self.config.captioner
        beam = replace(
            self.config, captioner=replace(c, num_candidates=1, decoding=replace(c.decoding, method="beam"))
        )
        sample = replace(self.config, captioner=replace(c, num_candidates=c.num_candidates - 1))
        out = [[] for _ in ids]
        for cfg in (beam, sample):
            if cfg.captioner.num_candidates < 1:
                continue
            helper = Reconstructor(cfg, self.device, self.cache, captioner=_LazyCaptioner(self))
            for caps, new in zip(out, helper.caption(images, ids, hashes)):
                caps.extend(new)
        return out


def select_captions(
    run_dir: str | Path,
    records: Sequence[dict],
    recon: Reconstructor,
    clip: cm.ClipScore,
    refs: dict | None,
    truth: dict | None,
    ref_metrics: Sequence[str],
    seed: int,
) -> tuple[dict[str, dict[str, list[float]]], list[dict]]:
    """Apply every rule to the ok records of a caption-candidate run.

    Returns ``{rule: {metric: [per image]}}`` (aligned over images) and per-image details.
    """
    run_dir = Path(run_dir)
    ok = [r for r in records if r.get("status") == "ok"]
    details = []
    for r in ok:
        original = load_image(run_dir / r["original"])
        caps = [c["caption"] for c in r["candidates"]]
        n = len(caps)
        ll = recon.captioner.log_likelihood([original] * n, caps).tolist()
        cs = clip.scores([to_tensor(original)] * n, caps)["clipscore"]
        select = r["select_by"]
        recon_scores = [c["scores"].get(select) for c in r["candidates"]]
        rng = np.random.default_rng(derive_seed(seed, r["id"], -2, 0))
        choices = {
            "reconstruction": int(r["chosen"]),
            "first_beam": 0,
            "random": int(rng.integers(n)),
            "likelihood": best_index(ll, "log_likelihood"),
            "clipscore": best_index(cs, "clipscore"),
        }
        key = stem(r["id"])
        exact = [attribute_scores(c, truth[key])["exact"] for c in caps] if truth else None
        if exact is not None:
            choices["oracle"] = int(np.argmax(exact)) if max(exact) > 0 else choices["reconstruction"]
        details.append(
            {
                "id": r["id"],
                "key": key,
                "captions": caps,
                "log_likelihood": ll,
                "clipscore": cs,
                "recon": recon_scores,
                "select_by": select,
                "exact": exact,
                "choices": choices,
                "distinct": len(set(caps)),
            }
        )
    rules = list(details[0]["choices"]) if details else list(CAPTION_RULES)
    values: dict[str, dict[str, list[float]]] = {rule: {} for rule in rules}
    for d in details:
        for rule, i in d["choices"].items():
            v = values[rule]
            if truth:
                a = attribute_scores(d["captions"][i], truth[d["key"]])
                v.setdefault("exact_attribute_acc", []).append(a["exact"])
                v.setdefault("attribute_acc", []).append(a["attributes"])
            v.setdefault("clipscore", []).append(d["clipscore"][i])
            v.setdefault(f"recon_{d['select_by']}", []).append(
                d["recon"][i] if d["recon"][i] is not None else np.nan
            )
            v.setdefault("log_likelihood", []).append(d["log_likelihood"][i])
    if refs and ref_metrics and details:
        sets = {rule: {d["key"]: d["captions"][d["choices"][rule]] for d in details} for rule in rules}
        scored = cm.reference_metrics(sets, refs, ref_metrics)
        for rule in rules:
            names = list(dict.fromkeys(m for s in scored[rule].per_item.values() for m in s))
            for m in names:
                values[rule][m] = [scored[rule].per_item.get(d["key"], {}).get(m, np.nan) for d in details]
    return values, details


def select_images(
    run_dir: str | Path,
    records: Sequence[dict],
    clip: cm.ClipScore,
    seed: int,
    judge=None,
    truth: dict | None = None,
) -> tuple[dict[str, dict[str, list[float]]], list[dict]]:
    """Image selection: per text-image-text record, the image whose caption is closest to the text by each text
    metric, a random image, and (with a judge and truth) the oracle. Metrics of the chosen image: CLIPScore to the
    text and, on shapes, the judge's exact and per-attribute accuracy."""
    run_dir = Path(run_dir)
    ok = [r for r in records if r.get("status") == "ok"]
    details, values = [], {}
    for r in ok:
        k = len(r["images"])
        tensors = [to_tensor(load_image(run_dir / p)) for p in r["images"]]
        cs = clip.scores(tensors, [r["text"]] * k)["clipscore"]
        rng = np.random.default_rng(derive_seed(seed, r["id"], -2, 0))
        choices = {
            f"by_{m}": best_index(vs, m) for m, vs in r["scores_per_image"].items()
        }  # a distance: argmin
        choices["random"] = int(rng.integers(k))
        judged = None
        if judge is not None and truth is not None:
            with torch.no_grad():
                predicted = judge.predict(torch.stack(tensors))
            judged = [attribute_agreement(p, truth[str(r["id"])]) for p in predicted]
            exact = [j["exact"] for j in judged]
            choices["oracle"] = int(np.argmax(exact))
        details.append(
            {
                "id": r["id"],
                "text": r["text"],
                "captions": r["captions"],
                "clipscore": cs,
                "judge": judged,
                "choices": choices,
            }
        )
        for rule, i in choices.items():
            v = values.setdefault(rule, {})
            v.setdefault("clipscore", []).append(cs[i])
            if judged is not None:
                v.setdefault("judge_exact_acc", []).append(judged[i]["exact"])
                v.setdefault("judge_attribute_acc", []).append(judged[i]["attributes"])
    return values, details
