"""Dropout layers as ``torch.nn.Module`` s; each is a thin stateful shell over :mod:`dropkit.functional`."""

from dropkit.nn.alpha import AlphaDropout as AlphaDropout
from dropkit.nn.alpha import FeatureAlphaDropout as FeatureAlphaDropout
from dropkit.nn.attention import AttentionDropout as AttentionDropout
from dropkit.nn.attention import ResidualDropout as ResidualDropout
from dropkit.nn.attention import ScaledDotProductAttention as ScaledDotProductAttention
from dropkit.nn.concrete import ConcreteDropout as ConcreteDropout
from dropkit.nn.concrete import concrete_regularizers as concrete_regularizers
from dropkit.nn.dropblock import DropBlock1d as DropBlock1d
from dropkit.nn.dropblock import DropBlock2d as DropBlock2d
from dropkit.nn.dropblock import DropBlock3d as DropBlock3d
from dropkit.nn.dropconnect import DropConnect as DropConnect
from dropkit.nn.dropout import Dropout as Dropout
from dropkit.nn.dropout import Dropout1d as Dropout1d
from dropkit.nn.dropout import Dropout2d as Dropout2d
from dropkit.nn.dropout import Dropout3d as Dropout3d
from dropkit.nn.droppath import DropPath as DropPath
from dropkit.nn.droppath import LayerDrop as LayerDrop
from dropkit.nn.droppath import StochasticDepth as StochasticDepth
from dropkit.nn.embedding import EmbeddingDropout as EmbeddingDropout
from dropkit.nn.fused import BiasDropoutAdd as BiasDropoutAdd
from dropkit.nn.gaussian import GaussianDropout as GaussianDropout
from dropkit.nn.gaussian import GaussianNoise as GaussianNoise
from dropkit.nn.locked import LockedDropout as LockedDropout
from dropkit.nn.regularization import KLWarmup as KLWarmup
from dropkit.nn.regularization import regularization_loss as regularization_loss
from dropkit.nn.sparse_variational import SparseVariationalConv1d as SparseVariationalConv1d
from dropkit.nn.sparse_variational import SparseVariationalConv2d as SparseVariationalConv2d
from dropkit.nn.sparse_variational import SparseVariationalConv3d as SparseVariationalConv3d
from dropkit.nn.sparse_variational import SparseVariationalLinear as SparseVariationalLinear
from dropkit.nn.sparse_variational import sparsity_report as sparsity_report
from dropkit.nn.transformer import TokenAndPositionEmbedding as TokenAndPositionEmbedding
from dropkit.nn.transformer import TransformerEncoderBlock as TransformerEncoderBlock
from dropkit.nn.variational import VariationalConv1d as VariationalConv1d
from dropkit.nn.variational import VariationalConv2d as VariationalConv2d
from dropkit.nn.variational import VariationalConv3d as VariationalConv3d
from dropkit.nn.variational import VariationalLinear as VariationalLinear
from dropkit.nn.weight_drop import WeightDrop as WeightDrop
from dropkit.nn.zoneout import ZoneoutCell as ZoneoutCell

__all__ = [
    "AlphaDropout",
    "AttentionDropout",
    "BiasDropoutAdd",
    "ConcreteDropout",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "DropConnect",
    "DropPath",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "EmbeddingDropout",
    "FeatureAlphaDropout",
    "GaussianDropout",
    "GaussianNoise",
    "KLWarmup",
    "LayerDrop",
    "LockedDropout",
    "ResidualDropout",
    "ScaledDotProductAttention",
    "SparseVariationalConv1d",
    "SparseVariationalConv2d",
    "SparseVariationalConv3d",
    "SparseVariationalLinear",
    "StochasticDepth",
    "TokenAndPositionEmbedding",
    "TransformerEncoderBlock",
    "VariationalConv1d",
    "VariationalConv2d",
    "VariationalConv3d",
    "VariationalLinear",
    "WeightDrop",
    "ZoneoutCell",
    "concrete_regularizers",
    "regularization_loss",
    "sparsity_report",
]
