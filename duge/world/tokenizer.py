"""The built-in world's word-level vocabulary, written in CLIP's tokenizer file format.

`write_tokenizer(folder)` writes `vocab.json`, `merges.txt` and the special-token files so
that `transformers.CLIPTokenizer.from_pretrained(folder)` (and ComfyUI's SD tokenizer) load it.
Every word of the world is one token: the merges build each word letter by letter, and every
intermediate piece is in the vocabulary. A word outside the vocabulary falls apart into pieces
that are not words: letters unknown to the vocabulary become `<|unk|>`, and the few pieces
that do have ids (fragments of world words) are listed by `unknown_piece_ids`; the trained text
encoder embeds each of them exactly as `<|unk|>` (training ties their rows), and
`to_word_ids` maps them to `<|unk|>` ids outright. Never an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from .scenes import CAPTION_TEMPLATES
from .vocabulary import CONCEPTS, FILLER_WORDS, GENERIC_WORD

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_LENGTH = 32


def world_words() -> list[str]:
    """Every word the world's captions and prompts use, sorted."""
    words = set(FILLER_WORDS)
    for concept in CONCEPTS:
        words.update(concept.names)
    words.update(w for w in GENERIC_WORD.values() if w)
    for template in CAPTION_TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return sorted(words)


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE whose merges turn each word into the single token `word</w>`.

    Merges are added until every word ends as one piece; merges appended later never change
    what earlier ones do, so words already whole stay whole. Whole words come first in the
    vocabulary, after the special tokens; intermediate pieces follow.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe_pieces(word, ranks)) > 1:
            # Join the first two leftover pieces; repeat until the word is whole.
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    for word in words:
        vocab[word + "</w>"] = len(vocab)
    # Pieces the merges produce or consume that are not words. They need ids (the BPE format
    # requires it) but the model treats them as unknown: `unknown_piece_ids` lists them.
    for a, b in merges:
        for piece in (a, b, a + b):
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def write_tokenizer(folder: str | Path) -> Path:
    """Write the tokenizer files into `folder` and check every world word is one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = world_words()
    vocab, merges = build_vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: duge-world\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS}, indent=2)
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_LENGTH,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": UNK,
                "pad_token": EOS,
                "do_lower_case": True,
                "add_prefix_space": False,
                "errors": "replace",
            },
            indent=2,
        )
    )
    return folder


def unknown_piece_ids(vocab: dict[str, int]) -> list[int]:
    """Ids of vocabulary entries that are neither world words nor special tokens (BPE fragments)."""
    keep = {UNK, BOS, EOS} | {f"{w}</w>" for w in world_words()}
    return [i for piece, i in vocab.items() if piece not in keep]


def to_word_ids(input_ids, vocab: dict[str, int]):
    """Replace fragment ids in a tensor or list of token ids by the unknown token's id."""
    import torch  # deferred: the tokenizer's files are written and read without torch

    ids = torch.as_tensor(input_ids)
    fragments = torch.tensor(unknown_piece_ids(vocab), dtype=ids.dtype)
    return torch.where(torch.isin(ids, fragments), torch.full_like(ids, vocab[UNK]), ids)
