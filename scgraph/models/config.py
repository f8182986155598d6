"""Every name the model takes, without torch: mixers and their families, adjacencies, activations,
feature maps, kernels, block layouts, value encoders, cell embeddings, and the presets.

``scgraph.config`` validates runs against these names and fills presets by mixer family, so a
command line or config file is checked (and ``--help`` lists its choices) before torch is imported;
``scgraph.models.model`` maps each name to its class or function. Each concept has one home: a name
and a mixer's family live here, a class lives in its registry in ``model.py``, and
``tests/test_model.py`` checks that each registry's keys are exactly the names here, in order.

Why a list of names beside the registries rather than one registry: the config must know the names
(and each mixer's family, which picks its preset row) without importing the classes, and a class
cannot be read without torch. Deriving the names from ``model.py`` without importing it (parsing its
source, or entry points in the package metadata, which go stale in a checkout on ``PYTHONPATH``) would
be more machinery than one line per name. So a new token mixer is its class, its line in
``model.MIXERS``, and its name and family in :data:`MIXER_FAMILIES` below.
"""

from __future__ import annotations

from typing import Any

#: The token mixers by name (the names ``--backbone`` takes), the Transformer first, each with its family:
#: ``attention`` (weights computed from the cell) or ``graph`` (a static gene-gene adjacency, handed to
#: the mixer by the model). The keys of ``model.MIXERS``.
MIXER_FAMILIES: dict[str, str] = {"transformer": "attention", "gnn": "graph", "gnn_linear": "graph"}
BACKBONES = tuple(MIXER_FAMILIES)
#: The GNN's adjacencies (``--adjacency``): the keys of ``model.ADJACENCIES``.
ADJACENCIES = ("factorized", "symmetric_mlp")
#: Activations of the feed-forward and of the post_act layout: the keys of ``model.ACTIVATIONS``.
ACTIVATIONS = ("gelu", "relu")
#: Positive feature maps of the linear GNN (``--feature-map``): the keys of ``model.FEATURE_MAPS``.
FEATURE_MAPS = ("elu+1", "softplus")
#: How the GNN computes its attention (``--graph-kernel``; see ``scgraph.models.kernels``).
KERNELS = ("auto", "scores_once", "sdpa", "subheads")
BLOCK_LAYOUTS = ("pre_norm", "post_norm", "post_act", "residual")
VALUE_ENCODERS = ("linear", "mlp", "bins")
CELL_EMBEDDINGS = ("mean", "cls")

# What each preset sets when a field is left as None: a row shared by both mixer families, then
# per-family rows. ``scbenchmark`` is the authors' released architecture (Transformer:
# nn.TransformerEncoderLayer, post-norm, ReLU, feed-forward width d; GNN: no feed-forward,
# Linear -> LayerNorm -> GELU -> residual, the symmetric-MLP adjacency), with one change: the cell
# embedding is the mean of the final gene states, not the authors' CLS output (``--cell-embedding
# cls`` restores it). At census density the CLS output of a pretrained Transformer collapsed (effective
# rank 12 against its untrained twin's 85) and its probe fell 4 points below the mean's (Zeisel,
# benchmarks/RESULTS.md). ``symmetric`` is the controlled experiment: one pre-norm block for both,
# only the mixer differs.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "scbenchmark": (
        dict(value_encoder="mlp", cell_embedding="mean", graph_out_proj=False),
        {"attention": dict(mlp_ratio=1.0, block_layout="post_norm", activation="relu", adjacency="factorized"),
         "graph": dict(mlp_ratio=0.0, block_layout="post_act", activation="gelu", adjacency="symmetric_mlp")}),
    "symmetric": (
        dict(mlp_ratio=4.0, block_layout="pre_norm", activation="gelu", value_encoder="linear",
             cell_embedding="mean", adjacency="factorized", graph_out_proj=True),
        {}),
}


def short_name(backbone: str) -> str:
    """How tables and figures name a backbone: TF, GNN, or the name itself."""
    return {"transformer": "TF", "gnn": "GNN"}.get(backbone, backbone)
