"""Labels of a release: read as names or indices, and classes read off the data that look like mistakes."""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmsenti.data.base import Sample
from mmsenti.errors import DataError


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
                          where: Path | str, *, lenient: bool = False) -> None:
    """Refuse labels read off the data that look like mistakes (:func:`label_problems`), listing every class;
    ``lenient``: accept them (the data doctor reports them itself)."""
    if lenient:
        return
    problems = label_problems(splits, label_names)
    if not problems:
        return
    counts = Counter(s.label for v in splits.values() for s in v)
    good = [n for n in label_names if not any(p.startswith(f"{n!r}:") for p in problems)] or list(label_names)
    raise DataError(
        f"{where}: labels read off the data (data.label_names not set) look wrong: {'; '.join(problems)}. Classes "
        f"and posts: {', '.join(f'{n} {counts.get(i, 0)}' for i, n in enumerate(label_names))}. Fix those labels, "
        f"or declare the classes with --set data.label_names=[{','.join(good)}] (any other label is then an error "
        f"naming its line)")
