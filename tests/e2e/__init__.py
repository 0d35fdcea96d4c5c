"""End-to-end tests against a real Label Studio (marker: e2e)."""
