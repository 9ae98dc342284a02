"""Kafka fixtures: a tansu broker per test session (see tests/integration/test_kafka.py)."""
