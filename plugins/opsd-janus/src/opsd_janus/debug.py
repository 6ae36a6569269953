"""The tiny ``debug`` flavour: a JanusConfig and a tokenizer built in code, for CPU tests.

Owns: the debug sizes (a 2-layer Llama of width 64, a 1-layer SigLIP-style ViT, a VQ model
whose decoder draws images of the configured side) and a byte-level tokenizer made with the
``tokenizers`` library (every UTF-8 text round-trips; Janus's special tokens come first).
Does not know: checkpoints on disk, contexts or training.
"""

from __future__ import annotations

import math

from opsd_janus import context as chat
from opsd_janus.context import (
    ASSISTANT,
    BOS,
    EOS,
    IMAGE_END,
    IMAGE_START,
    IMAGE_TOKEN,
    PAD,
    USER,
)

SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE_TOKEN, IMAGE_START, IMAGE_END, USER, ASSISTANT)
TOKENIZER_SIZE = 512
VOCAB_ROWS = 528
"""Logit rows of the debug LLM: more than the tokenizer's ids (at most 512), as real checkpoints pad them."""
# Byte-level BPE merges are learned from the prompt texts, so that contexts stay a few hundred
# positions long on a CPU (bytes alone made the teacher context 600 positions).
MERGE_CORPUS = (chat.SYSTEM_PROMPT, chat.REF_INTRO, chat.TRANSITION, chat.USER_OPEN, chat.ASSISTANT_OPEN)


def debug_config(image_size: int, image_tokens: int):
    """A tiny JanusConfig whose ViT reads and whose VQ decoder draws ``image_size`` squares."""
    from transformers import JanusConfig

    side = math.isqrt(image_tokens)
    patch = image_size // side
    levels = int(math.log2(patch)) + 1  # the VQ decoder doubles the side levels - 1 times
    hidden = 64
    return JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": VOCAB_ROWS,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "pad_token_id": SPECIAL_TOKENS.index(PAD),
            "bos_token_id": SPECIAL_TOKENS.index(BOS),
            "eos_token_id": SPECIAL_TOKENS.index(EOS),
        },
        vision_config={
            "image_size": image_size,
            "patch_size": patch,
            "num_image_tokens": image_tokens,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "mlp_ratio": 2,
            "projection_dim": hidden,
            "depth": 1,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 64,
            "latent_channels": 8,
            "base_channels": 32,
            "channel_multiplier": [1] * levels,
            "num_res_blocks": 1,
            "projection_dim": hidden,
            "image_token_embed_dim": hidden,
            "num_hidden_layers": 1,
        },
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )


def debug_tokenizer():
    """A ``PreTrainedTokenizerFast``: ids 0-7 Janus's special tokens, then the 256 bytes, then
    merges learned (deterministically) from the prompt texts; every UTF-8 text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(MERGE_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": IMAGE_START, "eoi_token": IMAGE_END},
    )
