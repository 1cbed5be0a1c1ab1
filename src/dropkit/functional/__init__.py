"""Functional dropout ops: pure functions of (input, rate, key); modules wrap them."""

from dropkit.functional.alpha import alpha_dropout as alpha_dropout
from dropkit.functional.alpha import alpha_dropout_coefficients as alpha_dropout_coefficients
from dropkit.functional.alpha import feature_alpha_dropout as feature_alpha_dropout
from dropkit.functional.attention import residual_dropout as residual_dropout
from dropkit.functional.attention import scaled_dot_product_attention as scaled_dot_product_attention
from dropkit.functional.concrete import concrete_dropout as concrete_dropout
from dropkit.functional.dropblock import drop_block as drop_block
from dropkit.functional.dropblock import drop_block1d as drop_block1d
from dropkit.functional.dropblock import drop_block2d as drop_block2d
from dropkit.functional.dropblock import drop_block3d as drop_block3d
from dropkit.functional.dropconnect import drop_connect_weight as drop_connect_weight
from dropkit.functional.dropconnect import moment_matching_linear as moment_matching_linear
from dropkit.functional.dropout import dropout as dropout
from dropkit.functional.dropout import dropout1d as dropout1d
from dropkit.functional.dropout import dropout2d as dropout2d
from dropkit.functional.dropout import dropout3d as dropout3d
from dropkit.functional.droppath import drop_path as drop_path
from dropkit.functional.droppath import stochastic_depth_rates as stochastic_depth_rates
from dropkit.functional.embedding import embedding_dropout as embedding_dropout
from dropkit.functional.embedding import word_dropout as word_dropout
from dropkit.functional.fused import bias_dropout_add as bias_dropout_add
from dropkit.functional.gaussian import gaussian_dropout as gaussian_dropout
from dropkit.functional.gaussian import gaussian_dropout_std as gaussian_dropout_std
from dropkit.functional.gaussian import gaussian_noise as gaussian_noise
from dropkit.functional.locked import locked_dropout as locked_dropout
from dropkit.functional.zoneout import zoneout as zoneout
from dropkit.functional.zoneout import zoneout_states as zoneout_states

__all__ = [
    "alpha_dropout",
    "alpha_dropout_coefficients",
    "bias_dropout_add",
    "concrete_dropout",
    "drop_block",
    "drop_block1d",
    "drop_block2d",
    "drop_block3d",
    "drop_connect_weight",
    "drop_path",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "embedding_dropout",
    "feature_alpha_dropout",
    "gaussian_dropout",
    "gaussian_dropout_std",
    "gaussian_noise",
    "locked_dropout",
    "moment_matching_linear",
    "residual_dropout",
    "scaled_dot_product_attention",
    "stochastic_depth_rates",
    "word_dropout",
    "zoneout",
    "zoneout_states",
]
