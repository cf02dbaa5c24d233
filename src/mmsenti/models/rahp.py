"""RAHP: retrieval-augmented hierarchical prompts (arXiv 2508.07666), with a saved training-set memory bank.

Per target modality m the model builds two reference contexts and lets m's token sequence attend to both:

* **modality-level context**: learnable modality-level prompt tokens of m, concatenated with the sample's own
  pooled features of every modality (plus a modality-type embedding), mixed by a small transformer;
* **sample-level context**: learnable sample-level prompt tokens of m, concatenated with the top-k training
  samples retrieved with m's retrieval embedding from *every* modality's index (in-modality and cross-modal),
  mixed by a second small transformer. A neighbour token carries the neighbour's pooled m features, which
  index found it, its similarity and (bank mode, ``neighbour_labels``) its training label.

The retrieval-augmented encoder is ``cross_layers`` cross-attention blocks per modality (tokens → both
contexts); the modalities' pooled outputs and pooled contexts are concatenated and fed to an MLP head. The
retrieval embeddings (a linear map of the time-averaged projected inputs, L2-normalised) are trained by the
cross-modal supervised contrastive loss (``lambda_ret``). With neighbour labels, a *label prior* (per target
and index, a similarity-softmax mean of the neighbours' labels) also feeds the head and, through a linear map
initialised to average the in-modality priors, the output: the model starts as k-NN and learns a residual.

Retrieval modes (``retrieval``):

* ``"bank"`` (default): a :class:`~mmsenti.retrieval.MemoryBank` over the training set, refreshed from the
  current encoders by the trainer hooks (before each epoch if stale, and after each epoch, before dev
  evaluation). In training a sample never retrieves itself (its bank row is excluded by id); in evaluation nothing
  is excluded, so a prediction never depends on the id a post is given. The bank is part of the
  model's ``state_dict`` (keys ``bank.*``), so checkpoints and ``model.safetensors`` carry it and a loaded
  model predicts without the training data, deterministically and independently of the batch. With several
  processes each encodes a share of the training set and every process builds the same bank from all shares.
* ``"in-batch"``: the authors' retrieval source: neighbours are the other samples of the current batch, in
  training *and* evaluation, so a prediction depends on the batch it comes in. Labels are never read in this
  mode (at test time they would be the test labels); unlike the authors' code, training does not partition the
  batch by the sign of the query's label (docs/rahp.md).
* ``"none"``: no retrieval and no contrastive loss (the sample-level context holds only its prompts).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmsenti.config import ConfigError, InputSpec, ModelConfig
from mmsenti.errors import DataError, ExportError
from mmsenti.models.base import MultimodalModel, TaskInfo
from mmsenti.models.encoders import build_image_encoder, build_text_encoder
from mmsenti.models.explanations import Explained, Retrieved
from mmsenti.models.factory import register_tiny
from mmsenti.models.layers import AttentionPool, TransformerBlock, build_attention
from mmsenti.registry import MODELS
from mmsenti.retrieval import INDEX_KINDS, CrossModalSupConLoss, MemoryBank, Neighbours
from mmsenti.utils import move

log = logging.getLogger(__name__)

KNOWN_MODALITIES = ("text", "image", "audio", "vision")
EXTRACTED = ("audio", "vision")  # what `mmsenti features extract` makes from a clip
BANK_PREFIX = "bank."  # state_dict keys of the memory bank


@dataclass
class RahpConfig(ModelConfig):
    name: str = "rahp"
    modalities: list[str] = field(default_factory=lambda: ["text", "audio", "vision"])
    # tokens: a text encoder reads the tokenized text; features: Sample.features["text"] (MMSA text_bert).
    text_input: Literal["tokens", "features"] = "tokens"
    # Width of each feature modality's input vectors (e.g. MOSI unaligned_50: text 768, audio 5, vision 20).
    feature_dims: dict[str, int] = field(default_factory=dict)
    # The settings of `mmsenti features extract` its audio/vision features were made with, taken from a `features`
    # dataset at training: the model extracts a new clip (`predict --video`, the service) exactly so.
    extraction: dict[str, Any] = field(default_factory=dict)
    width: int = 128  # d: every modality is projected to it; also the retrieval-embedding width
    heads: int = 4
    encoder_layers: int = 1  # transformer blocks of each modality's sequence encoder
    max_positions: int = 512  # learned positions; longer feature sequences are truncated
    k: int = 8  # neighbours per (target modality, searched index)
    retrieval: Literal["bank", "in-batch", "none"] = "bank"
    index: str = "auto"  # MemoryBank index kind; auto = chosen by a timing at each bank build (saved with the bank)
    neighbour_labels: bool = True  # bank mode: neighbour tokens carry the neighbours' training labels
    use_modality_prompts: bool = True
    use_sample_prompts: bool = True
    num_prompts: int = 4  # prompt tokens per level and modality
    context_layers: int = 1  # transformer blocks of each context (modality-level, sample-level)
    cross_layers: int = 1  # cross-attention blocks of the retrieval-augmented encoder
    hidden: int = 128  # fusion MLP width
    lambda_ret: float = 0.1  # weight of the cross-modal SupCon retrieval loss
    temperature: float = 0.1
    retrieval_classes: Literal["sign", "rounded"] = "sign"  # regression positives: same sign / same Acc-7 class

    def __post_init__(self) -> None:
        validate(self, check_dims=False)  # bad settings fail when the config is read, not at model build

    @property
    def feature_modalities(self) -> list[str]:
        """Modalities read from ``Sample.features`` as (T, D) sequences."""
        return [m for m in self.modalities
                if m not in ("text", "image") or (m == "text" and self.text_input == "features")]

    def inputs(self) -> list[InputSpec]:
        specs = [InputSpec("features", m, options={"dim": self.feature_dims.get(m),
                                                   **({"extraction": self.extraction}
                                                      if self.extraction and m in EXTRACTED else {})})
                 for m in self.feature_modalities]
        if "text" in self.modalities and self.text_input == "tokens":
            specs.append(InputSpec("tokens", "text"))
        return specs + ([self.image_input()] if "image" in self.modalities else [])

    def card(self) -> dict[str, Any]:
        card = super().card()
        if self.extraction:  # what a served clip model does to an uploaded clip
            card["extraction"] = self.extraction
        return card

    def adopt_data(self, bundle: Any) -> None:
        """Feature widths the config does not give are the data's; a ``features`` dataset's extraction settings
        become the model's, and data extracted otherwise than a trained model's is refused, naming the setting."""
        from mmsenti.data.video.extraction import difference

        dims = getattr(bundle, "feature_dims", None) or {}
        for m in self.feature_modalities:
            if m in dims and not self.feature_dims.get(m):
                self.feature_dims[m] = dims[m]
            elif m in dims and self.feature_dims[m] != dims[m]:
                raise DataError(f"dataset '{bundle.name}': '{m}' features are {dims[m]} wide, model.feature_dims.{m} "
                                f"is {self.feature_dims[m]}")
        theirs = getattr(bundle, "extraction", None)
        if not any(m in EXTRACTED for m in self.feature_modalities):
            return
        if theirs and not self.extraction:
            self.extraction = dict(theirs)
        elif self.extraction and not theirs:
            raise DataError(f"dataset '{bundle.name}': this model reads features made by `mmsenti features extract`; "
                            f"'{bundle.name}' has features made otherwise")
        elif self.extraction and (diff := difference(self.extraction, theirs, other=f"'{bundle.name}'")):
            raise DataError(f"dataset '{bundle.name}' was extracted otherwise than this model's clips: {diff}")

    def batch_dependence(self) -> tuple[str, str] | None:
        if self.retrieval != "in-batch":
            return None
        return ("rahp with model.retrieval=in-batch",
                "its neighbours are the other posts of the batch a post is predicted in, so its answer depends on "
                "that batch; train with model.retrieval=bank (a memory bank saved with the model) or none")


def validate(cfg: RahpConfig, check_dims: bool = True) -> None:
    """One-line ConfigErrors for settings the dataclass types cannot express.

    ``check_dims``: also require ``feature_dims`` for every feature modality (at model build only, so that the
    default config, whose audio/vision widths depend on the data, can be constructed).
    """
    mods = cfg.modalities
    if not mods or len(set(mods)) != len(mods) or set(mods) - set(KNOWN_MODALITIES):
        raise ConfigError(f"model.modalities: rahp reads a non-empty subset of {list(KNOWN_MODALITIES)}, got {mods}")
    for key in ("width", "heads", "encoder_layers", "max_positions", "k", "num_prompts", "context_layers",
                "cross_layers", "hidden"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.width % cfg.heads:
        raise ConfigError(f"model.width ({cfg.width}) must be divisible by model.heads ({cfg.heads})")
    if cfg.retrieval not in ("bank", "in-batch", "none"):
        raise ConfigError(f"model.retrieval: expected bank, in-batch or none, got {cfg.retrieval!r}")
    if cfg.index not in INDEX_KINDS:
        raise ConfigError(f"model.index: expected one of {', '.join(INDEX_KINDS)}, got {cfg.index!r}")
    if cfg.lambda_ret < 0 or cfg.temperature <= 0:
        raise ConfigError("model.lambda_ret must be >= 0 and model.temperature > 0")
    for m in cfg.feature_modalities if check_dims else ():
        if cfg.feature_dims.get(m, 0) < 1:
            raise ConfigError(f"model.feature_dims.{m}: give the width of the '{m}' feature vectors "
                              f"(e.g. --set model.feature_dims.{m}=20)")


class SequenceEncoder(nn.Module):
    """Input projection → [EMPTY] token + learned positions → transformer blocks.

    The learned first token is always a valid key, so a sample with a zero-length sequence (mask all zeros)
    still gets finite attention and pooling. ``ordered=False`` (a set of tags): no positions after the first token,
    so the encoding does not depend on the order of the inputs.
    """

    def __init__(self, in_dim: int, d: int, heads: int, layers: int, max_positions: int, dropout: float,
                 attention: str = "sdpa", ordered: bool = True):
        super().__init__()
        self.max_positions, self.ordered = max_positions, ordered
        # LayerNorm first: MMSA features have arbitrary scales (COVAREP, OpenFace).
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, d))
        self.empty = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (max_positions if ordered else 0) + 1, d) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(d, heads, dropout=dropout, attention=attention)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, L, D_in), ``valid`` (B, L) bool → tokens (B, 1 + L', d), their validity, and the masked
        mean of the projected inputs (B, d) (zeros for an empty sequence)."""
        x, valid = x[:, : self.max_positions], valid[:, : self.max_positions]
        h = self.proj(x)
        w = valid.to(h.dtype).unsqueeze(-1)
        shallow = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        h = torch.cat([self.empty.expand(h.shape[0], -1, -1).to(h.dtype), h], 1)
        h = h + self.pos[:, : h.shape[1]] if self.ordered else torch.cat([h[:, :1] + self.pos, h[:, 1:]], 1)
        valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], 1)
        for blk in self.blocks:
            h, _ = blk(h, key_padding_mask=~valid)
        return self.norm(h), valid, shallow


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries: a modality's tokens; keys: its reference context) + MLP."""

    def __init__(self, d: int, heads: int, dropout: float, attention: str = "sdpa"):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = build_attention(d, heads, impl=attention)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_valid: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(ctx)
        a, _ = self.attn(self.norm_q(x), kv, kv, key_padding_mask=~ctx_valid, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x)))


