"""Shared test builders (importable as `helpers.*`: pytest puts tests/ on sys.path)."""
