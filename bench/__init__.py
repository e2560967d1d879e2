"""Benchmarks that prove the gateway costs nothing users can feel.

  routing    signals + routing decision, no HTTP (python -m bench.routing)
  overhead   gateway vs direct-to-simulator: latency, throughput, streaming, memory
             (python -m bench.overhead)
  load       a load generator for users (python -m bench.load URL ...)
  simserver  the simulated fleet as its own process, for overhead and load
  stats      percentiles, medians and spreads shared by the benches

Everything talks to 127.0.0.1 only and every loop is bounded in count and time.
"""
