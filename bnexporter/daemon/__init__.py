"""The long-running exporter: watch checkpoint folders, analyse new checkpoints,
serve the results as Prometheus metrics. See docs/daemon.md."""
