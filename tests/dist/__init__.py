"""Multi-process tests: real process groups on gloo, spawned by ``helpers.run_distributed``."""
