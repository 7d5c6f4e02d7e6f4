"""The KV-tier messages between the driver and a worker: what to move this step, what came back.

Plain tuples of ints and bytes, carried by StepInput / StepOutput (protocol/step.py). Block ids
name device blocks; slots name host-memory blocks, allocated by the driver
(`kvcache/tiers/host_index.py`); hashes are the 32-byte chained block names.

A worker applies one step's ops in this order, all before the forward pass:

  1. writebacks      host slot -> Redis   copied out now: the driver hands the slot to a save below
  2. saves           device -> host       a device block evicted while scheduling this step still
                                          holds its KV; its new owner writes it in the forward pass
  3. write_throughs  host slot -> Redis   read in the background after the saves; the driver keeps
                                          the slot until the report lists it in `written`
  4. loads           host -> device       after the saves, so a block that is evicted and restored
                                          in one step reads what the save wrote

A hybrid model (DeepSeek-V4) keeps a second block group, a sliding window, whose block at the
same index is the block's window part, in a window-part slot (ids after the block slots:
protocol/host_slots.py): `window_saves` and `window_loads` move those, beside the `saves` and
`loads` (a restored prefix resumes from its last window blocks); write-throughs, write-backs and
fetches name window-part slots like block slots, under the parts' own keys.
  5. probes          which blocks Redis holds   background, no host memory; in `probed` later
  6. fetches         Redis -> host slot   background; each slot comes back in `fetched` of a later
                                          report (or this one), exactly once
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# Transfer paths, as measured by the worker and labelled in metrics.
DEVICE_TO_HOST = "device_to_host"
HOST_TO_DEVICE = "host_to_device"
HOST_TO_REDIS = "host_to_redis"
REDIS_TO_HOST = "redis_to_host"

# Outcomes of one fetched block. Everything but HIT is a miss: the block is recomputed.
HIT = "hit"
MISSING = "missing"  # no value: never written, expired, evicted, or the shard is unreachable
CHECKSUM = "checksum"  # the payload does not match its checksum
TRUNCATED = "truncated"  # shorter or longer than its header says
MISMATCH = "mismatch"  # a well-formed value of another format, dtype, shape or block
UNAUTHENTIC = "unauthentic"  # its MAC does not verify: forged, or copied from another block or namespace


@dataclass(frozen=True)
class KVTransferOps:
    writebacks: tuple[tuple[int, bytes], ...] = ()  # (slot, hash)
    saves: tuple[tuple[int, int], ...] = ()  # (device block, slot)
    write_throughs: tuple[tuple[int, bytes], ...] = ()  # (slot, hash)
    loads: tuple[tuple[int, int], ...] = ()  # (slot, device block)
    probes: tuple[tuple[int, tuple[bytes, ...]], ...] = ()  # (probe id, hashes)
    fetches: tuple[tuple[bytes, int], ...] = ()  # (hash, slot)
    window_saves: tuple[tuple[int, int], ...] = ()  # (window block, window-part slot): with the saves
    window_loads: tuple[tuple[int, int], ...] = ()  # (window-part slot, window block): with the loads
    # Set when the step computes nothing and a request waits for fetches: the worker may block
    # this long for one to finish instead of the engine spinning through empty steps.
    poll_timeout_s: float = 0.0
    # Start-up only (engine/calibration.py): time moving one block and about this many bytes each
    # way between device, host and Redis, in blocks and slots from 0 (none is in use yet); the
    # timings come back in the report's `transfers`.
    calibration_bytes: int = 0


@dataclass(frozen=True)
class TransferSample:
    path: str
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class KVTransferReport:
    probed: tuple[tuple[int, tuple[bool, ...]], ...] = ()  # (probe id, whether Redis holds each hash)
    fetched: tuple[tuple[int, str], ...] = ()  # (slot, outcome) of fetches that finished
    written: tuple[tuple[int, bool], ...] = ()  # (slot, stored) of write-throughs that finished
    transfers: tuple[TransferSample, ...] = ()
    # Transfers the step waited for (device<->host): the driver subtracts them from the step
    # time when it measures the prefill rate.
    blocking_seconds: float = 0.0
    writes_stored: int = 0  # blocks written to Redis (write-backs and write-throughs)
    writes_dropped: int = 0  # Redis writes given up: queue full, or Redis down
    redis_errors: int = 0  # failed Redis calls since the previous report
    redis_up: bool = True


@dataclass
class OpsBuilder:
    """The driver's queue of ops for the next step, in KVTransferOps' fields."""

    writebacks: list[tuple[int, bytes]] = field(default_factory=list)
    saves: list[tuple[int, int]] = field(default_factory=list)
    write_throughs: list[tuple[int, bytes]] = field(default_factory=list)
    loads: list[tuple[int, int]] = field(default_factory=list)
    probes: list[tuple[int, tuple[bytes, ...]]] = field(default_factory=list)
    fetches: list[tuple[bytes, int]] = field(default_factory=list)
    window_saves: list[tuple[int, int]] = field(default_factory=list)
    window_loads: list[tuple[int, int]] = field(default_factory=list)

    def take(self, poll_timeout_s: float) -> KVTransferOps:
        """Freeze the queue into one step's ops and empty it."""
        queued = {f.name: tuple(getattr(self, f.name)) for f in fields(self)}
        for f in fields(self):
            getattr(self, f.name).clear()
        return KVTransferOps(**queued, poll_timeout_s=poll_timeout_s)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))
