"""The original Wan release's umT5 weights (``models_t5_umt5-xxl-enc-bf16.pth``) as a transformers model.

Wan ships its text encoder as a state dict of its own ``T5Encoder`` module (umT5: a relative
position bias per layer, gated-GELU feed-forward). The names map one to one onto transformers'
``UMT5EncoderModel``; the architecture is read from the tensor shapes, with umT5-XXL's fixed
settings (max relative distance 128, gated-GELU, RMSNorm eps 1e-6) for what shapes cannot say.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from attn_harness.core.errors import HarnessError
from attn_harness.model.torchfile import safe_load

# Wan T5Encoder name (full match) -> transformers UMT5EncoderModel name.
_TO_TRANSFORMERS = (
    (r"token_embedding\.weight", r"shared.weight"),
    (r"norm\.weight", r"encoder.final_layer_norm.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
)
TIED_EMBEDDING = "encoder.embed_tokens.weight"  # transformers ties it to shared.weight
# umT5-XXL settings the tensor shapes do not carry (Wan's T5RelativeEmbedding max_dist, GELU-tanh gate, T5LayerNorm eps).
FIXED_CONFIG = {"relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6}
_SHOWN_KEYS = 5


def _few(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def to_transformers_keys(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Wan ``T5Encoder`` state dict -> ``UMT5EncoderModel`` keys (the embedding under both tied names)."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        for pattern, replacement in _TO_TRANSFORMERS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise HarnessError(
            f"{where}: not a Wan umT5 encoder state dict; unexpected keys {_few(sorted(unexpected))} "
            "(expected Wan's T5Encoder names: token_embedding.weight, blocks.N.{norm1,attn.q,...,ffn.fc2}.weight, norm.weight)"
        )
    if "shared.weight" in out:
        out[TIED_EMBEDDING] = out["shared.weight"]
    return out


def _shape(state: dict[str, torch.Tensor], key: str, where: Path) -> tuple[int, ...]:
    if key not in state:
        raise HarnessError(f"{where}: umT5 encoder state dict lacks {key!r}, needed to read the architecture")
    return tuple(state[key].shape)


def config_from_state(state: dict[str, torch.Tensor], where: Path) -> dict:
    """``UMT5Config`` arguments read from the shapes of a transformers-keyed umT5 state dict."""
    vocab_size, d_model = _shape(state, "shared.weight", where)
    attention = "encoder.block.0.layer.0.SelfAttention"
    num_buckets, num_heads = _shape(state, f"{attention}.relative_attention_bias.weight", where)
    inner = _shape(state, f"{attention}.q.weight", where)[0]
    if inner % num_heads:
        raise HarnessError(f"{where}: attention width {inner} is not a multiple of the {num_heads} heads of the position bias")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "num_heads": num_heads,
        "d_kv": inner // num_heads,
        "d_ff": _shape(state, "encoder.block.0.layer.1.DenseReluDense.wi_1.weight", where)[0],
        "num_layers": max(layers) + 1,
        "relative_attention_num_buckets": num_buckets,
        **FIXED_CONFIG,
    }


def load_original_umt5(path: Path, dtype: torch.dtype = torch.float32):
    """A ``UMT5EncoderModel`` holding the weights of Wan's ``models_t5_*.pth`` (cast to ``dtype``)."""
    from transformers import UMT5Config, UMT5EncoderModel

    raw = safe_load(path, what="the umT5 encoder's state dict (Wan's models_t5_*.pth)")  # mmap: no second copy of 11 GB
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise HarnessError(f"{path}: expected a state dict of tensors (Wan's T5Encoder); got {type(raw).__name__}")
    state = {k: v.to(dtype) for k, v in to_transformers_keys(raw, path).items()}
    config = UMT5Config(**config_from_state(state, path))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        problems = [f"missing {_few(missing)}"] if missing else []
        problems += [f"unexpected {_few(extra)}"] if extra else []
        raise HarnessError(f"{path}: umT5 weights do not form a {config.num_layers}-layer encoder: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape disagreements between layers
        raise HarnessError(f"{path}: umT5 tensor shapes disagree with each other: {str(err)[:400]}") from err
    return model.eval()
