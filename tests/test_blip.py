"""The dual-stream BLIP backbone: loading checkpoints of both layouts, adapters in both encoders, views,
a FedDAT run on it, and the errors of wrong or damaged checkpoints."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import BlipForQuestionAnswering
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from feddat.algorithms.feddat import FedDAT
from feddat.cli import main
from feddat.data.questions import WORDS
from feddat.errors import FedDATError
from feddat.models.backbone import build_word_tokenizer, load_backbone
from feddat.models.blip import BlipBackbone, PixelTransform, blip_config, encode, save_blip, small_blip_config
from feddat.models.vl import AnswerHead, adapt_backbone, pooled_features, pooled_features_of_views
from tiny import randomise_adapters, tiny_batch

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _tiny_blip_config(tok):
    return small_blip_config(len(tok), hidden=32, layers=2, heads=2, intermediate=64)


@pytest.fixture(scope="session")
def blip_vqa_dir(tmp_path_factory):
    """A tiny random BlipForQuestionAnswering (vision_model.*, text_encoder.*, text_decoder.*) saved with
    save_pretrained, with its tokenizer and a BLIP image processor normalising with CLIP's mean and std."""
    path = tmp_path_factory.mktemp("tiny-blip-vqa")
    tok = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    BlipForQuestionAnswering(_tiny_blip_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    BlipImageProcessorPil(size={"height": 48, "width": 48}, image_mean=CLIP_MEAN, image_std=CLIP_STD) \
        .save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def blip_model_dir(tmp_path_factory):
    """A tiny random BLIP in BlipModel's layout (vision_model.*, text_model.*), as `feddat pretrain` writes it."""
    path = tmp_path_factory.mktemp("tiny-blip-model")
    tok = build_word_tokenizer(WORDS)
    torch.manual_seed(1)
    save_blip(BlipBackbone(_tiny_blip_config(tok)), tok, path)
    return path


@pytest.fixture()
def tiny(blip_vqa_dir):
    backbone, tokenizer = load_backbone(blip_vqa_dir, family="blip")
    model = adapt_backbone(backbone, FedDAT.adapters, reduction=4, views=FedDAT.views)
    randomise_adapters(model)
    return model, tokenizer


def test_loads_the_vqa_layout_with_its_weights_processor_and_tokenizer(blip_vqa_dir):
    backbone, tok = load_backbone(blip_vqa_dir, family="blip")
    saved = BlipForQuestionAnswering.from_pretrained(blip_vqa_dir)
    assert torch.equal(backbone.vision_model.encoder.layers[1].mlp.fc2.weight,
                       saved.vision_model.encoder.layers[1].mlp.fc2.weight)
    assert torch.equal(backbone.text_model.encoder.layer[1].crossattention.self.key.weight,
                       saved.text_encoder.encoder.layer[1].crossattention.self.key.weight)
    assert not any(p.requires_grad for p in backbone.parameters())
    c = backbone.config
    assert (c.hidden_size, c.num_hidden_layers, c.image_size, c.patch_size, c.max_position_embeddings) == \
        (32, 4, 48, 12, 12)
    assert tok("what color is the circle ?")["input_ids"][0] == tok.cls_token_id
    # the checkpoint's processor: pixels of 0..255 rescaled by 1/255 and normalised with its mean and std
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    expected = ((x + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(backbone.pixels(x), expected, atol=1e-5)
    # the pooled feature is the text encoder's [CLS] position, attending to the image
    batch = tiny_batch(tok)
    with torch.no_grad():
        image = saved.vision_model(pixel_values=expected[:1].repeat(6, 1, 1, 1)).last_hidden_state
    assert image.shape == (6, 17, 32)
    text, pooled = encode(backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(pooled, text[:, 0])


def test_without_a_processor_our_preprocessing_is_used(blip_model_dir, tmp_path):
    copy_dir = tmp_path / "no-processor"
    shutil.copytree(blip_model_dir, copy_dir)
    (copy_dir / "preprocessor_config.json").unlink()
    backbone, _ = load_backbone(copy_dir, family="blip")
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    assert torch.equal(backbone.pixels(x), x)
    # an image of another size is resized to the encoder's, as the processor would
    assert PixelTransform((48, 48))(torch.zeros(1, 3, 96, 96)).shape == (1, 3, 48, 48)


def test_adapters_sit_after_the_ffn_of_every_layer_of_both_encoders(tiny):
    model, tok = tiny
    backbone = model.backbone
    assert len(model.slots) == 2 + 2
    hooked = backbone.adapted_layers()
    assert hooked[:2] == [layer.mlp for layer in backbone.vision_model.encoder.layers]
    assert hooked[2:] == [layer.output for layer in backbone.text_model.encoder.layer]
    batch = tiny_batch(tok)
    model.set_view("student")
    base = pooled_features(model, batch)
    g = torch.Generator().manual_seed(3)
    for index in (0, len(model.slots) - 1):  # the first image slot and the last text slot both act
        up = model.slots[index].adapters["global"].up.weight
        kept = up.detach().clone()
        with torch.no_grad():
            up.add_(torch.randn(up.shape, generator=g))
        assert not torch.allclose(pooled_features(model, batch), base, atol=1e-4)
        with torch.no_grad():
            up.copy_(kept)


def test_teacher_view_equals_mean_of_adapters_formula_through_the_model(tiny):
    model, tok = tiny
    batch = tiny_batch(tok)
    model.set_view("teacher")
    got = pooled_features(model, batch)
    # Manual rollout: after every image layer's FFN f <- f + 0.5 * (A_local(f) + A_frozen(f)), then the residual;
    # after every text layer's output block h <- h + 0.5 * (A_local(h) + A_frozen(h)).
    blip = model.backbone
    model.set_view("none")

    def dat(slot, h):
        return h + 0.5 * (slot.adapters["local"](h) + slot.adapters["global_frozen"](h))

    with torch.no_grad():
        h = blip.vision_model.embeddings(blip.pixels(batch["pixel_values"]))
        for layer, slot in zip(blip.vision_model.encoder.layers, model.slots[:2]):
            h = h + layer.self_attn(layer.layer_norm1(h))[0]
            h = h + dat(slot, layer.mlp(layer.layer_norm2(h)))
        image = blip.vision_model.post_layernorm(h)
        from transformers.masking_utils import create_bidirectional_mask

        t = blip.text_model.embeddings(input_ids=batch["input_ids"])
        mask = create_bidirectional_mask(config=blip.text_model.config, inputs_embeds=t,
                                         attention_mask=batch["attention_mask"])
        for layer, slot in zip(blip.text_model.encoder.layer, model.slots[2:]):
            a = layer.attention(t, attention_mask=mask)[0]
            a = layer.crossattention(a, encoder_hidden_states=image)[0]
            t = dat(slot, layer.output(layer.intermediate(a), a))
        expected = t[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    model.set_view("none")
    assert not torch.allclose(pooled_features(model, batch), got, atol=1e-3)


def test_views_with_the_shared_prefix_equal_separate_passes(tiny):
    model, tok = tiny
    batch = tiny_batch(tok)
    expected = []
    for view in ("teacher", "student"):
        model.set_view(view)
        expected.append(pooled_features(model, batch))
    for stacked in (False, True):
        got = pooled_features_of_views(model, batch, ("teacher", "student"), stacked=stacked)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-6)


def test_feddat_local_step_trains_adapters_and_keeps_the_backbone(tiny):
    from feddat.algorithms.base import LocalConfig

    model, tok = tiny
    method = FedDAT()
    for name in method.adapters:
        for p in model.adapter_parameters(name):
            p.requires_grad_(name in method.trained)
    head = AnswerHead(model.backbone.config.hidden_size, 4)
    cfg = LocalConfig()
    opt = torch.optim.AdamW(method.param_groups(model, head, cfg), weight_decay=cfg.weight_decay)
    before = copy.deepcopy(model.state_dict())
    method.train_step(model, head, tiny_batch(tok), opt, cfg)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters.global." in k or ".adapters.local." in k for k in changed)
    assert any(k.startswith("slots.0.") for k in changed) and any(k.startswith("slots.3.") for k in changed)


@pytest.mark.integration
def test_a_feddat_round_on_blip_saves_clients_that_predict(blip_model_dir, tmp_path):
    from feddat.config import RunConfig
    from feddat.federation.inprocess import build, run
    from feddat.inference import load_client

    cfg = RunConfig(model_path=str(blip_model_dir), backbone="blip", cache_dir=str(tmp_path / "cache"), rounds=1,
                    clients=2, train_per_client=16, val_per_client=8, test_per_client=16, batch_size=8,
                    threads=1, reduction=4).validate()
    setup = build(cfg)
    worker = setup.worker
    before = copy.deepcopy(worker.model.backbone.state_dict())
    client = setup.clients[0]
    res = worker.fit(client, worker.initial_state(0, len(client.answers), 0), worker.initial_global(0), 0, 1, 0, 0)
    assert all(torch.equal(before[k], v) for k, v in worker.model.backbone.state_dict().items())
    assert set(res.update) == set(worker.initial_global(0))

    out = tmp_path / "run"
    results = run(cfg, out_dir=out, progress=False)
    assert results["config"]["backbone"] == "blip" and len(results["final"]["clients"]) == 2
    meta = json.loads((out / "clients" / client.name / "client.json").read_text())
    assert meta["backbone"]["family"] == "blip" and meta["adapters"]["layers"] == 4
    model = load_client(out, client.name)
    image = (torch.rand(48, 48, 3) * 255).to(torch.uint8).numpy()
    (answers,) = model.predict([image], ["what color is the circle ?"], top_k=2)
    assert len(answers) == 2 and answers[0][0] in client.answers
    # the family is checked against what the client was trained on
    with pytest.raises(FedDATError, match="trained on a blip one"):
        load_client(out, client.name, backbone="vilt", model_path="embedded")


@pytest.mark.integration
def test_cli_run_with_backbone_blip(blip_model_dir, tmp_path):
    out = tmp_path / "cli-run"
    assert main(["run", "--backbone", "blip", "--model-path", str(blip_model_dir), "--rounds", "1", "--clients", "2",
                 "--train-per-client", "8", "--val-per-client", "8", "--test-per-client", "8", "--batch-size", "8",
                 "--reduction", "4", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["backbone"] == "blip"
    assert main(["run", "--backbone", "albef", "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_a_vilt_checkpoint_with_backbone_blip_is_refused(tiny_backbone_dir):
    with pytest.raises(FedDATError, match="'vilt' checkpoint, not a BLIP one"):
        load_backbone(tiny_backbone_dir, family="blip")


def test_a_blip_checkpoint_without_backbone_blip_names_the_option(blip_model_dir):
    with pytest.raises(FedDATError, match="--backbone blip"):
        load_backbone(blip_model_dir)


def test_a_truncated_weights_file_is_refused(blip_model_dir, tmp_path):
    damaged = tmp_path / "truncated"
    shutil.copytree(blip_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FedDATError, match="truncated or corrupt"):
        load_backbone(damaged, family="blip")


def test_missing_weights_are_named(blip_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "missing"
    shutil.copytree(blip_model_dir, damaged)
    state = load_file(str(damaged / "model.safetensors"))
    del state["text_model.encoder.layer.1.crossattention.self.query.weight"]
    save_file(state, str(damaged / "model.safetensors"))
    with pytest.raises(FedDATError, match="lacks 1 weights of its text encoder"):
        load_backbone(damaged, family="blip")
    shutil.rmtree(damaged)
    with pytest.raises(FedDATError, match="neither a local directory nor a reachable hub id"):
        load_backbone(damaged, family="blip")


def test_a_blip_without_text_encoder_is_refused(blip_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "captioner"
    shutil.copytree(blip_model_dir, damaged)
    state = {k: v for k, v in load_file(str(damaged / "model.safetensors")).items() if not k.startswith("text_")}
    save_file(state, str(damaged / "model.safetensors"))
    with pytest.raises(FedDATError, match="has no text encoder with cross-attention"):
        load_backbone(damaged, family="blip")


def test_base_size_is_blip_base():
    c = blip_config("base")
    v, t = c.vision_config, c.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == \
        (768, 12, 12, 384, 16)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.vocab_size) == \
        (768, 12, 12, 3072, 30524)
    assert t.encoder_hidden_size == 768 and t.is_decoder  # every text layer cross-attends to the image
    with pytest.raises(FedDATError, match="unknown backbone size"):
        blip_config("large")


def test_pretrain_blip_writes_a_loadable_backbone(tmp_path):
    from feddat.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(backbone="blip", steps=3, batch_size=8, pool_images=40, eval_questions=40, hidden=32,
                         layers=1, heads=2, intermediate=64, warmup=1, checkpoint_every=3, threads=1)
    info = pretrain(cfg, tmp_path / "pre", progress=False)
    assert info["config"]["backbone"] == "blip" and 0 <= info["eval"]["accuracy"] <= 1
    backbone, tok = load_backbone(tmp_path / "pre" / "backbone", family="blip")
    assert isinstance(backbone, BlipBackbone) and backbone.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "pre" / "backbone" / "config.json").read_text())["architectures"] == ["BlipModel"]


def test_prompt_tuning_names_its_vilt_only_form(blip_model_dir):
    from feddat.algorithms.base import LocalConfig
    from feddat.algorithms.registry import get_method
    from feddat.federation.worker import Worker

    backbone, _ = load_backbone(blip_model_dir, family="blip")
    with pytest.raises(FedDATError, match="no form for the blip backbone"):
        Worker(get_method("fedavg-prompt"), backbone, 4, LocalConfig())
