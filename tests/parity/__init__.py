"""Parity harness: ``run_region_writes`` must write exactly what ``Dataset.to_zarr`` writes."""
