"""Evaluation harness (an app on top of the library): benchmark cases, resumable records, sharding."""
