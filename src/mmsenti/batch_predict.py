"""Streaming batch prediction: ``mmsenti predict RUN --input posts.jsonl --output predictions.jsonl``.

The input (JSON lines or CSV with ``text``, ``image`` — a path relative to the file — and optional ``id``) is read
row by row and cut into batches (sorted by text length within a window of a few batches, so a batch needs little
padding); images are decoded and transformed in DataLoader worker processes (batch ``b`` goes to worker
``b mod W``); the main process runs the model and appends one JSON line per input row, in input order, as it goes. A bad row (missing field, unreadable image, broken JSON)
becomes an output row with an ``"error"`` field, so the good rows are never lost; with ``strict`` the first bad
row stops the run with an error naming the file and line. ``resume`` continues an interrupted output file: rows
already written are skipped, a partly written last line is dropped and rewritten.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmsenti.data.base import DataError, Sample
from mmsenti.inference import Predictor, check_per_post

log = logging.getLogger(__name__)


@dataclass
class PredictStats:
    rows: int = 0  # rows written in this call (predictions + errors)
    errors: int = 0
    resumed: int = 0  # rows found already written (resume)
    seconds: float = 0.0

    @property
    def posts_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self, output: str | Path | None) -> str:
        where = f" → {output}" if output else ""
        resumed = f" ({self.resumed} already there)" if self.resumed else ""
        errors = f", {self.errors} with an error (see their \"error\" field)" if self.errors else ", no errors"
        return (f"predicted {self.rows - self.errors} posts{errors}{resumed} in {self.seconds:.1f}s "
                f"({self.posts_per_second:.1f} posts/s){where}")


# --------------------------------------------------------------------------------------------------- reading
def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line, record)`` per data row; a row that cannot be parsed gives ``(line, error message)`` instead.

    Unlike the dataset readers (:mod:`mmsenti.data.formats.common`), which stop at the first bad row, prediction
    keeps going: one broken line must not lose the rest of the file.
    """
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with open(path, "rb") as f:  # decoded line by line: one line with bad bytes is one bad row
            for line, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield line, f"not valid UTF-8 (byte {e.start + 1})"
                    continue
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    yield line, f"invalid JSON ({e.msg} at column {e.colno})"
                    continue
                yield line, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
        return
    try:
        yield from _iter_csv(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start + 1} of a block); save the file as UTF-8") from None


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (no header)")
        n_header = len(reader.fieldnames)
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, f"bad CSV row ({e})"
            else:
                extra = row.pop(None, None) or []  # type: ignore[call-overload]
                n = sum(v is not None for v in row.values()) + len(extra)
                yield start, row if n == len(reader.fieldnames) else f"{n} fields, the header has {n_header}"
            start = reader.line_num + 1


def count_rows(path: Path) -> int:
    return sum(1 for _ in iter_rows(path))


@dataclass
class Row:
    position: int  # data row number in the file (0-based): the output is written in this order
    line: int
    id: str
    error: str | None = None


def _text_length(record: dict[str, Any] | str) -> int:
    text = record.get("text") if isinstance(record, dict) else None
    return len(text) if isinstance(text, str) else 0


