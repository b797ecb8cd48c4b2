"""Checkpoint format: safetensors headers, lazy tensor reads, fingerprints, PEFT adapters, validation,
Hugging Face layout writing and single-file artefacts. Storage plumbing lives in :mod:`swudi.storage`."""
