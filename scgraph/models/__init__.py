"""The backbones: one Block, a token mixer per backbone (model.py), the GNN's attention kernels
(kernels.py), and every name they take (config.py). Importing this package imports nothing else, so
``scgraph.models.config`` is read without torch."""
