"""A request (one output sequence) as the scheduler sees it: token ids and progress, no tensors."""

from __future__ import annotations

import enum
import time
from array import array
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field

from kvcache.block_hash import hash_full_blocks
from protocol.sampling_params import SamplingParams
from protocol.token_ids import token_array


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # eos, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context
    FINISHED_ABORTED = "abort"
    FINISHED_FAILED = "error"  # handling this request failed; the others went on

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: Sequence[int]  # held as array("q") (protocol/token_ids.py), never changed
    sampling_params: SamplingParams
    root_hash: bytes  # start of this request's prefix-hash chain: model, KV layout, tenant salt
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # Prompt then outputs, appended in place: a 1M-token prompt is never copied per step.
    token_ids: array = field(init=False)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (hits included)
    num_prefix_hit_tokens: int = 0  # of the prompt, served from the prefix cache at admission
    num_host_hit_tokens: int = 0  # of those, restored from host memory
    num_redis_hit_tokens: int = 0  # of those, restored from Redis (via host memory)
    num_expected_hit_tokens: int = 0  # estimated on arrival, for the autoscaler (engine/backlog.py)
    num_preemptions: int = 0
    # The prefill stops here and the request requeues to restore what follows, fetched from Redis
    # while it computed up to here (kvcache/tiers/prefetch.py); None: no pause.
    pause_at_tokens: int | None = None
    resumed: bool = False  # it paused once: its next admission adds to its hit counts
    block_hashes: list[bytes] = field(init=False)  # one per full block of token_ids
    # Names of the prompt's first full blocks, when the caller computed them already from this
    # root_hash and block_size (engine/request_preparer.py, perhaps in another process); the rest are hashed here.
    known_block_hashes: InitVar[Sequence[bytes]] = ()

    def __post_init__(self, known_block_hashes: Sequence[bytes]) -> None:
        self.prompt_token_ids = token_array(self.prompt_token_ids)
        self.token_ids = self.prompt_token_ids[:]  # a copy (a slice of an array is one memcpy)
        self.block_hashes = list(known_block_hashes)
        self.extend_block_hashes()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> array:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def computes_whole_prompt(self) -> bool:
        """Prompt logprobs come from the prompt's rows: none may be skipped by a prefix hit."""
        return self.sampling_params.prompt_logprobs is not None

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            self.extend_block_hashes()

    def extend_block_hashes(self) -> None:
        """Hash the blocks that became full since the last call: O(new blocks)."""
        num_full_blocks = len(self.token_ids) // self.block_size
        num_hashed = len(self.block_hashes)
        if num_full_blocks == num_hashed:
            return
        parent = self.block_hashes[-1] if self.block_hashes else self.root_hash
        new_tokens = self.token_ids[num_hashed * self.block_size : num_full_blocks * self.block_size]
        self.block_hashes.extend(hash_full_blocks(new_tokens, self.block_size, parent))
