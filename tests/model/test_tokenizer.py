import json

from transformers import CLIPTokenizer

from inference_server.embedded import dataset
from inference_server.embedded.tokenizer import MAX_LENGTH, build_tokenizer, save_tokenizer

from .conftest import WEIGHTS


def test_round_trip_of_every_training_caption(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    for text in dataset.caption_corpus()[::7]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) <= MAX_LENGTH
        # CLIP's decoder puts a space before punctuation ("background , red"); words survive exactly
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == text


def test_corpus_words_are_single_tokens_and_unknown_words_still_encode(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    assert tok.tokenize("a purple triangle on a yellow background") == [
        "a</w>",
        "purple</w>",
        "triangle</w>",
        "on</w>",
        "a</w>",
        "yellow</w>",
        "background</w>",
    ]
    ids = tok("a zebra").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra"
    assert tok("A  RED Circle").input_ids == tok("a red circle").input_ids


def test_saved_folder_reloads_identically_and_ships_vocab_files(tmp_path):
    tok = build_tokenizer(tmp_path / "build")
    save_tokenizer(tok, tmp_path / "saved")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "saved" / name).exists(), name
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    # the vocab/merges files alone rebuild the same tokenizer (older readers use them)
    vocab = json.loads((tmp_path / "saved" / "vocab.json").read_text())
    merges = (tmp_path / "saved" / "merges.txt").read_text().splitlines()[1:]
    from_files = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    text = "an orange square on a white background"
    assert again(text).input_ids == tok(text).input_ids == from_files(text).input_ids
    assert again.model_max_length == MAX_LENGTH


def test_shipped_tokenizer_matches_the_builder(tmp_path):
    if not (WEIGHTS / "tokenizer" / "vocab.json").exists():
        import pytest

        pytest.skip("no shipped weights yet")
    shipped = CLIPTokenizer.from_pretrained(WEIGHTS / "tokenizer")
    built = build_tokenizer(tmp_path / "tok")
    assert shipped.get_vocab() == built.get_vocab()
