"""The encoder interface every model builds on.

A text encoder returns **all layers' hidden states** and its attention mask; an image encoder returns a
**sequence of patch/region tokens per layer**. Fusion models (late fusion, INFIG, rahp) read only this
interface, so a backbone swap (tiny BERT → DeBERTa-v3, small CNN → ResNet-50) changes no model code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mmsenti.config import ImageEncoderConfig, TextEncoderConfig
from mmsenti.data.encoder_inputs import is_tiny_text, text_max_length


@dataclass
class EncoderOutput:
    """Per-layer token sequences of one modality.

    Attributes:
        hidden_states: one (B, L_l, D_l) tensor per layer, lowest first. For HF text models index 0 is the
            embedding output, as in ``transformers``.
        attention_mask: (B, L) with 1 for real tokens, or None when every token is real (images).
        feature_map: the last (B, C, H, W) map of a CNN, when there is one.
        grid_size: image encoders: (rows, cols) of the region grid of the last hidden state's region tokens,
            which are in row-major order (after [CLS] when there is one). Explanations map tokens to image regions
            with it; never guessed from the token count (a grid need not be square).
    """

    hidden_states: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor | None = None
    feature_map: torch.Tensor | None = None
    grid_size: tuple[int, int] | None = None

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self.hidden_states[-1]

    def mean_pool(self, layer: int = -1) -> torch.Tensor:
        """Average of the real tokens of one layer: (B, D)."""
        h = self.hidden_states[layer]
        if self.attention_mask is None:
            return h.mean(dim=1)
        m = self.attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# HF architectures whose layers :meth:`TextEncoder._run_layers` can run one by one (the cached path).
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
_DEBERTA = {"deberta-v2"}


def text_state_key(index: int) -> str:
    """Batch key of a cached text hidden state (index as in ``EncoderOutput.hidden_states``)."""
    return f"cached_text_state_{index}"


IMAGE_MAP_KEY = "cached_image_map"  # batch key of a cached CNN feature map
TAG_STATES_KEY = "cached_tag_states"  # batch key of cached frozen tag embeddings


class TextEncoder(nn.Module):
    """A Hugging Face encoder (BERT, DeBERTa-v2/v3, MiniLM, ...) exposed through :class:`EncoderOutput`.

    With ``trainable_layers`` = t ≥ 0 the embeddings and the lower L − t layers are frozen (kept in eval mode, so
    their outputs are deterministic); their hidden states can then come from the frozen-feature cache and only
    the top t layers run. ``needed_states`` (set by the model) says which hidden states it reads, so the cache
    stores only those of the frozen part plus the input of the first trainable layer.
    """

    def __init__(self, hf_model: nn.Module, trainable_layers: int = -1):
        super().__init__()
        self.backbone = hf_model
        self.width: int = hf_model.config.hidden_size
        self.num_layers: int = hf_model.config.num_hidden_layers
        self.needed_states: set[int] | None = None  # None = all
        L = self.num_layers
        # Index of the last frozen hidden state (0 = embeddings), or None when everything trains.
        self.frozen_depth: int | None = None if trainable_layers < 0 or trainable_layers >= L else L - trainable_layers
        if self.frozen_depth is not None:
            layers = self._layers()
            if layers is None and trainable_layers > 0:
                raise ValueError(f"model.text_encoder.trainable_layers={trainable_layers}: partial fine-tuning needs "
                                 f"an encoder with `encoder.layer` ({hf_model.config.model_type} has none); use 0 or -1")
            keep = set() if layers is None else {id(p) for layer in layers[self.frozen_depth:] for p in layer.parameters()}
            for p in hf_model.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)

    def _layers(self) -> nn.ModuleList | None:
        layers = getattr(getattr(self.backbone, "encoder", None), "layer", None)
        return layers if isinstance(layers, nn.ModuleList) else None

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if mode and self.frozen_depth is not None:  # frozen parts never use dropout
            layers = self._layers()
            if layers is None:
                self.backbone.eval()
            else:
                self.backbone.eval()
                for layer in layers[self.frozen_depth:]:
                    layer.train()
        return self

    # ------------------------------------------------------------------------------------------- caching
    @property
    def cacheable(self) -> bool:
        """Whether the frozen part's states can be cached (and the top layers run from them)."""
        if self.frozen_depth is None:
            return False
        if self.frozen_depth == self.num_layers:
            return True
        mt = self.backbone.config.model_type
        return mt in _BERT_LIKE or (mt in _DEBERTA and getattr(self.backbone.encoder, "conv", None) is None)

    def cached_state_indices(self) -> list[int]:
        """Hidden states the cache holds: the first trainable layer's input and the frozen states the model reads."""
        if not self.cacheable:
            return []
        frozen = range(self.frozen_depth + 1)
        needed = set(frozen) if self.needed_states is None else {i % (self.num_layers + 1) for i in self.needed_states}
        return sorted({self.frozen_depth} | (needed & set(frozen)))

    @torch.no_grad()
    def compute_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                            return_dict=True)
        return {text_state_key(i): out.hidden_states[i] for i in self.cached_state_indices()}

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Run layers ``start..L-1`` on ``hidden`` (the state before layer ``start``); returns their outputs."""
        layers = self._layers()
        bb = self.backbone
        states = []
        if bb.config.model_type in _DEBERTA:
            enc = bb.encoder
            mask = enc.get_attention_mask(attention_mask)
            rel_pos = enc.get_rel_pos(hidden)
            rel_emb = enc.get_rel_embedding()
            for layer in layers[start:]:
                hidden = layer(hidden, mask, relative_pos=rel_pos, rel_embeddings=rel_emb)[0]
                states.append(hidden)
            return states
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=bb.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in layers[start:]:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
            states.append(hidden)
        return states

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cached: dict[int, torch.Tensor] | None = None) -> EncoderOutput:
        """Every layer's states; with ``cached`` (frozen states by index) only the trainable layers run."""
        if cached is None:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                return_dict=True)
            return EncoderOutput(hidden_states=tuple(out.hidden_states), attention_mask=attention_mask)
        f = self.frozen_depth
        states = [cached.get(i) for i in range(f + 1)]
        if f < self.num_layers:
            states += self._run_layers(cached[f], attention_mask, f)
        return EncoderOutput(hidden_states=tuple(states), attention_mask=attention_mask)

    def encode_batch(self, batch: dict) -> EncoderOutput:
        """Encode a collated batch, from the frozen-feature cache's states when the batch has them."""
        cached = {i: batch[text_state_key(i)] for i in self.cached_state_indices() if text_state_key(i) in batch}
        return self(batch["input_ids"], batch["attention_mask"], cached or None)


