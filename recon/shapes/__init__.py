"""The shapes world: rendered scenes with exact ground truth, and the small-model bundle recon ships offline.

* :mod:`recon.shapes.world` -- renderer, caption templates, caption parser, held-out combinations.
* :mod:`recon.shapes.models` -- the bundle's architectures (real BLIP / Stable Diffusion / open_clip classes) and
  how each is saved; the evaluation-only attribute judge.
* :mod:`recon.shapes.train` -- ``recon shapes train``; :mod:`recon.shapes.evaluate` -- ``recon shapes eval``.
* :mod:`recon.shapes.commands` -- the argparse wiring (``register(subparsers)``).
* :mod:`recon.shapes.scenes` -- the compositional scenes world (1-4 objects on a 2x2 grid, relations, counts): renderer,
  templates, parser, exact scores; :mod:`recon.shapes.scenes_train` -- its models trained with the same loop and its
  cell-by-cell judge (the feasibility gate of issue 22).

The trained bundle lives in ``recon/shapes/bundle`` (``builtin:shapes/<part>``, see its MODEL_CARD.md).
"""
