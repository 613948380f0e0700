"""The built-in model, tokenizer and data set that `qlora-ext finetune` uses with no arguments.

They exist so that the command line can be tried, and tested, with nothing downloaded: a small
Llama-architecture model initialised from a seed (there is no pretrained checkpoint to load, so
LoRA learns the task on top of a random, NF4-quantized base), a byte-level tokenizer, and a
data set of short string transformations with a held-out split.
"""

from .tiny_llama import TinyLlama, TinyLlamaConfig
from .tokenizer import ByteTokenizer

__all__ = ["TinyLlama", "TinyLlamaConfig", "ByteTokenizer"]
