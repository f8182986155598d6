"""census | SOMA experiment | .h5ad -> WebDataset shards + manifest (``python -m sharding --help``)."""
