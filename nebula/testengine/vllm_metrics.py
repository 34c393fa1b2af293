"""The part of vLLM's /metrics page that Nebula reads, as the test engine keeps it."""

from __future__ import annotations

# (name, type, help) of each metric, in the page's order.
METRICS = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries (characters here)."),
    ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits (characters here)."),
)


def exposition(
    model: str, running: int, waiting: int, tokens: list[int], prefix_stats: list[int]
) -> str:
    """The page, for `running` and `waiting` requests, [prompt, generation] `tokens`
    and the prefix cache's [characters hit, characters queried]."""
    values = (
        running,
        waiting,
        f"{min(1.0, running / 16):.4f}",
        tokens[0],
        tokens[1],
        prefix_stats[1],
        prefix_stats[0],
    )
    lines = []
    for (name, kind, text), value in zip(METRICS, values, strict=True):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines.append(f'{name}{{model_name="{model}"}} {value}')
    return "\n".join(lines) + "\n"
