"""Real models for the tests, built from configs without weights, and a skip for libraries that
do not import here (one definition for every test file that needs them)."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn


def import_or_skip(name: str) -> Any:
    """Import ``name`` or skip with the error: any exception counts (timm and torchvision fail with
    a RuntimeError or AttributeError, not an ImportError, when torchvision was built for another
    torch)."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception as error:
        pytest.skip(f"{name} is not importable here ({type(error).__name__}: {error})")


def tiny_bert(transformers: Any, attn_implementation: str, classify: bool = True) -> nn.Module:
    """A 2-layer, 32-wide BERT (vocabulary 99, 3 labels) with the given attention implementation."""
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation=attn_implementation,
    )
    cls = transformers.BertForSequenceClassification if classify else transformers.BertModel
    model: nn.Module = cls(config)
    return model


def tiny_vit(transformers: Any, **overrides: Any) -> nn.Module:
    """A 2-layer, 32-wide ViT classifier on 16x16 images (patch 4, dropout 0.1, 3 labels)."""
    options: dict[str, Any] = {
        "image_size": 16,
        "patch_size": 4,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "num_labels": 3,
    }
    model: nn.Module = transformers.ViTForImageClassification(
        transformers.ViTConfig(**{**options, **overrides})
    )
    return model


def tiny_convnext(transformers: Any) -> nn.Module:
    """A 2-stage ConvNext classifier (widths 8, 16; depths 2, 2) with drop-path rate 0.3."""
    config = transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], drop_path_rate=0.3, num_labels=3
    )
    model: nn.Module = transformers.ConvNextForImageClassification(config)
    return model


def tiny_gpt2(transformers: Any, attn_implementation: str, **overrides: Any) -> nn.Module:
    """A 2-layer, 32-wide GPT-2 language model (vocabulary 99, context 32, 2 heads) with the given
    attention implementation and distinct rates per site: embeddings 0.1, attention 0.2, residual
    (attention output and MLP) 0.15."""
    options: dict[str, Any] = {
        "vocab_size": 99,
        "n_positions": 32,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": 37,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.2,
        "resid_pdrop": 0.15,
        "bos_token_id": 98,  # in the vocabulary (the default 50256 is not: a config warning)
        "eos_token_id": 98,
        "attn_implementation": attn_implementation,
    }
    model: nn.Module = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**options, **overrides}))
    return model


def tiny_llama(transformers: Any, attn_implementation: str, **overrides: Any) -> nn.Module:
    """A 2-layer, 32-wide LLaMA language model (vocabulary 99, context 32, 2 heads) with the given
    attention implementation and attention dropout 0.2, its only dropout: a functional call (no
    ``nn.Dropout`` module holds the rate, the attention's ``attention_dropout`` float does)."""
    options: dict[str, Any] = {
        "vocab_size": 99,
        "max_position_embeddings": 32,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "attention_dropout": 0.2,
        "attn_implementation": attn_implementation,
    }
    model: nn.Module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**options, **overrides}))
    return model


def fake_class(module: str, name: str, init: Any, forward: Any) -> type[nn.Module]:
    """A stand-in class named ``module.name`` (as timm's or torchvision's), without the library."""
    cls = type(name, (nn.Module,), {"__init__": init, "forward": forward, "__module__": module})
    cls.__qualname__ = name
    return cls
