"""``mmsenti features extract``: a folder or list of clips → a ``features`` dataset folder.

Input, either

* the MMSA / CMU-MOSI raw layout: a folder with ``label.csv`` (``video_id``, ``clip_id``, ``text``, ``label``,
  ``mode``; or ``id`` instead of the two) and the clips at ``Raw/<video_id>/<clip_id>.mp4`` (or without ``Raw/``), or
* a JSON-lines or CSV file of records with ``video`` (a path, relative to the file), ``text``, ``label`` and
  optionally ``id`` and ``split`` (``mode`` is read as the split too; records without one go to train).

Output (``--out DIR``, then ``mmsenti train`` with ``data.name: features``, ``data.root: DIR``):

* ``manifest.json``: the resolved extraction settings, each modality's width, the package versions that made them,
  the input and the counts;
* ``features.npz``: per split, in the layout of MMSA's feature files (and so of the ``mosi`` reader): ``<split>.audio``
  and ``<split>.vision`` (N, T_max, D) zero-padded with ``<split>.<modality>_lengths``, ``<split>.id``,
  ``<split>.raw_text``, ``<split>.label`` (as given) and, when every label is a number, ``<split>.regression_labels``.
  Safe arrays only: read with ``allow_pickle=False``;
* ``clips.jsonl``: the extracted clips' records (id, text, label, split, video), which the ``features`` dataset reads
  labels and splits from;
* ``errors.jsonl``: every clip that could not be used (unreadable, no audio track, too short or long, no face with
  ``vision.require_face``) and every remark on one that was (no face in any frame), with the reason;
* ``clips/``: one ``.npz`` per finished clip, written atomically: a killed run resumes without redoing them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsenti.data.formats.bundle import canonical_split
from mmsenti.data.formats.readers import read_csv, read_jsonl
from mmsenti.data.video.decode import probe
from mmsenti.data.video.extraction import Extraction, ExtractionConfig, difference
from mmsenti.errors import DataError
from mmsenti.utils import read_json, write_atomic

log = logging.getLogger(__name__)

FORMAT = "mmsenti-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.npz"
RECORDS = "clips.jsonl"
ERRORS = "errors.jsonl"


@dataclass
class ClipRecord:
    id: str
    video: Path
    text: str | None
    label: Any
    split: str
    where: str  # file:line, for messages


# ----------------------------------------------------------------------------------------------------- input
def read_clip_list(source: str | Path) -> list[ClipRecord]:
    """The clips to extract, from an MMSA raw folder or a JSON-lines/CSV file (see the module docstring)."""
    source = Path(source)
    if source.is_dir():
        records = _read_mmsa_raw(source)
    elif source.suffix.lower() == ".jsonl":
        records = [_record(source, line, obj) for line, obj in read_jsonl(source)]
    elif source.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
        records = [_record(source, line, row) for line, row in read_csv(source, delimiter, required=("video",))]
    elif not source.exists():
        raise DataError(f"{source}: no such file or folder")
    else:
        raise DataError(f"{source}: expected a folder with label.csv, or a .jsonl/.csv list of clips")
    if not records:
        raise DataError(f"{source}: no clips listed")
    seen: dict[str, str] = {}
    for r in records:
        if r.id in seen:
            raise DataError(f"{r.where}: id {r.id!r} repeats {seen[r.id]}")
        seen[r.id] = r.where
    return records


def _read_mmsa_raw(root: Path) -> list[ClipRecord]:
    csv_path = root / "label.csv"
    if not csv_path.is_file():
        raise DataError(f"{root}: no label.csv (the MMSA raw layout: label.csv + Raw/<video_id>/<clip_id>.mp4)")
    out = []
    for line, row in read_csv(csv_path, required=("text", "label", "mode")):
        where = f"{csv_path}:{line}"
        if row.get("video_id") and row.get("clip_id"):
            vid, cid = row["video_id"], row["clip_id"]
            sid = f"{vid}_{cid}"
            candidates = [root / "Raw" / vid / f"{cid}.mp4", root / vid / f"{cid}.mp4"]
        elif row.get("id"):
            sid = row["id"].replace("$_$", "_")
            vid, _, cid = row["id"].partition("$_$")
            candidates = [root / "Raw" / vid / f"{cid}.mp4", root / vid / f"{cid}.mp4", root / "Raw" / f"{sid}.mp4"]
        else:
            raise DataError(f"{where}: no id (expected video_id and clip_id, or id)")
        video = next((p for p in candidates if p.exists()), candidates[0])
        out.append(ClipRecord(sid, video, row["text"].strip(), row["label"], canonical_split(row["mode"], where),
                              where))
    return out


def _record(path: Path, line: int, obj: dict[str, Any]) -> ClipRecord:
    where = f"{path}:{line}"
    video = obj.get("video")
    if not isinstance(video, str) or not video.strip():
        raise DataError(f"{where}: 'video' must be a clip's path, got {video!r}")
    p = Path(video).expanduser()
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    split = obj.get("split") or obj.get("mode") or "train"
    sid = obj.get("id")
    return ClipRecord(str(sid) if sid not in (None, "") else f"{path.stem}:{line}",
                      p if p.is_absolute() else path.parent / p, text, obj.get("label"),
                      canonical_split(split, where), where)


# ---------------------------------------------------------------------------------------------------- output
def clip_file(out: Path, sid: str) -> Path:
    """Where clip ``sid``'s arrays go: its id made safe for a file name, plus a hash (two ids never collide)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sid)[:80]
    return out / "clips" / f"{safe}-{hashlib.blake2b(sid.encode(), digest_size=4).hexdigest()}.npz"


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST} (not a folder written by `mmsenti features extract`)")
    manifest = read_json(path, "features manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not an mmsenti features manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: written by a newer mmsenti (format version {manifest['format_version']})")
    return manifest


