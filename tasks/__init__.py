"""Thin Prefect tasks over the sd2 library: content-hash cache keys, retries, the `gpu` slot, paths in/out."""
