"""The tiny ``debug`` Emu3, built entirely in code: its config and its tokenizer.

Owns: a byte-level BPE tokenizer with no merges (every byte one token) plus Emu3's special and
visual tokens under their real names, and an Emu3Config whose vocabulary map is that
tokenizer's, with a 2-layer text model and a 4-level VQ-VAE (spatial factor 8, like Emu3's, and
64 codes).
Does not know: weights (the backend seeds them) or how any of it is used.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import Emu3Config, PreTrainedTokenizerFast

# Emu3's names for its special tokens (the released tokenizer's strings).
PAD = "<|endoftext|>"
BOS = "<|extra_203|>"
EOS = "<|extra_204|>"
IMAGE_START = "<|image start|>"
IMAGE_END = "<|image end|>"
IMAGE_WRAPPER = "<|image token|>"
END_OF_LINE = "<|extra_200|>"
END_OF_FRAME = "<|extra_201|>"
PLACEHOLDER = "<|extra_0|>"
SPECIAL = (PAD, BOS, EOS, IMAGE_START, IMAGE_END, IMAGE_WRAPPER, END_OF_LINE, END_OF_FRAME, PLACEHOLDER)

DEBUG_CODEBOOK = 64
DEBUG_VOCAB_ROWS = 336  # 256 bytes + 9 specials + 64 visual tokens = 329, padded to a multiple of 8


def visual_token(code: int) -> str:
    """Emu3's token string for VQ code ``code``."""
    return f"<|visual token {code:06d}|>"


def debug_tokenizer(codebook: int = DEBUG_CODEBOOK) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-255 are bytes, then the specials, then ``codebook`` visual
    tokens (the real VQ-VAE's 32,768 for full-size random models in the timing scripts)."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    added = [*SPECIAL, *(visual_token(code) for code in range(codebook))]
    for name in added:
        vocab[name] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in added])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def debug_config(tokenizer: PreTrainedTokenizerFast) -> Emu3Config:
    """A tiny Emu3Config whose vocabulary map is ``tokenizer``'s (``<image>`` -> the placeholder)."""
    vocabulary = dict(tokenizer.get_vocab())
    return Emu3Config(
        vocabulary_map={**vocabulary, "<image>": vocabulary[PLACEHOLDER]},
        text_config=dict(
            vocab_size=DEBUG_VOCAB_ROWS,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=vocabulary[PAD],
            bos_token_id=vocabulary[BOS],
            eos_token_id=vocabulary[EOS],
            attention_dropout=0.0,
        ),
        vq_config=dict(
            codebook_size=DEBUG_CODEBOOK,
            embed_dim=4,
            latent_channels=4,
            temporal_downsample_factor=1,
            base_channels=32,
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
        ),
    )
