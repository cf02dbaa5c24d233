"""The INFIG model: ablation switches, momentum encoders, queues, losses wired as the paper says."""

from __future__ import annotations

import pytest
import torch

from mmsenti.config import ConfigError, load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes
from mmsenti.losses import total_loss
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor

TINY = ["model.name=infig-tiny", "model.fusion_layers=2"]  # two fusion layers: attention maps per layer


@pytest.fixture(scope="module")
def data():
    return build_scenes(ScenesConfig(num_train=16, num_dev=4, num_test=4, image_size=32))


def make(data, *overrides):
    cfg = load_config(None, TINY + list(overrides))
    proc = build_processor(cfg.model, [s.text for s in data.splits["train"]], "classification")
    torch.manual_seed(0)
    return build_model(cfg.model, TaskInfo("classification", data.label_names), proc), proc


def names(model) -> set[str]:
    return {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}


def test_ablations_remove_their_parameters(data):
    full, _ = make(data)
    n = names(full)
    assert any(k.startswith("clip.") for k in n) and any(k.startswith("clip_image_proj.") for k in n)
    assert any(k.startswith("text_encoder_m.") for k in n) and "gam_loss.image_queue.queue" in n
    assert "hfam_temperature.log_tau" in n or any(k.startswith("hfam_temperature") for k in n)

    no_clip = names(make(data, "model.use_clip=false")[0])
    assert not any("clip" in k for k in no_clip)
    assert any(k.startswith("text_encoder_m.") for k in no_clip)  # GAM keeps its momentum encoders

    no_gam = names(make(data, "model.use_gam=false")[0])
    assert not any(k.endswith("_m") or "_m." in k or "gam" in k or "clip" in k for k in no_gam)

    no_hfam = names(make(data, "model.use_hfam=false")[0])
    assert not any("hfam" in k for k in no_hfam) and any(k.startswith("text_encoder_m.") for k in no_hfam)

    neither = make(data, "model.use_gam=false", "model.use_hfam=false")[0]
    assert not any("hfam" in k or "gam" in k or "_m." in k or "clip" in k for k in names(neither))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(neither) < count(make(data, "model.use_clip=false")[0]) < count(full)


def test_training_terms_and_eval_terms(data):
    model, proc = make(data)
    batch = proc(data.splits["train"][:8])
    model.train()
    terms = model.compute_loss(model(batch), batch)
    assert {"loss_sc", "loss_g", "loss_f"} <= set(terms)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert "global" not in out and "fine" not in out
    assert set(k for k in model.compute_loss(out, batch) if k.startswith("loss")) == {"loss_sc"}


def test_loss_weights_are_the_papers(data):
    model, proc = make(data, "model.lambda_g=0.3", "model.lambda_f=0.2")
    batch = proc(data.splits["train"][:8])
    model.train()
    out = model(batch)
    (i_g, t_g), (i_m, t_m) = out["global"], out["global_m"]
    q_before = model.gam_loss.image_queue.features().clone(), model.gam_loss.text_queue.features().clone()
    terms = model.compute_loss(out, batch)
    img, txt, mask, img_mask = out["fine"]
    raw_f = model.hfam_loss(img, txt, mask, model.hfam_temperature(), img_mask=img_mask)["loss_f"]
    assert terms["loss_f"].item() == pytest.approx(0.2 * raw_f.item(), rel=1e-5)
    # First step: the queues were empty, so L_g is InfoNCE against the batch's momentum features (eqs. 1-2).
    assert q_before[0].shape[0] == 0 and q_before[1].shape[0] == 0
    logits = torch.nn.functional.normalize(i_g, dim=-1) @ torch.nn.functional.normalize(t_m, dim=-1).T
    tau = model.gam_loss.temperature().item()
    i2t = torch.nn.functional.cross_entropy(logits / tau, torch.arange(8))
    logits_t = torch.nn.functional.normalize(t_g, dim=-1) @ torch.nn.functional.normalize(i_m, dim=-1).T
    t2i = torch.nn.functional.cross_entropy(logits_t / tau, torch.arange(8))
    assert terms["loss_g"].item() == pytest.approx(0.3 * 0.5 * (i2t + t2i).item(), rel=1e-4)


def test_momentum_encoders_are_an_ema_without_gradients(data):
    model, proc = make(data, "model.momentum=0.9")
    batch = proc(data.splits["train"][:8])
    online = dict(model.image_encoder.named_parameters())
    momentum = dict(model.image_encoder_m.named_parameters())
    assert all(not p.requires_grad for p in momentum.values())
    with torch.no_grad():  # make online and momentum differ
        for p in online.values():
            p.add_(0.5)
    before = {k: v.detach().clone() for k, v in momentum.items()}
    model.train()
    terms = model.compute_loss(model(batch), batch)
    total_loss(terms).backward()
    for k, p in momentum.items():  # a forward never moves them (it may be one of several micro-batches) ...
        assert torch.equal(p, before[k]) and p.grad is None
    model.on_optimizer_step()  # ... one EMA step per optimiser step does
    for k, p in momentum.items():
        torch.testing.assert_close(p, 0.9 * before[k] + 0.1 * online[k].detach())
        assert p.grad is None
    queue = model.gam_loss.image_queue
    assert queue.features().shape[0] == 8 and not queue.features().requires_grad


