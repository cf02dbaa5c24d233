"""Helpers every loader shares: the root directory, split names, file readers with line-numbered errors,
deterministic split carving and the final checks on a bundle (duplicate ids).

The checks that end a load with a :class:`DataError` (duplicate ids, missing images under ``missing_images:
error``) can be deferred with :func:`lenient`, so that ``mmsenti data check`` sees the whole dataset and reports
every problem instead of stopping at the first.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import difflib
import json
import logging
import math
import random
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmsenti.config import DataConfig
from mmsenti.data.base import SPLITS, DataError, DatasetBundle, Sample, Task, text_problem

log = logging.getLogger(__name__)

# Names the releases use for the three splits; everything is keyed "train"/"dev"/"test" after loading.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "dev": "dev", "valid": "dev", "val": "dev", "validation": "dev",
    "test": "test", "testing": "test",
}

_LENIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("mmsenti_data_lenient", default=False)


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """Within this block loaders keep duplicate ids and missing images (as paths) instead of raising.

    Used by the data doctor, which then reports every problem itself. Malformed files still raise.
    """
    token = _LENIENT.set(True)
    try:
        yield
    finally:
        _LENIENT.reset(token)


def is_lenient() -> bool:
    return _LENIENT.get()


def require_root(cfg: DataConfig) -> Path:
    """The dataset directory (or file, for user data) named by ``data.root``; a clear error when unset or absent."""
    if not cfg.root:
        raise DataError(f"dataset '{cfg.name}': data.root is not set (give the dataset directory: --root DIR "
                        f"or --set data.root=DIR)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset '{cfg.name}': data.root does not exist: {root}")
    return root


def canonical_split(name: str, where: str) -> str:
    """``valid``/``val``/... → ``dev``; anything unknown is an error naming ``where`` (file and line)."""
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise DataError(f"{where}: unknown split {name!r} (use one of: train, dev/valid/val, test)")
    return SPLIT_ALIASES[key]


def find_file(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (relative to ``root``) that exists."""
    for n in names:
        p = root / n
        if p.exists():
            return p
    return None


def lookup_codec(encoding: str) -> codecs.CodecInfo:
    """The codec ``data.encoding`` names; an unknown name is a one-line :class:`DataError`."""
    try:
        return codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """A small per-post text file (original MVSA/TumEmo releases) as str.

    Under the default ``utf-8`` each file falls back to Windows-1252, then Latin-1: old Twitter dumps mix encodings
    file by file. Any other ``data.encoding`` is strict: a byte it cannot decode is an error naming the file."""
    raw = path.read_bytes()
    if lookup_codec(encoding).name != "utf-8":
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not {encoding} text: byte 0x{raw[e.start]:02x} at byte offset {e.start}; if the "
                            f"file uses another encoding, say which with data.encoding") from None
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")  # never fails: every byte is a code point


# ------------------------------------------------------------------------------------------------ readers
def field_problem(fields: Mapping[Any, Any]) -> str | None:
    """The first string value of a record that a tokenizer cannot take (:func:`text_problem`), or None.

    Every field is checked, not the text alone: an id or an image path without a UTF-8 encoding cannot be written
    to an output file or opened either. Names the field: ``'text' holds an unpaired UTF-16 surrogate ...``.
    """
    for name, value in fields.items():
        if isinstance(value, str) and (problem := text_problem(value)) is not None:
            return f"{name!r} {problem}" if isinstance(name, str) else f"element {name} {problem}"
    return None


ENCODING_ADVICE = "if the file uses another encoding, say which with data.encoding (e.g. cp1252 or latin-1)"


def _decode_error(path: Path, lineno: int, raw: bytes, err: UnicodeDecodeError, offset: int, encoding: str,
                  advice: str) -> DataError:
    return DataError(f"{path}:{lineno}: not {encoding} text: byte 0x{raw[err.start]:02x} at byte offset "
                     f"{offset + err.start} (column {err.start + 1}); {advice}")


