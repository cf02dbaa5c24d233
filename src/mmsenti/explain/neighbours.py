"""RAHP: the training samples that formed each target modality's sample-level context."""

from __future__ import annotations

from collections.abc import Mapping

from mmsenti.data.base import Sample
from mmsenti.explain.results import Neighbour


def neighbours_from(found: Mapping[str, Mapping], bank_ids: list[str] | None, label_names: list[str] | None,
                    samples: Mapping[str, Sample] | None = None, index: int = 0) -> list[Neighbour]:
    """The neighbours a RAHP forward pass retrieved (``outputs["neighbours"]`` of ``forward(return_neighbours=True)``:
    ``{target: {source: Neighbours}}``) for sample ``index`` of its batch, in the order the context holds them.

    Args:
        bank_ids: the memory bank's sample ids by row (None in in-batch mode: rows are batch positions).
        label_names: class names (classification) to name the stored labels.
        samples: training samples by id, when the data is at hand: their texts, and labels the bank does not store.
    """
    out = []
    for target, per_source in found.items():
        for source, nb in per_source.items():
            labels = nb.payload.get("labels")
            for rank in range(nb.rows.shape[1]):
                row = int(nb.rows[index, rank])
                if row < 0:  # padding slot: the bank holds fewer than k rows
                    continue
                sid = bank_ids[row] if bank_ids is not None else str(row)
                ref = samples.get(sid) if samples is not None else None
                label = labels[index, rank].item() if labels is not None else (ref.label if ref is not None else None)
                out.append(Neighbour(target=target, source=source, rank=rank + 1, row=row, id=sid,
                                     similarity=float(nb.scores[index, rank]), label=_label(label, label_names),
                                     text=ref.text if ref is not None else None))
    return out


def _label(label, label_names: list[str] | None) -> str | float | None:
    if label is None:
        return None
    if label_names:
        return label_names[int(label)]
    return float(label)
