"""The output directory of ``recon metaeval``: one directory, one set of inputs, one process at a time.

``metaeval_inputs.json`` records what a directory was made from: the judgment and reference files by content, the
image folders, and the settings that change the judged units (``--limit``, ``--pascal-refs``, ``--clip-prefix``, or
``--shapes N``), with the config. :func:`open_run_dir` locks the directory (:func:`recon.runs.lock_run_dir`) and
refuses, before anything in it is written, a directory another process holds, another command's run, or a
meta-evaluation of other inputs, naming the user's file or option (not the inner ``runs/`` folders, whose own checks
would otherwise fire after ``inputs/`` had been rewritten). ``run.json`` says ``metaeval``, so other commands refuse
the directory in turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from recon.data import atomic_write_text
from recon.runs import RESULTS, RunError, config_differences, lock_run_dir, sha256_file
from recon.scoring.metaeval_formats import FORMAT, Source

INPUTS_DIR, RUNS_DIR = "inputs", "runs"
RECORD = "metaeval_inputs.json"
COMMAND = "metaeval"


def judged_inputs(sources: list[Source]) -> dict:
    """The record of what ``sources`` hold: judgment and reference files by content, image folders by path."""

    def file(p: Path) -> dict:
        return {"file": str(p), "sha256": sha256_file(p)}

    return {
        "judgments": [
            {"format": s.format, "files": [file(p) for p in FORMAT[s.format].files(s.path)]} for s in sources
        ],
        "images": [str(s.images.resolve()) for s in sources],
        "refs": [
            None if s.refs is None or FORMAT[s.format].own_references else file(s.refs) for s in sources
        ],
    }


def input_differences(old: dict, new: dict) -> list[str]:
    """What differs between two records, said in the user's terms: the file that changed, or the option."""

    def contents(entries: list) -> list:
        return [[f["sha256"] for f in e["files"]] for e in entries]

    def changed(
        old_files: list[dict], new_files: list[dict]
    ) -> list[str]:  # a file at the same place, other bytes
        before = {Path(f["file"]).resolve(): f["sha256"] for f in old_files}
        return [
            f"{f['file']} has changed since it was evaluated there"
            for f in new_files
            if before.get(Path(f["file"]).resolve(), f["sha256"]) != f["sha256"]
        ]

    def names(entries: list) -> str:
        return ", ".join(f["file"] for e in entries for f in e["files"][:1])

    def option(name: str, value) -> str:
        return (
            f"no {name}"
            if value is None
            else f"{name} {value!r}"
            if name == "--clip-prefix"
            else f"{name} {value}"
        )

    def judged(d: dict) -> str:
        built_in = [option(f"--{k}", d[k]) for k in ("shapes", "scenes") if d.get(k)]
        return built_in[0] if built_in else f"judgment files {names(d['judgments'])}"

    if old.get("shapes") != new.get("shapes") or old.get("scenes") != new.get("scenes"):
        return [f"{judged(new)} (it holds {judged(old)})"]
    out = []
    old_j, new_j = old.get("judgments", []), new.get("judgments", [])
    if [e["format"] for e in old_j] != [e["format"] for e in new_j] or contents(old_j) != contents(new_j):
        out += changed([f for e in old_j for f in e["files"]], [f for e in new_j for f in e["files"]]) or [
            f"other judgment files: {names(new_j)} (it holds the results of {names(old_j)})"
        ]
    if old.get("images") != new.get("images"):
        out.append(
            f"--images {', '.join(new.get('images') or [])} (it holds {', '.join(old.get('images') or [])})"
        )
    old_r, new_r = old.get("refs", []), new.get("refs", [])
    if [r and r["sha256"] for r in old_r] != [r and r["sha256"] for r in new_r]:
        files = [", ".join(dict.fromkeys(r["file"] for r in refs if r)) or None for refs in (old_r, new_r)]
        out += changed([r for r in old_r if r], [r for r in new_r if r]) or [
            f"{option('--refs', files[1])} (it was made with {option('--refs', files[0])})"
        ]
    for key, name in (
        ("limit", "--limit"),
        ("pascal_refs", "--pascal-refs"),
        ("clip_prefix", "--clip-prefix"),
    ):
        if old.get(key) != new.get(key):
            out.append(f"{option(name, new.get(key))} (it was made with {option(name, old.get(key))})")
    return out


