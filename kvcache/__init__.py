"""The device KV cache's control plane: block ids, ref counts and prefix-cache names; no tensors."""

from kvcache.block_hash import hash_block, hash_full_blocks, root_hash
from kvcache.block_pool import BlockPool, NoFreeBlocksError
from kvcache.kv_cache_manager import KVCacheManager

__all__ = [
    "BlockPool",
    "KVCacheManager",
    "NoFreeBlocksError",
    "hash_block",
    "hash_full_blocks",
    "root_hash",
]
