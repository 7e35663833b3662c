"""Tokenizer and chat template of a model, read from the same checkpoint as its weights
(the GGUF file's own vocabulary and template, or the HF directory's tokenizer files)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from workers.loader.source import ModelSource

# Nothing is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Tokenizer:
    hf: Any  # a transformers PreTrainedTokenizerFast
    model_id: str

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError(f"model {self.model_id!r} has no chat template; use the completions API")
        ids = self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return list(ids)


def load_tokenizer(source: ModelSource) -> Tokenizer:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if source.kind == "gguf":
        hf = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    else:
        hf = AutoTokenizer.from_pretrained(str(source.path))
    return Tokenizer(hf, source.model_id)
