"""Data: the gene vocabulary, the shard format, tokenization and masking, the streaming loader, and
real labelled datasets shipped in packages."""
