"""Bucket storage: S3-compatible URIs, verified directory transfers, completion manifests."""

from finetune_engine.storage.s3 import (
    IncompleteError,
    StorageError,
    delete_prefix,
    download_file,
    ensure_bucket,
    exists,
    is_complete,
    list_children,
    list_complete_children,
    list_objects,
    make_client,
    read_manifest,
    upload_file,
)
from finetune_engine.storage.transfer import download_dir, upload_dir
from finetune_engine.storage.uri import StorageURIError, UnsafeKeyError, join, parse_uri, safe_local_path

__all__ = [
    "IncompleteError", "StorageError", "StorageURIError", "UnsafeKeyError", "delete_prefix", "download_dir",
    "download_file", "ensure_bucket", "exists", "is_complete", "join", "list_children", "list_complete_children",
    "list_objects", "make_client", "parse_uri", "read_manifest", "safe_local_path", "upload_dir", "upload_file",
]
