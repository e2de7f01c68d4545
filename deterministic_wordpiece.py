"""A WordPiece vocabulary learnt the way HF `tokenizers`' WordPieceTrainer learns it, but reproducibly.

The Rust trainer gives a different tokenizer in every process, with one thread as with many (other
ids, and at ties between equally frequent merges sometimes other pieces): its hash maps are seeded
afresh in every process, and the ids it gives pieces, which break its ties, follow their order. Here
the same algorithm (BPE merges over the words of a BERT pre-tokenizer, continuation pieces prefixed
with `##`, the most frequent pair merged first) breaks every tie by the pieces' text, so the same
lines give the same vocabulary, ids included, in every process. The result is a stock `BertTokenizerFast` folder.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from pathlib import Path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PREFIX = "##"


def _pipeline():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def word_counts(lines, tok=None) -> Counter:
    """Words of the lines after BERT's normalizer (uncased) and pre-tokenizer, with their counts."""
    tok = tok or _pipeline()
    counts: Counter = Counter()
    for line in lines:
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)))
    return counts


def learn_vocab(counts: Counter, vocab_size: int, specials=SPECIALS) -> list[str]:
    """Specials, the alphabet (sorted), then merged pieces in the order learnt, up to `vocab_size` entries."""
    words = sorted(counts)  # a fixed order, so that nothing below depends on hashing
    symbols = [[w[0]] + [PREFIX + c for c in w[1:]] for w in words]
    freq = [counts[w] for w in words]
    alphabet = sorted({s for syms in symbols for s in syms if not s.startswith(PREFIX)}) + \
        sorted({s for syms in symbols for s in syms if s.startswith(PREFIX)})
    vocab = list(specials) + [s for s in alphabet if s not in specials]
    known = set(vocab)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg <= 0:
            continue  # a stale entry: the pair's count changed since it was pushed
        a, b = pair
        merged = a + (b[len(PREFIX):] if b.startswith(PREFIX) else b)
        delta: dict[tuple[str, str], int] = defaultdict(int)
        for i in sorted(where.pop(pair)):
            syms = symbols[i]
            out, j, hit = [], 0, False
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(merged)
                    j += 2
                    hit = True
                else:
                    out.append(syms[j])
                    j += 1
            if not hit:
                continue
            for p in zip(syms, syms[1:]):
                delta[p] -= freq[i]
            for p in zip(out, out[1:]):
                delta[p] += freq[i]
                where[p].add(i)
            symbols[i] = out
        for p, d in delta.items():
            if d:
                pair_count[p] += d
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        pair_count.pop(pair, None)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return vocab


def train_wordpiece(lines, out_dir: Path, vocab_size: int) -> Path:
    """Learn an uncased WordPiece vocabulary on `lines`; save a `BertTokenizerFast` folder in `out_dir`."""
    from tokenizers import models, processors
    from transformers import BertTokenizerFast

    tok = _pipeline()
    vocab = learn_vocab(word_counts(lines, tok), vocab_size)
    tok.model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    for special in SPECIALS:
        tok.add_special_tokens([special])
    BertTokenizerFast(tokenizer_object=tok, do_lower_case=True).save_pretrained(out_dir)
    return Path(out_dir)