class ContextEncoder(nn.Module):
    """A few transformer blocks over a context's tokens (prompts + pooled features or neighbours)."""

    def __init__(self, d: int, heads: int, layers: int, dropout: float, attention: str = "sdpa"):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(d, heads, dropout=dropout, attention=attention)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x, _ = blk(x, key_padding_mask=~valid)
        return self.norm(x)


@dataclass
class Encoded:
    """One modality of a batch after its sequence encoder."""

    tokens: torch.Tensor  # (B, L, d), first token the learned [EMPTY]
    valid: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, d)
    embedding: torch.Tensor  # (B, d) L2-normalised retrieval embedding
    present: torch.Tensor  # (B,) bool: the sample has at least one real token


class Rahp(MultimodalModel):
    """Retrieval-augmented hierarchical prompts; see the module docstring."""

    backbone_prefixes = ("text_encoder.backbone.", "image_encoder.")
    compiled_blocks = (*MultimodalModel.compiled_blocks, CrossBlock)

    def __init__(self, cfg: RahpConfig, info: TaskInfo, processor, load_weights: bool = True,
                 inference: bool = False):
        super().__init__(cfg, info, inference)
        validate(cfg)
        d, mods = cfg.width, list(cfg.modalities)
        self.modalities = mods
        self.text_encoder = self.image_encoder = None
        in_dims = {m: cfg.feature_dims.get(m, 0) for m in cfg.feature_modalities}
        if "text" in mods and cfg.text_input == "tokens":
            self.text_encoder = build_text_encoder(cfg.text_encoder, processor.tokenizer, load_weights)
            self.text_encoder.needed_states = {self.text_encoder.num_layers}  # only the last layer is read
            in_dims["text"] = self.text_encoder.width
        if "image" in mods:
            self.image_encoder = build_image_encoder(cfg.image_encoder, load_weights, text=cfg.text_encoder,
                                                     processor=processor)
            in_dims["image"] = self.image_encoder.width
        unordered = {"image"} if self.image_encoder is not None and not self.image_encoder.regions else set()
        self.encoders = nn.ModuleDict({m: SequenceEncoder(in_dims[m], d, cfg.heads, cfg.encoder_layers,
                                                          cfg.max_positions, cfg.dropout, cfg.attention,
                                                          ordered=m not in unordered) for m in mods})
        self.pools = nn.ModuleDict({m: AttentionPool(d) for m in mods})
        self.ret_heads = nn.ModuleDict({m: nn.Linear(d, d) for m in mods})
        self.type_embed = nn.Parameter(torch.randn(len(mods), d) * 0.02)  # modality of a pooled / source token

        n_p = cfg.num_prompts
        self.modality_prompts = nn.Parameter(torch.randn(len(mods), n_p, d) * 0.02) if cfg.use_modality_prompts else None
        self.sample_prompts = nn.Parameter(torch.randn(len(mods), n_p, d) * 0.02) if cfg.use_sample_prompts else None
        # Always-valid key of the sample-level context: no all-masked attention when nothing was retrieved.
        self.null_ref = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.modality_context = ContextEncoder(d, cfg.heads, cfg.context_layers, cfg.dropout, cfg.attention)
        self.sample_context = ContextEncoder(d, cfg.heads, cfg.context_layers, cfg.dropout, cfg.attention)

        self.use_labels = cfg.retrieval == "bank" and cfg.neighbour_labels
        if cfg.retrieval == "in-batch" and cfg.neighbour_labels:
            log.info("rahp: in-batch retrieval never reads neighbour labels (they would be the eval batch's)")
        self.nb_proj = nn.Linear(d, d)
        self.sim_proj = nn.Linear(1, d)
        if self.use_labels:
            self.label_embed = (nn.Embedding(info.num_outputs, d) if info.task == "classification"
                                else nn.Linear(1, d))
        self.cross = nn.ModuleDict({m: nn.ModuleList(CrossBlock(d, cfg.heads, cfg.dropout, cfg.attention)
                                                     for _ in range(cfg.cross_layers)) for m in mods})
        self.out_pools = nn.ModuleDict({m: AttentionPool(d) for m in mods})
        self.ctx_pools = nn.ModuleDict({m: AttentionPool(d) for m in mods})
        # Label prior (bank mode with labels): per (target, index) a similarity-softmax mean of the neighbours'
        # labels (regression) or class distribution, fed to the head next to the pooled features and, linearly,
        # to the output: the shortest path from the references' labels to the prediction.
        per = info.num_outputs if info.task == "classification" else 1
        n_prior = len(mods) * len(mods) * per if self.use_labels else 0
        if self.use_labels:
            self.prior_log_tau = nn.Parameter(torch.tensor(-2.3))  # softmax temperature ~0.1 over cosine scores
            self.prior_out = nn.Linear(n_prior, info.num_outputs)
            self._init_prior_out(len(mods), per)
        self.head_norm = nn.LayerNorm(2 * len(mods) * d)
        self.head = nn.Sequential(nn.Linear(2 * len(mods) * d + n_prior, cfg.hidden), nn.GELU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, info.num_outputs))
        self.ret_loss = CrossModalSupConLoss(info.task, cfg.temperature, weight=cfg.lambda_ret, normalize=False,
                                             regression_classes=cfg.retrieval_classes)
        self.bank = MemoryBank(mods, d, index=cfg.index)
        self._bank_stale = True  # weights changed since the bank was built

    @torch.no_grad()
    def _init_prior_out(self, n_mods: int, per: int) -> None:
        # Start as k-NN: the output is the mean of the in-modality label priors (the head learns a residual).
        # Otherwise the MLP first memorises the training labels from the sample's own features and learns to
        # ignore the (noisier, self-excluded) priors, which is what generalises on data like MOSI's.
        self.prior_out.weight.zero_()
        self.prior_out.bias.zero_()
        for i in range(n_mods):
            start = (i * n_mods + i) * per  # the (target i, index i) pair
            if per == 1:
                self.prior_out.weight[0, start] = 1.0 / n_mods
            else:
                self.prior_out.weight[:, start:start + per] += 4.0 * torch.eye(per) / n_mods

    def no_weight_decay(self) -> set[str]:
        return {"type_embed", "modality_prompts", "sample_prompts", "null_ref", "prior_log_tau",
                *(f"encoders.{m}.{p}" for m in self.modalities for p in ("empty", "pos"))}

    # -------------------------------------------------------------------------------------------- encoding
    def _inputs(self, batch: dict, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw token sequence (B, L, D_in) and validity (B, L) of modality ``m``."""
        if m == "text" and self.text_encoder is not None:
            out = self.text_encoder.encode_batch(batch)
            return out.hidden_states[-1], out.attention_mask.bool()
        if m == "image":
            out = self.image_encoder.encode_batch(batch)
            h = out.hidden_states[-1]
            if out.attention_mask is not None:  # tags: padding
                return h, out.attention_mask.bool()
            return h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return batch[f"{m}_features"], batch[f"{m}_mask"].bool()

    def encode(self, batch: dict) -> dict[str, Encoded]:
        """Every modality's tokens, pooled features and retrieval embedding."""
        out = {}
        for m in self.modalities:
            x, valid = self._inputs(batch, m)
            present = valid[:, : self.config.max_positions].any(1)
            tokens, valid, shallow = self.encoders[m](x, valid)
            pooled, _ = self.pools[m](tokens, key_padding_mask=~valid)
            # Retrieval reads the time-averaged projected inputs, not the deep tokens: averaging removes the
            # per-step noise, and the neighbours are sensible from the first epoch instead of drifting with
            # (and being collapsed by) the task-trained encoder.
            emb = F.normalize(self.ret_heads[m](shallow).float(), dim=-1)
            out[m] = Encoded(tokens, valid, pooled, emb, present)
        return out

    # ------------------------------------------------------------------------------------------- retrieval
    def retrieve(self, enc: dict[str, Encoded], ids: list[str]) -> dict[str, dict[str, Neighbours]]:
        """``{target: {source: Neighbours}}``: top-k for each target modality's embedding in each source index.

        Bank mode searches the training bank; while training it excludes each sample's own row (by id), so a
        training sample never finds itself. In eval mode nothing is excluded: a prediction depends on the input
        only, never on the id its caller gave it. In-batch mode searches a bank of the current batch, excluding the
        sample itself. Empty for ``retrieval: none``.
        """
        mode = self.config.retrieval
        if mode == "none":
            return {}
        if mode == "bank":
            if not self.bank.is_built:
                raise RuntimeError("rahp: the memory bank is empty; train the model (the trainer builds it) "
                                   "or call refresh_bank(batches)")
            bank = self.bank
            exclude = self.bank.rows_for_ids(ids) if self.training else torch.full((len(ids),), -1, dtype=torch.long)
        else:
            bank = MemoryBank(self.modalities, self.config.width, index="torch", device=enc[self.modalities[0]].embedding.device)
            bank.refresh({m: e.embedding for m, e in enc.items()},
                         payload={f"feat.{m}": e.pooled.float() for m, e in enc.items()},
                         ids=[str(i) for i in range(len(ids))])
            exclude = torch.arange(len(ids))
        b, mods = len(ids), self.modalities
        queries = torch.cat([enc[m].embedding for m in mods])  # one search per index for all targets
        exclude = exclude.repeat(len(mods))
        out: dict[str, dict[str, Neighbours]] = {m: {} for m in mods}
        for s in mods:
            nb = bank.query(queries, s, self.config.k, exclude_rows=exclude)
            for j, m in enumerate(mods):
                sl = slice(j * b, (j + 1) * b)
                out[m][s] = Neighbours(nb.scores[sl], nb.rows[sl], {k: v[sl] for k, v in nb.payload.items()})
        return out

    def _neighbour_tokens(self, target: str, found: dict[str, Neighbours], dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S·k, d) tokens of the neighbours retrieved for ``target`` and their validity."""
        toks, valid = [], []
        for s, nb in found.items():
            feat = nb.payload[f"feat.{target}"].to(dtype)
            score = nb.scores.masked_fill(~nb.mask, 0.0).to(dtype).unsqueeze(-1)
            t = self.nb_proj(feat) + self.sim_proj(score) + self.type_embed[self.modalities.index(s)]
            if self.use_labels:
                lab = nb.payload["labels"]
                t = t + (self.label_embed(lab.long()) if self.info.task == "classification"
                         else self.label_embed(lab.to(dtype).unsqueeze(-1)))
            toks.append(t)
            valid.append(nb.mask)
        return torch.cat(toks, 1), torch.cat(valid, 1)

    def _label_prior(self, nb: Neighbours, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1) similarity-weighted mean neighbour label, or (B, C) class distribution."""
        w = (nb.scores.float() / self.prior_log_tau.exp()).masked_fill(~nb.mask, float("-inf"))
        w = torch.nan_to_num(w.softmax(-1), nan=0.0)  # no neighbour at all: a zero prior, not NaN
        lab = nb.payload["labels"]
        if self.info.task == "classification":
            onehot = F.one_hot(lab.long().clamp_min(0), self.info.num_outputs).float()
            return torch.einsum("bk,bkc->bc", w, onehot).to(dtype)
        return (w * lab.float()).sum(-1, keepdim=True).to(dtype)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict, return_neighbours: bool = False) -> dict[str, Any]:
        """Logits, retrieval embeddings and which modalities are present; with ``return_neighbours`` also the
        neighbours this pass retrieved and built its sample-level contexts from (``{target: {source: Neighbours}}``,
        as :meth:`retrieve` returns them), for explanations."""
        if self.training:
            self._bank_stale = True
        enc = self.encode(batch)
        found = self.retrieve(enc, list(batch["ids"]))
        mods = self.modalities
        ref = enc[mods[0]].pooled
        b, dtype = ref.shape[0], ref.dtype
        # Modality-level context: [modality prompts of the target] + the sample's own pooled modalities.
        pooled = torch.stack([enc[m].pooled for m in mods], 1) + self.type_embed.to(dtype)  # (B, M, d)
        feats = []
        for i, m in enumerate(mods):
            parts = [pooled]
            if self.modality_prompts is not None:
                parts.insert(0, self.modality_prompts[i].to(dtype).expand(b, -1, -1))
            mod_ctx = torch.cat(parts, 1)
            mod_ctx = self.modality_context(mod_ctx, torch.ones(mod_ctx.shape[:2], dtype=torch.bool, device=ref.device))
            # Sample-level context: [null] + [sample prompts of the target] + retrieved neighbours.
            parts, valid = [self.null_ref.to(dtype).expand(b, -1, -1)], [torch.ones(b, 1, dtype=torch.bool, device=ref.device)]
            if self.sample_prompts is not None:
                parts.append(self.sample_prompts[i].to(dtype).expand(b, -1, -1))
                valid.append(torch.ones(b, parts[-1].shape[1], dtype=torch.bool, device=ref.device))
            if found:
                t, v = self._neighbour_tokens(m, found[m], dtype)
                parts.append(t)
                valid.append(v)
            smp_valid = torch.cat(valid, 1)
            smp_ctx = self.sample_context(torch.cat(parts, 1), smp_valid)
            ctx = torch.cat([mod_ctx, smp_ctx], 1)
            ctx_valid = torch.cat([torch.ones(mod_ctx.shape[:2], dtype=torch.bool, device=ref.device), smp_valid], 1)
            # Retrieval-augmented encoder: the target's tokens attend to both contexts.
            h = enc[m].tokens
            for blk in self.cross[m]:
                h = blk(h, ctx, ctx_valid)
            z, _ = self.out_pools[m](h, key_padding_mask=~enc[m].valid)
            c, _ = self.ctx_pools[m](ctx, key_padding_mask=~ctx_valid)
            feats += [z, c]
        x = self.head_norm(torch.cat(feats, -1))
        logits = None
        if self.use_labels and found:
            prior = torch.cat([self._label_prior(found[m][src], dtype) for m in mods for src in mods], -1)
            x = torch.cat([x, prior], -1)
            logits = self.prior_out(prior)
        logits = self.head(x) if logits is None else logits + self.head(x)
        out = {"logits": logits,
               "retrieval_embeddings": {m: enc[m].embedding for m in mods},
               "present": torch.stack([enc[m].present for m in mods], 1)}
        if return_neighbours:
            out["neighbours"] = found
        return out

    def compute_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = dict(self.criterion(outputs, batch))
        if self.training and self.config.retrieval != "none" and self.config.lambda_ret > 0:
            terms.update(self.ret_loss(outputs["retrieval_embeddings"], batch["labels"], outputs["present"]))
        return terms

    # ------------------------------------------------------------------------------------------ memory bank
    @torch.no_grad()
    def refresh_bank(self, batches, device: torch.device | str | None = None, dist=None) -> None:
        """Rebuild the bank from ``batches`` (the training set, in eval mode) with the current weights.

        Multi-process (``dist``, a :class:`mmsenti.distributed.Distributed`): each process encodes its
        round-robin share of the batches, the shares are gathered back into the global order, and every process
        builds the same bank, equal to a single process's.
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        was_training = self.training
        self.eval()
        rows = []  # per batch: (embeddings, pooled features, labels, ids) on the CPU
        try:
            for batch in batches:
                batch = move(batch, device)
                enc = self.encode(batch)
                rows.append(({m: e.embedding.float().cpu() for m, e in enc.items()},
                             {m: e.pooled.float().cpu() for m, e in enc.items()},
                             batch["labels"].cpu() if self.use_labels else None,
                             [str(i) for i in batch["ids"]]))
        finally:
            self.train(was_training)
        if dist is not None:
            rows = dist.gather_interleaved(rows)
        payload = {f"feat.{m}": torch.cat([r[1][m] for r in rows]) for m in self.modalities}
        if self.use_labels:
            payload["labels"] = torch.cat([r[2] for r in rows])
        bank = MemoryBank(self.modalities, self.config.width, index=self.config.index)
        bank.refresh({m: torch.cat([r[0][m] for r in rows]) for m in self.modalities}, payload=payload,
                     ids=[i for r in rows for i in r[3]])
        self.bank, self._bank_stale = bank, False
        log.debug("rahp: memory bank refreshed with %d samples", len(bank))

    def _refresh_from(self, trainer) -> None:
        if self.config.retrieval == "bank":
            self.refresh_bank(trainer.loader("train", None), trainer.device, getattr(trainer, "dist", None))

    def on_train_epoch_start(self, trainer) -> None:
        # After an epoch-end refresh (or a resume, which loads that bank) the weights have not changed.
        if self.config.retrieval == "bank" and (self._bank_stale or not self.bank.is_built):
            self._refresh_from(trainer)

    def on_train_epoch_end(self, trainer) -> None:
        self._refresh_from(trainer)  # dev evaluation and the saved model see a bank matching the weights

    # -------------------------------------------------------------------------------------------- explain
    @property
    def lists_neighbours(self) -> bool:
        return True

    @torch.no_grad()
    def explain_forward(self, batch: dict, options: Any) -> Explained:
        """Also the neighbours this pass built its sample-level contexts from (exactly those of the forward)."""
        out = self(batch, return_neighbours=True)
        if self.config.retrieval == "none":
            return Explained(out, neighbours=Retrieved({}), notes=["rahp with retrieval: none has no neighbours"])
        # (in-batch retrieval never gets here: explanations refuse it, check_per_post)
        notes = (["rahp: retrieval has no gradient, and along Integrated Gradients' path the neighbours change in "
                  "steps it cannot see; read its attributions as local, not complete"]
                 if options.integrated_gradients else [])
        return Explained(out, neighbours=Retrieved(out["neighbours"], self.bank.ids), notes=notes)

    # --------------------------------------------------------------------------------------------- export
    # In a graph the bank is exact retrieval as graph ops (BankRetrieval) over its vectors as constants, and the
    # graph also returns the retrieved bank rows ("neighbours"), which parity compares with the eager model's.
    def export_check(self) -> None:
        super().export_check()
        if self.config.retrieval != "bank":
            return
        if not self.bank.is_built:
            raise ExportError("rahp: the memory bank is empty (the model was never trained); nothing to retrieve from")
        from mmsenti.retrieval.index import FaissIndex

        for m, index in self.bank.indexes.items():
            if isinstance(index, FaissIndex) and index.kind != "flat":
                raise ExportError(f"rahp: the memory bank's '{m}' index is approximate (FAISS {index.kind}); the "
                                  "graph retrieves exactly (matmul + top-k) and would find other neighbours than the "
                                  "model does for some posts, so parity cannot hold; export a model whose bank uses "
                                  "model.index=torch or flat")

    def export_outputs(self) -> list[tuple[str, str, list[int | str]]]:
        m = len(self.modalities)
        return [("neighbours", "int64", ["batch", m, m, int(self.config.k)])] if self.config.retrieval == "bank" else []

    @contextlib.contextmanager
    def graph_mode(self) -> Iterator[Callable[[], tuple[torch.Tensor, ...]]]:
        with super().graph_mode() as base:
            if self.config.retrieval != "bank":
                yield base
                return
            self.graph_retrieval = BankRetrieval(self)  # a submodule while exporting: its tensors are constants
            self.retrieve = lambda enc, ids: self.graph_retrieval(enc)
            try:
                yield lambda: (self.graph_retrieval.rows,)
            finally:
                del self.retrieve
                del self.graph_retrieval

    def export_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.config.retrieval != "bank":
            return {}
        found, mods = self.retrieve(self.encode(batch), list(batch["ids"])), self.modalities
        return {"neighbours": torch.stack([torch.stack([found[t][s].rows for s in mods], 1) for t in mods], 1)}

    def export_info(self) -> dict[str, Any]:
        if self.config.retrieval != "bank":
            return {}
        return {"retrieval": {"bank_rows": len(self.bank), "k": int(self.config.k), "modalities": list(self.modalities),
                              "metric": self.bank.metric, "search": "exact (MatMul + TopK) over the bank as constants"}}

    # ------------------------------------------------------------------------ bank inside the state_dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.bank.state_dict().items():
            destination[prefix + BANK_PREFIX + k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        bp = prefix + BANK_PREFIX
        bank_state = {k[len(bp):]: v for k, v in state_dict.items() if k.startswith(bp)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(bp)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if "meta" not in bank_state:
            missing_keys.append(bp + "meta")
            return
        try:
            bank = MemoryBank(self.modalities, self.config.width, index=self.config.index)
            bank.load_state_dict(bank_state)
        except Exception as e:  # reported like any other state_dict mismatch
            error_msgs.append(f"memory bank: {e}")
            return
        self.bank, self._bank_stale = bank, False


class BankRetrieval(nn.Module):
    """The bank search as graph ops: exact top-k of cosine (or inner-product) scores against constant vectors.

    Returns what :meth:`Rahp.retrieve` returns in eval mode (nothing excluded), and keeps the retrieved rows of the
    last call in :attr:`rows`: ``(B, targets, sources, k)``, ``-1`` where the bank holds fewer than ``k`` samples.
    Ties keep the lower row first (ONNX ``TopK``), as the torch index does.
    """

    def __init__(self, model: Rahp):
        super().__init__()
        bank = model.bank
        self.modalities = list(model.modalities)
        self.k = int(model.config.k)
        self.cosine = bank.metric == "cosine"
        for m in self.modalities:
            # Torch and FAISS-flat indexes both store their (already normalised) vectors as "vectors".
            self.register_buffer(f"vectors_{m}", bank.indexes[m].state()[1]["vectors"].float().cpu().clone())
        self.payload_names = sorted(bank.payload)
        for i, name in enumerate(self.payload_names):
            self.register_buffer(f"payload_{i}", bank.payload[name].cpu().clone())
        self.fetch = min(self.k, len(bank))
        self.rows: torch.Tensor | None = None

    def forward(self, enc: dict) -> dict:
        mods, k = self.modalities, self.k
        queries = torch.cat([enc[m].embedding for m in mods])  # (targets·B, d): one search per index
        if self.cosine:
            queries = F.normalize(queries, dim=1)
        found: dict[str, dict] = {m: {} for m in mods}
        rows_by_source = []
        for s in mods:
            scores, rows = torch.topk(queries @ getattr(self, f"vectors_{s}").T, self.fetch, dim=1)
            if self.fetch < k:  # a bank smaller than k: padding slots, as the index returns them
                scores = torch.cat([scores, scores.new_full((scores.shape[0], k - self.fetch), float("-inf"))], 1)
                rows = torch.cat([rows, rows.new_full((rows.shape[0], k - self.fetch), -1)], 1)
            payload = {}
            for i, name in enumerate(self.payload_names):
                picked = getattr(self, f"payload_{i}")[rows.clamp_min(0)]
                if self.fetch < k:
                    valid = (rows >= 0).reshape(*rows.shape, *([1] * (picked.ndim - 2)))
                    picked = picked.masked_fill(~valid, 0)
                payload[name] = picked
            scores, rows = scores.unflatten(0, (len(mods), -1)), rows.unflatten(0, (len(mods), -1))
            payload = {n: v.unflatten(0, (len(mods), -1)) for n, v in payload.items()}
            for j, m in enumerate(mods):
                found[m][s] = Neighbours(scores[j], rows[j], {n: v[j] for n, v in payload.items()})
            rows_by_source.append(rows)  # (targets, B, k)
        self.rows = torch.stack(rows_by_source, 2).transpose(0, 1)  # (B, targets, sources, k)
        return found


@MODELS.register("rahp", config=RahpConfig,
                 description="retrieval-augmented hierarchical prompts with a saved training-set memory bank")
def rahp(cfg: RahpConfig, info: TaskInfo, processor, load_weights: bool = True, inference: bool = False) -> Rahp:
    return Rahp(cfg, info, processor, load_weights, inference)


# Tiny variant (tests, CPU smoke runs) on text tokens + image regions, the built-in scenes data's modalities.
register_tiny("rahp", modalities=["text", "image"], width=16, heads=2, hidden=16, k=3, num_prompts=2)
