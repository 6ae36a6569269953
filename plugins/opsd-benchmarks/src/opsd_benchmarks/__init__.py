"""The paper's nine evaluation benchmarks as evaluation-only opsd tasks."""