def text_lines(path: Path, encoding: str = "utf-8", advice: str = ENCODING_ADVICE) -> Iterator[str]:
    """The lines of a text file, decoded, each with its line ending (what :mod:`csv` wants).

    A byte sequence that is not ``encoding`` is a :class:`DataError` naming the file, line and byte offset, never a
    bare ``UnicodeDecodeError``; ``advice`` ends it. A UTF-8 byte-order mark is skipped.
    """
    codec = lookup_codec(encoding)
    if "\n".encode(codec.name) != b"\n":  # UTF-16/32: bytes cannot be split at b"\n"; decode the whole file
        raw = path.read_bytes()
        try:
            text = raw.decode(codec.name)
        except UnicodeDecodeError as e:
            line = raw[: e.start].decode(codec.name, errors="replace").count("\n") + 1
            raise DataError(f"{path}:{line}: not {encoding} text at byte offset {e.start} ({e.reason}); "
                            f"{advice}") from None
        for line in _LINE_END.split(text):
            if line:
                yield from _split_cr(line)
        return
    first = "utf-8-sig" if codec.name == "utf-8" else codec.name
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode(first if lineno == 1 else codec.name)
            except UnicodeDecodeError as e:
                raise _decode_error(path, lineno, raw, e, offset, encoding, advice) from None
            yield from _split_cr(text)
            offset += len(raw)


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")
_LINE_END = re.compile(r"(?<=\n)")


def _split_cr(text: str) -> list[str]:
    """A lone ``\\r`` ends a line too (old Mac / Excel for Mac files), as ``open(newline="")`` reads them for csv."""
    if "\r" not in text.replace("\r\n", ""):
        return [text]
    return [piece for piece in _LONE_CR.split(text) if piece]


