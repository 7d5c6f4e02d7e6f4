"""Turn a stream of sampled token ids into text deltas, one token at a time.

Decoding the whole output after every token costs O(n) per token, which a 1M-token sequence cannot
afford; decoding each token alone breaks characters that byte-level BPE splits over several tokens
(東 is three bytes, often three tokens) and loses context-dependent spaces. So, as vLLM and TGI do,
we decode a small window of ids:

    ids:      ... | context | held               |
                  ^ window start (a clean boundary)
                            ^ everything before here has been emitted

The text of `context` is already emitted; the window's text beyond it is the new text. While the
window's text ends with U+FFFD, the last character is incomplete: the tokens are held until a later
token completes it. When the text ends cleanly, the window slides so that the held tokens become the
next context. A window thus spans a few tokens, and each step decodes only it.
"""

from __future__ import annotations

from collections.abc import Sequence

from model_folder.tokenizer import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"
# Prompt tokens decoded before the first output token, so that context-dependent decoders (a
# SentencePiece-style leading space) render the first output token as it reads after the prompt.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """`append` returns each token's text delta; deltas never contain half a character.

    For byte-level BPE tokenizers (Llama 3, Qwen2, make_model folders) the deltas of all output
    tokens followed by `flush()` equal `tokenizer.decode(output_ids)`. A prompt that ends inside a
    character gives no context, so its missing bytes are not glued to the output's first bytes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHARACTER):
            context = []
        self._window = context
        self._read_index = len(context)  # window[:read_index] is context already rendered
        self._emitted_chars = len(self._decode(context))  # chars of decode(window) already returned

    def append(self, token_id: int) -> str:
        """The new text that `token_id` completes; "" while it ends in an incomplete character."""
        self._window.append(token_id)
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHARACTER):
            return ""
        delta = text[self._emitted_chars :]
        self._slide()
        return delta

    def flush(self) -> str:
        """Held text at the end of generation, incomplete characters rendered as U+FFFD like `decode`."""
        delta = self._decode(self._window)[self._emitted_chars :]
        self._window, self._read_index, self._emitted_chars = [], 0, 0
        return delta

    def _slide(self) -> None:
        # The window ends on a clean boundary: the tokens since the previous one become the context.
        self._window = self._window[self._read_index :]
        self._read_index = len(self._window)
        self._emitted_chars = len(self._decode(self._window))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
