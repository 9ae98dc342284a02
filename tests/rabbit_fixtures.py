"""RabbitMQ fixtures (see tests/integration/test_rabbitmq.py)."""
