"""The frozen vision-language backbone: a Hugging Face ViLT, the embedded small one or a real checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast, ViltConfig, ViltModel

from feddat.data.questions import EXTRA_WORDS, TASK_WORDS, WORDS
from feddat.errors import FedDATError
from feddat.models.blip import load_blip, random_blip
from feddat.models.checkpoints import SIZES, verify_checksums
from feddat.models.vocab import extend_word_vocabulary, is_word_level

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED_DIRS = {"vilt": WEIGHTS_DIR / "vilt-small", "blip": WEIGHTS_DIR / "blip-small"}
EMBEDDED_DIR = EMBEDDED_DIRS["vilt"]
WEIGHTS_FILE = "model.safetensors"


def small_vilt_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                      intermediate: int = 512, text_len: int = 12) -> ViltConfig:
    """The embedded backbone: a real ViLT at toy scale, 48 px images in 12 px patches (one per grid cell)."""
    return ViltConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=text_len, image_size=48, patch_size=12,
        num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_image_length=-1,
        modality_type_vocab_size=2, type_vocab_size=2,
    )


def vilt_config(size: str) -> ViltConfig:
    """The architecture of a named size: `small` = the embedded backbone's, `base` = ViLT-B/32 (ViltConfig's
    defaults, the architecture of vilt-b32-mlm: 12 layers of width 768, 384 px images in 32 px patches,
    40 text positions, BERT's vocabulary)."""
    if size == "small":
        return ViltConfig.from_pretrained(str(EMBEDDED_DIR))
    if size == "base":
        return ViltConfig()
    raise FedDATError(f"unknown backbone size {size!r}; choose one of {', '.join(SIZES)}")


BACKBONES = ("vilt", "blip")


def check_family(family: str) -> str:
    if family not in BACKBONES:
        raise FedDATError(f"unknown backbone {family!r}; choose one of {', '.join(BACKBONES)}")
    return family


def embedded_dir(family: str = "vilt") -> Path:
    """The directory of the shipped backbone of a family (src/feddat/weights/vilt-small or blip-small)."""
    return EMBEDDED_DIRS[check_family(family)]


def backbone_family(model: nn.Module) -> str:
    """'blip' for a `feddat.models.blip.BlipBackbone`, 'vilt' for a ViltModel."""
    return getattr(model, "family", "vilt")


def random_backbone(size: str, device: str | torch.device = "cpu", seed: int = 0, family: str = "vilt"):
    """A frozen backbone (ViLT, or BLIP with family='blip') of a named size with random weights (no download):
    for timing and memory, not accuracy."""
    if check_family(family) == "blip":
        return random_blip(size, device, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViltModel(vilt_config(size), add_pooling_layer=True)
    model.to(device).eval()
    freeze(model)
    return model


def build_word_tokenizer(words: list[str], max_length: int = 12) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the generated world, saved beside the weights like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=max_length,
    )


def image_embeddings(model: ViltModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embeddings + [CLS] + positions for full-size images, without ViLT's random patch sampling.

    `ViltEmbeddings.visual_embed` draws a random permutation of the patches with the global RNG in a
    per-sample loop; with every patch valid that permutation changes nothing but cost and determinism.
    """
    emb = model.embeddings
    x = emb.patch_embeddings(pixel_values).flatten(2).transpose(1, 2)
    cls = emb.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = emb.position_embeddings
    if pos.shape[1] != x.shape[1]:
        raise FedDATError(
            f"images give {x.shape[1] - 1} patches but the backbone expects {pos.shape[1] - 1}: "
            "resize images to the checkpoint's image_size"
        )
    return x + pos


def encode(model: ViltModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence output, pooled output) of ViLT for a batch of questions and images."""
    img = image_embeddings(model, pixel_values)
    pixel_mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, image_embeds=img, pixel_mask=pixel_mask)
    return out.last_hidden_state, out.pooler_output


