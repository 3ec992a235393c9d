"""The seed's figures, generalised: shapes, scales, frame units, highlights and files on disk.

Statistics drawn in figures are checked against brute-force float64 NumPy oracles written
here from docs/design.md, "Statistics" (not against attn_harness.core.metrics, which the figures call).
Tolerance 1e-5 absolute: the data is float32 and the oracle reads the same float32 values.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import matplotlib.colors
import numpy as np
import pytest
import xarray as xr
from PIL import Image

from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import block_causal_mask
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset
from attn_harness.report import figures

TOL = 1e-5


def planted_dataset(
    *,
    steps: int = 2,
    layers: int = 3,
    heads: int = 4,
    frames: int = 9,
    mask: str = "bidirectional",
    seed: int = 0,
    sink_heads: tuple[int, ...] = (0,),
    diagonal: float = 3.0,
) -> xr.Dataset:
    """A contract-valid extraction with known structure: a +``diagonal`` self-frame bump in every
    head, a +4 first-key-frame sink in ``sink_heads``, small noise; mass is the row softmax."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.3, (steps, layers, heads, frames, frames)) + diagonal * np.eye(frames)
    for head in sink_heads:
        logits[:, :, head, :, 0] += 4.0
    visible = block_causal_mask(frames, 3) if mask == "block-causal" else np.ones((frames, frames), bool)
    logits = np.where(visible, logits, np.nan)
    weights = np.where(visible, np.exp(np.nan_to_num(logits, nan=0.0)), 0.0)
    mass = weights / weights.sum(-1, keepdims=True)
    attrs = {key: "unknown" for key in REQUIRED_ATTRS}
    attrs.update(
        mask=mask, block_size=3, temporal_stride=4, latent_frames=frames, num_frames=1 + 4 * (frames - 1),
        seed=seed, model_id=f"synthetic-seed{seed}",
    )
    return build_dataset(
        {"logits": logits, "mass": mass},
        steps=list(range(0, 5 * steps, 5)),
        timesteps=list(np.linspace(999.0, 100.0, steps)),
        layers=list(range(layers)),
        attrs=attrs,
    )


def oracle_sink(view: np.ndarray, query_frames: list[int]) -> np.ndarray:
    """sink per head of a (head, query, key) float array: r[k0] - mean r[k1..k_{m-1}] over valid keys."""
    profile = np.nanmean(view[:, query_frames, :].astype(np.float64), axis=1)
    valid = np.flatnonzero(~np.isnan(profile).all(axis=0))
    return profile[:, valid[0]] - profile[:, valid[1:-1]].mean(axis=1)


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


@pytest.mark.parametrize(
    ("heads", "shape"), [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (12, (3, 4)), (30, (5, 6)), (40, (5, 8))]
)
def test_grid_shape_adapts_to_the_head_count(heads, shape):
    assert figures.grid_shape(heads) == shape


def test_grid_shape_never_leaves_an_empty_row():
    for heads in range(1, 129):
        rows, cols = figures.grid_shape(heads)
        assert rows * cols >= heads > (rows - 1) * cols


def test_frame_ticks_start_at_zero_with_a_round_step_and_at_most_eight_ticks():
    for frames in (1, 3, 9, 21, 33, 81):
        ticks = figures.frame_ticks(frames)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
        assert ticks[0] == 0 and len(ticks) <= 8 and ticks[-1] < frames
        assert step in (1, 2, 5, 10, 20) and ticks == list(range(0, frames, step))
    assert figures.frame_ticks(21) == [0, 5, 10, 15, 20]


def test_head_grid_draws_one_panel_per_head_with_one_shared_symmetric_colorbar():
    ds = planted_dataset(heads=12, frames=5, steps=1, layers=1)
    view = ds.logits.isel(step=0, layer=0)
    fig = figures.head_grid(view, metric="logits")
    panels = image_axes(fig)
    assert len(panels) == 12
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "colorbar"] == ["attention logit (block mean)"]
    limit = float(np.abs(view.values).max())
    for head, ax in enumerate(panels):
        image = ax.images[0]
        assert image.origin == "lower"
        assert image.norm.vmin == pytest.approx(-limit) and image.norm.vmax == pytest.approx(limit)
        np.testing.assert_array_equal(image.get_array(), view.sel(head=head).values)
        assert ax.get_title() == f"Head {head}"


def test_head_grid_uses_a_sequential_scale_from_zero_for_mass():
    view = planted_dataset(steps=1, layers=1).mass.isel(step=0, layer=0)
    image = image_axes(figures.head_grid(view, metric="mass"))[0].images[0]
    assert image.norm.vmin == 0.0 and image.norm.vmax == pytest.approx(float(view.max()))
    assert image.get_cmap().name.startswith("viridis")


