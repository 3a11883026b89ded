"""Tokenizers of the toy text encoder: a CLIP BPE tokenizer whose merges make every word of the toy captions one token
(as real CLIP's BPE does for common words; the shipped toy checkpoints'), or a character-level one (the toys before
issue 17's word tokenizer).

Both keep every printable ASCII character as a token, so any text tokenizes; only the toy words differ. Built with
`transformers.CLIPTokenizer`'s public constructor, saved and loaded like any CLIP tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from ..testing import build_tiny_tokenizer, character_tokens
from .data import COLORS, RELATIONS, SHAPES, TEXTURES

__all__ = ["TOY_TOKENIZERS", "build_toy_tokenizer", "toy_words"]

TOY_TOKENIZERS = ("character", "word")


def toy_words() -> list[str]:
    """Every word of the toy captions (`carve3d_trl.toy.data`: articles, colours, textures, shapes, relations), in
    alphabetical order."""
    words = ["a", "an", *COLORS, *(texture for texture in TEXTURES if texture != "plain"), *SHAPES]
    words += [word for relation in RELATIONS if relation != "alone" for word in relation.split()]
    return sorted(set(words))


def build_toy_tokenizer(save_directory: str | Path, kind: str = "word", model_max_length: int = 64):
    """Build, save in `save_directory` and return a `CLIPTokenizer` of `kind` `"word"` (each of `toy_words()` one
    token) or `"character"` (`carve3d_trl.testing.build_tiny_tokenizer`)."""
    from transformers import CLIPTokenizer

    if kind not in TOY_TOKENIZERS:
        raise ValueError(f"Unknown toy tokenizer {kind!r}; valid tokenizers: {', '.join(TOY_TOKENIZERS)}.")
    if kind == "character":
        return build_tiny_tokenizer(save_directory, model_max_length=model_max_length)
    tokens = character_tokens()
    merges: list[tuple[str, str]] = []
    # BPE applies the lowest-ranked merge present first, so merges learnt for one word can split another: each pass
    # appends, after the existing ones, the merges that join the pieces a word still falls into, left to right.
    for _ in range(max(map(len, toy_words())) + 1):
        tokenizer = CLIPTokenizer(
            vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))},
            merges=list(merges),
            model_max_length=model_max_length,
        )
        split = [pieces for pieces in map(tokenizer.tokenize, toy_words()) if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            joined = pieces[0]
            for piece in pieces[1:]:
                if (joined, piece) not in merges:
                    merges.append((joined, piece))
                joined += piece
                tokens.append(joined)
    else:
        raise RuntimeError("The toy words did not become single tokens; this is a bug in build_toy_tokenizer.")
    tokenizer.save_pretrained(save_directory)
    return tokenizer
