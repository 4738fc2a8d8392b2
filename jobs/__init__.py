"""Flink job entry points and the pure logic they wire."""
