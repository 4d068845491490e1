"""alignloop.feedback: the feedback stream between serving and the trainer.

- `producer`: EventProducer (kafka-python, acks=all, idempotent) with a durable local spool; MemorySink.
- `spool`: the fsync'd, bounded, ordered on-disk log the producer falls back to.
- `snapshot`: consumes both topics into versioned, deduped Parquet datasets with the images.
- `image_store`: fsspec-addressed PNG store.
- `broker`: runs Apache Kafka (KRaft) on loopback, one node or a cluster; `cli` exposes it all.
"""
