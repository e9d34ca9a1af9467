"""The dual-stream (ALBEF-family) backbone: Hugging Face BLIP's image encoder and its text encoder with
cross-attention to the image features as the fusion.

`BlipBackbone` holds a `BlipVisionModel` (a ViT) and a `BlipTextModel` (BERT with a cross-attention block in
every layer), frozen. The pooled feature is the text encoder's output at the [CLS] position, as BLIP's VQA
and ITM heads take it. Adapter slots sit after the FFN of every layer of both encoders: on the image encoder's
`mlp` (before its residual sum), on the text encoder's `output` block (as on ViLT's).

A checkpoint is a `save_pretrained` directory (or hub id) of any BLIP model class that has both encoders:
`BlipForQuestionAnswering` / `BlipForImageTextRetrieval` (`vision_model.*`, `text_encoder.*`) or `BlipModel`
(`vision_model.*`, `text_model.*`). Other weights in it (decoder, projections, ITM head) are not loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from feddat.data.questions import EXTRA_WORDS, TASK_WORDS, WORDS
from feddat.errors import FedDATError
from feddat.models.checkpoints import SIZES, verify_checksums
from feddat.models.vocab import extend_word_vocabulary, is_word_level

FAMILY = "blip"
# BLIP's VQA truncates questions at 35 tokens; a checkpoint with fewer text positions takes that many.
QUESTION_TOKENS = 35
# Where each BLIP model class keeps its text encoder, in the order tried.
TEXT_PREFIXES = ("text_encoder.", "text_model.")
VISION_PREFIX = "vision_model."
PROCESSOR_FILE = "preprocessor_config.json"


def small_blip_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                      intermediate: int = 512, text_len: int = 12) -> BlipConfig:
    """A BLIP at the embedded world's scale: 48 px images in 12 px patches (one per grid cell), `layers` layers
    in each encoder, the word-level tokenizer's special ids ([PAD] 0, [CLS] 2, [SEP] 3)."""
    vision = BlipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=48, patch_size=12, initializer_range=0.02,
                              attention_dropout=0.0)
    text = BlipTextConfig(vocab_size=vocab_size, hidden_size=hidden, encoder_hidden_size=hidden,
                          intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=text_len, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                          sep_token_id=3)
    return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=hidden,
                      image_text_hidden_size=hidden)


def blip_config(size: str) -> BlipConfig:
    """The architecture of a named size: `small` = `small_blip_config` with the world's word vocabulary, `base`
    = BLIP-base (a ViT-B/16 image encoder at 384 px, a BERT-base text encoder with cross-attention, BERT's
    vocabulary plus BLIP's two extra tokens)."""
    if size == "small":
        return small_blip_config(4 + len(set(WORDS) | set(EXTRA_WORDS)))
    if size == "base":
        vision = BlipVisionConfig(initializer_range=0.02)  # ViT-B/16, 384 px
        text = BlipTextConfig(num_attention_heads=12)      # BERT-base: 12 layers of width 768, 12 heads
        return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    raise FedDATError(f"unknown backbone size {size!r}; choose one of {', '.join(SIZES)}")


