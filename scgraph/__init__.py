"""scgraph: pretrain and compare a Transformer and a static-adjacency GNN on single-cell data.

``scgraph.embed(adata, checkpoint)`` puts a pretrained encoder's cell embeddings in
``adata.obsm["X_scgraph"]`` (see ``scgraph.eval.embed.embed``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def embed(*args: Any, **kwargs: Any) -> Any:
    """See ``scgraph.eval.embed.embed``; imported on first use so ``import scgraph`` stays light."""
    from scgraph.eval.embed import embed as _embed

    return _embed(*args, **kwargs)
