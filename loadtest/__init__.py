"""Clients of the running server: `make predict` and the Locust load test."""
