"""What crosses process boundaries, defined once and importable without torch.

- `states`: model states on a worker and the control actions that move them;
- `messages`: invocations, sampling parameters, typed response events, finish reasons, worker reports;
- `keys`: every Redis key name;
- `errors`: the failure kinds a request can end with, each with its HTTP status;
- `settings`: the tunables every process must agree on, in one documented object.
"""
