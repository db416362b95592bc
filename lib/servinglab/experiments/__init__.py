"""The steps of a run, one module each, in the order a batch takes them: preflight, deploy, smoke, latency
(with the in-cluster load), lifecycle."""
