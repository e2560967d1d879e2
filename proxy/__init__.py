"""llm-proxy: an OpenAI-compatible LLM gateway that routes, fails over and streams.

A map of the package, a line per module:

  __main__      the command line (serve, check, explain, report, demo, chaos, systemd-unit)
  app           wiring: the aiohttp app, routes, serving loop, signals, the drain
  workers       --workers N: forked processes on one port, signals forwarded, respawn
  handlers      the HTTP edge: decode once, call the gateway, write JSON or SSE, shape errors
  cors          browser clients: preflight and CORS headers for the configured origins
  gateway       the one app-scoped object: config snapshot, state, sessions, log, metrics
  config        providers.yaml + routes.yaml -> frozen dataclasses, errors with file and path
  yaml_paths    YAML read with file + path locations, ConfigError, the strict loader
  checks        warnings of `llm-proxy check`
  signals       pure: request -> Signals (token estimate, task, format, latency, ceiling, tier)
  router        pure: Signals + rules -> Plan (rule, reason, candidates, skipped)
  dispatch      the one attempt loop: breaker, bucket, adapter, commit at first content, failover
  streaming     one streamed attempt: hold until first content, commit, move bytes, watch the end
  balancer      token buckets, the state store interface, the choice of a deployment
  breaker       closed / open / half-open per deployment
  errors        the error tree, FailureClass and the policy table
  transport     pooled upstream sessions and exception mapping
  sse           SSE framing: incremental parser and encoders
  usage         normalised token usage and its cost
  decisions     one decision record per request and the JSON-lines log
  metrics       Prometheus metrics derived from decision records
  report        `llm-proxy report`: weekly cost, fallback rate, quality and latency from decision logs
  logs          structured JSON logs
  systemd       `llm-proxy systemd-unit`: a hardened service unit for this install
  demo          the gateway in front of the simulated fleet
  chaos         `llm-proxy chaos`: fail each step of every chain against the simulator, report
  providers/    one pure adapter per wire protocol: openai, anthropic, gemini
  simulator/    the fake provider fleet used by tests, bench and demo
"""

__version__ = "0.1.0"
