"""The built-in tiny backbone: a 4-layer Llama and a byte-level BPE tokenizer, shipped in the
package (`profit_ds/assets/tiny`) so the default run works offline on a laptop.

It was pretrained by `scripts/pretrain_builtin.py` on the built-in suite (different instances
from the ones runs use), jointly with one learned soft prefix per task, so that it has learned to
read task conventions from its soft-prompt positions, as real LLMs learn to follow
instructions. That makes it a faithful small stand-in for prompt tuning: prompts have something
to steer.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `--model tiny` is resolved without loading them
    from transformers import LlamaConfig, PreTrainedTokenizerFast

BUILTIN_NAMES = ("tiny", "builtin")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`: open vocabulary (any UTF-8 text encodes), and the
    suite's words become single tokens, which keeps sequences short for a CPU model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def tiny_config(vocab_size: int) -> LlamaConfig:
    """Small enough to pretrain in minutes on 2 CPU cores, deep enough to learn the suite."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
