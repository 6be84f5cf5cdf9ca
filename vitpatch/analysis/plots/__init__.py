"""The papers' figures from in-memory data, one module per paper (``paper000`` ... ``paper004``).

Every function takes plain arrays or tensors (one image, not a batch) and returns a
``matplotlib.figure.Figure`` built without pyplot (no global state, no GUI backend: PNGs are
rendered by Agg); :func:`save_figure` writes and closes it.

- :func:`plot_uncertainty_rows`  Fig. 3 (b): rows ``U[p, :]`` over the image for a few patches.
- :func:`plot_uncertainty_matrix` Fig. 5: the ``n x n`` U, column variances, dropped patches.
- :func:`plot_windows`           Fig. 4 (c): adaptive windows of a few patches, window areas.
- :func:`plot_field_size`        Fig. 12: responsive-field size ``|S_p|`` (eq. 6) per patch.
- :func:`plot_field_tendency`    Fig. 11: tendency ``R_p / |R_p|`` (eq. 7) as arrows and flow colours.
- :func:`plot_cluster_heatmaps`  PaCa (paper 004 Fig. 1): each cluster's assignment over the image.

Paper 002 (docs/math.md §8): :func:`plot_keypoints` (Fig. 3), :func:`plot_attended_row` (Fig. 4),
:func:`plot_layer_points` (Fig. 5/6), :func:`plot_stage_summary` (Fig. 7a), :func:`plot_mask_prompt`
(Fig. 8). Paper 003 (docs/math.md §9, Fig. 1, 5, 6): :func:`plot_head_importance`,
:func:`plot_mode_bars`, :func:`plot_top_heads`, :func:`plot_khop_strength`,
:func:`plot_entropy_layers`, :func:`plot_tsne`, :func:`plot_context_masks`, :func:`plot_attention_heatmap`.

The image is ``(H, W, 3)`` floats in ``[0, 1]`` (or ``(3, H, W)``, or uint8), already resized
to the model's input so that the patch grid ``(gh, gw)`` tiles it; :func:`display_image`
undoes the normalisation of a model input.
"""
from __future__ import annotations

from ._common import default_patches, display_image, save_figure
from .paper000 import (plot_field_size, plot_field_tendency, plot_uncertainty_matrix, plot_uncertainty_rows,
                       plot_windows)
from .paper002 import plot_attended_row, plot_keypoints, plot_layer_points, plot_mask_prompt, plot_stage_summary
from .paper003 import (plot_attention_heatmap, plot_context_masks, plot_entropy_layers, plot_head_importance,
                       plot_khop_strength, plot_mode_bars, plot_top_heads, plot_tsne)
from .paper004 import plot_cluster_heatmaps

__all__ = ["display_image", "default_patches", "plot_uncertainty_rows", "plot_uncertainty_matrix",
           "plot_windows", "plot_field_size", "plot_field_tendency", "plot_cluster_heatmaps", "save_figure",
           # paper 002
           "plot_keypoints", "plot_attended_row", "plot_layer_points", "plot_stage_summary", "plot_mask_prompt",
           # paper 003
           "plot_head_importance", "plot_mode_bars", "plot_top_heads", "plot_khop_strength", "plot_entropy_layers",
           "plot_tsne", "plot_context_masks", "plot_attention_heatmap"]
