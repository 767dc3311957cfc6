"""Build the embedded model's CLIP tokenizer from our own caption corpus.

The vocabulary follows CLIP's layout (256 byte symbols, the same with ``</w>``, one entry per learned
merge, then ``<|startoftext|>`` and ``<|endoftext|>``), so the stock ``CLIPTokenizer`` reads it and any
word outside the corpus still tokenizes, character by character. The byte alphabet and the mapping of
a word's bytes onto it are `tokenizers`' ``ByteLevel`` (GPT-2's table, which CLIP uses).

The merges are learned by `learn_bpe` rather than by `tokenizers`' ``BpeTrainer``: both merge the
most frequent pair first, but they break ties differently, and 90 of the 110 shipped merges were
ties. ``BpeTrainer`` takes the pair with the smallest token ids, and it numbers merged tokens after
every initial symbol, in the order they were made; the shipped vocabulary took the pair that is
largest as text. At the sixth merge, (``ou``, ``nd</w>``) and (``k``, ``gr``) are tied: the
shipped merge is the first, while ``BpeTrainer`` must take the second, since ``ou`` was merged
and so has a larger id than ``k`` whatever order the initial alphabet, special tokens or limits
give the symbols. Reproducing the shipped vocabulary would mean handing the trainer the merged tokens
in advance; changing the vocabulary would mean retraining the text encoder whose embeddings it indexes.
`tests/model/test_tokenizer.py` shows both facts: `learn_bpe` regenerates the shipped files byte for
byte, and ``BpeTrainer`` makes merges of the same counts in another order.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from .dataset import caption_corpus

# Captions are at most 10 words; 20 positions leave room for bos/eos and a few extra words in
# free-form prompts. Longer prompts are truncated (with the tokenizer's own warning).
MAX_LENGTH = 20
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# Words people are likely to add to a prompt; learning them keeps such prompts short in tokens.
EXTRA_WORDS = (
    "an image photo drawing of and in the shape colour color coloured colored small big "
    "large centre center plain simple"
).split()
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def byte_symbols() -> list[str]:
    """The 256 byte symbols in CLIP's order: by code point, which is the order of byte values for
    the printable bytes (mapped to themselves) and then for the rest (mapped past U+0100)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout for `merges` (with no merges: the byte-level vocabulary alone)."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def word_symbols(word: str) -> list[str]:
    """`word`'s bytes as byte symbols, the last one marked as the end of the word."""
    [(mapped, _)] = _BYTE_LEVEL.pre_tokenize_str(word)
    symbols = list(mapped)
    symbols[-1] += END_OF_WORD
    return symbols


def learn_bpe(words: Counter[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every corpus word is a single symbol; ties broken by the pair's text."""
    seqs = {w: word_symbols(w) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, sym in seqs.items():
            for a, b in zip(sym, sym[1:], strict=False):
                pairs[(a, b)] += words[w]
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for w, sym in seqs.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[w] = out


def corpus_words() -> Counter[str]:
    """The words the tokenizer learns from: every caption's, and EXTRA_WORDS once each."""
    words: Counter[str] = Counter()
    for text in caption_corpus():
        words.update(_WORD_RE.findall(text.lower()))
    words.update(EXTRA_WORDS)
    return words


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_bpe(corpus_words())
    return clip_vocab(merges), merges


def write_vocab_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt, as CLIP ships them (what `tests/model` compares byte for byte)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt to `folder` and return a CLIPTokenizer reading them."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    write_vocab_files(folder, vocab, merges)
    # transformers annotates `merges` as list[str]; the tokenizers BPE it builds takes (a, b) pairs.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)  # type: ignore[arg-type]


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """save_pretrained writes tokenizer.json; also ship vocab.json/merges.txt for older readers."""
    tokenizer.save_pretrained(folder)
    write_vocab_files(folder, *build_vocab())
