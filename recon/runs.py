"""Run directories and the content-keyed cache.

A run directory holds ``config.yaml`` (the resolved config), ``results.jsonl`` (one JSON record per item,
appended whole with flush + fsync), ``images/`` (PNG) and ``report.html``. A killed run resumes: items whose
record is present are skipped; a torn last line (a kill mid-write) is cut off before appending. Under
``accelerate launch`` every process appends to its own shard ``results.rank{i}.jsonl``; the main process merges
them into ``results.jsonl`` at the end (and on the next start, so a resumed sharded run never loses a record).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from recon.config import Config
from recon.data import DataError, atomic_write_bytes, atomic_write_text  # noqa: F401 - the writers re-exported for jobs

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
INPUTS = "current_inputs.json"  # the ids of the last run's inputs (RunDir.set_inputs)
# Settings that do not change any result: a resumed run may change them freely.
RESULT_NEUTRAL_KEYS = {"run.batch_size", "run.device", "run.threads", "run.cache_dir", "run.max_report_items"}


class RunError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def read_jsonl(path: Path) -> tuple[list[dict], list[bytes]]:
    """Every record (JSON object line) of a JSONL file, and the lines that are not one: corrupt lines anywhere,
    and a last line torn by a kill mid-write (no newline). Blank lines are neither."""
    path = Path(path)
    if not path.exists():
        return [], []
    records, bad = [], []
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            rec = json.loads(line) if line.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(line if line.endswith(b"\n") else line + b"\n")
    return records, bad


def set_aside_bad_lines(path: Path) -> list[dict]:
    """The records of ``path``; lines that are not records are appended to ``path.corrupt`` (fsynced) and then
    ``path`` is rewritten without them, atomically. Nothing is ever deleted: a bad line moves, with a warning."""
    path = Path(path)
    records, bad = read_jsonl(path)
    if bad:
        aside = path.with_name(path.name + ".corrupt")
        fd = os.open(aside, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"".join(bad))
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write_text(
            path, "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
        )
        log.warning("%s: %d unreadable line(s) moved to %s", path, len(bad), aside)
    return records


def append_jsonl(path: Path, record: dict, allow_nan: bool = False) -> None:
    """Append ``record`` to a JSONL file as one write(2) of one line, then fsync: whole or absent after a kill.
    ``allow_nan``: training metrics may be NaN (a diverged loss is a result); result records may not."""
    line = (
        json.dumps(record, ensure_ascii=False, allow_nan=allow_nan, default=_json_default) + "\n"
    ).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_dir(tmp: Path, final: Path) -> Path:
    """Move the complete directory ``tmp`` into place as ``final``: a reader sees the old one or the new one, never
    half of either (rename, rename, then the old one is deleted)."""
    final = Path(final)
    trash = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
    return final


def item_dir_name(item_id: str) -> str:
    """A flat, readable, collision-free folder name for an item id (see :meth:`RunDir.image_path`)."""
    text = str(item_id)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "item"
    return f"{slug}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def lock_run_dir(path: Path):
    """An exclusive OS lock on ``path/.lock`` (flock: released when the holder exits or is killed), or a RunError
    naming the process that holds it. Returns the open lock file; closing it releases the lock."""
    import fcntl

    f = open(Path(path) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(
            f"{path} is in use by {holder}; wait for it to finish, or pass another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"recon pid {os.getpid()}\n")
    f.flush()
    return f


def read_run_config(path: Path) -> dict:
    """The resolved config a run directory holds (``config.yaml`` / ``finetune.yaml``), or a clear error."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged ({type(e).__name__}); restore it, or pass a new --out") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} is damaged (not a mapping); restore it, or pass a new --out")
    return data


