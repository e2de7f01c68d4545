"""Builders for tests: tokenizers and tiny models made locally, never downloaded."""
from __future__ import annotations

from pathlib import Path


def train_wordpiece(lines, out_dir: Path, vocab_size: int = 2000) -> Path:
    """Train an uncased WordPiece tokenizer on `lines` and save it as a `BertTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(lines, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_bert(n_layers=4, hidden=32, heads=4, vocab=120, seed=0):
    """A small BertForMaskedLM built from a config (eval mode, no dropout)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).eval()


def tiny_distilbert(n_layers=2, hidden=32, heads=4, vocab=120, seed=1, dropout=0.0):
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=n_layers, n_heads=heads, hidden_dim=hidden * 2,
                           max_position_embeddings=128, dropout=dropout, attention_dropout=dropout,
                           sinusoidal_pos_embds=False)
    return DistilBertForMaskedLM(cfg).eval()


def tiny_gpt2(n_layers=2, hidden=32, heads=4, vocab=120, seed=2):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=n_layers, n_head=heads, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()
