"""Prefect flows: the SD² pipeline and its stages (see flows/pipeline.py)."""
