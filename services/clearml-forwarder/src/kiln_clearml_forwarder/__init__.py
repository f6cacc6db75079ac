"""Kiln clearml-forwarder: a durable JetStream consumer that mirrors job events into ClearML tasks."""
