"""Watching a run: metrics sinks (JSONL, TensorBoard, plots, progress), the live monitor of step
times and stragglers, the Prometheus exporter, system samples, the hang watchdog, and the log
of which samples each step trained on."""