def claim_run_dir(path: Path, command: str, write: bool = True) -> None:
    """Record which command fills the directory ``path`` (``run.json``); another command's directory is refused,
    since its records would count as done (``recon caption`` then ``recon reconstruct`` into one ``--out``), and so
    is a finetune directory for a job or a job's directory for ``recon finetune`` made before ``run.json`` was."""
    path = Path(path)
    marker = path / "run.json"
    if marker.exists():
        try:
            held = json.loads(marker.read_text()).get("command")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            raise RunError(f"{marker} is damaged; restore it, or pass a new --out") from None
    elif command != "finetune" and (path / "finetune.yaml").exists():
        held = "finetune"
    elif command == "finetune" and ((path / "config.yaml").exists() or (path / RESULTS).exists()):
        held = "reconstruct / caption / generate / score"
    else:
        held = command
    if held != command:
        raise RunError(f"{path} holds a `recon {held}` run; `recon {command}` needs its own --out")
    if write and not marker.exists():
        atomic_write_text(marker, json.dumps({"command": command}) + "\n")


def failure_note(records: Iterable[dict], results: Path) -> str | None:
    """One line for a user: how many items failed and why the first did (the rest are in ``results``)."""
    failed = [r for r in records if r.get("status") != "ok"]
    if not failed:
        return None
    return (
        f"{len(failed)} item(s) failed; the first, {failed[0].get('id')}: {failed[0].get('error')} (every "
        f"failure is in {results})"
    )


def latest_per_id(records: Iterable[dict]) -> list[dict]:
    """One record per id, the last written (a resumed run's retry), in order of first appearance."""
    by_id: dict[Any, dict] = {}
    anonymous = []
    for r in records:
        if not isinstance(r, dict):
            continue
        if "id" in r:
            by_id[str(r["id"])] = r  # a repeated key keeps its first position
        else:
            anonymous.append(r)
    return list(by_id.values()) + anonymous