# ------------------------------------------------------------------------------------------------ the workers
_worker: Extraction | None = None


def _init_worker(resolved: dict[str, Any]) -> None:
    import torch

    global _worker
    torch.set_num_threads(1)  # one clip per core: the workers are the parallelism
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    _worker = Extraction(resolved)


def _extract_one(sid: str, video: str, target: str) -> tuple[str, str | None, list[str], float, float]:
    """Extract one clip into ``target`` → ``(id, error, notes, seconds of video, seconds taken)``."""
    assert _worker is not None
    start = time.perf_counter()
    try:
        arrays, notes = _worker(video)
        seconds = probe(video).duration
    except DataError as e:
        return sid, str(e), [], 0.0, time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a decoder or extractor failing on one odd clip must not end the job
        return sid, f"{video}: {type(e).__name__}: {e}", [], 0.0, time.perf_counter() - start
    write_atomic(target, _npz_bytes(arrays))
    return sid, None, notes, seconds, time.perf_counter() - start


@dataclass
class ExtractSummary:
    clips: int = 0  # usable clips in the output
    resumed: int = 0  # of those, finished by an earlier run
    errors: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    video_seconds: float = 0.0  # of the clips extracted by this run
    clip_seconds: float = 0.0  # time the workers spent on those clips (without starting up)
    wall_seconds: float = 0.0

    def line(self, out: Path) -> str:
        speed = (f"; {self.video_seconds:.0f} s of video in {self.wall_seconds:.0f} s "
                 f"({self.video_seconds / max(self.wall_seconds, 1e-9):.1f}x real time)") if self.video_seconds else ""
        problems = (f"; {len(self.errors)} clip(s) left out and {len(self.notes)} remark(s), see {out / ERRORS}"
                    if self.errors or self.notes else "")
        return f"extracted {self.clips} clip(s) into {out} ({self.resumed} from an earlier run){speed}{problems}"