class _Batches(IterableDataset):
    """Yields ``(rows, model inputs or None)`` per batch; worker ``k`` of ``W`` prepares batches ``b ≡ k mod W``.

    Rows are read in windows of ``sort_window`` batches and sorted by text length inside a window before they are
    cut into batches: a batch is then padded to similar lengths (half the padded tokens on real posts). The
    writer puts rows back in input order.
    """

    def __init__(self, path: Path, predictor: Predictor, batch_size: int, skip: int, sort_window: int = 4):
        self.path, self.processor, self.batch_size, self.skip = path, predictor.processor, batch_size, skip
        self.window = batch_size * max(1, sort_window)
        self.modalities = predictor.modalities
        self.allow_missing = predictor.allow_missing_modality

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        window: list[tuple[int, int, dict[str, Any] | str]] = []
        index = 0
        for position, (line, record) in enumerate(iter_rows(self.path)):
            if position < self.skip:
                continue
            window.append((position, line, record))
            if len(window) == self.window:
                yield from self._batches(window, index, worker, workers)
                index += -(-len(window) // self.batch_size)
                window = []
        if window:
            yield from self._batches(window, index, worker, workers)

    def _batches(self, window, index: int, worker: int, workers: int):
        window = sorted(window, key=lambda item: _text_length(item[2]))
        for b, start in enumerate(range(0, len(window), self.batch_size), index):
            if b % workers == worker:
                yield self._prepare(window[start:start + self.batch_size])

    def _prepare(self, chunk) -> tuple[list[Row], dict[str, Any] | None]:
        rows, samples = [], []
        for position, line, record in chunk:
            if isinstance(record, str):
                rows.append(Row(position, line, str(line), record))
                continue
            row = Row(position, line, str(record.get("id") or line))
            try:
                samples.append(self._sample(row, record))
            except DataError as e:
                row.error = str(e)
            rows.append(row)
        return rows, self.processor(samples, training=False) if samples else None

    def _sample(self, row: Row, record: dict[str, Any]) -> Sample:
        text, image = record.get("text"), record.get("image")
        for field, value in (("text", text), ("image", image)):
            if field in self.modalities and value in (None, "") and not self.allow_missing:
                raise DataError(f"missing '{field}' (this model reads {' and '.join(self.modalities)})")
        if text is not None and not isinstance(text, str):
            raise DataError(f"'text' must be a string, got {type(text).__name__}")
        if "text" not in self.modalities or text == "":
            text = None
        pixels = None
        if "image" in self.modalities and image not in (None, ""):
            if not isinstance(image, str):
                raise DataError(f"'image' must be a path, got {type(image).__name__}")
            pixels = self.processor.image_tensor(self.path.parent / image, row.id)
        return Sample(id=row.id, label=None, text=text, image=pixels)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers leave the cores to the model


# --------------------------------------------------------------------------------------------------- resume
def _resume_point(output: Path) -> tuple[int, str | None]:
    """Complete rows already in ``output`` and the id of the last one; a partly written last line is cut off."""
    if not output.is_file():
        return 0, None
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a row cut short by the interruption
    if keep < len(data):
        with open(output, "r+b") as f:
            f.truncate(keep)
    lines = data[:keep].decode("utf-8").splitlines()
    last = json.loads(lines[-1]).get("id") if lines else None
    return len(lines), last


def predict_file(predictor: Predictor, input: str | Path, output: str | Path | None = None, *,
                 batch_size: int = 32, workers: int = 0, resume: bool = False, strict: bool = False,
                 progress: bool = False, out_stream: TextIO | None = None, sort_window: int = 4) -> PredictStats:
    """Predict every row of ``input`` into ``output`` (JSON lines; ``None`` writes to ``out_stream``).

    Args:
        batch_size: posts per model call.
        workers: DataLoader worker processes that read and transform images (0: in this process).
        resume: continue an existing ``output`` instead of starting it anew.
        strict: stop at the first bad row (DataError naming file and line) instead of writing an error row.
        progress: a progress bar with posts/s (on a terminal).
        sort_window: batches whose rows are sorted by text length before batching (1: batches in input order).
    """
    import sys

    from tqdm.auto import tqdm

    check_per_post(predictor.config.model, "used for prediction")  # rows are regrouped by text length
    path = Path(input)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    if batch_size < 1 or workers < 0:
        raise DataError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    skip, last_id = 0, None
    if resume:
        if output is None:
            raise DataError("--resume needs --output (the file to continue)")
        skip, last_id = _resume_point(Path(output))
        if skip:
            ids = [r[1].get("id") or r[0] if isinstance(r[1], dict) else r[0]
                   for _, r in zip(range(skip), iter_rows(path), strict=False)]
            if len(ids) < skip or str(ids[-1]) != str(last_id):
                raise DataError(f"{output}: holds {skip} rows that do not match the start of {path} "
                                f"(last id {last_id!r}); use another --output or drop --resume")
    stats = PredictStats(resumed=skip)
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers in forked workers
    loader = DataLoader(_Batches(path, predictor, batch_size, skip, sort_window), batch_size=None, num_workers=workers,
                        worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    bar = tqdm(total=count_rows(path) if progress else None, initial=skip, unit="post", disable=not progress,
               dynamic_ncols=True, desc="predict")
    sink = open(output, "a" if resume else "w", encoding="utf-8") if output is not None else (out_stream or sys.stdout)
    t0 = time.perf_counter()
    done: dict[int, tuple[Row, dict | None]] = {}  # finished rows by position, until every earlier one is written
    next_position = skip
    try:
        for rows, batch in loader:
            preds = iter(predictor.decode(predictor.run(batch))) if batch is not None else iter(())
            for row in rows:
                done[row.position] = (row, next(preds) if row.error is None else None)
            written = 0
            while next_position in done:  # in input order, whatever order the rows were predicted in
                row, pred = done.pop(next_position)
                next_position += 1
                if row.error is not None:
                    if strict:
                        sink.flush()
                        raise DataError(f"{path}:{row.line}: {row.error}")
                    out = {"id": row.id, "line": row.line, "error": row.error}
                    stats.errors += 1
                else:
                    out = {"id": row.id, **pred}
                sink.write(json.dumps(out, ensure_ascii=False) + "\n")
                stats.rows += 1
                written += 1
            sink.flush()
            bar.update(written)
    finally:
        stats.seconds = time.perf_counter() - t0
        bar.close()
        if output is not None:
            sink.close()
    return stats