@dataclass
class LayerCall:
    """The call ViLT's encoder makes to one of its layers, as the installed transformers builds it: the hidden
    states and the other arguments (attention mask, ...). `encode_from` runs the rest of the model from it."""

    index: int
    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def _per_row(self, fn) -> "LayerCall":
        """The call with `fn` applied to the hidden states and to every argument that has the batch as its
        first dimension (the attention mask); the other arguments are kept."""
        n = self.hidden.shape[0]

        def apply(x):
            return fn(x) if torch.is_tensor(x) and x.dim() and x.shape[0] == n else x

        return LayerCall(self.index, apply(self.hidden), tuple(apply(a) for a in self.args),
                         {k: apply(v) for k, v in self.kwargs.items()})

    def repeated(self, times: int) -> "LayerCall":
        """The call for the batch repeated `times` times along its first dimension."""
        return self._per_row(lambda x: torch.cat([x] * times))

    def rows(self, idx: torch.Tensor) -> "LayerCall":
        """The call for rows `idx` of the batch."""
        return self._per_row(lambda x: x[idx.to(x.device)])

    @staticmethod
    def cat(calls: list["LayerCall"]) -> "LayerCall":
        """One call for the batches of `calls` (made for the same layer) one after another."""
        first = calls[0]
        sizes = [c.hidden.shape[0] for c in calls]

        def join(i: int | None, key: str | None = None):
            parts = [c.hidden if i is None and key is None else c.args[i] if key is None else c.kwargs[key]
                     for c in calls]
            per_row = all(torch.is_tensor(p) and p.dim() and p.shape[0] == n for p, n in zip(parts, sizes))
            return torch.cat(parts) if per_row else parts[0]

        return LayerCall(first.index, join(None), tuple(join(i) for i in range(len(first.args))),
                         {k: join(None, k) for k in first.kwargs})


class _LayerReached(Exception):
    def __init__(self, call: LayerCall):
        super().__init__(f"encoder layer {call.index} reached")
        self.call = call


def encode_until(model: ViltModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor, index: int) -> LayerCall:
    """Run ViLT's own forward up to encoder layer `index` (embeddings and the layers before it) and stop there.

    The forward stops by an exception from a pre-hook of that layer, so that the mask and every other argument
    are the ones the installed transformers builds: `encode_from` then gives `encode`'s result exactly.
    """
    def stop(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _LayerReached(LayerCall(index, hidden, tuple(args[1:]), kwargs))

    handle = model.encoder.layer[index].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        encode(model, input_ids, attention_mask, pixel_values)
    except _LayerReached as reached:
        return reached.call
    finally:
        handle.remove()
    raise FedDATError(f"ViLT's forward never called encoder layer {index}")


def encode_from(model: ViltModel, call: LayerCall, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence output, pooled output) of ViLT from `hidden` entering encoder layer `call.index`."""
    for layer in model.encoder.layer[call.index:]:
        out = layer(hidden, *call.args, **call.kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    sequence = model.layernorm(hidden)
    return sequence, model.pooler(sequence)


def load_backbone(path: str | Path | None = None, device: str | torch.device = "cpu", family: str = "vilt"):
    """(ViltModel, tokenizer) from a local directory or hub id; None means the embedded backbone. With
    family='blip', (feddat.models.blip.BlipBackbone, tokenizer) from a BLIP checkpoint (None: the embedded one).
    The embedded backbones' files are checked against their SHA256SUMS at every load.

    The model is returned frozen and in eval mode: FedDAT never trains the backbone.
    """
    if check_family(family) == "blip":
        if path is None and not embedded_dir("blip").is_dir():
            raise FedDATError(f"the embedded BLIP backbone is missing from {embedded_dir('blip')}; rebuild it with "
                              "`feddat pretrain --backbone blip` (docs/pretraining.md) or pass --model-path")
        return load_blip(embedded_dir("blip") if path is None else path, device)
    source = EMBEDDED_DIR if path is None else path
    local = Path(source)
    if local.exists():
        verify_checksums(local)
        try:
            config = json.loads((local / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FedDATError(f"{local / 'config.json'} is missing or unreadable ({e}); point --model-path at a "
                              "directory written by save_pretrained") from e
        if config.get("model_type") != "vilt":
            raise FedDATError(f"{local} holds a {config.get('model_type')!r} checkpoint, not a ViLT one; "
                              "use a ViLT checkpoint (e.g. a copy of vilt-b32-mlm)"
                              + (", or --backbone blip for this one" if config.get("model_type") == "blip"
                                 else " or --backbone for other families"))
    elif path is None:
        raise FedDATError(f"the embedded backbone is missing from {local}; run `feddat pretrain` to rebuild it")
    try:
        model = ViltModel.from_pretrained(str(source), add_pooling_layer=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source)) if (local / "tokenizer.json").exists() \
            else _auto_tokenizer(source)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedDATError(f"could not load a ViLT backbone from {source} (missing or mis-shaped weights for its "
                          f"config.json?): {first}") from e
    if is_word_level(tokenizer):
        tokenizer = extend_word_vocabulary(model, tokenizer, list(WORDS) + list(EXTRA_WORDS) + list(TASK_WORDS))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _auto_tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