def test_head_grid_greys_out_masked_cells_and_labels_latent_frames():
    view = planted_dataset(steps=1, layers=1, mask="block-causal").logits.isel(step=0, layer=0)
    fig = figures.head_grid(view)
    ax = image_axes(fig)[-1]
    image = ax.images[0]
    assert np.ma.getmaskarray(image.get_array())[0, 8] and not np.ma.getmaskarray(image.get_array())[8, 0]
    assert tuple(image.get_cmap().get_bad()) == matplotlib.colors.to_rgba(figures.MASKED_COLOR)
    assert ax.get_xlabel() == "key frame (latent)"
    assert image_axes(fig)[0].get_ylabel() == "query frame (latent)"


def test_pixel_frames_use_the_causal_vae_mapping_not_the_seed_floor_mapping():
    view = planted_dataset(steps=1, layers=1, frames=9).logits.isel(step=0, layer=0)
    ax = image_axes(figures.head_grid(view, pixel_frames=33))[0]
    drawn = np.asarray(ax.images[0].get_array())
    latent = view.sel(head=0).values
    ceil_map = [math.ceil(i / 4) for i in range(33)]
    np.testing.assert_array_equal(drawn, latent[np.ix_(ceil_map, ceil_map)])
    floor_map = [i // 4 for i in range(33)]
    assert not np.array_equal(drawn, latent[np.ix_(floor_map, floor_map)])
    assert ax.get_ylabel() == "query frame (pixel)"


def test_pixel_frames_must_match_the_latent_frame_count():
    view = planted_dataset(steps=1, layers=1, frames=9).logits.isel(step=0, layer=0)
    with pytest.raises(HarnessError, match="num_pixel_frames = 33"):
        figures.head_grid(view, pixel_frames=81)


def rectangles(ax):
    return [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]


def test_highlight_outlines_the_violating_cell_only_in_its_head():
    view = planted_dataset(steps=1, layers=1).logits.isel(step=0, layer=0)
    fig = figures.head_grid(view, highlight=[{"step": 0, "layer": 0, "head": 1, "query_frame": 5, "key_frame": 2}])
    panels = image_axes(fig)
    assert rectangles(panels[1]) == [(1.5, 4.5, 1.0, 1.0)]
    assert all(rectangles(panels[h]) == [] for h in (0, 2, 3))
    assert panels[1].title.get_color() != panels[0].title.get_color()


def test_highlight_without_frames_outlines_the_whole_panel_and_maps_to_pixel_frames():
    view = planted_dataset(steps=1, layers=1).logits.isel(step=0, layer=0)
    whole = figures.head_grid(view, highlight=[{"head": 2}])
    assert rectangles(image_axes(whole)[2]) == [(-0.5, -0.5, 9.0, 9.0)]
    pixel = figures.head_grid(view, pixel_frames=33, highlight=[{"head": 0, "query_frame": 5, "key_frame": 0}])
    # latent 5 <- pixel frames 17..20; latent 0 <- pixel frame 0 alone
    assert rectangles(image_axes(pixel)[0]) == [(-0.5, 16.5, 1.0, 4.0)]


def test_head_bars_plot_the_query_profile_with_the_sink_score_in_each_title():
    ds = planted_dataset(steps=1, layers=1, mask="block-causal")
    view = ds.logits.isel(step=0, layer=0)
    query = [6, 7, 8]
    sinks = oracle_sink(view.values, query)
    fig = figures.head_bars(view, query)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 4
    profile = np.nanmean(view.values[:, query, :].astype(np.float64), axis=1)
    for head, ax in enumerate(panels):
        heights = [bar.get_height() for bar in ax.patches]
        np.testing.assert_allclose(heights, profile[head], atol=TOL)
        assert ax.get_title() == f"H{head} (sink={sinks[head]:+.2f})"
    assert sinks[0] > 3.0 > abs(sinks[1])
    assert fig.get_suptitle() == "Layer 0, step 0: logits, mean over query frames [6, 7, 8] (latent) per key frame"
    assert [ax.get_ylabel() for ax in panels] == ["mean attention logit (block mean)", "",
                                                  "mean attention logit (block mean)", ""]


def test_stats_table_lists_every_head_with_the_seed_statistics():
    from attn_harness.core.metrics import layer_summary

    view = planted_dataset(steps=1, layers=1).logits.isel(step=0, layer=0)
    table = figures.stats_table(layer_summary(view, [6, 7, 8]))
    root = ET.fromstring(table)
    rows = root.findall("./tbody/tr")
    assert [r[0].text for r in rows] == ["H0", "H1", "H2", "H3"]
    sinks = oracle_sink(view.values, [6, 7, 8])
    assert [float(r[4].text) for r in rows] == pytest.approx(sinks, abs=1e-3)
    diag = np.mean([view.values[h, a, a] for h in range(4) for a in range(9)], dtype=np.float64)
    assert f"diagonal mean {diag:+.3f}" in root.find("caption").text


def test_evolution_plots_each_heads_sink_against_the_step():
    ds = planted_dataset(steps=3, layers=2)
    fig = figures.evolution(ds, 1)
    sink_ax = fig.axes[0]
    assert len(sink_ax.lines) == 4 + 1  # one per head, plus the zero line
    for head, line in enumerate(sink_ax.lines[:4]):
        np.testing.assert_array_equal(line.get_xdata(), [0, 5, 10])
        expected = [oracle_sink(ds.logits.sel(step=s, layer=1).values, [6, 7, 8])[head] for s in (0, 5, 10)]
        np.testing.assert_allclose(line.get_ydata(), expected, atol=TOL)


def test_layer_head_overview_maps_sink_scores_per_layer_and_head():
    ds = planted_dataset(steps=1, layers=3)
    fig = figures.layer_head_overview(ds, 0)
    sink_grid = np.asarray(image_axes(fig)[0].images[0].get_array())
    expected = np.stack([oracle_sink(ds.logits.sel(step=0, layer=layer).values, [6, 7, 8]) for layer in range(3)])
    np.testing.assert_allclose(sink_grid, expected, atol=TOL)
    assert image_axes(fig)[0].get_ylabel() == "layer"


def test_unknown_layer_or_step_names_the_available_ones():
    ds = planted_dataset(steps=1, layers=2)
    with pytest.raises(HarnessError, match=r"layer 7 is not in this extraction; available layers: \[0, 1\]"):
        figures.evolution(ds, 7)
    with pytest.raises(HarnessError, match=r"step 3 .* \[0\]"):
        figures.layer_head_overview(ds, 3)


def test_save_writes_svg_with_editable_text_and_a_decodable_png(tmp_path):
    fig = figures.head_grid(planted_dataset(steps=1, layers=1).logits.isel(step=0, layer=0))
    svg, png = figures.save(fig, tmp_path / "grid")
    tree = ET.parse(svg)
    texts = ["".join(t.itertext()) for t in tree.iter("{http://www.w3.org/2000/svg}text")]
    assert "Head 3" in texts and "key frame (latent)" in texts
    with Image.open(png) as image:
        image.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "grid.svg"]


