"""The tiers below the device KV cache: a host-slot index, Redis, the value format, the cost model.

Torch-free. The driver-side policy that uses them is `kvcache/tier_manager.py`; the worker-side
data movement is `model_shards/kv_io/kv_transfer.py`. docs/kv_tiers.md walks through the design.
"""
