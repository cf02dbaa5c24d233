"""Streaming batch prediction: ``mmsenti predict RUN --input posts.jsonl --output predictions.jsonl``.

The input (JSON lines or CSV with ``text``, ``image`` — a path relative to the file — and optional ``id``; for a model
whose image encoder is ``tags``, ``tags`` instead of ``image``: a JSON list of strings, or a CSV cell ``a|b|c``; for a
model trained on extracted clip features, ``video``: a clip's path, extracted with the model's own settings) is read
row by row and cut into batches (sorted by text length within a window of a few batches, so a batch needs little
padding); images are decoded and transformed in DataLoader worker processes (batch ``b`` goes to worker
``b mod W``); the main process runs the model and appends one JSON line per input row, in input order, as it goes.
Every row names the model that wrote it (``"model": {"name", "version"}``, as ``GET /v1/model`` does). A bad row
(missing field, unreadable image, broken JSON, a text a tokenizer cannot take, a CSV row whose quote is never
closed: the rows it swallowed are read again) becomes an output row with an ``"error"`` field, so the good rows are
never lost and every input row is accounted for; with ``strict`` the first bad row stops the run with an error
naming the file and line. ``resume`` continues an interrupted output file written by the same model: rows already
written are skipped, a partly written last line is dropped and rewritten; another model's rows or a line that is
not an output row are refused.
"""

from __future__ import annotations

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

from mmsenti.data.base import DataError, Sample, parse_tags, text_problem
from mmsenti.data.formats.readers import field_problem, iter_csv_rows
from mmsenti.inference import Prediction, Predictor
from mmsenti.models.base import check_per_post
from mmsenti.models.folder import ModelFolder

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
    # The dataset reader's checks, going on after a bad record: the rows an unterminated quote swallowed are read
    # again, so every row of the file gets an output row. No limit on a record's lines: a long quoted post is
    # predicted (the limit would cut it into rows of its own).
    yield from iter_csv_rows(path, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", max_record_lines=0,
                             advice="save the file as UTF-8")


def row_id(line: int, record: dict[str, Any] | str) -> str:
    """The ``"id"`` of a row's output: its ``id`` field, else its line number (also for a row that did not parse, or
    whose id cannot be written as UTF-8)."""
    ident = str(record.get("id") or line) if isinstance(record, dict) else str(line)
    return ident if text_problem(ident) is None else str(line)


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
        self.fields = predictor.processor.post_fields  # the field each modality is read from (a tags model: tags)
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
                rows.append(Row(position, line, row_id(line, record), record))
                continue
            row = Row(position, line, row_id(line, record))
            try:
                samples.append(self._sample(row, record))
            except DataError as e:
                row.error = str(e)
            rows.append(row)
        return rows, self.processor(samples, training=False) if samples else None

    def _sample(self, row: Row, record: dict[str, Any]) -> Sample:
        problem = field_problem(record)  # JSON's \ud800 escapes: a text the tokenizer would fail the whole batch on
        if problem is not None:
            raise DataError(problem)
        text, image = record.get("text"), record.get("image")
        tags = None
        if "tags" in self.fields.values():
            try:
                tags = parse_tags(record.get("tags"), cell=self.path.suffix.lower() in (".csv", ".tsv"))
            except DataError as e:
                raise DataError(f"'tags': {e}") from None
        video = record.get("video")
        reads = [f for f in self.fields.values() if f in ("text", "image", "tags", "video")]
        for field, value in (("text", text), ("image", image), ("tags", tags), ("video", video)):
            if field in reads and value in (None, "", []) and not self.allow_missing:
                raise DataError(f"missing '{field}' (this model reads {' and '.join(reads)})")
        if text is not None and not isinstance(text, str):
            raise DataError(f"'text' must be a string, got {type(text).__name__}")
        if "text" not in self.modalities or text == "":
            text = None
        pixels = None
        if "image" in reads and image not in (None, ""):
            if not isinstance(image, str):
                raise DataError(f"'image' must be a path, got {type(image).__name__}")
            pixels = self.processor.image_tensor(self.path.parent / image, row.id)
        clip = None
        if "video" in reads and video not in (None, ""):
            if not isinstance(video, str):
                raise DataError(f"'video' must be a path, got {type(video).__name__}")
            clip = self.path.parent / Path(video).expanduser()
        # A clip model's features are extracted here, per row: a bad clip is this row's error, not its batch's.
        return self.processor.prepare(Sample(id=row.id, label=None, text=text, image=pixels, tags=tags, video=clip))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers leave the cores to the model


