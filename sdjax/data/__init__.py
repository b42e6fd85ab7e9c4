"""Training data: datasets yield {"image": uint8 (H, W, 3), "caption": str}; `iterate_batches` turns
one into host-sharded, resumable float batches.

  shapes.ShapesDataset      procedural coloured shapes with captions (the offline demo)
  folder.FolderDataset      a local folder: image + .txt caption, or metadata.jsonl
  preprocess                resize / crop / flip / caption dropout, and iterate_batches

numpy and PIL only (no TensorFlow).
"""
from sdjax.data.folder import FolderDataset
from sdjax.data.preprocess import iterate_batches, make_preprocess
from sdjax.data.shapes import ShapesDataset, all_captions, caption_for, parse_caption

__all__ = ["FolderDataset", "ShapesDataset", "all_captions", "caption_for", "iterate_batches", "make_preprocess",
           "parse_caption"]
