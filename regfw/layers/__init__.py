"""The dropout-family layer library: one function plus a thin module per variant (timm style).

Every module subclasses :class:`~regfw.layers.base.StochasticModule` and keeps its rate in ``p``.
Importing this package needs torch only.
"""
from .attention import DEFAULT_ATTENTION_DROPOUT, set_attention_dropout
from .base import Rate, StochasticModule, attach_child, check_rate
from .concrete import ConcreteDropout, concrete_dropout, concrete_regularizer
from .drop_block import DropBlock2d, drop_block_2d, drop_block_gamma
from .drop_path import DropPath, drop_path, drop_path_schedule
from .dropout import (
    AlphaDropout,
    Dropout,
    GaussianDropout,
    SpatialDropout,
    SpatialDropout1d,
    SpatialDropout2d,
    SpatialDropout3d,
    alpha_dropout,
    dropout,
    gaussian_dropout,
    spatial_dropout,
)
from .embedding import EMBEDDING_DROPOUT_ATTR, EmbeddingDropout, apply_embedding_dropout, embedding_dropout
from .recurrent import (
    LockedDropout,
    WeightDrop,
    apply_weight_drop,
    drop_connect,
    locked_dropout,
    remove_weight_drop,
)

__all__ = [
    "StochasticModule",
    "Rate",
    "attach_child",
    "check_rate",
    "Dropout",
    "dropout",
    "SpatialDropout",
    "SpatialDropout1d",
    "SpatialDropout2d",
    "SpatialDropout3d",
    "spatial_dropout",
    "GaussianDropout",
    "gaussian_dropout",
    "AlphaDropout",
    "alpha_dropout",
    "DropBlock2d",
    "drop_block_2d",
    "drop_block_gamma",
    "DropPath",
    "drop_path",
    "drop_path_schedule",
    "LockedDropout",
    "locked_dropout",
    "WeightDrop",
    "drop_connect",
    "apply_weight_drop",
    "remove_weight_drop",
    "set_attention_dropout",
    "DEFAULT_ATTENTION_DROPOUT",
    "ConcreteDropout",
    "concrete_dropout",
    "concrete_regularizer",
    "EmbeddingDropout",
    "embedding_dropout",
    "apply_embedding_dropout",
    "EMBEDDING_DROPOUT_ATTR",
]
