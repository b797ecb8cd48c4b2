"""The merge as steps over small records (no Prefect): plan, cache keys and code digests, the artefact
store, the layer and group steps, the work folder and the checks before a merge."""
