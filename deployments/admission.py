"""A replica's bounded queue, in requests and in prompt tokens. Plain Python, no Ray.

"Queued" means admitted and not yet streaming: waiting in the scheduler or still in prefill.
That is the backlog a new request waits behind, so it is both what the bound limits and what
the router reads as the replica's load. Bounding tokens as well as requests matters with long
contexts: eight queued 1M-token prompts are hours of prefill, eight queued chat turns are not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Ticket:
    num_tokens: int
    queued: bool = True


class AdmissionQueue:
    def __init__(self, max_requests: int, max_tokens: int):
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.num_requests = 0
        self.num_tokens = 0

    def try_admit(self, num_tokens: int) -> Ticket | None:
        """A ticket, or None when the request would overflow the queue.

        A request larger than the whole token bound is admitted into an empty queue; refusing
        it would make a prompt the replica can serve unservable for ever.
        """
        if self.num_requests >= self.max_requests:
            return None
        if self.num_requests and self.num_tokens + num_tokens > self.max_tokens:
            return None
        self.num_requests += 1
        self.num_tokens += num_tokens
        return Ticket(num_tokens)

    def leave(self, ticket: Ticket) -> None:
        """The request started streaming, finished or failed: it no longer waits. Idempotent."""
        if ticket.queued:
            ticket.queued = False
            self.num_requests -= 1
            self.num_tokens -= ticket.num_tokens
