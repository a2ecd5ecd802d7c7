"""The universal GPU worker: one process per device, serving any number of functions from Redis streams.

- `process`: the process itself (threads, heartbeat, control jobs, start and stop);
- `consumer`: reading invocations through the consumer group, re-claiming orphans, cancellations;
- `streamer`: starting requests, stepping engines, detokenizing, stop strings, the outbox and acks;
- `models`: each function's model and its COLD/HOST/WARM/HOT lifecycle, one explicit table of control actions;
- `running`: the table of requests in flight, the state those threads share;
- `control`: the RQ job that carries a control action to this process.
"""
