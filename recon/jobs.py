"""Dataset jobs that fill a run directory: caption, generate, reconstruct (both directions).

Each job lists its items, skips those already recorded (resume), processes the rest in batches and appends one
record per item. A bad item becomes a ``"status": "failed"`` record with its error and the run goes on; when a
batch fails as a whole, its items are retried one by one so only the culprit fails. Under
``accelerate launch`` each process takes every ``world_size``-th item and writes its own shard; the main
process merges the shards and writes the report.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from recon import fingerprint, hub
from recon.config import Config, ConfigError
from recon.data import DataError, list_images, load_image, load_texts, validate_text, write_coco_results
from recon.pipeline import Reconstructor, png_bytes
from recon.report import write_report
from recon.runs import Cache, RunDir, RunError, atomic_write_bytes, derive_seed, sha256_file

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    state: object | None = None

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def distributed() -> Distributed:
    """accelerate's process state when launched with several processes; no process group otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=hub.processes_on_cpu())
        return Distributed(state.process_index, state.num_processes, state)
    return Distributed()


def make_cache(config: Config) -> Cache:
    """The run's cache, checked writable before any work (see :class:`Cache`)."""
    if config.run.cache_dir == "":
        return Cache(None)
    return Cache(
        Path(config.run.cache_dir).expanduser() if config.run.cache_dir else hub.cache_root() / "cache"
    )


def failed(item_id: str, error: BaseException | str, **extra) -> dict:
    msg = (
        error
        if isinstance(error, str)
        else f"{type(error).__name__}: {error}"
        if not isinstance(error, (DataError, ValueError))
        else str(error)
    )
    return {"id": item_id, "status": "failed", "error": msg, **extra}


# A full disk, a quota or a read-only filesystem fails every item alike: the run stops, it fails no item.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def environment_error(error: BaseException) -> OSError | None:
    """The OSError in ``error``'s chain that is the machine's fault (see :data:`ENVIRONMENT_ERRNOS`), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def _stop_for(error: OSError, run: RunDir) -> RunError:
    where = f" writing {error.filename}" if error.filename else ""
    return RunError(
        f"stopped: {error.strerror or os.strerror(error.errno)}{where}; the records so far are kept in "
        f"{run.path}; free space or make it writable, then rerun the same command to resume"
    )


def run_job(
    config: Config,
    out: str | Path,
    items: Sequence,
    process: Callable[[list, RunDir], list[dict]],
    desc: str,
    retry_failed: bool = False,
    report: bool = True,
    progress: bool = True,
    preflight: Callable[[], None] | None = None,
    reconstructor: Reconstructor | None = None,
    images_per_item: int = 1,
) -> RunDir:
    """The shared loop: resume, preflight, batch, isolate failures, append, merge shards, report.

    Missing models (:class:`hub.ModelNotAvailableError`) stop the run instead of failing every item. With the
    ``reconstructor`` whose generator does the work, the progress bar moves per generated image (``images_per_item``
    of them make an item) instead of once per batch, so its ETA holds from the first image on."""
    hub.configure_threads(config.run.threads)
    dist = distributed()
    run = RunDir(out, config, dist.rank, dist.world_size, command=desc)
    try:
        run.set_inputs(it.id for it in items)
        _run_items(
            run,
            dist,
            config,
            items,
            process,
            desc,
            retry_failed,
            report,
            progress,
            preflight,
            reconstructor,
            images_per_item,
        )
    finally:
        run.close()
    return run


def content_key(item) -> tuple[str, str | None]:
    """The record key that identifies an item's content, and its value: ``input_sha256`` of an image file (None
    when unreadable), or the ``text`` itself. Resume redoes an item whose recorded content differs."""
    if hasattr(item, "path"):
        try:
            return "input_sha256", sha256_file(item.path) if item.path is not None else None
        except OSError:
            return "input_sha256", None
    return "text", getattr(item, "text", None)


def _todo(run: RunDir, items: Sequence, retry_failed: bool) -> tuple[list, dict]:
    """The items still to do (not recorded, or recorded for other content), and each one's content key."""
    todo, prints = [], {}
    for it in items:
        key, value = prints[it.id] = content_key(it)
        rec = run.record(it.id)
        if rec is not None and key in rec and rec[key] != value:
            log.warning("%s changed since it was recorded; redoing it", it.id)
        elif run.done(it.id, retry_failed):
            continue
        todo.append(it)
    return todo, prints


