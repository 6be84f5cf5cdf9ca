"""Patch-interaction analysis (paper 000 §3.2–4.3; docs/math.md §2–5).

Pipeline for one batch of images::

    from vitpatch import analysis
    U = analysis.uncertainty(analysis.attention_maps(model, images), model.num_prefix_tokens)  # eq. 2-3
    windows = analysis.adaptive_windows(U, alpha=0.1, grid=(14, 14))                           # eq. 4
    keep = analysis.indiscriminative_patches(U, beta=0.2)                                      # §4.2
    size, tendency = analysis.responsive_field(windows, keep, grid=(14, 14))                   # eq. 6-7
    eo = analysis.effective_operations(windows, (14, 14), keep)                                # eq. 5

For a dataset, :func:`run_windows` (the ``vitpatch windows`` command) writes windows and keep
masks to memory-mapped ``.npy`` files and :class:`WindowDataset` feeds them to training. The
figures of the paper live in :mod:`vitpatch.analysis.plots`.

Submodules load on first use: importing this package does no work.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "attention_maps": "maps",
    "AttentionMaps": "maps",
    "attention_modules": "maps",
    "model_layout": "maps",
    "uncertainty": "interactions",
    "LayerVariance": "interactions",
    "adaptive_windows": "windows",
    "indiscriminative_patches": "windows",
    "column_variance": "windows",
    "responsive_field": "windows",
    "effective_operations": "windows",
    "round_half_up": "windows",
    "dip_sweep": "windows",
    "attention_rows": "interactions",
    "InnerOuterStats": "paper000_stats",
    "inner_outer_statistics": "paper000_stats",
    "box_objects": "paper000_stats",
    "mask_objects": "paper000_stats",
    "ObjectMasks": "paper000_stats",
    "inner_outer_report": "paper000_stats",
    "analyze_report": "paper000_stats",
    "run_entry": "paper000_stats",
    "load_model": "pipeline",
    "ImageFiles": "pipeline",
    "eval_transform": "pipeline",
    "compute_windows": "pipeline",
    "run_windows": "pipeline",
    "WindowDataset": "pipeline",
    "WindowCollate": "pipeline",
    "read_windows": "pipeline",
    # paper 002 (docs/math.md §8)
    "sift_keypoints": "semantic",
    "keypoint_counts": "semantic",
    "to_uint8": "semantic",
    "attended_sets": "semantic",
    "interrelation": "semantic",
    "interrelation_summary": "semantic",
    "Interrelation": "semantic",
    "focus_index": "semantic",
    "layer_semantics": "semantic",
    "LayerSemantics": "semantic",
    "patch_scores": "semantic",
    "mask_patches": "semantic",
    "mask_prompt_accuracy": "semantic",
    "MaskPromptAccuracy": "semantic",
    "semantic_report": "semantic",
    "require_opencv": "semantic",
    "default_stages": "semantic",
    "guided_mae_mask": "semantic",
    "curriculum_beta": "semantic",
    # paper 003 (docs/math.md §9)
    "PRUNE_MODES": "pruning",
    "check_modes": "pruning",
    "mean_attention_distance": "strength",
    "ring_sizes": "strength",
    "khop_strength": "strength",
    "strength_entropy": "strength",
    "layer_strengths": "strength",
    "LayerStrengths": "strength",
    "region_mask": "pruning",
    "prune_attention": "pruning",
    "head_importance": "pruning",
    "head_importance_loop": "pruning",
    "HeadImportance": "pruning",
    "js_divergence": "pruning",
    "image_overview": "pruning",
    "tsne": "patterns",
    "cls_patterns": "patterns",
    "binarize_patterns": "patterns",
    "PatternAutoencoder": "patterns",
    "pattern_latents": "patterns",
    "train_pattern_autoencoder": "patterns",
    "encode_patterns": "patterns",
    "context_masks": "patterns",
    "NpyAppender": "patterns",
    "pack_patterns": "patterns",
    "unpack_patterns": "patterns",
    "PackedPatterns": "patterns",
    "RunningStats": "heads",
    "heads_report": "heads",
    # paper 004 §3.5 (docs/math.md §7)
    "cluster_importance": "clusters",
    "clusters_report": "clusters",
    "ClusterImportance": "clusters",
    "ClusterImportanceAccumulator": "clusters",
    "cluster_heatmaps": "clusters",
    "load_paca_model": "clusters",
}
_SUBMODULES = ("maps", "interactions", "windows", "pipeline", "plots", "semantic", "heads", "pruning", "strength",
               "patterns", "paper000_stats", "clusters")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vitpatch.analysis' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
