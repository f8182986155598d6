"""The shard-set format, one owner for the sharding tool (which writes it) and the loader and
evaluation (which read it): ``codec`` the bytes of a shard, ``manifest`` the manifest and
``ShardSet``, the validated set on disk."""

from scgraph.data.shards.codec import (
    COUNTS,
    GENES,
    MEMBERS,
    OBS,
    TAR_END,
    Cell,
    CorruptShardError,
    ShardArrays,
    decode_cell,
    decode_npy,
    encode_block,
    encode_obs,
    iter_shard,
    join_rows,
    npy_header,
    read_shard_arrays,
)
from scgraph.data.shards.manifest import (
    FORMAT,
    MANIFEST_NAME,
    ShardSet,
    build_manifest,
    content_identity,
    differences,
    read_manifest,
    shard_name,
    write_manifest,
)

__all__ = ["COUNTS", "FORMAT", "GENES", "MANIFEST_NAME", "MEMBERS", "OBS", "TAR_END", "Cell",
           "CorruptShardError", "ShardArrays", "ShardSet", "build_manifest", "content_identity", "decode_cell",
           "decode_npy", "differences", "encode_block", "encode_obs", "iter_shard", "join_rows",
           "npy_header", "read_manifest", "read_shard_arrays", "shard_name", "write_manifest"]
