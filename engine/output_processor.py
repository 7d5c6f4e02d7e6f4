"""Turn sampled token ids into text deltas and decide when each sequence stops. No tensors."""

from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.request import Request, RequestStatus
from engine.stop_strings import StopStringMatcher


@dataclass
class StepResult:
    """One sequence's outcome of one step: new text, and a status when it finished."""

    text: str
    finish_status: RequestStatus | None


class SequenceOutput:
    """Per-sequence output state: incremental detokenizer plus stop-string matcher."""

    def __init__(self, request: Request, tokenizer, max_model_len: int):
        params = request.sampling_params
        self.params = params
        self.max_model_len = max_model_len
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self.stop_matcher = StopStringMatcher(params.stop)
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids.update(params.eos_token_ids)

    def finish_status(self, request: Request, token_id: int) -> RequestStatus | None:
        """`request` already holds the token as its last output token. The checks that need no text (a stop token, the length): the engine makes them before
        it schedules the next step, so a finished request is never scheduled again. A stop string
        (`text`) may still end a sequence that these let go on."""
        if self._is_stop_token(request, token_id):
            return RequestStatus.FINISHED_STOPPED
        if self._reached_length(request):
            return RequestStatus.FINISHED_LENGTH
        return None

    def text(self, token_id: int, finish_status: RequestStatus | None) -> StepResult:
        """The token's text and the sequence's final status, given `finish_status` of the token
        (which `finish_status` gave). A stop string in the token's text ends the sequence there,
        also when the length ended it (OpenAI's reason is then "stop")."""
        if finish_status is RequestStatus.FINISHED_STOPPED:  # a stop token: its text is not shown
            return StepResult(self._final_text(), RequestStatus.FINISHED_STOPPED)
        text, hit_stop_string = self.stop_matcher.feed(self.detokenizer.append(token_id))
        if hit_stop_string:
            return StepResult(text, RequestStatus.FINISHED_STOPPED)
        if finish_status is not None:
            return StepResult(text + self._final_text(), finish_status)
        return StepResult(text, None)

    def _final_text(self) -> str:
        """What the detokenizer and the stop matcher still hold when the sequence ends."""
        text, hit_stop_string = self.stop_matcher.feed(self.detokenizer.flush())
        return text if hit_stop_string else text + self.stop_matcher.flush()

    def _is_stop_token(self, request: Request, token_id: int) -> bool:
        # min_tokens: the sampler masks stop tokens until then; this guards the same rule here.
        return token_id in self.stop_token_ids and request.num_output_tokens > self.params.min_tokens

    def _reached_length(self, request: Request) -> bool:
        return request.num_output_tokens >= self.params.max_tokens or request.num_tokens >= self.max_model_len
