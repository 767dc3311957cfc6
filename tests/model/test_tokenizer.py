import json
from collections import Counter

from transformers import CLIPTokenizer

from inference_server.embedded import dataset
from inference_server.embedded.tokenizer import (
    MAX_LENGTH,
    build_tokenizer,
    clip_vocab,
    corpus_words,
    learn_bpe,
    save_tokenizer,
    word_symbols,
)

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


def test_the_builder_regenerates_the_shipped_vocabulary_byte_for_byte(tmp_path):
    built = build_tokenizer(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "tok" / name).read_bytes() == (WEIGHTS / "tokenizer" / name).read_bytes(), name
    shipped = CLIPTokenizer.from_pretrained(WEIGHTS / "tokenizer")
    assert shipped.get_vocab() == built.get_vocab()
    # The byte alphabet (tokenizers' ByteLevel) is CLIP's: the first 512 entries, in its order.
    vocab = json.loads((WEIGHTS / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert list(vocab)[:512] == list(clip_vocab([]))[:512]


def merge_counts(words: Counter[str], merges: list[tuple[str, str]]) -> list[int]:
    """How often each merge's pair occurred when it was made, replaying `merges` in order."""
    seqs = {w: word_symbols(w) for w in words}
    counts = []
    for a, b in merges:
        count = 0
        for w, sym in seqs.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == (a, b):
                    out.append(a + b)
                    count += words[w]
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[w] = out
        counts.append(count)
    return counts


def test_tokenizers_bpe_trainer_breaks_ties_in_another_order():
    """Why `learn_bpe` stays (see the module docstring): the library's trainer makes merges of the
    same frequencies, one by one, but picks other pairs among equally frequent ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = corpus_words()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,
        show_progress=False,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([w for w, count in words.items() for _ in range(count)], trainer)
    library = [tuple(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    shipped = [
        tuple(line.split(" "))
        for line in (WEIGHTS / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ]
    assert learn_bpe(words) == shipped
    assert library != shipped
    assert merge_counts(words, library) == merge_counts(words, shipped)  # both greedy, by frequency
    # The sixth merge: a tie that the library must break towards the pair of smaller ids.
    assert shipped[5] == ("ou", "nd</w>") and library[5] != shipped[5]
