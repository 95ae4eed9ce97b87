"""Emotion data: taxonomies, dataset loaders with bad-input reporting (the synthetic
EmoScenes benchmark is the default run's, in ``emor3.toy.emoscenes``)."""

from emor3.data.dataset import (
    REASONS, BadSampleError, BytesImage, EmotionDataset, ImageSource, LoadReport, Sample, smart_resize,
)
from emor3.data.loaders import (
    build_emoset_subset, detect_layout, load_dataset, load_emoset, load_emotion6, load_image_folder, load_manifest,
    load_parquet, load_webemo, open_image, parquet_image_bytes, parquet_splits, split_suffix, write_manifest,
)
from emor3.data.taxonomy import (
    BINARY, BUILTIN_NAMES, EMOTION6, MIKELS8, WEBEMO2, WEBEMO7, WEBEMO25, Taxonomy, binary_correct, get_taxonomy,
    load_taxonomy, map_label, normalize_label, taxonomy_from_dict, to_binary,
)

__all__ = [
    "BINARY", "BUILTIN_NAMES", "EMOTION6", "MIKELS8", "REASONS", "WEBEMO2", "WEBEMO7", "WEBEMO25",
    "BadSampleError", "BytesImage", "EmotionDataset", "ImageSource", "LoadReport", "Sample", "Taxonomy",
    "binary_correct", "build_emoset_subset", "load_emotion6", "load_webemo", "detect_layout", "get_taxonomy",
    "load_dataset", "load_emoset", "load_image_folder", "load_manifest", "load_parquet", "open_image",
    "parquet_image_bytes", "parquet_splits", "split_suffix", "load_taxonomy", "map_label", "normalize_label",
    "smart_resize", "taxonomy_from_dict", "to_binary",
    "write_manifest",
]
