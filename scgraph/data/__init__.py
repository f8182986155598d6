"""Data: tokenization, masking, real datasets shipped in packages, and (later) the shard loader."""
