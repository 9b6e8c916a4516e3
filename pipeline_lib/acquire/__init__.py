"""Phase 1, acquire: crawl sources, validate and ingest files, fingerprint them (imports core only)."""
