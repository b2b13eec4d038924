"""Tokenizers trained on the item titles for the random-weight stand-ins of text backbones and
captioners (WordPiece for BERT, byte-level BPE for the decoders)."""

from __future__ import annotations


def _word_counts(texts: list[str], pre_tokenizer, lowercase: bool) -> list[str]:
    """Distinct words of `texts`, most frequent first, ties by the word itself (deterministic:
    the `tokenizers` trainers are multi-threaded and break ties differently run to run)."""
    from collections import Counter

    counts: Counter = Counter()
    for t in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(t.lower() if lowercase else t))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]



def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A BERT WordPiece tokenizer for demo stand-ins, built offline and deterministically from
    `texts`: special tokens, every character (alone and as a ##continuation), then whole words
    by frequency."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pre = pre_tokenizers.BertPreTokenizer()
    words = _word_counts(texts, pre, lowercase=True)
    chars = sorted({c for w in words for c in w})
    vocab = special + chars + [f"##{c}" for c in chars]
    vocab += [w for w in words if w not in set(vocab)][: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A word-level tokenizer for decoder stand-ins, built deterministically from `texts`:
    <pad> = 0, <s> = 1 (prepended to every title), </s> = 2, <unk> = 3, then words by frequency."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    pre = pre_tokenizers.Whitespace()
    words = _word_counts(texts, pre, lowercase=False)
    vocab = special + words[: max(0, vocab_size - len(special))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
