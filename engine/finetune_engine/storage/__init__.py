"""Bucket storage: S3-compatible URIs, verified directory transfers, completion manifests."""

from finetune_engine.storage.s3 import (
    IncompleteError,
    MissingCredentialsError,
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
    put_bytes,
    read_bytes,
    read_manifest,
    session_client,
    upload_file,
)
from finetune_engine.storage.transfer import download_dir, upload_dir
from finetune_engine.storage.uri import (
    StorageURIError,
    UnsafeKeyError,
    check_relative_key,
    join,
    parse_uri,
    safe_local_path,
    validate_bucket,
)

__all__ = [
    "IncompleteError", "MissingCredentialsError", "StorageError", "StorageURIError", "UnsafeKeyError",
    "check_relative_key", "delete_prefix", "download_dir", "download_file", "ensure_bucket", "exists", "is_complete",
    "join", "list_children", "list_complete_children", "list_objects", "make_client", "parse_uri", "put_bytes",
    "read_bytes", "read_manifest", "safe_local_path", "session_client", "upload_dir", "upload_file", "validate_bucket",
]