def extract_features(source: str | Path, out: str | Path, config: ExtractionConfig | None = None, *,
                     workers: int = 1, strict: bool = False, progress: bool = False) -> ExtractSummary:
    """Extract every clip of ``source`` into ``out`` (see the module docstring) with ``workers`` processes.

    A second call with the same ``out`` resumes: finished clips are kept, the others extracted. ``out`` made with
    other settings is refused, naming the first that differs.

    Raises:
        DataError: a bad input list, an ``out`` made otherwise, no usable clip, or (``strict``) the first bad clip.
    """
    config = config or ExtractionConfig()
    out = Path(out)
    resolved = config.resolved()
    records = read_clip_list(source)
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        if (diff := difference(resolved, old["extraction"], mine="this run", other=str(out))) is not None:
            raise DataError(f"{out} holds features made with other settings ({diff}); give another --out folder")
    (out / "clips").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    main = Extraction(config)  # fails here, once, on a missing package or bad setting; gives dims and versions
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "extraction": resolved, "dims": main.dims,
                "versions": main.versions(), "source": str(Path(source).resolve()), "complete": False}
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    summary = ExtractSummary()
    todo = []
    for r in records:
        if clip_file(out, r.id).is_file():
            summary.resumed += 1
        else:
            todo.append(r)
    if summary.resumed:
        log.info("%s: %d of %d clips already extracted; extracting the other %d", out, summary.resumed,
                 len(records), len(todo))
    by_id = {r.id: r for r in records}
    failed: dict[str, str] = {}

    def done(result) -> None:
        sid, error, notes, seconds, took = result
        summary.clip_seconds += took
        r = by_id[sid]
        if error is not None:
            failed[sid] = error
            if strict:
                raise DataError(f"{r.where}: {error} (--strict stops at the first bad clip)")
            log.warning("%s: %s", r.where, error)
        summary.notes += [{"id": sid, "video": str(r.video), "note": n, "kept": True} for n in notes]
        summary.video_seconds += seconds

    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), initial=summary.resumed, desc="extracting", unit="clip", disable=not progress)
    if workers <= 1:
        global _worker
        _worker = main
        for r in todo:
            done(_extract_one(r.id, str(r.video), str(clip_file(out, r.id))))
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # torch and OpenCV threads do not survive a fork
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(resolved,)) as pool:
            pending = {pool.submit(_extract_one, r.id, str(r.video), str(clip_file(out, r.id))) for r in todo}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
                        bar.update()
            except BrokenProcessPool:
                raise DataError(f"a worker process died while extracting (the system killed it: out of memory, or "
                                f"a clip crashed the decoder); the {len(list((out / 'clips').glob('*.npz')))} "
                                "finished clips are kept: run the same command again to resume, with --workers 1 to "
                                "see which clip it is") from None
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    bar.close()

    summary.errors = [{"id": sid, "video": str(by_id[sid].video), "where": by_id[sid].where, "error": e,
                       "kept": False} for sid, e in failed.items()]
    good = [r for r in records if r.id not in failed]
    if not good:
        raise DataError(f"{source}: no clip could be extracted (first: {summary.errors[0]['error']})")
    summary.clips = len(good)
    _assemble(out, good, main.dims)
    write_atomic(out / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n"
                                       for e in summary.errors + summary.notes))
    summary.wall_seconds = time.perf_counter() - start
    manifest.update(complete=True, clips=summary.clips, left_out=len(summary.errors),
                    splits={s: sum(r.split == s for r in good) for s in ("train", "dev", "test")})
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return summary


def _assemble(out: Path, good: list[ClipRecord], dims: dict[str, int]) -> None:
    """``features.npz`` (MMSA's per-split layout) and ``clips.jsonl`` from the per-clip files."""
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "dev", "test"):
        rows = [r for r in good if r.split == split]
        if not rows:
            continue
        clips = []
        for r in rows:
            with np.load(clip_file(out, r.id), allow_pickle=False) as z:
                clips.append({m: z[m] for m in dims})
        for m, d in dims.items():
            lengths = np.array([len(c[m]) for c in clips], dtype=np.int64)
            padded = np.zeros((len(rows), int(lengths.max()), d), np.float32)
            for i, c in enumerate(clips):
                padded[i, : len(c[m])] = c[m]
            arrays[f"{split}.{m}"], arrays[f"{split}.{m}_lengths"] = padded, lengths
        arrays[f"{split}.id"] = np.array([r.id for r in rows])
        arrays[f"{split}.raw_text"] = np.array([r.text or "" for r in rows])
        labels = [r.label for r in rows]
        arrays[f"{split}.label"] = np.array(["" if v is None else str(v) for v in labels])
        try:
            arrays[f"{split}.regression_labels"] = np.array([float(v) for v in labels], dtype=np.float64)
        except (TypeError, ValueError):
            pass  # class names: the features dataset reads them from clips.jsonl
    write_atomic(out / FEATURES, _npz_bytes(arrays))
    write_atomic(out / RECORDS, "".join(
        json.dumps({"id": r.id, "text": r.text, "label": r.label, "split": r.split, "video": str(r.video)},
                   ensure_ascii=False) + "\n" for r in good))
