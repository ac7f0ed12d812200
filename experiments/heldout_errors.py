"""What a shapes-world experiment's captioners get wrong on held-out combinations (post hoc, exploratory).

E4's runs kept 8 captions per split in ``eval.json``; this script makes each selected arm's held-out captions again
with the evaluation's own code (``semi_supervised.evaluate``, captions only) and reads them: per attribute, how often
it is wrong, and how often a caption names a *seen* combination. The tuple accuracy of the re-made captions must
equal the recorded one (a run whose does not is reported as such). Records are appended whole to
``OUT/heldout_errors.jsonl``, one line per labelled size, arm and seed; a rerun skips what is there and sets a
corrupt line aside.

    python experiments/heldout_errors.py --out runs/semi-e4 --experiment e4 --labelled 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import semi_supervised as ss  # noqa: E402  (the experiment's own configs and evaluation)

from recon.runs import append_jsonl, set_aside_bad_lines  # noqa: E402
from recon.shapes import world as W  # noqa: E402
from recon.shapes.worlds import WORLDS  # noqa: E402
from recon.stats import seeds_by_items_t_interval  # noqa: E402

RECORDS = "heldout_errors.jsonl"


def remake(root: Path, experiment: str, arm: str, labelled: int, seed: int, bundle: Path) -> dict:
    """One arm and seed: its selected adapters' held-out captions, made again, and what is wrong in them."""
    from recon.train.config import load_finetune_config
    from recon.train.selection import SELECTED_DIR

    cfg = load_finetune_config(
        ss.config_name(experiment), ss.arm_overrides(bundle, experiment, arm, labelled, seed, None)
    )
    run_dir = root / f"l{labelled}" / arm / f"seed{seed}"
    selected = run_dir / SELECTED_DIR
    record = json.loads((run_dir / "eval.json").read_text())
    n = record["n"]
    found = ss.evaluate(
        cfg,
        str(selected / "captioner_adapter"),
        None,  # no judge splits: the generator is not loaded
        n,
        ("heldout",),
        bundle,
        (),
        "shapes",
    )
    truth = [s.attributes for s in WORLDS["shapes"].sample(n, ss.EVAL_SEED, "heldout", ss.EVAL_STREAM)]
    parsed = [W.parse_caption(c) for c in found["heldout/captions"]]
    seen = set(W.SEEN_COMBOS)
    return {
        "labelled": labelled,
        "arm": arm,
        "seed": seed,
        "reproduced": found["heldout/caption_tuple_acc"] == record["heldout/caption_tuple_acc"],
        "correct": found["heldout/caption_tuple_acc"],
        "names_seen": [tuple(p[a] for a in W.ATTRIBUTES) in seen for p in parsed],
        **{f"wrong/{a}": [p[a] != t[a] for p, t in zip(parsed, truth)] for a in W.ATTRIBUTES},
        "captions": found["heldout/captions"],
    }


def table(rows: list[dict], base: str) -> str:
    """Per arm: mean % of held-out captions with each property; the seen-combination share paired to ``base``."""
    keys = ["correct", "names_seen", *(f"wrong/{a}" for a in W.ATTRIBUTES)]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["seed"]] = r
    lines = [
        "| arm | seeds | reproduced | "
        + " | ".join(k.replace("/", " ") + " %" for k in keys)
        + f" | names seen - {base} |",
        "| --- | --- | --- |" + " --- |" * (len(keys) + 1),
    ]
    for arm, seeds in by.items():
        cells = [f"{100 * np.mean([np.mean(r[k]) for r in seeds.values()]):.1f}" for k in keys]
        shared = sorted(s for s in seeds if s in by.get(base, {}))
        diff = "-"
        if arm != base and shared:
            e = seeds_by_items_t_interval(
                np.array([seeds[s]["names_seen"] for s in shared], float)
                - np.array([by[base][s]["names_seen"] for s in shared], float)
            )
            diff = f"{100 * e.diff:+.1f} [{100 * e.low:+.1f}, {100 * e.high:+.1f}]"
        reproduced = sum(r["reproduced"] for r in seeds.values())
        lines.append(
            f"| {arm} | {len(seeds)} | {reproduced}/{len(seeds)} | " + " | ".join(cells) + f" | {diff} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a semi_supervised.py run directory")
    parser.add_argument("--experiment", default="e4", help="a shapes-world experiment with model selection")
    parser.add_argument("--labelled", type=int, default=200)
    parser.add_argument("--arms", default=None, help="comma-separated (default: every arm with runs)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--bundle", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = ss.EXPERIMENTS.get(args.experiment)
    if spec is None or ss.world(args.experiment) != "shapes" or not spec.get("select"):
        parser.error(f"--experiment {args.experiment}: needs a shapes-world experiment with model selection")

    import torch

    from recon import hub

    torch.set_num_threads(1)
    bundle = (args.bundle or hub.SHAPES_BUNDLE).resolve()
    arms = (
        args.arms.split(",")
        if args.arms
        else [a for a in spec["arms"] if (args.out / f"l{args.labelled}" / a).is_dir()]
    )
    records = args.out / RECORDS
    rows = [r for r in set_aside_bad_lines(records) if r.get("labelled") == args.labelled]
    done = {(r["arm"], r["seed"]) for r in rows}
    for seed in map(int, args.seeds.split(",")):
        for arm in arms:
            if (arm, seed) in done or not (
                args.out / f"l{args.labelled}" / arm / f"seed{seed}" / "eval.json"
            ).exists():
                continue
            row = remake(args.out, args.experiment, arm, args.labelled, seed, bundle)
            append_jsonl(records, row)
            rows.append(row)
            print(f"{arm} seed {seed}: reproduced={row['reproduced']}", flush=True)
    if not rows:
        print(f"no finished arm under {args.out / f'l{args.labelled}'}", file=sys.stderr)
        return 2
    print(table(rows, spec["baseline"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