# --------------------------------------------------------------------------------------------------- resume
def _resume_point(output: Path, input: Path, model: ModelFolder) -> int:
    """How many complete rows ``output`` holds; a partly written last line (the interruption) is cut off.

    Every row must be an output row of ``model`` for the same row of ``input``: resuming after anything else would
    mix two models' answers (or two inputs) in one file, or keep a line nobody can read, so it is refused.
    """
    if not output.is_file():
        return 0
    inputs = iter_rows(input)
    rows = offset = 0
    with open(output, "r+b") as f:
        for raw in f:
            if not raw.endswith(b"\n"):  # a row cut short by the interruption: written again
                f.truncate(offset)
                break
            rows += 1
            try:
                row = json.loads(raw)
            except ValueError:  # not JSON, or not UTF-8
                row = None
            if not isinstance(row, dict) or "id" not in row:
                raise DataError(f"{output}:{rows}: not a row of mmsenti predict; delete or mend that line, or use "
                                f"another --output")
            theirs = row.get("model")
            if not isinstance(theirs, dict) or theirs.get("version") != model.version:
                who = (f"model {theirs.get('name')!r} version {theirs.get('version')}" if isinstance(theirs, dict)
                       else "a model it does not name (an older mmsenti?)")
                raise DataError(f"{output}:{rows}: written by {who}, not by {model.name!r} version {model.version}; "
                                f"resuming would mix two models in one file: use another --output or drop --resume")
            line_record = next(inputs, None)
            if line_record is None or str(row["id"]) != row_id(*line_record):
                raise DataError(f"{output}: holds rows that do not match the start of {input} (row {rows} has id "
                                f"{row['id']!r}); use another --output or drop --resume")
            offset += len(raw)
    return rows


def predict_file(predictor: Predictor, input: str | Path, output: str | Path | None = None, *,
                 batch_size: int = 32, workers: int = 0, resume: bool = False, strict: bool = False,
                 progress: bool = False, out_stream: TextIO | None = None, sort_window: int = 4,
                 model: ModelFolder | None = None) -> PredictStats:
    """Predict every row of ``input`` into ``output`` (JSON lines; ``None`` writes to ``out_stream``).

    Args:
        batch_size: posts per model call.
        workers: DataLoader worker processes that read and transform images (0: in this process).
        resume: continue an existing ``output`` instead of starting it anew.
        strict: stop at the first bad row (DataError naming file and line) instead of writing an error row.
        progress: a progress bar with posts/s (on a terminal).
        sort_window: batches whose rows are sorted by text length before batching (1: batches in input order).
        model: the folder whose name and version every row carries (default: the one ``predictor`` was loaded
            from).
    """
    import sys

    from tqdm.auto import tqdm

    check_per_post(predictor.config.model, "used for prediction")  # rows are regrouped by text length
    path = Path(input)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    if batch_size < 1 or workers < 0:
        raise DataError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    model = model or predictor.folder
    if model is None:
        raise ValueError("this predictor does not know the folder it was loaded from: pass it (model=)")
    skip = 0
    if resume:
        if output is None:
            raise DataError("--resume needs --output (the file to continue)")
        skip = _resume_point(Path(output), path, model)
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
    ref = model.ref()
    done: dict[int, Prediction] = {}  # finished rows by position, until every earlier one is written
    next_position = skip
    try:
        for rows, batch in loader:
            good = [row.id for row in rows if row.error is None]
            preds = iter(predictor.decode(predictor.run(batch), good) if batch is not None else ())
            for row in rows:
                done[row.position] = next(preds) if row.error is None else Prediction(row.id, line=row.line,
                                                                                      error=row.error)
            written = 0
            while next_position in done:  # in input order, whatever order the rows were predicted in
                pred = done.pop(next_position)
                next_position += 1
                if pred.error is not None:
                    if strict:
                        sink.flush()
                        raise DataError(f"{path}:{pred.line}: {pred.error}")
                    stats.errors += 1
                sink.write(json.dumps({**pred.to_dict(), "model": ref}, ensure_ascii=False) + "\n")
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
