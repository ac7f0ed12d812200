"""The models a ``recon score`` run needs besides the reconstructor (CLIPScore's CLIP, SBERT), loaded on first use,
and the preflight of every metric family a run asks for."""

from __future__ import annotations

from recon import hub
from recon.config import Config, MetricConfig
from recon.pipeline import Timer
from recon.scoring import caption_metrics as cm
from recon.similarity import load_similarity


def shared_clip_metric(recon):
    """The reconstructor's module of the preset's first ``clip`` image metric: CLIPScore shares its weights."""
    where, _ = cm.clip_metric_config(recon.config)
    return recon.image_metrics[recon.metric_names("image")[int(where.rsplit(".", 1)[1])]]


class Scorers:
    """The models a score run needs, loaded on first use (a fully resumed run loads none)."""

    def __init__(self, config: Config, recon, metrics: list[str], clip_prefix: str, timer: Timer):
        self.config, self.recon, self.metrics, self.clip_prefix = config, recon, metrics, clip_prefix
        self.timer = timer
        self._clip = self._sbert = None

    @property
    def clip(self) -> cm.ClipScore:
        if self._clip is None:
            with self.timer("model_loading"):
                shared = shared_clip_metric(self.recon) if "recon" in self.metrics else None
                self._clip = cm.ClipScore.from_config(
                    self.config, self.recon.device, shared, prefix=self.clip_prefix
                )
        return self._clip

    @property
    def sbert(self):
        if self._sbert is None:
            where, cfg = next(
                (
                    (f"similarity.text.{i}", m)
                    for i, m in enumerate(self.config.similarity.text)
                    if m.kind == "sbert"
                ),
                ("sbert", MetricConfig(kind="sbert")),
            )
            with self.timer("model_loading"):
                self._sbert = load_similarity(cfg, self.recon.device, where=where, role="text")
        return self._sbert

    def preflight(self) -> None:
        if "recon" in self.metrics:
            self.recon.preflight(("generator", "image"))
        if {"clipscore", "refclipscore"} & set(self.metrics):
            cm.clip_metric_config(self.config)
        if set(cm.JAVA_METRICS) & set(self.metrics):
            cm.check_java()
        if "sbert" in self.metrics and not any(
            m.kind == "sbert" and m.model for m in self.config.similarity.text
        ):
            hub.sbert_default_path()
