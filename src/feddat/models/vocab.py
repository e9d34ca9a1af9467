"""Word-level tokenizers (the embedded backbones') grown by the words a backbone's vocabulary lacks."""

from __future__ import annotations

import json

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast, ViltModel


def is_word_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and json.loads(backend.to_str())["model"]["type"] == "WordLevel"


def extend_word_vocabulary(model: ViltModel, tokenizer: PreTrainedTokenizerFast, words: list[str],
                           seed: int = 0) -> PreTrainedTokenizerFast:
    """The word-level `tokenizer` with the `words` it lacks appended (ids after its last one), and `model`'s word
    embeddings grown to match; returns the tokenizer (the same one when nothing was missing).

    A word the tokenizer lacks would otherwise read as [UNK], so every such word would mean the same. New rows
    are random directions at the mean norm of the existing words' rows, as pretraining gives words it never saw
    (`feddat.pretrain.reinit_unseen_words`), drawn from their own generator seeded with `seed`: a backbone loads
    the same way every time, and the global RNG is untouched. Existing ids and rows do not change.
    """
    vocab = tokenizer.get_vocab()
    missing = [w for w in dict.fromkeys(words) if w not in vocab]
    if not missing:
        return tokenizer
    old = model.get_input_embeddings()
    start = max(old.num_embeddings, max(vocab.values()) + 1)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend["model"]["vocab"].update({w: start + i for i, w in enumerate(missing)})
    from tokenizers import Tokenizer

    extended = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(backend)), model_max_length=tokenizer.model_max_length,
        **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)})
    # sorted: get_vocab() comes in hash order, and the mean below must not depend on it (bitwise determinism)
    words_rows = sorted(i for w, i in vocab.items() if not w.startswith("[") and i < old.num_embeddings)
    weight = old.weight.detach()
    target = weight[words_rows].norm(dim=1).mean() if words_rows else weight.norm(dim=1).mean()
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn(start + len(missing) - old.num_embeddings, weight.shape[1], generator=gen)
    draw = draw / draw.norm(dim=1, keepdim=True) * target.cpu()
    grown = nn.Embedding(start + len(missing), weight.shape[1], padding_idx=old.padding_idx)
    grown.weight.data = torch.cat([weight, draw.to(weight)])
    model.set_input_embeddings(grown.to(weight.device))
    model.config.vocab_size = grown.num_embeddings
    return extended
