"""Publishing: versions and ``latest.json``, reader leases, the version writer, the model card, the merge
report, the adapter output and ``push_to_hub``."""
