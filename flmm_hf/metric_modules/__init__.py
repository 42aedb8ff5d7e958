"""``evaluate`` metric modules (load with ``evaluate.load(flmm_hf.metrics.metric_module_path(name))``)."""
