"""Build the embedded model's CLIP tokenizer from our own caption corpus.

The vocabulary follows CLIP's layout (256 byte symbols, the same with ``</w>``, one entry per learned
merge, then ``<|startoftext|>`` and ``<|endoftext|>``), so the stock ``CLIPTokenizer`` reads it and any
word outside the corpus still tokenizes, character by character.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from .dataset import caption_corpus

# Captions are at most 10 words; 20 positions leave room for bos/eos and a few extra words in
# free-form prompts. Longer prompts are truncated (with the tokenizer's own warning).
MAX_LENGTH = 20
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words people are likely to add to a prompt; learning them keeps such prompts short in tokens.
EXTRA_WORDS = (
    "an image photo drawing of and in the shape colour color coloured colored small big "
    "large centre center plain simple"
).split()
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def learn_bpe(words: Counter[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every corpus word is a single symbol; ties broken by the pair's text."""
    byte_map = bytes_to_unicode()
    seqs: dict[str, list[str]] = {}
    for w in words:
        chars = [byte_map[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        seqs[w] = chars
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


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    words: Counter[str] = Counter()
    for text in caption_corpus():
        words.update(_WORD_RE.findall(text.lower()))
    words.update(EXTRA_WORDS)
    merges = learn_bpe(words)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt to `folder` and return a CLIPTokenizer reading them."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """save_pretrained writes tokenizer.json; also ship vocab.json/merges.txt for older readers."""
    tokenizer.save_pretrained(folder)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