def open_run_dir(out: Path, config, inputs: dict):
    """Lock ``out`` for this process and bind it to ``inputs`` (:data:`RECORD`); returns the lock (close it to
    release). Refused before anything in ``out`` is written: a directory another process holds, another command's
    run, a meta-evaluation of other inputs, or of another config once something was scored (as
    :class:`recon.runs.RunDir`: a run stopped before its first record binds no config)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; pass a new or existing directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(out)
    try:
        if (out / "run.json").exists():
            try:
                held = json.loads((out / "run.json").read_text(encoding="utf-8")).get("command")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                raise RunError(f"{out / 'run.json'} is damaged; restore it, or pass a new --out") from None
            if held != COMMAND:
                raise RunError(f"{out} holds a `recon {held}` run; `recon {COMMAND}` needs its own --out")
        elif (out / RESULTS).exists():
            raise RunError(f"{out} holds a recon run that is not a metaeval; pass a new --out")
        record = out / RECORD
        if record.is_file():
            try:
                old = json.loads(record.read_text(encoding="utf-8"))
                old_inputs, old_config = dict(old["inputs"]), old["config"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                raise RunError(f"{record} is damaged; restore it, or pass a new --out") from None
            if diff := input_differences(old_inputs, inputs):
                raise RunError(
                    f"{out} holds the metaeval of other inputs: {'; '.join(diff)}. Pass a new --out for "
                    "these inputs (reconstructions come from the cache), or the same inputs to resume it"
                )
            scored = any(p.stat().st_size for p in out.glob(f"{RUNS_DIR}/*/*/{RESULTS}"))
            diff = config_differences(
                old_config, json.loads(json.dumps(config.to_dict()))
            )  # as stored: lists
            if scored and diff:
                raise RunError(
                    f"{out} holds a metaeval with a different config ({', '.join(diff[:6])}"
                    f"{' ...' if len(diff) > 6 else ''}); pass a new --out, or the same settings to "
                    "resume it"
                )
        elif (out / "metaeval.json").exists() or (out / INPUTS_DIR).exists():
            raise RunError(
                f"{out} holds a metaeval that did not record its inputs ({RECORD}); pass a new --out "
                "(reconstructions come from the cache)"
            )
        if not (out / "run.json").exists():
            atomic_write_text(out / "run.json", json.dumps({"command": COMMAND}) + "\n")
        atomic_write_text(
            record,
            json.dumps({"inputs": inputs, "config": config.to_dict()}, indent=1, ensure_ascii=False) + "\n",
        )
    except BaseException:
        lock.close()
        raise
    return lock


def slot_captions(out: Path, name: str) -> dict[tuple[str, str], str]:
    """``{(system, image): caption}`` of one judgment file of a metaeval directory (its ``inputs/NAME/c*.json``)."""
    captions = {}
    for f in (Path(out) / INPUTS_DIR / name).glob("c*.json"):
        captions.update({(f.stem, u): c for u, c in json.loads(f.read_text()).items()})
    return captions


def scores_by_caption(out: Path, name: str = "ExpertAnnotations") -> dict[tuple[str, str], dict[str, float]]:
    """``{(caption, image): scores}`` merged over a metaeval directory's metric runs of one judgment file (for
    post-hoc analyses that read the records back; no model runs)."""
    caption_of, table = slot_captions(out, name), {}
    for run in (Path(out) / RUNS_DIR / name).iterdir():
        for line in (run / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("status") == "ok":
                key = (caption_of[(r["system"], r["image_id"])], r["image_id"])
                table.setdefault(key, {}).update(r["scores"])
    return table
