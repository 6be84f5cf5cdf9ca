"""The papers' figures from in-memory data, one module per paper (``paper000`` ... ``paper004``).

Every function takes plain arrays or tensors (one image, not a batch) and returns a
``matplotlib.figure.Figure`` built without pyplot (no global state, no GUI backend: PNGs are
rendered by Agg); :func:`save_figure` writes and closes it.

- ``paper000`` (docs/math.md §2-5): U rows (Fig. 3b), per-layer attention rows beside U (Fig.
  3a), inner/outer patch-pair statistics per layer (Fig. 2), the U matrix and dropped patches
  (Fig. 5), the beta sweep of DIP (Fig. 6), windows (Fig. 4c), responsive-field size and
  tendency (Fig. 12, 11).
- ``paper002`` (§8): keypoints (Fig. 3), an attended row (Fig. 4), KK/NK/AFI per layer (Fig. 5/6),
  the stage summary and per-stage heatmaps (Fig. 7a/b), mask as prompt and its masked images (Fig. 8).
- ``paper003`` (§9): head importance with the std over images (Fig. 1 B1 / Fig. 7), one head's
  modes (B2), top-5 under pruning (B3), mode bars, top heads, k-hop strength, entropy per layer and
  its distribution over images (C3), t-SNE and its density view (D1), the two-axes view (D3), the
  threshold histogram (D5), context masks, the attention heatmap.
- ``paper004`` (§7): cluster assignments as heatmaps (Fig. 1), cluster importance by masking and
  the top clusters over images (§3.5, Figs. 4-6).

The image is ``(H, W, 3)`` floats in ``[0, 1]`` (or ``(3, H, W)``, or uint8), already resized
to the model's input so that the patch grid ``(gh, gw)`` tiles it; :func:`display_image`
undoes the normalisation of a model input.
"""
from __future__ import annotations

from ._common import default_patches, display_image, save_figure
from .paper000 import (plot_attention_rows, plot_beta_sweep, plot_field_size, plot_field_tendency, plot_inner_outer,
                       plot_uncertainty_matrix, plot_uncertainty_rows, plot_windows)
from .paper002 import (plot_attended_row, plot_keypoints, plot_layer_points, plot_mask_prompt, plot_masked_images,
                       plot_stage_heatmaps, plot_stage_summary)
from .paper003 import (METRIC_NAMES, attention_threshold, plot_attention_heatmap, plot_context_masks,
                       plot_entropy_distribution, plot_entropy_layers, plot_head_importance, plot_head_modes,
                       plot_importance_metrics, plot_khop_strength, plot_mode_bars, plot_pattern_density,
                       plot_pruned_top5, plot_threshold_histogram, plot_top_heads, plot_tsne, plot_two_axes)
from .paper004 import (plot_cluster_heatmaps, plot_cluster_importance, plot_top_clusters)

__all__ = ["display_image", "default_patches", "save_figure", "plot_uncertainty_rows", "plot_uncertainty_matrix",
           "plot_windows", "plot_field_size", "plot_field_tendency", "plot_inner_outer", "plot_attention_rows",
           "plot_beta_sweep", "plot_keypoints", "plot_attended_row", "plot_layer_points", "plot_stage_summary",
           "plot_stage_heatmaps", "plot_mask_prompt", "plot_masked_images", "plot_head_importance", "plot_mode_bars",
           "plot_top_heads", "plot_khop_strength", "plot_entropy_layers", "plot_tsne", "plot_context_masks",
           "plot_attention_heatmap", "plot_importance_metrics", "plot_head_modes", "plot_pruned_top5",
           "plot_entropy_distribution", "plot_pattern_density", "plot_two_axes", "plot_threshold_histogram",
           "attention_threshold", "METRIC_NAMES", "plot_cluster_heatmaps", "plot_cluster_importance",
           "plot_top_clusters"]
