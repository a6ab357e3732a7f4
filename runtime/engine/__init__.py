"""The batching engine: requests, scheduler, paged KV cache, executor, adapter registry, sampling
and metrics."""
