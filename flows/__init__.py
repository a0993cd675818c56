"""Prefect flows: orchestration only. The ML lives in pipeline/; flows move commands and URIs."""
