"""The universal GPU worker: one process per device, serving any number of functions from Redis streams.

- `process`: the process itself (threads, heartbeat, control jobs, start and stop);
- `consumer`: reading invocations through the consumer group, re-claiming orphans, cancellations;
- `streamer`: starting requests (a read's worth under one hold of the model's lock) and stepping engines;
- `publisher`: a process of its own: detokenizing, stop strings, writing answers, acknowledging invocations;
- `fairlock`: the per-model lock, granted first come first served;
- `models`: each function's model and its COLD/HOST/WARM/HOT lifecycle, one explicit table of control actions;
- `running`: the table of requests in flight, the state those threads share;
- `control`: the RQ job that carries a control action to this process.
"""
