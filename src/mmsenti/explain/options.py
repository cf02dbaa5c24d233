"""What an explanation computes (no heavy imports: the CLI's parser reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("similarity", "attention", "rollout")  # word → region maps (INFIG)
IMAGE_BASELINES = ("mean", "blur")


@dataclass
class ExplainOptions:
    # Word → region figure (INFIG): the `words` words with the highest attention-pooling weight, or the words in
    # `select` (case-insensitive); one row per source in `sources` (every source is in the JSON regardless).
    words: int = 4
    select: tuple[str, ...] | None = None
    sources: tuple[str, ...] = ("similarity", "rollout")
    hfam_layer: int = 1  # HFAM layer (from the end, 1 = last) of the similarity map; 1..model.hfam_layers
    rollout_residual: float = 0.5  # attention rollout: A' = r·I + (1 − r)·A per layer (Abnar & Zuidema 2020)
    # Integrated Gradients (Captum) over the text's word embeddings and the image's pixels.
    integrated_gradients: bool = True
    ig_steps: int = 64  # steps of the path integral (Gauss-Legendre, Captum's default); see the result's delta
    ig_batch: int = 16  # path points per forward pass (bounds memory)
    # Neutral image: "mean" = the normalisation mean colour everywhere (all-zero pixel values); "blur" = the image
    # blurred by a Gaussian of blur_sigma × its side. Used both to replace the image and as IG's baseline.
    image_baseline: str = "mean"
    blur_sigma: float = 0.1

    def __post_init__(self) -> None:
        if self.words < 0:
            raise ValueError(f"words must be >= 0, got {self.words}")
        self.sources = tuple(self.sources)
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown map source {unknown[0]!r} (choose from {', '.join(SOURCES)})")
        if self.select is not None:
            self.select = tuple(self.select)
        if self.hfam_layer < 1:
            raise ValueError(f"hfam_layer must be >= 1 (1 = last layer), got {self.hfam_layer}")
        if not 0.0 <= self.rollout_residual <= 1.0:
            raise ValueError(f"rollout_residual must be in [0, 1], got {self.rollout_residual}")
        if self.ig_steps < 1 or self.ig_batch < 1:
            raise ValueError(f"ig_steps and ig_batch must be >= 1, got {self.ig_steps} and {self.ig_batch}")
        if self.image_baseline not in IMAGE_BASELINES:
            raise ValueError(f"image_baseline must be one of {', '.join(IMAGE_BASELINES)}, got {self.image_baseline!r}")
        if self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")
