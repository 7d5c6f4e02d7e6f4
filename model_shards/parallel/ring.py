"""Ring attention over the zigzag split of prefill chunks (sp_plan.py).

N ranks pass their chunk K/V around a ring: at step t rank r holds the K/V block of rank
src = (r - t) mod N, sends it on to r + 1 and receives the next one from r - 1 while it computes
on the current one (isend/irecv overlap the attention kernel). After N steps every query has seen
every key of its chunk once; the partials are merged by log-sum-exp (lse_attention.py).

Why zigzag balances the ring: rank r holds pieces (r, 2N-1-r) of each chunk and src holds
(src, 2N-1-src). Comparing piece indices (a later piece sees all of an earlier one, none of a
later one, and itself causally):

    src == r   causal over r's own rows (its two pieces in position order)
    src <  r   all of r's rows see src's first piece fully, nothing of its second
    src >  r   only r's second piece sees, and it sees both of src's pieces fully

so every step is one unmasked (or one causal-diagonal) block of the same area, on every rank: no
rank waits for another, and fused kernels need no custom mask.
"""

from __future__ import annotations

from typing import Callable

import torch

from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.lse_attention import (
    LseKernel,
    PartialSum,
    attention_with_lse,
)
from model_shards.parallel.sp_plan import RingSequence, SequenceParallelPlan

BlockCallback = Callable[[int, torch.Tensor], None]  # (src rank, its (2, rows, KV, D) block)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SequenceParallelPlan,
                   group: ParallelGroup, scale: float, kernel: LseKernel,
                   on_block: BlockCallback | None = None) -> PartialSum:
    """q (R, H, D), k/v (R, KV, D): this rank's ring rows -> their partial attention over every
    rank's chunk keys. `on_block` sees each K/V block once (to store the rows this rank owns)."""
    rows, heads, head_dim = q.shape
    partial = PartialSum(rows, heads, head_dim, q.device, torch.promote_types(q.dtype, torch.float32))
    current = torch.stack([k, v])  # (2, R, KV, D): one buffer, one send per step
    for step in range(group.size):
        src = (group.rank - step) % group.size
        incoming, requests = _start_next(current, plan, group, step)
        _attend_block(partial, q, current, src, plan, scale, kernel)
        if on_block is not None:
            on_block(src, current)
        for request in requests:
            request.wait()
        current = incoming
    return partial


def _start_next(current: torch.Tensor, plan: SequenceParallelPlan, group: ParallelGroup,
                step: int) -> tuple[torch.Tensor | None, list]:
    """Post the send of `current` and the receive of the block computed on after it. Empty
    blocks are not sent: both ends know every block's size from the plan."""
    if step == group.size - 1:
        return None, []
    next_src = (group.rank - step - 1) % group.size
    incoming = current.new_empty((2, plan.ring_rows[next_src], *current.shape[2:]))  # (2, R_src, KV, D)
    send = current if current.shape[1] else None
    receive = incoming if incoming.shape[1] else None
    return incoming, group.start_ring_exchange(send, receive)


def _attend_block(partial: PartialSum, q: torch.Tensor, block: torch.Tensor, src: int,
                  plan: SequenceParallelPlan, scale: float, kernel: LseKernel) -> None:
    for ring in plan.ring:
        q_start, q_stop, k_start, k_stop, causal = _visible(ring, src, plan.rank)
        if q_start == q_stop or k_start == k_stop:
            continue
        out, lse = attention_with_lse(kernel, q[q_start:q_stop], block[0, k_start:k_stop],
                                      block[1, k_start:k_stop], scale, causal)
        partial.add(q_start, out, lse)


def _visible(ring: RingSequence, src: int, rank: int) -> tuple[int, int, int, int, bool]:
    """(query rows, key rows of src's block, causal) that see each other (module docstring)."""
    q_start, q_stop = ring.rows
    k_start, k_stop = ring.src_rows[src]
    if src == rank:
        return q_start, q_stop, k_start, k_stop, True
    if src < rank:
        return q_start, q_stop, k_start, k_start + ring.src_first[src], False
    return q_start + ring.first, q_stop, k_start, k_stop, False
