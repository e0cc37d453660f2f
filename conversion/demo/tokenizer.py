"""A CLIP tokenizer built offline: byte-level BPE whose merges make a given list of words single tokens."""

from __future__ import annotations

CLIP_MAX_LENGTH = 77
# The random demo model's words (changing them changes its files: bump DEMO_VERSION).
RANDOM_MODEL_WORDS = ("a", "photo", "of", "the", "cat", "dog", "an", "astronaut", "on", "horse")


def clip_vocab_and_merges(words: tuple[str, ...] = RANDOM_MODEL_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary: every byte alone and as a word end, plus the merges that make
    each of ``words`` one token.

    Any text tokenizes (unknown words fall back to single bytes).
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Merge what BPE cannot merge yet, left to right; a merge added later ranks after every
        # earlier one, so it never changes how an earlier word splits.
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    return vocab, merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How CLIP's BPE splits ``word`` with the merges ``ranks``: the lowest-ranked pair merged first."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        ranked = [(ranks[pair], pair) for pair in zip(pieces, pieces[1:], strict=False) if pair in ranks]
        if not ranked:
            break
        _, (first, second) = min(ranked)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def make_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH, words: tuple[str, ...] = RANDOM_MODEL_WORDS):
    """A ``CLIPTokenizer`` over :func:`clip_vocab_and_merges` (no download)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))