def _run_items(
    run: RunDir,
    dist: Distributed,
    config: Config,
    items: Sequence,
    process,
    desc: str,
    retry_failed: bool,
    report: bool,
    progress: bool,
    preflight,
    reconstructor=None,
    images_per_item: int = 1,
) -> None:
    mine = list(items)[dist.rank :: dist.world_size]
    todo, prints = _todo(run, mine, retry_failed)
    if todo and preflight is not None:
        preflight()
    if todo and dist.rank == 0:  # what decides these numbers, for this start of the run
        fingerprint.write(run.path, config.to_dict())
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or dist.rank != 0, unit="item")
    partial = {"items": 0.0, "cap": 0.0}  # the current batch's generated work, in items, kept below its size

    def on_images(n: float) -> None:
        partial["items"] = min(partial["items"] + n / max(1, images_per_item), partial["cap"])
        if int(start + partial["items"]) > bar.n:  # whole items' worth: the count and its ETA stay honest
            bar.n = int(start + partial["items"])
            bar.refresh()

    if reconstructor is not None and bar.disable is False:
        reconstructor.on_progress = on_images
    for start in range(0, len(todo), max(1, config.run.batch_size)):
        chunk = todo[start : start + config.run.batch_size]
        partial.update(items=0.0, cap=len(chunk) - 1e-6)
        try:
            records = process(chunk, run)
        except hub.ModelNotAvailableError:
            raise
        except Exception as e:  # isolate the item that broke the batch
            if (env := environment_error(e)) is not None:
                raise _stop_for(env, run) from e
            log.debug("batch failed (%s); retrying its items one by one", e, exc_info=True)
            records = []
            for it in chunk:
                try:
                    records += process([it], run)
                except hub.ModelNotAvailableError:
                    raise
                except Exception as e1:  # noqa: BLE001 - recorded, the run goes on
                    if (env := environment_error(e1)) is not None:
                        raise _stop_for(env, run) from e1
                    log.debug("item %s failed", it.id, exc_info=True)
                    records.append(failed(it.id, e1))
        pos = {it.id: n for n, it in enumerate(chunk)}
        for r in sorted(records, key=lambda r: pos.get(r["id"], len(pos))):  # input order within a batch
            if r["id"] in prints:
                key, value = prints[r["id"]]
                r.setdefault(key, value)
            try:
                run.append(r)
            except OSError as e:
                if environment_error(e) is None:
                    raise
                raise _stop_for(e, run) from e
        bar.n = start + len(chunk)
        bar.refresh()
    if reconstructor is not None:
        reconstructor.on_progress = None
    bar.close()
    dist.wait()
    if dist.rank == 0:
        if dist.world_size > 1:
            run.merge_shards([it.id for it in items])
        records = run.records()
        if report:
            write_report(run.path, records, config.to_dict(), max_items=config.run.max_report_items)
    dist.wait()


def input_images(source: str | Path, out: str | Path) -> list:
    """The images of ``source``, leaving out the run directory's own outputs (``out/images/``, the only place a run
    writes images) when they lie inside it: a run never reads its outputs back as inputs, while inputs kept in the
    run directory (the experiments render theirs into ``OUT/data``) are read. No image left is an error naming
    ``source``: a job over zero inputs would be an empty success."""
    outputs = (Path(out) / "images").resolve()
    items = [it for it in list_images(source) if outputs not in it.path.resolve().parents]
    if not items:
        raise DataError(
            f"{source}: no input images outside the run directory's outputs ({outputs}); "
            "pass a folder of images"
        )
    return items


def _rel(run: RunDir, path: Path) -> str:
    return path.relative_to(run.path).as_posix()


def _load(items, run: RunDir) -> tuple[list, list[dict]]:
    ok, bad = [], []
    for it in items:
        try:
            ok.append((it, load_image(it.path), sha256_file(it.path)))
        except (DataError, OSError) as e:
            bad.append(failed(it.id, e, source=str(it.path)))
    return ok, bad


def reconstruct_images(
    config: Config,
    source: str | Path,
    out: str | Path,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    reconstructor: Reconstructor | None = None,
) -> RunDir:
    """image -> N captions -> K images each -> similarity to the original; best candidate chosen."""
    if not config.similarity.image:
        raise ConfigError(
            "similarity.image is empty: reconstruct scores and ranks candidates by an image "
            "similarity; list at least one (e.g. --set similarity.image.0.kind=clip)"
        )
    items = input_images(source, out)[:limit]
    recon = reconstructor or Reconstructor(config, cache=make_cache(config))

    def process(chunk, run: RunDir) -> list[dict]:
        loaded, records = _load(chunk, run)
        if loaded:
            results = recon.image_to_text_to_image(
                [im for _, im, _ in loaded], [it.id for it, _, _ in loaded], [h for _, _, h in loaded]
            )
            for (it, image, _), rec in zip(loaded, results):
                rec["source"] = str(it.path)
                if config.run.save_images:
                    path = run.image_path(it.id, "original.png")
                    atomic_write_bytes(path, png_bytes(image))
                    rec["original"] = _rel(run, path)
                for c, cand in enumerate(rec["candidates"]):
                    cand["images"] = []
                    for k, data in enumerate(cand.pop("png")):
                        path = run.image_path(it.id, f"c{c}_k{k}.png")
                        if config.run.save_images:
                            atomic_write_bytes(path, data)
                        cand["images"].append(_rel(run, path))
                records.append(rec)
        return records

    return run_job(
        config,
        out,
        items,
        process,
        "reconstruct",
        retry_failed,
        progress=progress,
        preflight=lambda: recon.preflight(("captioner", "generator", "image")),
        reconstructor=recon,
        images_per_item=config.captioner.num_candidates * config.generator.images_per_caption,
    )


