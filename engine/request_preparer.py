"""A caller's request made ready for the engine, before it meets the engine's state: tokenized,
checked against the model and the cache's size, its prompt's full blocks named.

This reads only what never changes after start-up (`RequestLimits`), so it runs wherever is
cheapest: on the engine's own thread for `LLMEngine.add_request`, and in the replica process
when the engine runs in a child (engine/engine_process.py `ProcessEngine`). There the child's
step thread would otherwise share its GIL with a 33K-token prompt's ~3 ms of Python (tokens
copied and range-checked, 516 blocks hashed; CPU machine) while the GPU waits for the step's
Python (session 15: the served path's prompts cost ~2x their batched rate in mixed steps).
A prepared request crosses the pipe as its uint32 encoding, which the range check and the hashes
needed anyway: pickled in a byte copy where a list of ints takes ~0.6 ms, and rebuilt no slower.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvcache.block_hash import decode_token_ids, encode_token_ids, hash_encoded_blocks, root_hash
from model_folder.tokenizer import Tokenizer
from protocol.sampling_params import InvalidParameterError, SamplingParams


class ContextLengthExceededError(InvalidParameterError):
    """The prompt does not fit the model's context; HTTP code `context_length_exceeded`."""

    code = "context_length_exceeded"


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against, fixed once the engine has started. An engine process
    sends it to its replica, which then prepares requests itself."""

    vocab_size: int
    max_model_len: int  # prompt and output, in tokens
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # the device cache's: one sequence must fit it alone
    max_waiting_requests: int  # the queue bound: a request's n may not exceed it
    sequence_parallel_size: int
    eos_token_ids: tuple[int, ...]
    model_fingerprint: str  # model and KV layout: the root of every prefix-hash chain


@dataclass(frozen=True)
class PreparedRequest:
    """A caller's request tokenized, checked and hashed, not queued yet."""

    request_id: str
    token_ids: array  # the prompt's, as array("q") (protocol/token_ids.py)
    params: SamplingParams  # the caller's, with the model's end-of-sequence ids
    chain_root: bytes  # start of its prefix-hash chain (model, KV layout, cache salt)
    block_hashes: tuple[bytes, ...]  # names of the prompt's full blocks, chained from chain_root
    # token_ids as little-endian uint32 (kvcache/block_hash.py `encode_token_ids`): what pickling sends.
    encoded_token_ids: bytes = field(repr=False, compare=False, default=b"")

    def __reduce__(self):
        # Bytes pickle in a copy (a 33K-token list of ints: ~0.6 ms); the receiver widens them to its array.
        encoded = self.encoded_token_ids or encode_token_ids(self.token_ids)
        return _unpickle_prepared, (self.request_id, encoded, self.params, self.chain_root, self.block_hashes)


def _unpickle_prepared(request_id, encoded, params, chain_root, block_hashes) -> PreparedRequest:
    return PreparedRequest(request_id, decode_token_ids(encoded), params, chain_root, block_hashes, encoded)


def encode_vocabulary_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> bytes:
    """`token_ids` as uint32 (`encode_token_ids`); InvalidParameterError naming `param` unless
    every id is an integer in [0, vocab_size). The encoding refuses negative and non-integer ids,
    and numpy's max over it costs ~20 us for 33K ids against ~1 ms for Python's min and max."""
    try:
        encoded = encode_token_ids(token_ids)
    except (ValueError, TypeError):
        encoded = None
    if encoded is None or (encoded and int(np.frombuffer(encoded, dtype="<u4").max()) >= vocab_size):
        raise InvalidParameterError(param, f"token ids must be in [0, {vocab_size})")
    return encoded


class RequestPreparer:
    def __init__(self, tokenizer: Tokenizer, limits: RequestLimits):
        self.tokenizer = tokenizer
        self.limits = limits

    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                cache_salt: str | None = None) -> PreparedRequest:  # fmt: skip
        """Raises InvalidParameterError (a 400) for what the engine would refuse anyway."""
        token_ids, encoded = self._tokenize(prompt)
        self._check_against_model(params)
        self._check_fits_kv_cache(len(token_ids), params)
        self._check_prompt_logprobs(params)
        params = dataclasses.replace(params, eos_token_ids=self.limits.eos_token_ids)
        chain_root = root_hash(self.limits.model_fingerprint, cache_salt)
        block_hashes = tuple(hash_encoded_blocks(encoded, self.limits.block_size, chain_root))
        # As an int64 array (protocol/token_ids.py), from the encoding in one numpy pass.
        return PreparedRequest(request_id, decode_token_ids(encoded), params, chain_root, block_hashes, encoded)

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[Sequence[int], bytes]:
        """The prompt's token ids and their encoding, checked: not empty, within the context and
        the vocabulary."""
        if not prompt:  # "" would still encode to a lone BOS token
            raise InvalidParameterError("prompt", "the prompt is empty")
        # Ids as given (a list, or an array from the replica's check): the encoding below checks them.
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not token_ids:
            raise InvalidParameterError("prompt", "the prompt is empty")
        max_model_len = self.limits.max_model_len
        if len(token_ids) >= max_model_len:
            raise ContextLengthExceededError(
                "prompt",
                f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                f"{max_model_len} tokens, prompt and output together",
            )
        return token_ids, encode_vocabulary_ids(token_ids, self.limits.vocab_size, "prompt")

    def _check_against_model(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: ids within the vocabulary, n within the queue."""
        vocab_size, max_waiting = self.limits.vocab_size, self.limits.max_waiting_requests
        if any(not 0 <= token_id < vocab_size for token_id in params.stop_token_ids):
            raise InvalidParameterError("stop_token_ids", f"token ids must be in [0, {vocab_size})")
        if any(token_id >= vocab_size for token_id, _ in params.logit_bias):
            raise InvalidParameterError("logit_bias", f"token ids must be in [0, {vocab_size})")
        if params.top_k > vocab_size:
            raise InvalidParameterError("top_k", f"must be at most the vocabulary size {vocab_size}, got {params.top_k}")
        if params.n > max_waiting:
            raise InvalidParameterError("n", f"must be at most {max_waiting} (the queue bound), got {params.n}")

    def _check_fits_kv_cache(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        # A sequence that cannot fit the whole cache alone would be preempted for ever.
        limits = self.limits
        num_tokens = min(num_prompt_tokens + params.max_tokens, limits.max_model_len)
        num_blocks = -(-num_tokens // limits.block_size)
        if num_blocks > limits.num_kv_blocks:
            capacity = limits.num_kv_blocks * limits.block_size
            raise ContextLengthExceededError(
                "prompt",
                f"prompt and max_tokens need {num_tokens} tokens of KV cache; this replica holds {capacity}",
            )

    def _check_prompt_logprobs(self, params: SamplingParams) -> None:
        if params.prompt_logprobs is not None and self.limits.sequence_parallel_size > 1:
            raise InvalidParameterError(
                "prompt_logprobs", "prompt logprobs need parallel.sequence_parallel_size 1 (SP splits the prompt's rows)"
            )
