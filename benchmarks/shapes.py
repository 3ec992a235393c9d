"""Model shapes and token geometries the benchmarks run at, as data.

A shape is a ``WanTransformer3DModel`` config plus a latent geometry (frames x height x width
before the (1, 2, 2) patch) and a text length. Weights are random: timings do not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import WanTransformer3DModel

from attn_harness.model.models import TINY_CONFIG, TINY_TEXT_TOKENS, build_tiny_random, cast_model

WAN_1_3B_CONFIG: dict = {
    **TINY_CONFIG,
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "rope_max_seq_len": 1024,
}


@dataclass(frozen=True)
class Shape:
    """A model config and the latent video it runs on."""

    name: str
    config: dict = field(hash=False)
    latent_frames: int
    latent_height: int
    latent_width: int
    text_tokens: int

    @property
    def tokens_per_frame(self) -> int:
        patch = self.config["patch_size"]
        return (self.latent_height // patch[1]) * (self.latent_width // patch[2])

    @property
    def tokens(self) -> int:
        return self.latent_frames * self.tokens_per_frame

    def describe(self) -> dict:
        cfg = self.config
        return {
            "shape": self.name,
            "layers": cfg["num_layers"],
            "heads": cfg["num_attention_heads"],
            "head_dim": cfg["attention_head_dim"],
            "latent_frames": self.latent_frames,
            "tokens_per_frame": self.tokens_per_frame,
            "tokens": self.tokens,
        }


# The embedded model at its default probe (33 frames of 64x64 pixels -> 9 latent frames of 16 tokens).
EMBEDDED = Shape("embedded", TINY_CONFIG, 9, 8, 8, TINY_TEXT_TOKENS)
# Issue 6's mid-size model: Wan's width and heads, 2 layers, 5 latent frames of 1,560 tokens (480x832).
MID = Shape("mid", {**WAN_1_3B_CONFIG, "num_layers": 2}, 5, 60, 104, 512)
# --quick: the same model on 5 latent frames of 390 tokens (240x416).
MID_QUICK = Shape("mid-quick", MID.config, 5, 30, 52, 512)
# Wan2.1-T2V-1.3B at 81 frames of 480x832: 21 latent frames of 1,560 tokens = 32,760.
WAN_1_3B = Shape("wan2.1-t2v-1.3b", WAN_1_3B_CONFIG, 21, 60, 104, 512)
# Test-sized: runs in a fraction of a second.
SMOKE = Shape("smoke", {**TINY_CONFIG, "num_layers": 2}, 3, 4, 4, 8)

SHAPES = {shape.name: shape for shape in (EMBEDDED, MID, MID_QUICK, WAN_1_3B, SMOKE)}


def build_model(shape: Shape, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> WanTransformer3DModel:
    """Random-weight model of ``shape``, built directly on ``device`` (no 5 GB CPU detour for the full size)."""
    if shape.config is TINY_CONFIG:
        model = build_tiny_random().to(device)
    else:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = WanTransformer3DModel(**shape.config)
    return cast_model(model.eval(), dtype)


def model_inputs(shape: Shape, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> dict:
    """Keyword arguments of one forward call: latents, timestep and a text embedding."""
    gen = torch.Generator().manual_seed(seed)
    cfg = shape.config
    latents = torch.randn(1, cfg["in_channels"], shape.latent_frames, shape.latent_height, shape.latent_width, generator=gen)
    text = torch.randn(1, shape.text_tokens, cfg["text_dim"], generator=gen)
    return {
        "hidden_states": latents.to(device=device, dtype=dtype),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": text.to(device=device, dtype=dtype),
        "return_dict": False,
    }