def _split_valid_texts(items) -> tuple[list[dict], list]:
    """Failed records for empty / null texts, and the items that can be processed."""
    records, good = [], []
    for it in items:
        err = validate_text(it.text)
        (records.append(failed(it.id, err, text=it.text)) if err else good.append(it))
    return records, good


def reconstruct_texts(
    config: Config,
    texts: str | Path,
    out: str | Path,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    reconstructor: Reconstructor | None = None,
) -> RunDir:
    """text -> K images -> a caption each -> text similarity to the original text."""
    if not config.similarity.text:
        log.warning(
            "similarity.text is empty: reconstruct-text records captions of the generated images but no "
            "text similarity (add one, e.g. --set similarity.text.0.kind=clip_text)"
        )
    items = load_texts(texts)[:limit]
    recon = reconstructor or Reconstructor(config, cache=make_cache(config))

    def process(chunk, run: RunDir) -> list[dict]:
        records, good = _split_valid_texts(chunk)
        if good:
            for it, rec in zip(
                good, recon.text_to_image_to_text([it.text for it in good], [it.id for it in good])
            ):
                rec["images"] = []
                for k, data in enumerate(rec.pop("png")):
                    path = run.image_path(it.id, f"k{k}.png")
                    atomic_write_bytes(path, data)
                    rec["images"].append(_rel(run, path))
                records.append(rec)
        return records

    return run_job(
        config,
        out,
        items,
        process,
        "reconstruct-text",
        retry_failed,
        progress=progress,
        preflight=lambda: recon.preflight(("captioner", "generator", "text")),
        reconstructor=recon,
        images_per_item=config.generator.images_per_caption,
    )


def caption_images(
    config: Config,
    source: str | Path,
    out: str | Path,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> RunDir:
    """Caption a folder; also writes ``captions.json`` in COCO results format (image_id = file stem)."""
    items = input_images(source, out)[:limit]
    stems: dict[str, Path] = {}
    for it in items:  # captions.json names an image by its path without extension
        stem = Path(it.id).with_suffix("").as_posix()
        if stem in stems:
            raise DataError(
                f"{stems[stem]} and {it.path} would share the image_id {stem!r} in captions.json; "
                "rename one of them, or caption them from separate folders"
            )
        stems[stem] = it.path
    recon = Reconstructor(config, cache=make_cache(config))

    def process(chunk, run: RunDir) -> list[dict]:
        loaded, records = _load(chunk, run)
        if loaded:
            caps = recon.caption(
                [im for _, im, _ in loaded], [it.id for it, _, _ in loaded], [h for _, _, h in loaded]
            )
            records += [
                {
                    "id": it.id,
                    "status": "ok",
                    "direction": "caption",
                    "source": str(it.path),
                    "captions": c,
                    "caption": c[0] if c else "",
                }
                for (it, _, _), c in zip(loaded, caps)
            ]
        return records

    run = run_job(
        config,
        out,
        items,
        process,
        "caption",
        retry_failed,
        report=False,
        progress=progress,
        preflight=lambda: recon.preflight(("captioner",)),
    )
    if run.rank == 0:
        write_coco_results(
            run.path / "captions.json",
            [
                (Path(r["id"]).with_suffix("").as_posix(), r["caption"])
                for r in run.records()
                if r.get("status") == "ok"
            ],
        )
    return run


def generate_images(
    config: Config,
    texts: str | Path,
    out: str | Path,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> RunDir:
    """K images per text, seeded from (run seed, text id, 0, image index)."""
    items = load_texts(texts)[:limit]
    recon = Reconstructor(config, cache=make_cache(config))
    K = config.generator.images_per_caption

    def process(chunk, run: RunDir) -> list[dict]:
        records, good = _split_valid_texts(chunk)
        if good:
            seeds = [derive_seed(config.run.seed, it.id, 0, k) for it in good for k in range(K)]
            rendered = recon.render(
                [it.text for it in good for _ in range(K)], seeds, [it.id for it in good for _ in range(K)]
            )
            for n, it in enumerate(good):
                mine = rendered[n * K : (n + 1) * K]
                paths = [run.image_path(it.id, f"k{k}.png") for k in range(K)]
                for p, r in zip(paths, mine):
                    atomic_write_bytes(p, r.png)
                records.append(
                    {
                        "id": it.id,
                        "status": "ok",
                        "direction": "generate",
                        "text": it.text,
                        "images": [_rel(run, p) for p in paths],
                        "seeds": seeds[n * K : (n + 1) * K],
                        "flagged": [r.flagged for r in mine],
                        "warnings": sorted({w for r in mine for w in r.warnings}),
                    }
                )
        return records

    return run_job(
        config,
        out,
        items,
        process,
        "generate",
        retry_failed,
        report=False,
        progress=progress,
        preflight=lambda: recon.preflight(("generator",)),
        reconstructor=recon,
        images_per_item=K,
    )