def same_value(a: Any, b: Any) -> bool:
    """Equality for config values, with NaN equal to NaN (an identical rerun is never a "different config")."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def config_differences(old: dict, new: dict) -> list[str]:
    """The dotted keys of two run configs whose values differ, leaving out :data:`RESULT_NEUTRAL_KEYS` (the one
    rule for "is this the same run?", used by run directories and metaeval)."""
    a, b = flatten(old), flatten(new)
    return sorted(
        k for k in set(a) | set(b) if not same_value(a.get(k), b.get(k)) and k not in RESULT_NEUTRAL_KEYS
    )


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}`` (config comparison, tracker hparams)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


class RunDir:
    """One run's output directory; ``rank``/``world_size`` select the shard this process appends to."""

    def __init__(
        self, path: str | Path, config: Config, rank: int = 0, world_size: int = 1, command: str | None = None
    ):
        self.path = Path(path)
        self.rank, self.world_size = rank, world_size
        self.images_dir = self.path / "images"
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a directory; pass a new or existing directory")
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_run_dir(self.path) if rank == 0 else None
        except OSError as e:  # read-only or full filesystem, no permission
            raise RunError(
                f"--out {self.path} cannot be written ({e.strerror or e}); pass a writable directory"
            ) from None
        if command is not None:  # before anything is written: another command's directory stays as it was
            self.claim(command)
        self._check_config(config)
        name = RESULTS if world_size == 1 else f"results.rank{rank}.jsonl"
        self.results_path = self.path / name
        self._done: dict[str, dict] = {}
        for p in [self.path / RESULTS, *sorted(self.path.glob("results.rank*.jsonl"))]:
            for rec in read_jsonl(p)[0]:
                if "id" in rec:
                    self._done[str(rec["id"])] = rec
        set_aside_bad_lines(self.results_path)

    def _check_config(self, config: Config) -> None:
        cfg_path = self.path / "config.yaml"
        new = config.to_dict()
        holds_records = any(
            p.stat().st_size
            for p in [self.path / RESULTS, *self.path.glob("results.rank*.jsonl")]
            if p.is_file()
        )
        if cfg_path.exists() and holds_records:  # a run stopped before its first record binds no config
            old = read_run_config(cfg_path)
            diff = config_differences(old, new)
            if diff:
                raise RunError(
                    f"{self.path} holds a run with a different config ({', '.join(diff[:6])}"
                    f"{' ...' if len(diff) > 6 else ''}); pass a new --out to start a new run, "
                    "or the same settings to resume it"
                )
        if self.rank == 0:
            atomic_write_text(cfg_path, yaml.safe_dump(new, sort_keys=False, allow_unicode=True))

    def claim(self, command: str) -> None:
        """See :func:`claim_run_dir`."""
        claim_run_dir(self.path, command, write=self.rank == 0)

    def close(self) -> None:
        """Release the run directory's lock (also released when the process exits or is killed)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def done(self, item_id: str, retry_failed: bool = False) -> bool:
        rec = self._done.get(str(item_id))
        return rec is not None and not (retry_failed and rec.get("status") != "ok")

    def record(self, item_id: str) -> dict | None:
        return self._done.get(str(item_id))

    def append(self, record: dict) -> None:
        """Append one record (see :func:`append_jsonl`): a record is either whole or absent."""
        append_jsonl(self.results_path, record)
        self._done[str(record["id"])] = record

    def image_path(self, item_id: str, name: str) -> Path:
        """``images/<readable slug>-<8 hex of sha256(id)>/<name>``: one folder per exact id, so ids that differ only
        in characters the slug folds (``a..b.png`` / ``a__b.png``, ``"."`` / ``""``) never share a file."""
        return self.images_dir / item_dir_name(item_id) / name

    def merge_shards(self, order: Iterable[str] | None = None) -> list[dict]:
        """Merge shard files (and an existing results.jsonl) into results.jsonl, last record per id wins."""
        paths = [self.path / RESULTS, *sorted(self.path.glob("results.rank*.jsonl"))]
        records = latest_per_id(rec for p in paths for rec in read_jsonl(p)[0])
        if order is not None:
            rank = {i: n for n, i in enumerate(order)}
            records.sort(key=lambda r: rank.get(str(r.get("id")), len(rank)))
        text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
        atomic_write_text(self.path / RESULTS, text)
        for p in paths[1:]:
            p.unlink(missing_ok=True)
        return records

    def set_inputs(self, ids: Iterable[str]) -> None:
        """The ids of this run's current inputs (``current_inputs.json``): summaries, leaderboards and reports count
        these only, while records of inputs deleted or renamed since an earlier run stay on disk."""
        if self.rank == 0:
            atomic_write_text(self.path / INPUTS, json.dumps([str(i) for i in ids]) + "\n")

    def records(self) -> list[dict]:
        """The records of results.jsonl, the last one per id (a redone item is appended again), of the current
        inputs only (see :meth:`set_inputs`)."""
        return current_records(self.path, latest_per_id(read_jsonl(self.path / RESULTS)[0]))


def current_records(run_dir: Path, records: Iterable[dict]) -> list[dict]:
    """``records`` of the inputs a run directory's last run had (its ``current_inputs.json``; all when it has none:
    runs written before it existed, or not by a job)."""
    path = Path(run_dir) / INPUTS
    records = list(records)
    if not path.is_file():
        return records
    try:
        ids = set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        log.warning("%s is damaged; counting every record of the run", path)
        return records
    return [r for r in records if str(r.get("id")) in ids]


def _json_default(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class Cache:
    """Content-keyed store: ``key(**parts)`` hashes canonical JSON of everything that determines a result
    (input bytes' hash, model ids, decoding/generation settings, seed); values are JSON or bytes files written
    atomically under ``root/<namespace>/<2 hex>/<key>``. ``Cache(None)`` is a disabled cache."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None
        if (
            self.root is not None
        ):  # checked once here, not per item (every item would fail, and count as done)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.root).close()  # writable, not only present
            except OSError as e:
                raise RunError(
                    f"cache directory {self.root} cannot be used ({e.strerror or e}); set RECON_CACHE "
                    "(or run.cache_dir) to a writable directory, or run.cache_dir='' to disable it"
                ) from None

    @staticmethod
    def key(**parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def _path(self, namespace: str, key: str, suffix: str) -> Path:
        assert self.root is not None
        return self.root / namespace / key[:2] / f"{key}{suffix}"

    def load(self, namespace: str, key: str, suffix: str, read: Callable[[Path], Any]) -> Any | None:
        """``read(path)`` of an entry, or None for a miss. An entry ``read`` cannot use (it raises: a torn, tampered
        or oversized file) is *damaged*: a warning names the file, the file is removed, and it is a miss, so the
        caller computes the value again and its ``put_*`` writes a good entry in its place."""
        if self.root is None:
            return None
        path = self._path(namespace, key, suffix)
        try:
            return read(path)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - any failure to use a cache entry is a miss, never a failed item
            log.warning(
                "cache entry %s is damaged (%s: %s); treated as a miss, it will be rebuilt",
                path,
                type(e).__name__,
                e,
            )
            try:
                path.unlink(missing_ok=True)
            except (
                OSError
            ):  # a directory in its place, a read-only cache: the rebuilt value is simply not stored
                pass
            return None

    def get_json(self, namespace: str, key: str, valid: Callable[[Any], bool] | None = None) -> Any | None:
        """The JSON value of an entry, or None for a miss; an entry that is not strict JSON (NaN is never stored),
        or whose value ``valid`` rejects, is damaged (see :meth:`load`)."""

        def read(path: Path) -> Any:
            value = json.loads(path.read_bytes(), parse_constant=_reject_constant)
            if valid is not None and not valid(value):
                raise ValueError(f"unexpected value {json.dumps(value)[:80]}")
            return value

        return self.load(namespace, key, ".json", read)

    def put_json(self, namespace: str, key: str, value: Any) -> None:
        """Store ``value``; one that is not strict JSON (NaN, inf) is not stored: a non-finite result is recomputed,
        never served from the cache."""
        if self.root is None:
            return
        try:
            text = json.dumps(value, default=_json_default, allow_nan=False)
        except ValueError:
            log.warning("not caching a non-finite value under %s/%s", namespace, key)
            return
        atomic_write_text(self._path(namespace, key, ".json"), text)

    def get_bytes(
        self, namespace: str, key: str, suffix: str = ".bin", check: Callable[[Path], Any] | None = None
    ) -> bytes | None:
        """The bytes of an entry, or None for a miss; ``check(path)`` raising marks the entry damaged (see
        :meth:`load`)."""

        def read(path: Path) -> bytes:
            data = path.read_bytes()  # first: a missing entry is a plain miss, whatever ``check`` says of it
            if check is not None:
                check(path)
            return data

        return self.load(namespace, key, suffix, read)

    def put_bytes(self, namespace: str, key: str, data: bytes, suffix: str = ".bin") -> None:
        if self.root is not None:
            atomic_write_bytes(self._path(namespace, key, suffix), data)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a cacheable value")


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime): a run hashes each input once although resume
    (which items changed), loading and the caches all key on it."""
    st = os.stat(path)
    return _sha256_file(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def derive_seed(run_seed: int, item_id: str, candidate: int, image: int) -> int:
    """A 63-bit seed from (run seed, item id, candidate index, image index): any image reproducible alone."""
    digest = hashlib.sha256(f"{run_seed}\x1f{item_id}\x1f{candidate}\x1f{image}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class RecordList(list):
    """Records of a ``results.jsonl``; ``skipped_lines`` counts its unreadable lines."""

    skipped_lines: int = 0


def read_records(path: str | Path) -> RecordList:
    """The records of a run's ``results.jsonl`` (for :func:`recon.report.write_report` and analyses).

    Reads like a resuming run does (:func:`read_jsonl`): torn or corrupt lines (a run killed
    mid-write) are skipped and counted in ``skipped_lines``, which the report shows. Only the records of the run's
    current inputs count (:func:`current_records`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such results file; is this a run directory?")
    records, bad = read_jsonl(path)
    out = RecordList(current_records(path.parent, records))
    out.skipped_lines = len(bad)
    return out
