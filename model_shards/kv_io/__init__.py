"""The worker's side of the KV tiers: moving block bytes between device, host memory and Redis.

The driver decides what moves (kvcache/tier_manager.py) and sends it as `protocol.kv_transfer_ops`;
`kv_transfer.py` executes it on this rank, `remote_block_io.py` runs the Redis traffic on background
threads over `redis_store.py` / `resp.py`, values are framed and verified by `codec.py`.
"""
