"""The storage layer: where artifacts (adapters, base models, datasets) come from and how they are verified.

- `uri`: the one parser of artifact URIs (`parse_uri` -> `ArtifactUri`), plus the pure path helpers builders
  write into pod specs (`pvc_mount_path`, `fetched_model_path`);
- `fetchers`: one fetcher per scheme (local/PVC, HTTP(S), S3, Hugging Face Hub) behind `fetchers.base.Fetcher`,
  and the one S3 client construction (`fetchers.s3.s3_client`);
- `errors`: what a store's failure means (NotFound, AccessDenied, Unavailable...), one mapping for HTTP and S3;
- `digest`: the sha256 of files and directories that trainer and loader agree on;
- `cache`: the verified, size-bounded artifact cache (loader, `loraplane fetch-model`, the trainer's remote base
  models) on top of the fetchers.

It imports only `loraplane.api`; builders import only `storage.uri`; trainer, loader and fetch-model use the
rest. Heavy clients (boto3, huggingface_hub, datasets) are imported when a URI of their scheme is fetched.
"""
