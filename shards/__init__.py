"""Parquet image shards: schema, manifest, writer (ingest), readers and storage URIs.

    >>> from shards import ingest, read_manifest, ShardDataset, ray_dataset, verify

``ShardDataset`` (PyTorch) is imported on first use, so that ``import shards`` does not import torch.
"""
from shards.ingest import ingest, summary_table
from shards.reader import check_shards, decode_to_chw, ray_dataset, read_manifest, verify
from shards.schema import MANIFEST_NAME, SCHEMA, SPLITS, Manifest, ShardInfo

__all__ = ["ingest", "summary_table", "ShardDataset", "check_shards", "decode_to_chw", "ray_dataset",
           "read_manifest", "verify", "MANIFEST_NAME", "SCHEMA", "SPLITS", "Manifest", "ShardInfo"]


def __getattr__(name: str):
    if name == "ShardDataset":
        from shards.torch_dataset import ShardDataset

        return ShardDataset
    raise AttributeError(f"module 'shards' has no attribute {name!r}")