class ImageEncoder(nn.Module):
    """Base for image encoders: ``forward(pixel_values) -> EncoderOutput`` with one token sequence per stage.

    A frozen encoder (``freeze``) stays in eval mode; its last feature map can then come from the cache.
    """

    width: int  # channels of the last stage's tokens
    num_layers: int
    frozen: bool = False
    regions: bool = True  # tokens are a grid of image regions (a feature map); False: a set of tags, with a mask

    def freeze(self) -> ImageEncoder:
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(mode and not self.frozen)

    @property
    def cacheable(self) -> bool:
        return self.frozen

    @torch.no_grad()
    def compute_cached(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {IMAGE_MAP_KEY: self(pixel_values).feature_map}

    # What the frozen-feature cache stores for this encoder (per sample), the batch keys it then makes unnecessary,
    # and how it computes them from a batch: a CNN's last feature map from the pixels.
    def cache_keys(self) -> dict[str, str]:
        return {IMAGE_MAP_KEY: "fixed"}

    def cache_replaces(self) -> set[str]:
        return {"pixel_values"}

    @torch.no_grad()
    def compute_cached_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.compute_cached(batch["pixel_values"])

    def from_feature_map(self, fmap: torch.Tensor) -> EncoderOutput:
        """The output for a cached last feature map (only the last stage's tokens exist then)."""
        return EncoderOutput(hidden_states=(fmap.flatten(2).transpose(1, 2),), feature_map=fmap,
                             grid_size=(fmap.shape[-2], fmap.shape[-1]))

    def encode_batch(self, batch: dict) -> EncoderOutput:
        """Encode a collated batch, from the cached feature map when the batch has one."""
        if self.cacheable and IMAGE_MAP_KEY in batch:
            return self.from_feature_map(batch[IMAGE_MAP_KEY])
        return self(batch["pixel_values"])

    def tag_states_layer(self) -> nn.Module | None:
        """A tags encoder's layer whose output is the per-tag embeddings (B, max_tags, width), before anything mixes
        the tags (what explanations attribute to); None for an encoder of pixels."""
        return None


class SmallCNN(ImageEncoder):
    """A small from-scratch CNN: ``num_stages`` conv-BN-ReLU-maxpool stages, each halving the resolution.

    Each stage's map is also returned flattened to (B, H·W, C) tokens, so region-level models (INFIG) can use
    it like any backbone's feature map.
    """

    def __init__(self, width: int = 32, num_stages: int = 4, in_chans: int = 3):
        super().__init__()
        stages = []
        c_in = in_chans
        for i in range(num_stages):
            c_out = width * 2**i
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.width = c_in
        self.num_layers = num_stages

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        x = pixel_values
        tokens = []
        for stage in self.stages:
            x = stage(x)
            tokens.append(x.flatten(2).transpose(1, 2))
        return EncoderOutput(hidden_states=tuple(tokens), feature_map=x, grid_size=(x.shape[-2], x.shape[-1]))


class TimmImageEncoder(ImageEncoder):
    """A timm CNN (``forward_features`` → last (B, C, H, W) map) as an encoder with one token sequence.

    Weights are kept channels-last. In eval mode on CPU, images go through in chunks of ``eval_chunk``, channels-last:
    a CNN's large early activations then stay in cache (EfficientNet-Lite0 here: 4.9 ms/image instead of 22.5 ms as
    one contiguous batch of 32). Each image's features are computed on their own either way.
    """

    eval_chunk = 4

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.to(memory_format=torch.channels_last)
        self.width = int(model.num_features)
        self.num_layers = 1
        self._whole_batch = False  # in an exported graph (graph_mode)

    @contextlib.contextmanager
    def graph_mode(self) -> Iterator[None]:
        """While exporting: the whole batch at once. Traced, the chunk loop would be unrolled for the example batch
        and the graph would break at any other batch size (the per-image arithmetic is the same)."""
        self._whole_batch = True
        try:
            yield
        finally:
            self._whole_batch = False

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        if self.training or self._whole_batch or pixel_values.device.type != "cpu":
            return self.from_feature_map(self.backbone.forward_features(pixel_values))
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        fmap = torch.cat([self.backbone.forward_features(c) for c in x.split(self.eval_chunk)])
        return self.from_feature_map(fmap.contiguous())


class TagEncoder(ImageEncoder):
    """The image as its tags (the ``tags`` input's ``tag_ids`` / ``tag_mask``): one token per tag, a mask for padding.

    ``learned``: a table of hash buckets trained with the model (any tags: ids or words). ``vocab``: each tag's word
    pieces through a frozen copy of the text backbone's input embeddings, averaged. ``encoder``: a frozen pass of
    the text backbone over each tag ([CLS] pieces [SEP]), its last layer averaged over the pieces (as sentence
    encoders pool). The frozen kinds are cached per post like a frozen CNN's map. No position embedding: tags are a
    set. ``hidden_states`` has one layer, (B, max_tags, width), ``attention_mask`` (B, max_tags).
    """

    regions = False

    def __init__(self, embedding: str, *, table: nn.Embedding | None = None, backbone: nn.Module | None = None):
        super().__init__()
        self.embedding = embedding
        self.table, self.backbone = table, backbone
        if embedding == "encoder":
            self.width = int(backbone.config.hidden_size)
        else:
            self.width = table.embedding_dim
        self.num_layers = 1
        self.states = nn.Identity()  # the per-tag embeddings pass through it (tag_states_layer); no weights
        if embedding != "learned":
            self.freeze()

    def embed(self, tag_ids: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, P) pieces → (B, T, width) tag embeddings (padding tags are zero)."""
        b, t, p = tag_ids.shape
        m = tag_mask.unsqueeze(-1).to(torch.float32)
        if self.embedding == "encoder":
            flat_ids, flat_mask = tag_ids.reshape(b * t, p), tag_mask.reshape(b * t, p)
            out = self.backbone(input_ids=flat_ids, attention_mask=flat_mask, return_dict=True).last_hidden_state
            pieces = out.view(b, t, p, -1)
        else:
            pieces = self.table(tag_ids)
        return (pieces * m).sum(2) / m.sum(2).clamp_min(1.0)

    def forward(self, tag_ids: torch.Tensor, tag_mask: torch.Tensor,
                tag_states: torch.Tensor | None = None) -> EncoderOutput:
        h = self.embed(tag_ids, tag_mask) if tag_states is None else tag_states.to(torch.float32)
        return EncoderOutput(hidden_states=(self.states(h),), attention_mask=tag_mask.amax(-1))

    def tag_states_layer(self) -> nn.Module:
        return self.states

    @property
    def cacheable(self) -> bool:
        return self.frozen

    def cache_keys(self) -> dict[str, str]:
        return {TAG_STATES_KEY: "fixed"}

    def cache_replaces(self) -> set[str]:
        return {"tag_ids"}

    @torch.no_grad()
    def compute_cached_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return {TAG_STATES_KEY: self.embed(batch["tag_ids"], batch["tag_mask"])}

    def encode_batch(self, batch: dict) -> EncoderOutput:
        if self.cacheable and TAG_STATES_KEY in batch:
            return self(None, batch["tag_mask"], batch[TAG_STATES_KEY])
        return self(batch["tag_ids"], batch["tag_mask"])


def build_tag_encoder(cfg: ImageEncoderConfig, text: TextEncoderConfig | None, tokenizer,
                      load_weights: bool = True) -> TagEncoder:
    """The ``tags`` image encoder; ``vocab`` / ``encoder`` take a frozen copy of the text backbone (``text``: the
    model's text encoder config, ``tokenizer``: the tags input's)."""
    if cfg.tag_embedding == "learned":
        return TagEncoder("learned", table=nn.Embedding(cfg.tag_buckets, cfg.tag_dim, padding_idx=0))
    if text is None or tokenizer is None:
        raise ValueError("model.image_encoder.tag_embedding: vocab/encoder embed tags through the text backbone")
    backbone = build_text_encoder(text, tokenizer, load_weights).backbone
    if cfg.tag_embedding == "vocab":
        emb = backbone.get_input_embeddings()
        return TagEncoder("vocab", table=nn.Embedding.from_pretrained(emb.weight.detach().clone(), freeze=True))
    return TagEncoder("encoder", backbone=backbone)


# ------------------------------------------------------------------------------------------------- building
def build_text_encoder(cfg: TextEncoderConfig, tokenizer, load_weights: bool = True) -> TextEncoder:
    """Build the configured text encoder.

    Args:
        cfg: the encoder's config.
        tokenizer: the tokenizer it will read (its vocabulary sizes the embedding of from-scratch models).
        load_weights: False when the caller is about to load a saved checkpoint (no pretrained weights are read).
    """
    if is_tiny_text(cfg):
        from transformers import BertConfig, BertModel

        hf_cfg = BertConfig(**{
            "vocab_size": len(tokenizer), "hidden_size": cfg.width, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": 4 * cfg.width,
            "max_position_embeddings": max(64, text_max_length(cfg)), "pad_token_id": tokenizer.pad_token_id,
            **cfg.arch,  # e.g. {hidden_dropout_prob: 0, attention_probs_dropout_prob: 0}
        })
        return TextEncoder(BertModel(hf_cfg, add_pooling_layer=False), cfg.trainable_layers)
    from mmsenti.backbones import load_text_backbone

    arch = dict(cfg.arch)
    if not cfg.pretrained:  # random init reads the processor's tokenizer, which may be a learned word-piece one
        arch.setdefault("vocab_size", len(tokenizer))
        arch.setdefault("pad_token_id", tokenizer.pad_token_id)
    model, _ = load_text_backbone(cfg.name, cfg.pretrained, config=arch or None, load_weights=load_weights,
                                  config_key="model.text_encoder.pretrained")
    return TextEncoder(model, cfg.trainable_layers)


def build_image_encoder(cfg: ImageEncoderConfig, load_weights: bool = True, *, text: TextEncoderConfig | None = None,
                        processor=None) -> ImageEncoder:
    """The configured image encoder (``text`` and ``processor``: what a ``tags`` encoder embeds its tags with)."""
    if cfg.name == "tags":
        tags = processor.builder("tags") if processor is not None else None
        return build_tag_encoder(cfg, text, tags.tokenizer if tags is not None else None, load_weights)
    if cfg.name == "small-cnn":
        enc: ImageEncoder = SmallCNN(width=cfg.width, num_stages=cfg.num_stages)
    else:
        from mmsenti.backbones import load_image_backbone

        enc = TimmImageEncoder(load_image_backbone(cfg.name, cfg.pretrained, load_weights=load_weights,
                                                   config_key="model.image_encoder.pretrained"))
    return enc.freeze() if cfg.freeze else enc


def build_processor(cfg, train_texts, task: str):
    """The preprocessing that matches ``cfg`` (a ModelConfig): a :class:`~mmsenti.data.processing.Processor` with a
    builder for every input the model declares (``cfg.inputs()``), for training and for evaluation.

    From-scratch text encoders learn their word-piece vocabulary on ``train_texts`` here; the result is saved
    with the model so prediction tokenizes exactly as training did.
    """
    from mmsenti.data.processing import Processor

    return Processor.create(cfg, train_texts, task)


class ImageTransformerEncoder(ImageEncoder):
    """CNN feature map → linear projection to ``width`` → [CLS] + position embeddings → transformer layers.

    INFIG's image encoder. ``hidden_states[0]`` is the projected input (like an HF embedding output) and
    ``hidden_states[i]`` the output of transformer layer i, each (B, 1 + H·W, width) with [CLS] first and the
    regions in row-major order; ``grid_size`` = (H, W).
    """

    def __init__(self, backbone: ImageEncoder, width: int, num_layers: int, num_heads: int, image_size: int | None,
                 dropout: float = 0.1, attention: str = "sdpa"):
        super().__init__()
        from mmsenti.models.layers import TransformerBlock

        self.backbone = backbone
        self.regions = backbone.regions
        # (rows, cols) of the regions; tags have no grid and no positions (only [CLS] has a position embedding)
        self.grid_size: tuple[int, int] | None = self._region_grid(backbone, image_size) if self.regions else None
        num_tokens = self.grid_size[0] * self.grid_size[1] if self.regions else 0
        self.proj = nn.Linear(backbone.width, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, num_heads, dropout=dropout, attention=attention)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.width = width
        self.num_layers = num_layers

    @staticmethod
    def _region_grid(backbone: ImageEncoder, image_size: int) -> tuple[int, int]:
        was_training = backbone.training
        backbone.eval()  # a dummy pass must not move batch-norm statistics
        with torch.no_grad():
            fmap = backbone(torch.zeros(1, 3, image_size, image_size)).feature_map
        backbone.train(was_training)
        return fmap.shape[-2], fmap.shape[-1]

    @property
    def cacheable(self) -> bool:
        return self.backbone.cacheable

    @torch.no_grad()
    def compute_cached(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone.compute_cached(pixel_values)

    def cache_keys(self) -> dict[str, str]:
        return self.backbone.cache_keys()

    def cache_replaces(self) -> set[str]:
        return self.backbone.cache_replaces()

    @torch.no_grad()
    def compute_cached_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.backbone.compute_cached_batch(batch)

    def tag_states_layer(self) -> nn.Module | None:
        return self.backbone.tag_states_layer()

    def encode_batch(self, batch: dict) -> EncoderOutput:
        if not self.regions:
            return self.from_tokens(self.backbone.encode_batch(batch))
        if self.cacheable and IMAGE_MAP_KEY in batch:
            return self(feature_map=batch[IMAGE_MAP_KEY])
        return self(batch["pixel_values"])

    def forward(self, pixel_values: torch.Tensor | None = None, feature_map: torch.Tensor | None = None) -> EncoderOutput:
        fmap = self.backbone(pixel_values).feature_map if feature_map is None else feature_map
        x = self.proj(fmap.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"image gives {x.shape[1] - 1} regions, the encoder was built for "
                             f"{self.pos_embed.shape[1] - 1}: images must be resized to the configured image_size")
        x = x + self.pos_embed
        states = [x]
        for i, block in enumerate(self.blocks):
            x, _ = block(x)
            states.append(self.norm(x) if i == len(self.blocks) - 1 else x)
        return EncoderOutput(hidden_states=tuple(states), feature_map=fmap,
                             grid_size=(fmap.shape[-2], fmap.shape[-1]))

    def from_tokens(self, tokens: EncoderOutput) -> EncoderOutput:
        """The layers over a set of tokens with a mask (tags): [CLS] + projected tokens, padding masked in every
        layer; ``attention_mask`` (B, 1 + T) with [CLS] real."""
        x = self.proj(tokens.last_hidden_state)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        mask = torch.cat([torch.ones_like(tokens.attention_mask[:, :1]), tokens.attention_mask], dim=1)
        pad = mask == 0
        states = [x]
        for i, block in enumerate(self.blocks):
            x, _ = block(x, key_padding_mask=pad)
            states.append(self.norm(x) if i == len(self.blocks) - 1 else x)
        return EncoderOutput(hidden_states=tuple(states), attention_mask=mask)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}
