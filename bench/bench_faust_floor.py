"""The worker's floor: what Faust alone costs per Kafka message, with no detection at all.

    python bench/bench_faust_floor.py [--messages 100000]

Fills the ops topic of the embedded broker with `--messages` messages (a 3-record pack each), then consumes them
with a Faust agent that only counts, micro-batched as the worker's agents are (`take_events`, the worker's batch
size and wait). Prints messages/s and the process's CPU per message (its threads together, the broker excluded).
This is the cost that packing records per partition (producers/packing.py) divides: a worker's main thread pays
it once per message, whatever the message holds (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import faust
from kafka import KafkaProducer
from rankwatch.processors.app import EMBEDDED_GROUP_TIMEOUTS, WorkerConfig

from rankwatch.broker import EmbeddedBroker, ensure_topics, free_port
from rankwatch.config import Settings

RECORD = b'{"kind":"op","job":"j","rank":1,"ts":1.0,"data":{"op":"AllReduce","op_count":1,"stream":"0x1"}}'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    a = ap.parse_args()
    n = a.messages
    broker = EmbeddedBroker(port=free_port()).start()
    s = Settings(bootstrap=broker.bootstrap, app_id=f"faust-floor-{int(time.time())}")
    s.use_topic_prefix(s.app_id)
    ensure_topics(s)
    producer = KafkaProducer(**s.kafka_kwargs(), linger_ms=5, batch_size=256 * 1024)
    value = b"[" + b",".join([RECORD] * 3) + b"]"
    for i in range(n):
        producer.send(s.topic_ops, key=f"j/{i % 4096}/0x1".encode(), value=value)
    producer.flush()
    producer.close()
    worker = WorkerConfig()
    timeouts = EMBEDDED_GROUP_TIMEOUTS
    app = faust.App(s.app_id, broker=s.faust_broker(), topic_partitions=s.partitions, topic_disable_leader=True,
                    web_enabled=False, store="memory://", consumer_auto_offset_reset="earliest",
                    broker_rebalance_timeout=timeouts["rebalance_timeout_s"],
                    broker_session_timeout=timeouts["session_timeout_s"],
                    broker_heartbeat_interval=timeouts["heartbeat_interval_s"])
    topic = app.topic(s.topic_ops, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = {"n": 0, "wall": 0.0, "cpu": 0.0}

    @app.agent(topic)
    async def count(stream):
        async for events in stream.take_events(worker.batch_size, within=worker.batch_within_s):
            if not seen["n"]:  # timing starts at the first batch: group join and fetch start-up excluded
                seen["wall"], seen["cpu"] = time.perf_counter(), time.process_time()
            seen["n"] += len(events)
            if seen["n"] >= n:
                wall, cpu = time.perf_counter() - seen["wall"], time.process_time() - seen["cpu"]
                print(f"Faust alone: {n:,} messages in {wall:.2f} s: {n / wall:,.0f} messages/s, "
                      f"{cpu / n * 1e6:.0f} us of CPU per message (the worker's floor; broker excluded)", flush=True)
                os._exit(0)  # Faust's own shutdown takes seconds; the broker dies with this process

    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()
    return 1


if __name__ == "__main__":
    sys.exit(main())
