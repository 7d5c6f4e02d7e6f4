"""Prompts -> token ids in the ingress: completions' text or ids, chat messages through the
model folder's chat template.

Tokenizing here, before routing, gives the router token ids to hash for prefix affinity and
lets a prompt that cannot fit the context be refused without a trip to a replica. The engine
checks again (it is the authority, and other callers bypass the ingress).
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cluster.config import LongctxConfig
from deployments.errors import APIError
from deployments.messages import invalid_request
from engine.request_preparer import encode_vocabulary_ids
from kvcache.block_hash import decode_token_ids
from model_folder.hf_config import load_architecture
from model_folder.tokenizer import Tokenizer
from protocol.sampling_params import InvalidParameterError


def split_prompts(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """A completion request's prompts: `prompt` is one (text or ids) or a list of them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise InvalidParameterError("prompt", "the prompt is empty")
    return [prompt]


Result = TypeVar("Result")
# Tokenizing runs at ~1.5 s per million tokens and releases the GIL: prompts above ~16k tokens
# are tokenized on a thread so that the streams an ingress serves keep flowing meanwhile.
LONG_PROMPT_CHARS = 64_000


async def off_loop_if_long(function: Callable[..., Result], num_chars: int, *args) -> Result:
    """function(*args), on a thread when it works on `num_chars` or more characters."""
    if num_chars < LONG_PROMPT_CHARS:
        return function(*args)
    return await asyncio.to_thread(function, *args)


# A normalizer may shrink text before it is split into tokens (NFC composes three Hangul jamo,
# 9 bytes, into one 3-byte syllable; NFKC a 3-byte fullwidth letter into 1 byte).
NORMALIZER_HEADROOM = 4
UTF8_MAX_CHAR_BYTES = 4


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        # More bytes than this cannot fit the context whatever their tokens: such a prompt is
        # refused before tokenizing it (10 MB of text took 15 s of CPU to find it too long).
        self.max_prompt_bytes = max_model_len * tokenizer.max_token_bytes * NORMALIZER_HEADROOM

    @classmethod
    def from_config(cls, config: LongctxConfig) -> PromptBuilder:
        architecture = load_architecture(config.model.path)
        architecture.check_tensor_parallel(config.parallel.tensor_parallel_size)
        max_model_len = config.model.max_model_len or architecture.max_position_embeddings
        return cls(Tokenizer.from_folder(config.model.path), max_model_len, architecture.vocab_size)

    def completion(self, prompt: str | list[int] | list[str] | list[list[int]],
                   truncate: int | None = None) -> list[list[int]]:
        """The token ids of each prompt: one text or id list, or a list of them (a batch);
        `truncate`: each keeps its last that many tokens (vLLM's truncate_prompt_tokens)."""
        keep = self.kept_tokens(truncate)
        return [self._one_completion(one, keep) for one in split_prompts(prompt)]

    def kept_tokens(self, truncate: int | None) -> int | None:
        """truncate_prompt_tokens as a count: -1 is the longest prompt that leaves one output token."""
        if truncate is None:
            return None
        if truncate == -1:
            return self.max_model_len - 1
        if not 1 <= truncate < self.max_model_len:
            raise InvalidParameterError("truncate_prompt_tokens", f"must be -1 or between 1 and "
                                        f"{self.max_model_len - 1} (the context less one output token), got {truncate}")
        return truncate

    def _one_completion(self, prompt: str | list[int], keep: int | None) -> list[int]:
        if isinstance(prompt, str):
            if keep is None:  # text that cannot fit is refused before tokenizing; truncated text may be any size
                self._check_bytes([prompt], "prompt")
            return self._checked(_last(self.tokenizer.encode(prompt) if prompt else [], keep), "prompt")
        return self._checked(_last(list(prompt), keep), "prompt")

    @property
    def template_defines_tools(self) -> bool:
        """Whether the chat template renders `tools` (a template without them would drop them)."""
        return bool(self.tokenizer.chat_template) and "tools" in self.tokenizer.chat_template

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             truncate: int | None = None) -> list[int]:
        keep = self.kept_tokens(truncate)
        if keep is None:
            self._check_bytes([message["content"] for message in messages], "messages")
        return self._checked(_last(self.chat_tokens(messages, tools), keep), "messages")

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """The chat's token ids through the template, unchecked against the context (/tokenize)."""
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          tools=tools)
        except Exception as error:  # noqa: BLE001 - a template's own raise_exception(), bad roles
            raise InvalidParameterError("messages", f"the chat template rejected the messages: {error}") from None
        # The rendered text starts with the BOS text already: no second BOS from the post-processor.
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def text_tokens(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A text's token ids, unchecked against the context (/tokenize)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens) if text else []

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def prompt_text(self, token_ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
    def _check_bytes(self, texts: list[str], param: str) -> None:
        if sum(map(len, texts)) * UTF8_MAX_CHAR_BYTES <= self.max_prompt_bytes:
            return  # the common case, without encoding anything
        num_bytes = sum(len(text.encode("utf-8")) for text in texts)
        if num_bytes > self.max_prompt_bytes:
            self._too_long(f"the prompt has {num_bytes} bytes, more than {self.max_model_len} tokens can hold", param)

    def _checked(self, token_ids: list[int], param: str) -> array:
        """The ids, checked, as the int64 array a request holds them in while it streams (no list
        for this process's garbage collector to walk: protocol/token_ids.py)."""
        if not token_ids:
            raise InvalidParameterError(param, "the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            self._too_long(f"the prompt has {len(token_ids)} tokens", param)
        return decode_token_ids(encode_vocabulary_ids(token_ids, self.vocab_size, param))

    def _too_long(self, what: str, param: str) -> None:
        message = (f"{what}; this model's maximum context length is {self.max_model_len} tokens, "
                   "prompt and output together")
        raise APIError(invalid_request(message, param, "context_length_exceeded"))


def _last(token_ids: list[int], keep: int | None) -> list[int]:
    """The last `keep` ids (all of them for None): left truncation keeps what the answer follows."""
    return token_ids if keep is None or len(token_ids) <= keep else token_ids[-keep:]
