"""The toy's tokenizers: one token per caption word, characters for any other text, saved and loaded as CLIP's."""

import pytest
import torch
from transformers import CLIPTokenizer

from carve3d_trl.testing import build_tiny_tokenizer
from carve3d_trl.toy import build_toy_pipeline, random_scene
from carve3d_trl.toy.model import SINGLE_VIEW_SIZE
from carve3d_trl.toy.tokenizer import build_toy_tokenizer, toy_words


def test_toy_words_are_the_words_of_the_captions():
    generator = torch.Generator().manual_seed(0)
    words = {word for _ in range(3000) for word in random_scene(generator).caption.split()}
    assert sorted(words) == toy_words()


def test_word_tokenizer_gives_one_token_per_caption_word_and_characters_elsewhere(tmp_path):
    tokenizer = build_toy_tokenizer(tmp_path / "word", "word")
    for word in toy_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]
    caption = "a checkered brown sphere next to an orange torus"
    assert tokenizer.tokenize(caption) == [word + "</w>" for word in caption.split()]
    pieces = tokenizer.tokenize("zebra")  # not a toy word: characters (and pieces of toy words, "br" of "brown")
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>" and "z" in pieces
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "word")
    assert loaded(caption).input_ids == tokenizer(caption).input_ids
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2  # with the start and end tokens


def test_character_tokenizer_is_the_tiny_one(tmp_path):
    tokenizer = build_toy_tokenizer(tmp_path / "character", "character", model_max_length=64)
    tiny = build_tiny_tokenizer(tmp_path / "tiny", model_max_length=64)
    assert tokenizer.get_vocab() == tiny.get_vocab()
    assert tokenizer("a red cube").input_ids == tiny("a red cube").input_ids
    with pytest.raises(ValueError, match="valid tokenizers: character, word"):
        build_toy_tokenizer(tmp_path / "bad", "bpe")


def test_toy_pipeline_with_the_word_tokenizer_encodes_captions():
    pipeline = build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE, tokenizer="word")
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer)
    ids = pipeline.tokenizer(["a red cube on a blue sphere"], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 64)
    hidden = pipeline.text_encoder(ids)[0]
    assert hidden.shape == (1, 64, 64) and torch.isfinite(hidden).all()