class PixelTransform(nn.Module):
    """Our pixel tensors (ViLT's normalisation: [-1, 1]) as the checkpoint's image processor would give them:
    resized to its size (bicubic, as BlipImageProcessor), rescaled and normalised with its mean and std.
    Without a processor (ours): the identity on images of the encoder's size."""

    def __init__(self, size: tuple[int, int], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale: float = 1 / 255,
                 normalize: bool = True):
        super().__init__()
        self.size = tuple(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.scale = rescale * 255.0
        self.normalize = normalize
        self.identity = (normalize and abs(self.scale - 1) < 1e-9 and torch.allclose(self.mean, torch.tensor(0.5))
                         and torch.allclose(self.std, torch.tensor(0.5)))

    @classmethod
    def from_processor(cls, directory: Path, image_size: int) -> "PixelTransform":
        """The transform of the image processor saved in `directory` (preprocessor_config.json), else ours."""
        path = directory / PROCESSOR_FILE
        if not path.is_file():
            return cls((image_size, image_size))
        try:
            p = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FedDATError(f"{path} is unreadable ({e}); fix it or remove it to use our preprocessing") from e
        size = p.get("size") or {}
        side = (size.get("height", image_size), size.get("width", image_size)) if p.get("do_resize", True) \
            else (image_size, image_size)
        if tuple(side) != (image_size, image_size):
            raise FedDATError(f"{path} resizes images to {side[0]}x{side[1]} but the image encoder takes "
                              f"{image_size}x{image_size}: the processor is not this checkpoint's")
        mean = p.get("image_mean", [0.5] * 3)
        std = p.get("image_std", [0.5] * 3)
        mean, std = ([mean] * 3 if isinstance(mean, (int, float)) else mean), \
            ([std] * 3 if isinstance(std, (int, float)) else std)
        rescale = p.get("rescale_factor", 1 / 255) if p.get("do_rescale", True) else 1.0
        return cls(side, mean, std, rescale, p.get("do_normalize", True))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.identity and tuple(pixels.shape[-2:]) == self.size:
            return pixels
        x = (pixels + 1) * 127.5  # back to 0..255
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
        x = x * (self.scale / 255.0)
        return (x - self.mean.to(x)) / self.std.to(x) if self.normalize else x


class BlipShape:
    """What the rest of FedDAT reads of a backbone's config, in ViltConfig's names: the width (both encoders'),
    the layers (image encoder's + text encoder's), the image and patch size, the question length (`text_len`, as
    `max_position_embeddings`), the vocabulary."""

    def __init__(self, blip: BlipConfig, text_len: int):
        self.blip = blip
        self.max_position_embeddings = text_len
        self.num_channels = 3

    @property
    def hidden_size(self) -> int:
        return self.blip.vision_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.blip.vision_config.num_hidden_layers + self.blip.text_config.num_hidden_layers

    @property
    def image_size(self) -> int:
        return self.blip.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.blip.vision_config.patch_size

    @property
    def vocab_size(self) -> int:
        return self.blip.text_config.vocab_size


class BlipBackbone(nn.Module):
    """A BLIP image encoder and text encoder (with cross-attention), with the checkpoint's pixel transform."""

    family = FAMILY

    def __init__(self, config: BlipConfig, pixels: PixelTransform | None = None, text_len: int | None = None):
        super().__init__()
        vc, tc = config.vision_config, config.text_config
        if vc.hidden_size != tc.hidden_size or tc.encoder_hidden_size != vc.hidden_size:
            raise FedDATError(f"this BLIP has an image encoder of width {vc.hidden_size} and a text encoder of width "
                              f"{tc.hidden_size}: FedDAT's adapters need one width for both (BLIP-base has 768 "
                              "for both)")
        self.vision_model = BlipVisionModel(vc)
        self.text_model = BlipTextModel(tc, add_pooling_layer=False)
        self.pixels = pixels or PixelTransform((vc.image_size, vc.image_size))
        self.config = BlipShape(config, text_len or min(tc.max_position_embeddings, QUESTION_TOKENS))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def adapted_layers(self) -> list[nn.Module]:
        """The modules whose outputs the adapter slots take: every image layer's FFN, then every text layer's
        FFN output block."""
        return [layer.mlp for layer in self.vision_model.encoder.layers] + \
            [layer.output for layer in self.text_model.encoder.layer]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=self.pixels(pixel_values)).last_hidden_state

    def fuse(self, image: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
             text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The text encoder's sequence output, attending to the image features in every layer."""
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        return self.text_model(input_ids=None if text_embeds is not None else input_ids,
                               encoder_embeds=text_embeds, attention_mask=attention_mask,
                               encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text sequence output, pooled = its [CLS] position, image sequence output)."""
        image = self.image_features(pixel_values)
        text = self.fuse(image, attention_mask, input_ids)
        return text, text[:, 0], image


def encode(backbone: BlipBackbone, input_ids, attention_mask, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence output, pooled output), as `feddat.models.backbone.encode` gives them for ViLT."""
    text, pooled, _ = backbone(input_ids, attention_mask, pixel_values)
    return text, pooled


@dataclass
class SharedPrefix:
    """What comes before the first adapter slot, the same in every view: the first image layer's residual
    stream and its FFN output, the text embeddings and the question mask."""

    residual: torch.Tensor
    ffn: torch.Tensor
    text_embeds: torch.Tensor
    attention_mask: torch.Tensor

    def repeated(self, times: int) -> "SharedPrefix":
        return SharedPrefix(*(torch.cat([t] * times) for t in (self.residual, self.ffn, self.text_embeds,
                                                                 self.attention_mask)))


class _FirstFFNReached(Exception):
    pass


def shared_prefix(backbone: BlipBackbone, input_ids, attention_mask, pixel_values) -> SharedPrefix:
    """Run BLIP's own image encoder up to the first layer's FFN output and stop there (an exception from a hook),
    keeping the residual that enters that FFN's layer norm; embed the question."""
    first = backbone.vision_model.encoder.layers[0]
    seen: dict[str, torch.Tensor] = {}

    def keep_residual(module, args):
        seen["residual"] = args[0]

    def stop(module, args, output):
        seen["ffn"] = output
        raise _FirstFFNReached

    handles = [first.layer_norm2.register_forward_pre_hook(keep_residual), first.mlp.register_forward_hook(stop)]
    try:
        backbone.image_features(pixel_values)
    except _FirstFFNReached:
        pass
    finally:
        for h in handles:
            h.remove()
    if "ffn" not in seen:
        raise FedDATError("BLIP's image encoder never called its first layer's FFN")
    text_embeds = backbone.text_model.embeddings(input_ids=input_ids)
    return SharedPrefix(seen["residual"], seen["ffn"], text_embeds, attention_mask)


def pooled_from_prefix(backbone: BlipBackbone, prefix: SharedPrefix, first_slot: nn.Module) -> torch.Tensor:
    """The pooled output from the shared prefix, the first slot applied to the first FFN's output."""
    hidden = prefix.residual + first_slot(prefix.ffn)
    for layer in backbone.vision_model.encoder.layers[1:]:
        hidden = layer(hidden)
    image = backbone.vision_model.post_layernorm(hidden)
    return backbone.fuse(image, prefix.attention_mask, text_embeds=prefix.text_embeds)[:, 0]


def pooled_features_of_views(model, batch: dict, views: tuple[str, ...], stacked: bool = False) -> list[torch.Tensor]:
    """`feddat.models.vl.pooled_features_of_views` for a BLIP backbone: the shared prefix once, then each view
    (in turn, or side by side along the batch with `stacked`)."""
    backbone: BlipBackbone = model.backbone
    model.set_view("none")
    prefix = shared_prefix(backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    if stacked:
        model.set_views(views)
        pooled = pooled_from_prefix(backbone, prefix.repeated(len(views)), model.slots[0])
        return list(pooled.chunk(len(views)))
    features = []
    for view in views:
        model.set_view(view)
        features.append(pooled_from_prefix(backbone, prefix, model.slots[0]))
    return features


# ----- loading -----

def random_blip(size: str, device: str | torch.device = "cpu", seed: int = 0) -> BlipBackbone:
    """A frozen BLIP of a named size with random weights (no download): for timing and memory, not accuracy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipBackbone(blip_config(size))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _snapshot(source: str) -> Path:
    """A hub id's files (config, weights, tokenizer, processor) in the local hub cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown id, no hub client: one message at the edge
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedDATError(f"--model-path {source} is neither a local directory nor a reachable hub id ({first}); "
                          "pass a directory written by save_pretrained") from e


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained directory: model.safetensors, its shards, or pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index, legacy = (directory / "model.safetensors", directory / "model.safetensors.index.json",
                             directory / "pytorch_model.bin")
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(directory / shard)))
            return state
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedDATError(f"the weights in {directory} are unreadable ({first}): the file is truncated or corrupt; "
                          "save the checkpoint again") from e
    raise FedDATError(f"{directory} holds no weights file (model.safetensors, its shards or pytorch_model.bin); "
                      "point --model-path at a directory written by save_pretrained")


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, what: str, where: Path) -> None:
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = [k for k in expected if k not in part]
    if missing:
        raise FedDATError(f"the BLIP checkpoint {where} lacks {len(missing)} weights of its {what} (e.g. "
                          f"{prefix}{missing[0]}): the weights file is incomplete")
    for k, v in expected.items():
        if tuple(part[k].shape) != tuple(v.shape):
            raise FedDATError(f"the BLIP checkpoint {where}: {prefix}{k} has shape {tuple(part[k].shape)} but its "
                              f"config.json gives {tuple(v.shape)}")
    module.load_state_dict({k: part[k] for k in expected})


