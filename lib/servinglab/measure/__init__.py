"""Measuring: the load generator and what it sends (workloads, schedules), the client's and the server's
metrics, one latency stage run end to end (``stage``), and ``servinglab bench``."""
