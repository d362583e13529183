"""Parquet image shards: schema, manifest, writer (ingest), readers and storage URIs.

    >>> from shards import ingest, read_manifest, ShardDataset, ray_dataset, verify
"""
from shards.ingest import ingest, summary_table
from shards.reader import ShardDataset, check_shards, decode_to_chw, ray_dataset, read_manifest, verify
from shards.schema import MANIFEST_NAME, SCHEMA, SPLITS, Manifest, ShardInfo

__all__ = ["ingest", "summary_table", "ShardDataset", "check_shards", "decode_to_chw", "ray_dataset",
           "read_manifest", "verify", "MANIFEST_NAME", "SCHEMA", "SPLITS", "Manifest", "ShardInfo"]