def test_queue_wraps_over_training_steps(data):
    model, proc = make(data, "model.queue_size=12")
    model.train()
    for i in range(3):  # 3 × 5 samples through a queue of 12
        batch = proc(data.splits["train"][i * 5 : i * 5 + 5])
        model.compute_loss(model(batch), batch)
    assert model.gam_loss.image_queue.features().shape[0] == 12


def test_attention_maps_for_explanations(data):
    model, proc = make(data)
    model.eval()
    batch = proc(data.splits["train"][:4])
    with torch.no_grad():
        out = model(batch, return_attention=True)
    attn = out["attention"]
    n_img = out["num_image_tokens"]
    L = n_img + batch["input_ids"].shape[1]
    assert attn.shape == (4, 2, L, L)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 2, L))
    pad = batch["attention_mask"] == 0
    assert pad.any(), "fixture should contain padded texts"
    assert attn[..., n_img:][pad[:, None, None, :].expand(-1, 2, L, -1)].abs().max() == 0  # padding never attended
    torch.testing.assert_close(out["pool_weights"].sum(-1), torch.ones(4))


def test_gam_layer_selects_the_cls_of_that_layer(data):
    model, proc = make(data, "model.gam_layer=2", "model.use_clip=false", "model.image_layers=2",
                       "model.text_encoder.num_layers=2")
    batch = proc(data.splits["train"][:4])
    model.train()
    torch.manual_seed(1)
    out = model(batch)
    torch.manual_seed(1)
    img_states, txt_states, _, _ = model._encode(batch)
    torch.testing.assert_close(out["global"][0], img_states[-2][:, 0])
    torch.testing.assert_close(out["global"][1], txt_states[-2][:, 0])


@pytest.mark.parametrize("override, message", [
    ("model.hfam_layers=9", "need 9"), ("model.gam_layer=0", "gam_layer: must be >= 1"),
    ("model.momentum=1.0", "momentum"), ("model.modalities=[audio]", "infig reads text and/or image"),
    ("model.modality_dropout=1.5", "modality_dropout"),
])
def test_bad_settings_are_config_errors(data, override, message):
    with pytest.raises(ConfigError, match=message):
        make(data, override)


def test_modality_drop_hides_one_modality_per_hit_sample():
    from mmsenti.models.infig.model import modality_drop

    g = torch.Generator().manual_seed(0)
    drop = modality_drop(20000, 0.3, generator=g)
    assert not (drop[:, 0] & drop[:, 1]).any()  # never both: fusion always has keys
    assert abs(drop.any(1).float().mean().item() - 0.3) < 0.02
    assert abs(drop[:, 0].float().mean().item() - 0.15) < 0.01
    assert not modality_drop(50, 0.0).any() and modality_drop(50, 1.0).any(1).all()


def test_modality_dropout_removes_the_dropped_modality_from_the_logits(data, monkeypatch):
    import mmsenti.models.infig.model as infig

    model, proc = make(data, "model.modality_dropout=0.5", "model.use_gam=false", "model.use_hfam=false")
    batch = proc(data.splits["train"][:4])
    fixed = torch.tensor([[True, False], [False, True], [False, False], [False, False]])
    monkeypatch.setattr(infig, "modality_drop", lambda b, p, device=None, generator=None: fixed)
    model.train()

    def logits(b):
        torch.manual_seed(3)  # same dropout masks in every pass
        return model(b)["logits"].detach()

    base = logits(batch)
    other_img = logits({**batch, "pixel_values": batch["pixel_values"].flip(0)})
    other_txt = logits({**batch, "input_ids": batch["input_ids"].flip(0),
                        "attention_mask": batch["attention_mask"].flip(0)})
    torch.testing.assert_close(other_img[0], base[0])  # sample 0: image hidden
    torch.testing.assert_close(other_txt[1], base[1])  # sample 1: text hidden
    assert (other_img[2:] - base[2:]).abs().max() > 1e-4 and (other_txt[2:] - base[2:]).abs().max() > 1e-4
    model.eval()  # never at evaluation
    with torch.no_grad():
        assert (model({**batch, "pixel_values": batch["pixel_values"].flip(0)})["logits"][0]
                - model(batch)["logits"][0]).abs().max() > 1e-4