def test_plot_layer_writes_every_figure_and_the_stats_table(tmp_path):
    ds = planted_dataset(steps=2, layers=2)
    written = figures.plot_layer(ds, 1, None, tmp_path, pixel_frames=True)
    names = sorted(p.name for p in written)
    stems = ("layer1_step5_heads_logits", "layer1_step5_heads_mass", "layer1_step5_bars", "layer1_evolution",
             "step5_overview")
    assert names == sorted([f"{stem}.{ext}" for stem in stems for ext in ("svg", "png")] + ["layer1_step5_stats.html"])
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert "key frame (pixel)" in (tmp_path / "layer1_step5_heads_logits.svg").read_text()
    assert "<td>H3</td>" in (tmp_path / "layer1_step5_stats.html").read_text()


def _text_view(heads: int = 4, frames: int = 3, tokens: int = 6) -> xr.DataArray:
    values = np.random.default_rng(0).dirichlet(np.ones(tokens), size=(heads, frames))
    return xr.DataArray(
        values, dims=("head", "query_frame", "text_token"),
        coords={"head": range(heads), "query_frame": range(frames), "text_token": range(tokens),
                "text_content": ("text_token", np.array([1] * 4 + [0] * (tokens - 4), dtype=np.int8))},
    )


def test_text_mass_grid_draws_each_heads_query_frame_by_token_mass_and_marks_padding():
    view = _text_view()
    fig = figures.text_mass_grid(view, token_labels=["a", "red", "square", "</s>", "<pad>", "<pad>"])
    panels = image_axes(fig)
    assert len(panels) == 4
    for head, ax in enumerate(panels):
        np.testing.assert_array_equal(ax.images[0].get_array(), view.sel(head=head).values)
        assert ax.images[0].norm.vmin == 0.0 and ax.images[0].norm.vmax == pytest.approx(float(view.max()))
        assert len(ax.patches) == 2  # one grey mark per padding token
    assert [t.get_text() for t in panels[-1].get_xticklabels()][:2] == ["a", "red"]


def test_text_mass_grid_needs_the_text_token_dim():
    with pytest.raises(HarnessError, match="text_mass_grid needs dims"):
        figures.text_mass_grid(planted_dataset(steps=1, layers=1).mass.isel(step=0, layer=0))
