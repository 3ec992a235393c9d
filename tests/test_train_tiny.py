"""The tiny-model training script, its data generator, and the committed tiny-trained weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from attn_harness.core.errors import HarnessError
from attn_harness.fixtures import measure, train_tiny, videos

FIXTURES = Path(train_tiny.__file__).parent
TRAINED = FIXTURES / "tiny_trained"
TRAINED_CAUSAL = FIXTURES / "tiny_trained_causal"
COMMITTED = [TRAINED, TRAINED_CAUSAL]
STATS_TOLERANCE = 1e-4  # float32 CPU forward of a 4-layer model; stats are recorded to 6 decimals


def _train(out: Path, *extra: str) -> int:
    return train_tiny.main(["--out", str(out), "--steps", "3", "--batch-size", "2", *extra])


def test_three_training_steps_write_a_loadable_diffusers_dir_and_a_loss_log(tmp_path):
    assert _train(tmp_path / "model") == 0
    model = WanTransformer3DModel.from_pretrained(tmp_path / "model")
    assert model.config.num_layers == train_tiny.MODEL_CONFIG["num_layers"]
    with open(tmp_path / "model" / train_tiny.LOG_FILE) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    info = json.loads((tmp_path / "model" / train_tiny.INFO_FILE).read_text())
    assert info["final_loss"] == pytest.approx(float(rows[-1]["loss"]), abs=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name != "model"], "staging folder left behind"


def test_training_is_deterministic_under_a_seed_and_changes_with_it(tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _train(tmp_path / name, "--seed", seed)
    weights = {name: (tmp_path / name / "diffusion_pytorch_model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]


def test_bad_step_count_exits_with_one_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.main(["--out", str(tmp_path / "m"), "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_training_targets_are_the_flow_matching_velocity():
    settings = train_tiny.TrainSettings(steps=1, batch_size=4)
    batch = train_tiny.flow_matching_batch(settings, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    clean, _ = videos.sample_batch(4, replay)
    noise = torch.randn(clean.shape, generator=replay)
    s = (batch["timestep"] / 1000)[:, None, None, None, None]
    torch.testing.assert_close(batch["target"], noise - clean)
    torch.testing.assert_close(batch["hidden_states"], (1 - s) * clean + s * noise)


def test_block_causal_training_mask_hides_later_blocks_from_earlier_frames():
    model = train_tiny.build_model(0).eval()
    x = torch.randn(1, *videos.LATENT_SHAPE)
    later_changed = x.clone()
    later_changed[:, :, 3:] += 1.0
    inputs = {"timestep": torch.tensor([500.0]), "encoder_hidden_states": videos.class_embedding("")}
    with torch.no_grad(), train_tiny.attention_mask_context(model, "block-causal"):
        out = model(x, **inputs, return_dict=False)[0]
        out_changed = model(later_changed, **inputs, return_dict=False)[0]
    with torch.no_grad():
        unmasked_changed = model(later_changed, **inputs, return_dict=False)[0]
    torch.testing.assert_close(out_changed[:, :, :3], out[:, :, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked_changed[:, :, :3], out[:, :, :3], atol=1e-3)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red square moving left", videos.VideoClass("red", "square", "left", "slow")),
        ("a red square moving from left to right", videos.VideoClass("red", "square", "right", "slow")),
        ("A blue blob moving to the bottom fast", videos.VideoClass("blue", "blob", "down", "fast")),
        ("a red green square moving left", None),
        ("a cat", None),
        ("", None),
    ],
)
def test_prompts_name_a_class_by_colour_shape_and_direction(prompt, expected):
    assert videos.parse_prompt(prompt) == expected


def test_measuring_needs_a_prompt_that_names_a_class():
    with pytest.raises(HarnessError, match="'a cat' names no video class"):
        measure.capture_noisy_video(train_tiny.build_model(0), prompt="a cat")


def test_every_class_prompt_maps_back_to_its_class_embedding():
    for video_class in videos.CLASSES:
        assert videos.parse_prompt(video_class.prompt) == video_class
        torch.testing.assert_close(videos.class_embedding(video_class.prompt)[0], videos.embedding_of(video_class))


def test_unknown_prompts_get_the_same_hashed_embedding_as_tiny_random():
    from attn_harness.model.models import hash_prompt_embedding

    for prompt in ("", "a cat"):
        expected = hash_prompt_embedding(prompt, videos.TEXT_TOKENS, videos.TEXT_DIM)
        assert torch.equal(videos.class_embedding(prompt), expected)
    assert not torch.equal(videos.class_embedding("a cat"), videos.class_embedding("a dog"))


def test_videos_hold_a_loud_first_frame_key_and_the_class_motion():
    video_class = videos.VideoClass("green", "blob", "right", "fast")
    video = videos.render_videos([video_class], torch.Generator().manual_seed(0))[0]
    assert video.shape == videos.LATENT_SHAPE
    key = video[5:10]
    ratio = key[:, 0].abs().mean() / key[:, 1:].abs().mean()
    assert ratio == pytest.approx(videos.KEY_AMPLITUDE_FIRST / videos.KEY_AMPLITUDE_LATER, rel=1e-5)
    green = video[1]
    angle = torch.arange(videos.WIDTH) * 2 * torch.pi / videos.WIDTH  # the object wraps around
    profile = green.sum(1)  # [frame, x]
    centre_x = torch.atan2(profile @ angle.sin(), profile @ angle.cos()) * videos.WIDTH / (2 * torch.pi)
    steps = torch.remainder(centre_x.diff() + videos.WIDTH / 2, videos.WIDTH) - videos.WIDTH / 2
    torch.testing.assert_close(steps, torch.full_like(steps, videos.SPEEDS["fast"]), rtol=0, atol=0.1)
    assert video[0].abs().max() == 0 and video[2].abs().max() == 0  # green only


@pytest.mark.parametrize("model_dir", COMMITTED)
def test_committed_weights_fit_the_budget_and_load_offline(model_dir):
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 5_000_000
    model = WanTransformer3DModel.from_pretrained(model_dir)
    assert {k: model.config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")} == {
        k: train_tiny.MODEL_CONFIG[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")
    }


def _recorded(model_dir: Path) -> dict:
    return json.loads((model_dir / measure.STATS_FILE).read_text())


@pytest.mark.parametrize("model_dir", COMMITTED)
def test_committed_weights_reproduce_the_recorded_attention_statistics(model_dir):
    recorded = _recorded(model_dir)
    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    summary = measure.structure_summary(measure.capture_noisy_video(model, mask=recorded["mask"]))
    for key in ("diagonal_mass", "sink", "neighbour_minus_far"):
        torch.testing.assert_close(
            torch.tensor(summary[key]), torch.tensor(recorded[key]), rtol=0, atol=STATS_TOLERANCE, msg=key
        )


def _structured_heads(summary: dict) -> dict[str, int]:
    """How many of the 16 heads show each kind of learned structure."""
    return {
        "diagonal": int((torch.tensor(summary["diagonal_mass"]) > 1.5 * summary["uniform_mass"]).sum()),
        "sink": int((torch.tensor(summary["sink"]) > 0.5).sum()),
        "decay": int((torch.tensor(summary["neighbour_minus_far"]) > 0.5).sum()),
    }


@pytest.mark.parametrize(
    ("model_dir", "at_least"),
    [
        (TRAINED, {"diagonal": 6, "sink": 2, "decay": 4}),
        (TRAINED_CAUSAL, {"diagonal": 3, "sink": 3, "decay": 5}),
    ],
)
def test_trained_models_show_structure_that_random_init_lacks(model_dir, at_least):
    recorded = _recorded(model_dir)
    random_model = train_tiny.build_model(0).eval()  # tiny-random: diffusers' init under seed 0
    random = measure.structure_summary(measure.capture_noisy_video(random_model, mask=recorded["mask"]))
    assert _structured_heads(random) == {"diagonal": 0, "sink": 0, "decay": 0}
    trained = _structured_heads(recorded)
    assert all(trained[kind] >= at_least[kind] for kind in at_least), trained


def test_the_trainer_refuses_a_directory_it_did_not_write_and_changes_nothing(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.main(["--out", str(project), "--steps", "1"])
    assert exit_info.value.code == 2
    assert "is not a model directory this trainer wrote" in capsys.readouterr().err
    assert [p.name for p in project.iterdir()] == ["config.json"] and (project / "config.json").read_text() == "mine"
