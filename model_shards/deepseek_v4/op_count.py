"""Counting the aten ops a piece of torch code dispatches, and which of them wait on the device.

On a GPU nearly every non-view aten op is a kernel launch, so the count of a decode step is its
launch count, and a step whose count grows with the number of requests launches per request (and
cannot be one CUDA graph). A "host sync" is an op whose result the host needs before it can go on
(a scalar read, an output whose size depends on the values): inside a decode step's layers it
stalls the launch queue, and a CUDA graph cannot hold it.

    with OpCounter(layers=model.layers) as counter:
        runner.execute(step)
    counter.step.total(), counter.layers.computing_total(), counter.layers.syncs

The mode sees the ops the Python code dispatches (a composite op once, not the ops it runs inside).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output size or value the host must read: each one waits for the device
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), int(t), float(t), bool(t), .tolist() element by element
    "aten.is_nonzero", "aten.equal", "aten.allclose",  # Python bools of device values
    "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2",
    "aten.unique_consecutive", "aten.unique_dim", "aten.argwhere",  # output size depends on the values
})
# ops that sync unless given their output size
SIZED_OPS = {"aten.repeat_interleave": "output_size"}


@dataclass
class OpTally:
    """Calls per op name (overload packet, e.g. "aten.index_put_"), those that compute (write
    memory: a kernel on a GPU; not a view or a no-op conversion), and the host syncs among them."""

    ops: Counter[str] = field(default_factory=Counter)
    computing: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.ops.values())

    def computing_total(self) -> int:
        return sum(self.computing.values())

    def sync_total(self) -> int:
        return sum(self.syncs.values())


def host_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether an op with these arguments makes the host wait for the device."""
    if name in SYNC_OPS:
        return True
    if name in SIZED_OPS and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return kwargs.get(SIZED_OPS[name]) is None
    if name in ("aten.index", "aten.index_put", "aten.index_put_") and len(args) > 1:
        return any(index is not None and index.dtype == torch.bool for index in args[1])  # a mask: nonzero inside
    if name in ("aten._to_copy", "aten.copy_"):
        return _device_to_host(args, kwargs)
    return False


def computes(name: str, args: tuple, result) -> bool:
    """Whether an op wrote memory: in place (name ends in "_"), or into an output that aliases no
    input (a view, a reshape that could view, `.to` of the same dtype alias their input)."""
    if name.endswith("_"):
        return True
    outputs = [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]
    if not outputs:
        return True
    inputs = {t.untyped_storage().data_ptr() for t in _tensors(args)}
    return outputs[0].numel() > 0 and outputs[0].untyped_storage().data_ptr() not in inputs


def _tensors(args) -> list[torch.Tensor]:
    found = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            found.append(arg)
        elif isinstance(arg, (tuple, list)):
            found += _tensors(arg)
    return found


def _device_to_host(args: tuple, kwargs: dict) -> bool:
    """A blocking copy from an accelerator to the host."""
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if kwargs.get("non_blocking") or args[-1] is True:
        return False
    if len(tensors) == 2:  # copy_(destination, source)
        return tensors[1].device.type != "cpu" and tensors[0].device.type == "cpu"
    device = kwargs.get("device")
    return bool(tensors) and tensors[0].device.type != "cpu" and device is not None and \
        torch.device(device).type == "cpu"


def describe(value):
    """An op argument as a comparable value: a tensor by its layout (shape, strides, offset, dtype,
    device), which is all a CUDA graph records of it; anything else (an int, a dtype, a list) as is.
    Two runs whose calls describe equal dispatch the same launches with the same host values: a
    host value read from the inputs (a position, a slot) would differ between them."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(describe(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, describe(item)) for key, item in value.items()))
    return value


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (`step`), and separately those dispatched
    while one of `layers` runs its forward (`layers`). `record_calls`: also keeps every call with
    its arguments described (`calls`: (op, args, kwargs) in order)."""

    def __init__(self, layers: Iterable[nn.Module] = (), record_calls: bool = False):
        super().__init__()
        self.step, self.layers = OpTally(), OpTally()
        self.record_calls = record_calls
        self.calls: list[tuple] = []
        self._depth = 0  # > 0 while a counted layer runs
        self._hooks = []
        for module in layers:
            self._hooks.append(module.register_forward_pre_hook(self._enter_layer))
            self._hooks.append(module.register_forward_hook(self._leave_layer))

    def _enter_layer(self, *_) -> None:
        self._depth += 1

    def _leave_layer(self, *_) -> None:
        self._depth -= 1

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        tallies = (self.step, self.layers) if self._depth else (self.step,)
        sync = host_sync(name, args, kwargs)
        if self.record_calls:
            self.calls.append((str(func), describe(args), describe(kwargs)))
        result = func(*args, **kwargs)
        computed = computes(name, args, result)
        for tally in tallies:
            tally.ops[name] += 1
            if computed:
                tally.computing[name] += 1
            if sync:
                tally.syncs[name] += 1
        return result
