"""Context parallelism: attention over a sequence sharded across processes.

    import mlx.core as mx
    from mlx_flash.distributed import ring_flash_attention, shard, unshard

    group = mx.distributed.init()
    q, k, v = (shard(x, group, "zigzag") for x in (q_full, k_full, v_full))
    out = ring_flash_attention(q, k, v, group=group, causal=True)

See docs/distributed.md.
"""

from .layout import local_positions, shard, unshard
from .ring import ring_flash_attention
from .transport import in_ring_order

__all__ = ["ring_flash_attention", "shard", "unshard", "local_positions", "in_ring_order"]
