"""GPU check: the full Wan2.1-T2V-1.3B shape, random weights, a few sampling steps, with and without capture.

Builds the transformer (30 layers, 12 x 128 heads, dim 1536, ffn 8960, text_dim 4096) on the
device in bfloat16, then runs ``--steps`` UniPC flow-matching steps on 21 latent frames of
1,560 tokens (480x832, 32,760 tokens) twice: plain, and capturing logits and mass on every
layer. Prints seconds per step for both, their ratio, peak device memory, and a sanity check
of the captured mass (rows sum to 1). ``--shape tiny`` runs the same code on a small model
(what CI and CPU-only machines can run). Run it through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from diffusers import UniPCMultistepScheduler

from attn_harness.model.capture import Recorder, capture
from benchmarks.shapes import SMOKE, WAN_1_3B, Shape, build_model, model_inputs

SHAPES = {"wan": WAN_1_3B, "tiny": SMOKE}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def sample(model, inputs: dict, steps: int, device: torch.device, recorder: Recorder | None) -> list[float]:
    """Seconds per sampling step (one conditional forward + scheduler update each)."""
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000
    )
    scheduler.set_timesteps(steps, device=device)
    latents = inputs["hidden_states"].float()
    seconds = []
    for step, timestep in enumerate(scheduler.timesteps):
        _sync(device)
        start = time.perf_counter()
        if recorder is not None:
            recorder.step = step
        step_inputs = {**inputs, "hidden_states": latents.to(inputs["hidden_states"].dtype), "timestep": timestep.expand(1)}
        velocity = model(**step_inputs)[0]
        latents = scheduler.step(velocity.float(), timestep, latents, return_dict=False)[0]
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def check(shape: Shape, *, steps: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    model = build_model(shape, dtype=dtype, device=str(device))
    inputs = model_inputs(shape, dtype=dtype, device=str(device))
    layers = list(range(len(model.blocks)))
    result: dict = {"shape": shape.describe(), "dtype": str(dtype).removeprefix("torch."), "device": str(device), "steps": steps}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    with torch.inference_mode():
        sample(model, inputs, 1, device, None)  # warm-up: kernel selection, allocator
        plain, captured = [], []
        for _ in range(repeats):  # alternate, so a clock or load change hits both alike
            _reset_peak(device)
            plain += sample(model, inputs, steps, device, None)
            result["peak_bytes_plain"] = _peak_bytes(device)
            recorder = Recorder(tokens_per_frame=shape.tokens_per_frame, metrics=("logits", "mass"), active=True)
            _reset_peak(device)
            with capture(model, layers, recorder):
                captured += sample(model, inputs, steps, device, recorder)
            result["peak_bytes_capture"] = _peak_bytes(device)
    mass = torch.stack([recorder.records[(0, layer)]["mass"] for layer in layers])
    result.update(
        {
            "seconds_per_step_plain": statistics.median(plain),
            "seconds_per_step_capture": statistics.median(captured),
            "ratio": statistics.median(captured) / statistics.median(plain),
            "step_seconds_plain": plain,
            "step_seconds_capture": captured,
            "captured_layers": len(layers),
            "mass_row_sum_max_error": float((mass.sum(-1) - 1).abs().max()),
            "mass_finite": bool(torch.isfinite(mass).all()),
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="wan", help="wan: the full 1.3B shape; tiny: a CPU-sized stand-in"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating plain/capture runs of --steps steps each")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false",
                        help="skip the Triton mass kernels section (per layer and whole model; CUDA and the wan shape only)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per case in the kernels section")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is available: use --device cpu --shape tiny")
    result = check(SHAPES[args.shape], steps=args.steps, dtype=DTYPES[args.dtype], device=device, repeats=args.repeats)
    gib = lambda n: "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
    where = result.get("gpu", result["device"])
    print(f"{result['shape']['shape']} on {where}, {result['dtype']}, {result['shape']['tokens']} tokens, {args.steps} steps")
    plain, capture = result["seconds_per_step_plain"], result["seconds_per_step_capture"]
    print(f"  per step, plain:                          {plain:.3f} s   peak {gib(result['peak_bytes_plain'])}")
    layers = result["captured_layers"]
    print(f"  per step, capture logits+mass, {layers} layers: {capture:.3f} s   peak {gib(result['peak_bytes_capture'])}")
    row_error = result["mass_row_sum_max_error"]
    print(f"  ratio {result['ratio']:.3f}; mass rows sum to 1 within {row_error:.2e} (finite: {result['mass_finite']})")
    if args.kernels and device.type == "cuda" and args.shape == "wan":
        from benchmarks import kernels_gpu
        from benchmarks.run import table
        from benchmarks.timing import environment

        result["kernels"] = kernels_gpu.run(reps=args.reps, warmup=1, env=environment(args.device), device=args.device)
        print(table(result["kernels"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