def load_blip(path: str | Path, device: str | torch.device = "cpu"):
    """(BlipBackbone, tokenizer) from a save_pretrained directory or hub id of a BLIP checkpoint, frozen, in eval
    mode. The checkpoint's own image processor and tokenizer are used where it has them."""
    local = Path(path)
    if not local.exists():
        local = _snapshot(str(path))
    verify_checksums(local)
    try:
        raw = json.loads((local / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FedDATError(f"{local / 'config.json'} is missing or unreadable ({e}); point --model-path at a "
                          "directory written by save_pretrained") from e
    if raw.get("model_type") != FAMILY:
        raise FedDATError(f"{local} holds a {raw.get('model_type')!r} checkpoint, not a BLIP one (model_type "
                          f"'blip'); use a BLIP checkpoint with --backbone blip, or --backbone "
                          f"{raw.get('model_type')} if FedDAT supports it")
    config = BlipConfig.from_pretrained(str(local))
    state = _read_state(local)
    text_prefix = next((p for p in TEXT_PREFIXES if any(k.startswith(p + "encoder.") for k in state)), None)
    if text_prefix is None:
        arch = ", ".join(raw.get("architectures") or ["?"])
        raise FedDATError(f"the BLIP checkpoint {local} ({arch}) has no text encoder with cross-attention "
                          f"(no {' or '.join(p + 'encoder.*' for p in TEXT_PREFIXES)} weights): use a "
                          "BlipForQuestionAnswering, BlipForImageTextRetrieval or BlipModel checkpoint")
    config.text_config.is_decoder = True  # the text encoder's layers carry the cross-attention blocks
    pixels = PixelTransform.from_processor(local, config.vision_config.image_size)
    model = BlipBackbone(config, pixels)
    _load_part(model.vision_model, state, VISION_PREFIX, "image encoder", local)
    _load_part(model.text_model, state, text_prefix, "text encoder", local)
    tokenizer = _tokenizer(local)
    if is_word_level(tokenizer):
        tokenizer = extend_word_vocabulary(model.text_model, tokenizer,
                                           list(WORDS) + list(EXTRA_WORDS) + list(TASK_WORDS))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (directory / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(str(directory))
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise FedDATError(f"the BLIP checkpoint {directory} has no usable tokenizer ({e}); save its tokenizer "
                          "(or processor) beside the weights") from e


def save_blip(backbone: BlipBackbone, tokenizer, directory: Path) -> None:
    """Write `backbone` as a `BlipModel` save_pretrained directory (its projections random: FedDAT does not use
    them), with the tokenizer and a BLIP image processor of its pixel transform."""
    from transformers import BlipModel
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # BlipModel announces its deprecation in favour of the task classes
    try:
        full = BlipModel(backbone.config.blip)
    finally:
        logging.set_verbosity(verbosity)
    full.vision_model.load_state_dict(backbone.vision_model.state_dict())
    full.text_model.load_state_dict(backbone.text_model.state_dict(), strict=False)  # its pooler stays random
    full.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    p = backbone.pixels
    BlipImageProcessorPil(size={"height": p.size[0], "width": p.size[1]}, image_mean=p.mean.flatten().tolist(),
                          image_std=p.std.flatten().tolist(), rescale_factor=p.scale / 255,
                          do_normalize=p.normalize).save_pretrained(directory)
