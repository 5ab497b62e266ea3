"""The financial sentiment monitor: records, the alert rule, input sources, the monitor loop and its demo."""
