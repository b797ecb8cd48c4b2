"""Storage plumbing over fsspec: URLs and atomic writes, retries and faults, secrets in storage options,
canonical locations, the output lock, kill points for tests."""
