"""Typed configuration: dataclass defaults, YAML files holding only their differences, ``--set a.b=v`` overrides.

A YAML file may name a ``_base_`` file (relative to itself) whose settings it extends, so an ablation config is
two lines. The ``data`` and ``model`` sections are polymorphic: their ``name`` picks the registered dataset or
model, whose own config dataclass (a subclass of :class:`DataConfig` / :class:`ModelConfig`) then types the
rest of the section; a registered variant's name (``infig-tiny``) picks its model with the variant's settings
under the section's own. Every error is a :class:`ConfigError` whose one-line message names the key or file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mmsenti.errors import ConfigError


# --------------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class InputSpec:
    """One input a model reads, built into its batches by an input builder the processor composes.

    ``kind`` names a builder registered in :data:`mmsenti.registry.INPUTS` (``tokens``, ``pixels``, ``features``,
    ``clip``, or a plugin's): a new kind of input is a new builder, never a branch in shared code.
    """

    kind: str
    modality: str | None = None  # the modality it reads (text, image, audio, ...); None: none of its own (CLIP)
    training_only: bool = False  # read only by training losses (INFIG's CLIP prior): never in evaluation batches
    options: dict[str, Any] = field(default_factory=dict)  # the builder's own settings (features: {"dim": D})


@dataclass
class TextEncoderConfig:
    # 'tiny-bert': a small BERT trained from scratch with a word-piece vocabulary learned on the training texts.
    # Otherwise a backbone preset (deberta-v3-base, bert-base-uncased, minilm-l6), a Hugging Face id or a local
    # model directory (see `mmsenti list`).
    name: str = "tiny-bert"
    # Weights of a pretrained backbone: true = the preset's (local path → offline package → $MMSENTI_WEIGHTS_DIR
    # → hub), a path or hub id = those, false/null = random initialisation. Ignored by tiny-bert.
    pretrained: bool | str | None = True
    arch: dict[str, Any] = field(default_factory=dict)  # overrides of the HF architecture config (e.g. dropout)
    max_length: int | None = None  # tokens incl. special tokens; None = the preset's (tiny-bert: 40)
    trainable_layers: int = -1  # top transformer layers fine-tuned; -1 = all (+ embeddings), 0 = frozen
    # tiny-bert sizes:
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 2000  # upper bound for the learned word-piece vocabulary


@dataclass
class ImageEncoderConfig:
    # 'small-cnn': a small CNN trained from scratch. Otherwise an image preset (resnet50, efficientnet_lite0,
    # mobilenetv2_100) or any timm model name; its last feature map is the region grid.
    name: str = "small-cnn"
    pretrained: bool | str | None = True  # as for the text encoder; ignored by small-cnn
    freeze: bool = False  # keep the CNN fixed (eval mode); its feature maps can then be cached on disk
    image_size: int | None = None  # None = the preset's (small-cnn: 64)
    mean: list[float] | None = None  # None = the preset's normalisation (small-cnn: 0.5)
    std: list[float] | None = None
    # small-cnn sizes:
    width: int = 16  # channels of the first stage; doubled at each later stage
    num_stages: int = 4
    # name 'tags': the image as a post's tags (words predicted from it, or detector class ids), one token per tag.
    # learned: a trained table of hashed tags (any tags, e.g. ids); vocab: a word tag's word pieces through the text
    # backbone's frozen input embeddings, averaged; encoder: a frozen pass of the text backbone over the tag.
    tag_embedding: Literal["learned", "vocab", "encoder"] = "learned"
    max_tags: int = 8  # tags kept per post (the first ones); padding is masked
    tag_pieces: int = 4  # word pieces kept per tag (vocab/encoder)
    tag_buckets: int = 4096  # hash buckets of the learned table
    tag_dim: int = 128  # width of the learned table's embeddings


@dataclass
class ModelConfig:
    """Fields every model has. Each registered model subclasses this with its own settings."""

    name: str = "late-fusion"
    # Which inputs the model reads. A modality the data lacks must be switched off here, never faked.
    modalities: list[str] = field(default_factory=lambda: ["text", "image"])
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    dropout: float = 0.1
    label_smoothing: float = 0.0  # classification loss only
    # Attention of the models' own transformer blocks: sdpa = F.scaled_dot_product_attention (fused kernels);
    # mha = torch.nn.MultiheadAttention (the earlier path). Same parameters, so weights load into either.
    attention: Literal["sdpa", "mha"] = "sdpa"

    # ---------------------------------------------------------------- what the model declares (its config knows)
    # These describe the model without building it: preprocessing, the service and the ONNX backend read them.
    def inputs(self) -> list[InputSpec]:
        """The inputs the model reads (:class:`InputSpec`), in batch order: tokenized text and pixel values of its
        text and image. A model with other inputs overrides this."""
        return [*([InputSpec("tokens", "text")] if "text" in self.modalities else []),
                *([self.image_input()] if "image" in self.modalities else [])]

    def image_input(self) -> InputSpec:
        """The image's input: pixel values, or a post's tags for the ``tags`` image encoder."""
        if self.image_encoder.name == "tags":
            return InputSpec("tags", "image", options={"embedding": self.image_encoder.tag_embedding})
        return InputSpec("pixels", "image")

    def data_modalities(self) -> list[str]:
        """What the model reads of a dataset (``DatasetBundle.modalities``): each input's modality, or what its
        builder reads instead (the ``tags`` input reads a post's tags for the image modality)."""
        from mmsenti.registry import INPUTS

        out = []
        for spec in self.inputs():
            if spec.modality is not None and not spec.training_only:
                reads = INPUTS.get(spec.kind).builder.reads or spec.modality
                out += [reads] if reads not in out else []
        return out

    def batch_inputs(self, training: bool) -> list[str]:
        """The batch keys the model reads in training or in evaluation/prediction (those of :meth:`inputs`)."""
        from mmsenti.registry import INPUTS

        return [key for spec in self.inputs() if training or not spec.training_only
                for key in INPUTS.get(spec.kind).builder.keys_of(spec)]

    def adopt_data(self, bundle: Any) -> None:
        """Fill what the config left to the data (a ``DatasetBundle``) and refuse data made otherwise. Called before
        the model is built and when a trained model meets data: a model on extracted features takes their widths and
        extraction settings here. Most models take nothing."""

    def batch_dependence(self) -> tuple[str, str] | None:
        """``(what, why)`` when the model's answer for a post depends on the other posts of its batch: ``what``
        names the model and setting, ``why`` says why and how to train it otherwise. None (most models) when not."""
        return None

    @property
    def learns_missing_modalities(self) -> bool:
        """Whether training hides modalities from the model (modality dropout), so that its predictions for a post
        lacking one were trained for (``--allow-missing-modality`` warns otherwise)."""
        return False

    def card(self) -> dict[str, Any]:
        """The model's own fields of its card (``GET /v1/model``): the backbones of the modalities it reads; a tags
        image encoder reads as ``tags (<tag_embedding>)``, with the number of a post's tags it reads (``max_tags``)."""
        card: dict[str, Any] = {"backbones": {m: getattr(self, f"{m}_encoder").name for m in ("text", "image")
                                              if m in self.modalities}}
        image = self.image_encoder
        if "image" in self.modalities and image.name == "tags":
            card["backbones"]["image"] = f"tags ({image.tag_embedding})"
            card["max_tags"] = image.max_tags
        return card


@dataclass
class DataConfig:
    """Fields every dataset has. Each registered dataset may subclass this with its own settings."""

    name: str = "scenes"
    root: str | None = None  # dataset directory (not needed by generated datasets)
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    # Training batches of texts of similar length (less padding): each pool of `bucket_pool` shuffled batches is
    # sorted by length, then the batches are shuffled. Same samples per epoch; order a function of (seed, epoch).
    bucket_by_length: bool = False
    bucket_pool: int = 64
    # Image files that are absent or cannot be used (unreadable, truncated, over max_image_pixels): error = stop
    # and list them, drop = leave those posts out, blank = give them a blank image; counted and logged either way.
    # Every image file is checked when the dataset loads, so a bad test image cannot stop a run after training.
    missing_images: Literal["error", "drop", "blank"] = "error"
    # header: format, size, end marker and PNG checksums (fast); decode: every pixel of every image (thorough, slow).
    image_check: Literal["header", "decode"] = "header"
    max_image_pixels: int = 89_478_485  # larger images are refused (decompression bombs); sets PIL's limit
    encoding: str = "utf-8"  # of text, CSV and JSON files; bytes that are not are an error naming file and line


@dataclass
class OptimConfig:
    epochs: int = 10
    lr: float = 1e-3  # new (randomly initialised) layers
    backbone_lr: float | None = None  # pretrained backbone parameters; None = same as lr
    weight_decay: float = 0.01  # never applied to biases, norms, embeddings-like tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1  # fraction of all optimiser steps spent warming up linearly
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimiser step
    # AdamW kernel: fused = one kernel over all parameters (CPU and CUDA); foreach = a few multi-tensor ops;
    # for-loop = one small op per tensor (torch's CPU default before); auto = fused. Same update up to rounding.
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"


@dataclass
class RunConfig:
    seed: int = 0
    out: str | None = None  # run directory; default runs/<config-stem>-<timestamp>
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = bf16 on CUDA, fp32 on CPU; bf16 on CPU when asked (fast only with AVX512-BF16/AMX; docs/performance.md)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    select_metric: str = "auto"  # dev metric for model selection; auto = f1_weighted (classification) / mae
    patience: int = 0  # epochs without dev improvement before stopping; 0 = never stop early
    checkpoint_every: int = 0  # also write `last` every N optimiser steps (0 = at epoch ends only)
    log_every: int = 20
    quiet: bool = False
    threads: int = 0  # torch CPU threads; 0 = torch default (the number of physical cores)
    # torch.compile the models' transformer blocks (inductor; needs a C++ compiler, else eager with a warning).
    # Off by default: on 2 CPU cores it compiles for minutes and did not pay (docs/performance.md).
    compile: bool = False
    # Frozen-feature cache: outputs of frozen backbone parts are computed once per split and memory-mapped from
    # disk (dir: $MMSENTI_CACHE_DIR, else ~/.cache/mmsenti/features).
    feature_cache: bool = True
    cache_dir: str | None = None
    cache_dtype: Literal["float32", "float16"] = "float32"
    # Cross-validation (mmsenti/data/splits.py cuts the folds, mmsenti/experiment/cv.py trains them): with
    # cv_folds = K >= 2, train+dev are pooled and cut into K stratified folds (fixed by cv_seed, not by the training
    # seed); fold cv_fold is the dev split, the other folds the train split, and the test split is not loaded.
    # `mmsenti train` with cv_fold unset trains every fold (into <out>/fold<i>) and writes the mean dev metrics
    # over folds to <out>/cv.json.
    cv_folds: int = 0
    cv_fold: int | None = None
    cv_seed: int = 0
    # Several processes (torchrun; see README "Training on several GPUs or machines"): let DDP tolerate trainable
    # parameters that get no gradient, at the cost of one autograd-graph walk per step (the trainer stops at the
    # first step, naming them, when they exist and this is off).
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False  # CUDA only: batch norm over the global batch (SyncBatchNorm) instead of per process


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- dict <-> dataclass
_MISSING = object()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats, lists to tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a bug in a config class, not user input


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(fields)})")
        f = fields[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and f.default_factory is not dataclasses.MISSING:
            # A partial nested section overrides the *parent's* default for it (e.g. InfigConfig's 3-layer text
            # encoder), not the nested class's bare defaults.
            value = merge(dataclasses.asdict(f.default_factory()), value)
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ loading
def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("_base_", None)
    if base is not None:
        data = merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge into a copy of ``base`` (never changed); ``over`` wins, nested mappings merge key by
    key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` → ``{"a": {"b": value}}``, the value read as YAML (so 3 is an int, [1, 2] a list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: bad key")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def build_config(data: dict[str, Any]) -> Config:
    """Typed Config from a merged mapping; the data/model sections get their registered dataclass."""
    from mmsenti.registry import DATASETS, MODELS, RegistryError

    data = dict(data)
    unknown = set(data) - {"data", "model", "optim", "run"}
    if unknown:
        raise ConfigError(f"unknown config key '{sorted(unknown)[0]}' (known: data, model, optim, run)")
    sections: dict[str, Any] = {}
    for key, registry, base_cls in (("data", DATASETS, DataConfig), ("model", MODELS, ModelConfig)):
        section = data.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{key}: expected a mapping, got {section!r}")
        name = section.get("name", base_cls.name)
        try:
            entry, variant_settings = registry.resolve(name)
        except RegistryError as e:
            raise ConfigError(f"{key}.name: {e}") from None
        # A variant (infig-tiny) is its entry with other defaults: the section's own settings (a YAML file's,
        # --set's) go over the variant's, and the typed config names the entry, so a saved config.json needs no
        # variant to be read back.
        if name != entry.name:
            section = merge(variant_settings, {**section, "name": entry.name})
        sections[key] = from_dict(entry.config_cls or base_cls, section, key)
    sections["optim"] = from_dict(OptimConfig, data.get("optim") or {}, "optim")
    sections["run"] = from_dict(RunConfig, data.get("run") or {}, "run")
    return Config(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file (with its ``_base_`` chain) ← ``--set`` overrides, validated and typed."""
    data = _read_yaml(Path(path)) if path else {}
    for item in overrides:
        data = merge(data, parse_override(item))
    return build_config(data)


def config_from_json(path: str | Path) -> Config:
    """Read back a resolved config written by :func:`save_config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f":{e.lineno}:{e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{path}{where}: not valid JSON ({getattr(e, 'msg', e)}); the file is damaged") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    try:
        return build_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    from mmsenti.utils import write_atomic

    write_atomic(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------- resuming
# What `mmsenti train --resume` may change: where the data is, what to do with images that went missing, and how
# the run reports and uses the machine. Nothing else: a resumed run continues the training it started.
# (missing_images=drop/blank changes which posts are read from the resume on; the run records that it did.)
RESUME_OVERRIDES = ("data.root", "data.missing_images", "data.num_workers", "run.threads", "run.quiet",
                    "run.log_every", "run.checkpoint_every", "run.cache_dir", "run.out")


def dict_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (value in a, value in b)}`` for every value that differs (nested keys dotted)."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in [*x, *(k for k in y if k not in x)]:
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else k)
        elif x != y:
            out[key] = (x, y)

    walk(a, b, "")
    return out


def config_differences(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (value in a, value in b)}`` for every setting that differs (nested keys dotted)."""
    return dict_differences(a.to_dict(), b.to_dict())


def resume_config(saved: Config, requested: Config | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The config a resumed run continues with, and what changed: ``saved`` (the run's ``config.json``) with the
    ``overrides`` applied, or ``requested`` (``--config`` with its ``--set``s) in place of both.

    Raises:
        ConfigError: a change outside :data:`RESUME_OVERRIDES` (one line naming it).
    """
    if requested is None:
        data = saved.to_dict()
        for item in overrides:
            data = merge(data, parse_override(item))
        requested = build_config(data)
    changes = config_differences(saved, requested)
    refused = [k for k in changes if k not in RESUME_OVERRIDES]
    if refused:
        k = refused[0]
        more = f" (and {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"--resume cannot change {k} ({changes[k][0]!r} in the run, {changes[k][1]!r} asked){more}: "
                          f"a resumed run continues the training it started; it may change only "
                          f"{', '.join(RESUME_OVERRIDES)}; to train with other settings, start a new run "
                          "(another --out)")
    return requested, changes