def read_json_list(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """A JSON file holding a list of objects (the CLMLF format); errors name the file, line and column."""
    try:
        data = json.loads("".join(text_lines(path, encoding)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    for i, item in enumerate(data):
        if (problem := field_problem(item)) is not None:
            raise DataError(f"{path}: item {i}: {problem}")
    return data


def read_clmlf_splits(root: Path, split_files: dict[str, Sequence[str]], num_labels: int, encoding: str = "utf-8"
                      ) -> tuple[dict[str, list[Sample]], list[Path]]:
    """CLMLF-style json splits (MVSA, HFM): each file a list of ``{"id", "text", "emotion_label"}``.

    ``split_files`` maps a split to the file names tried in order; a split with no file is left out.
    Returns the samples per canonical split and the files read.
    """
    splits: dict[str, list[Sample]] = {}
    sources = []
    for split, names in split_files.items():
        path = find_file(root, names)
        if path is None:
            continue
        sources.append(path)
        samples = []
        for i, row in enumerate(read_json_list(path, encoding)):
            try:
                samples.append(Sample(id=str(row["id"]), label=int(row["emotion_label"]), text=str(row["text"])))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: item {i}: expected id, text and an integer emotion_label ({e})") from None
            if not 0 <= samples[-1].label < num_labels:
                raise DataError(f"{path}: item {i}: emotion_label must be in 0..{num_labels - 1}, "
                                f"got {samples[-1].label}")
        splits[canonical_split(split, str(path))] = samples
    return splits, sources


def read_jsonl(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(text_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if (problem := field_problem(obj)) is not None:  # JSON's \ud800 escapes make lone surrogates
            raise DataError(f"{path}:{lineno}: {problem}")
        yield lineno, obj


# A record spanning more lines than this is refused: an unterminated quote makes one field swallow the rows after it.
MAX_RECORD_LINES = 10


class _LineTap:
    """Passes numbered lines on to :mod:`csv`, remembers those a record was read from, and takes lines back: the
    rows an unterminated quote swallowed are then read again as rows of their own."""

    def __init__(self, lines: Iterator[str]):
        self.lines = enumerate(lines, 1)
        self.taken: list[tuple[int, str]] = []
        self.again: deque[tuple[int, str]] = deque()  # handed back: read before the file's next line

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self.again.popleft() if self.again else next(self.lines)
        self.taken.append(item)
        return item[1]

    def hand_back(self, lines: list[tuple[int, str]]) -> None:
        self.again.extendleft(reversed(lines))


def _complete_record(line: str, delimiter: str, width: int) -> bool:
    """Whether ``line`` on its own, quotes taken literally, has the header's number of fields."""
    return len(next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])) == width


def _misplaced_quote(lines: list[str], delimiter: str) -> bool:
    """Whether a quote in these lines is closed inside a field (``"a,b\nc,"d",e``: the record goes on after it),
    which :mod:`csv` reads silently and ``strict`` parsing refuses: a multi-line record that does this is a quote
    that was never closed, and the next quote in the file ended it."""
    try:
        for _ in csv.reader(lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error:
        return True
    return False


def _record_problem(row: dict[Any, Any], span: list[tuple[int, str]], width: int, delimiter: str,
                    max_record_lines: int) -> str | None:
    """What is wrong with a record :mod:`csv` read from the numbered lines ``span``, or None (see :func:`read_csv`)."""
    start, end = span[0][0], span[-1][0]
    extra = row.pop(None, None) or []
    short = sum(v is None for v in row.values())
    if extra or short:
        where = f" (the record runs from line {start} to line {end}: an unterminated quote on line {start}?)" \
            if end > start else ""
        return f"expected {width} fields, got {width + len(extra) - short}{where}"
    if end > start:
        if len(span) >= 3 and all(_complete_record(line, delimiter, width) for _, line in span):
            return (f"an unterminated quote on line {start} swallows lines {start + 1}-{end}, each of which is a row "
                    f"of its own")
        if _misplaced_quote([line for _, line in span], delimiter):
            return (f"an unterminated quote on line {start}? The record it opens runs to line {end}, where a quote "
                    f"ends it inside a field")
        if 0 < max_record_lines < end - start + 1:
            return (f"one record spans lines {start}-{end} ({end - start + 1} lines, more than {max_record_lines}): an "
                    f"unterminated quote on line {start}? (a longer quoted field is allowed with a larger "
                    f"data.max_record_lines)")
    return field_problem(row)


def _csv_records(path: Path, delimiter: str, required: Sequence[str], encoding: str, max_record_lines: int,
                 keep_going: bool, advice: str = ENCODING_ADVICE) -> Iterator[tuple[int, dict[str, str] | str]]:
    """:func:`read_csv` and :func:`iter_csv_rows`: ``(line, row)``, or ``(line, problem)`` with ``keep_going``."""
    tap = _LineTap(text_lines(path, encoding, advice))
    reader = csv.DictReader(tap, delimiter=delimiter)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{path}:1: bad CSV header ({e})") from None
    if not header:
        raise DataError(f"{path}: empty CSV file (no header)")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
    while True:
        tap.taken = []
        try:
            row: dict[str, str] | None = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as e:
            row, problem = None, f"bad CSV row ({e}; an unterminated quote?)"
        blank = next((i for i, (_, line) in enumerate(tap.taken) if line.strip("\r\n")), 0)  # empty lines csv skipped
        span = tap.taken[blank:]
        if row is not None:
            problem = _record_problem(row, span, len(header), delimiter, max_record_lines)
        if problem is None:
            yield span[0][0], row  # type: ignore[misc]
            continue
        if not keep_going:
            raise DataError(f"{path}:{span[0][0]}: {problem}")
        yield span[0][0], problem
        tap.hand_back(span[1:])  # the record's other lines: rows of their own when a quote swallowed them


def read_csv(path: Path, delimiter: str = ",", required: Sequence[str] = (), encoding: str = "utf-8",
             max_record_lines: int = MAX_RECORD_LINES) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for each data row of a CSV file with a header.

    A quoted field may span lines, but a field whose quote is never closed swallows the rows after it, which the
    :mod:`csv` module accepts silently. So these are errors naming the file and the record's first line: a row
    with more or fewer fields than the header; a record spanning more than ``max_record_lines`` lines (0: no
    limit on the lines, the other checks still apply); a record of 3 or more lines each of which is a complete row on its own; a record of several lines in
    which a quote closes inside a field; a field a tokenizer cannot take (:func:`field_problem`).
    """
    rows = _csv_records(path, delimiter, required, encoding, max_record_lines, keep_going=False)
    yield from rows  # type: ignore[misc]  # without keep_going every row is a dict


def iter_csv_rows(path: Path, delimiter: str = ",", encoding: str = "utf-8", max_record_lines: int = MAX_RECORD_LINES,
                  advice: str = ENCODING_ADVICE) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Like :func:`read_csv`, but a bad record gives ``(line, problem)`` and reading goes on (batch prediction).

    After a bad record that spans lines, its other lines are read again as rows of their own, so every row of the
    file is accounted for: the rows an unterminated quote swallowed are predicted, and the row holding the quote
    is reported. A file that cannot be decoded (``advice`` ends that message) or has no header still raises
    :class:`DataError`.
    """
    return _csv_records(path, delimiter, (), encoding, max_record_lines, keep_going=True, advice=advice)


def attach_translations(splits: dict[str, list[Sample]], root: Path, name: str) -> Path:
    """``translation.json`` (CLMLF: ``[{"id", "text_translation"}]``, back-translated text used for augmentation)
    into ``extra["translation"]``; posts without one get None (counted in the log)."""
    path = root / "translation.json"
    if not path.is_file():
        raise DataError(f"data.use_translation: no translation.json in {root}")
    table = {}
    for i, row in enumerate(read_json_list(path)):
        if "id" not in row or "text_translation" not in row:
            raise DataError(f"{path}: item {i}: expected id and text_translation")
        table[str(row["id"])] = str(row["text_translation"])
    lacking = 0
    for samples in splits.values():
        for s in samples:
            s.extra["translation"] = table.get(s.id)
            lacking += s.extra["translation"] is None
    if lacking:
        log.warning("%s: %d post(s) have no back-translation in %s", name, lacking, path)
    return path


# ------------------------------------------------------------------------------------------------ splits
def carve_split(samples: Sequence[Sample], fraction: float, seed: int, stratify: bool = True) -> tuple[list, list]:
    """Split off ``fraction`` of ``samples`` deterministically: ``(rest, carved)``, both in the input order.

    ``round(fraction * n)`` samples are carved. Stratified by label, each class gives its share rounded down and
    the remaining places go to the classes with the largest remainders (ties in label order), so even a small
    dev split keeps the class balance. Which samples a class gives depends only on ``seed`` and the ids.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must be in (0, 1), got {fraction}")
    groups: dict[Any, list[str]] = defaultdict(list)
    for s in samples:
        groups[s.label if stratify else None].append(s.id)
    labels = sorted(groups, key=repr)
    quota = {k: fraction * len(groups[k]) for k in labels}
    take = {k: int(quota[k]) for k in labels}
    spare = round(fraction * len(samples)) - sum(take.values())
    for k in sorted(labels, key=lambda k: -(quota[k] - take[k]))[: max(0, spare)]:  # stable: label order on ties
        take[k] += 1
    chosen: set[str] = set()
    for k in labels:
        ids = sorted(groups[k])
        random.Random(f"{seed}/{k!r}").shuffle(ids)
        chosen.update(ids[: take[k]])
    return [s for s in samples if s.id not in chosen], [s for s in samples if s.id in chosen]


def random_splits(samples: Sequence[Sample], seed: int, fractions: tuple[float, float] = (0.1, 0.1),
                  stratify: bool = True) -> dict[str, list[Sample]]:
    """Deterministic stratified train/dev/test (default 8:1:1) for releases that ship no split lists."""
    rest, test = carve_split(samples, fractions[1], seed, stratify)
    train, dev = carve_split(rest, fractions[0] / (1.0 - fractions[1]), seed + 1, stratify)
    return {"train": train, "dev": dev, "test": test}


def split_by_id_lists(samples: Iterable[Sample], lists: dict[str, list[str]], where: str) -> dict[str, list[Sample]]:
    """Assign samples to splits by id lists (in the lists' order); ids the lists name but the data lacks are logged."""
    by_id = {s.id: s for s in samples}
    out: dict[str, list[Sample]] = {}
    for split, ids in lists.items():
        found = [by_id[i] for i in ids if i in by_id]
        if len(found) < len(ids):
            lost = [i for i in ids if i not in by_id]
            log.warning("%s: %d id(s) of the %s list are not in the data (first: %s)", where, len(lost), split,
                        ", ".join(lost[:5]))
        out[split] = found
    unused = len(by_id) - len({i for ids in lists.values() for i in ids} & by_id.keys())
    if unused:
        log.info("%s: %d post(s) are in no split list and are left out", where, unused)
    return out


# ------------------------------------------------------------------------------------------------ labels
def label_index(value: Any, label_names: Sequence[str], where: str) -> int:
    """A label given as a name (case-insensitive) or as an index into ``label_names``."""
    if isinstance(value, str):
        lowered = [n.lower() for n in label_names]
        key = value.strip().lower()
        if key in lowered:
            return lowered.index(key)
        if key.isdigit():
            value = int(key)
    if isinstance(value, float) and value.is_integer():  # JSON writers sometimes emit 1.0 for 1
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(label_names):
            raise DataError(f"{where}: label index {value} out of range for {len(label_names)} classes")
        return value
    raise DataError(f"{where}: unknown label {value!r} (known: {', '.join(label_names)})")


def label_problems(splits: dict[str, list[Sample]], label_names: Sequence[str]) -> list[str]:
    """Classes that look like mistakes when the label names were read off the data (no ``data.label_names``).

    A typo (``neutrall``) silently becomes a class of its own; so does a label spelled differently in one file.
    Suspect are classes with very few posts (fewer than max(3, 1% of all posts)) and classes found in one split
    only although the other splits are large enough to expect 3 or more of their posts. Returns one description
    per suspect class (empty: nothing suspect).
    """
    per_split = {k: Counter(s.label for s in v if s.label is not None) for k, v in splits.items()}
    total: Counter = Counter()
    for c in per_split.values():
        total.update(c)
    n = sum(total.values())
    few = max(3, math.ceil(0.01 * n))
    sizes = {k: sum(c.values()) for k, c in per_split.items()}
    out = []
    for i, name in enumerate(label_names):
        k = total.get(i, 0)
        why = [f"{k} post(s)"] if k < few else []
        present = [split for split, c in per_split.items() if c.get(i)]
        absent = [split for split in per_split if split not in present and k * sizes[split] / max(1, n) >= 3]
        if len(present) == 1 and absent:
            why.append(f"only in {present[0]}, none in {'/'.join(absent)}")
        if not why:
            continue
        close = difflib.get_close_matches(name, [m for m in label_names if m != name], n=1, cutoff=0.75)
        first = [s.id for v in splits.values() for s in v if s.label == i][:3]
        out.append(f"{name!r}: {', '.join(why)}" + (f", close to {close[0]!r}" if close else "")
                   + (f" (ids: {', '.join(first)})" if first else ""))
    return out


def check_inferred_labels(name: str, splits: dict[str, list[Sample]], label_names: Sequence[str],
                          where: Path | str) -> None:
    """Refuse labels read off the data that look like mistakes (:func:`label_problems`), listing every class."""
    problems = label_problems(splits, label_names)
    if not problems or is_lenient():  # the doctor reports them itself
        return
    counts = Counter(s.label for v in splits.values() for s in v)
    good = [n for n in label_names if not any(p.startswith(f"{n!r}:") for p in problems)] or list(label_names)
    raise DataError(
        f"{where}: labels read off the data (data.label_names not set) look wrong: {'; '.join(problems)}. Classes "
        f"and posts: {', '.join(f'{n} {counts.get(i, 0)}' for i, n in enumerate(label_names))}. Fix those labels, "
        f"or declare the classes with --set data.label_names=[{','.join(good)}] (any other label is then an error "
        f"naming its line)")


# ------------------------------------------------------------------------------------------------ bundle
def duplicate_ids(samples: Iterable[Sample]) -> list[str]:
    counts = Counter(s.id for s in samples)
    return sorted(i for i, n in counts.items() if n > 1)


def finish(name: str, splits: dict[str, list[Sample]], task: Task, label_names: list[str] | None,
           modalities: tuple[str, ...], sources: Sequence[Path] = (),
           text_fn: Callable[[str], str] | None = None) -> DatasetBundle:
    """Order the splits, apply the text normaliser, refuse texts a tokenizer cannot take (:func:`text_problem`) and
    duplicate ids, and log the split sizes.

    Splits a release does not have are left out (``bundle.split(name)`` then names what exists), never filled
    with an empty list that would train or score on nothing.
    """
    ordered = {k: splits[k] for k in SPLITS if k in splits and splits[k]}
    if not ordered:
        raise DataError(f"dataset '{name}': no samples found")
    for split, samples in ordered.items():
        for s in samples:
            if s.text and text_fn is not None:
                s.text = text_fn(s.text)
            # The file readers name the line; this catches texts from anywhere else (feature files, odd encodings).
            if s.text and (problem := text_problem(s.text)) is not None:
                raise DataError(f"dataset '{name}': {split} post {s.id!r}: the text {problem}")
    if not is_lenient():
        dups = duplicate_ids(s for samples in ordered.values() for s in samples)
        if dups:
            raise DataError(f"dataset '{name}': {len(dups)} duplicate id(s) (first: {', '.join(dups[:5])}); "
                            f"ids must be unique across all splits (run `mmsenti data check {name}`)")
    log.info("%s: %s", name, ", ".join(f"{k} {len(v)}" for k, v in ordered.items()))
    return DatasetBundle(name=name, splits=ordered, task=task, label_names=label_names, modalities=modalities,
                         sources=[Path(p) for p in sources])
