"""The pure pipeline (embed, cache, sink): no Kafka in here."""
