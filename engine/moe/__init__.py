"""One MoE layer's step: experts registration with transformers, expert math per backend, the scheduler
(hits, CPU misses, fetches), slot store, CPU miss path, cost model, telemetry, and the runtime facade."""
