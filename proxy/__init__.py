"""llm-proxy: an OpenAI-compatible LLM gateway that routes, fails over and streams.

A map of the package, a line per room:

  __main__      the command line: assembles the parser from proxy.commands
  commands/     one module per command: serve, check, explain, demo, report (and report_html,
                its --html page), chaos, systemd (systemd-unit); __init__ holds the helpers they share
  server/       the HTTP layer: app (wiring, serving loop, signals, the drain), edge (body
                decoding, request ids, JSON and SSE answers, error middleware), admin (route,
                feedback, models, health, metrics), cors (browser clients), workers (--workers N),
                connections (head and keep-alive bounds, the connection limit, malformed HTTP)
  ops/          the live operations page (/dashboard): rolling aggregates fed once per
                request, the state reader, the SSE feed, the page and its vendored chart library
  inbound/      the client APIs, one module per surface: chat (chat completions), messages
                (Anthropic Messages and count_tokens; messages_request checks and translates a
                request, messages_answer encodes answers and streams), responses (OpenAI
                Responses: handlers and stored state; responses_input decodes a request,
                responses_output encodes answers and the event stream); lifecycle (the request
                path every surface shares: key, body, decode, route, dispatch, encode, one
                decision record); routing (authenticate, read once, signals, plan)
  encoding      the Encoder contract: how a surface puts streams and answers on its wire
  gateway       the one app-scoped object: config snapshot, state, sessions, log, metrics
  config        providers.yaml + routes.yaml -> frozen dataclasses, errors with file and path
  settings      routes.yaml's server: section (bounds, log, CORS, breaker policy, state backend)
  yaml_paths    YAML read with file + path locations, ConfigError, the strict loader
  checks        warnings of `llm-proxy check`
  signals       pure: request -> Signals (token estimate, task, format, latency, ceiling, tier)
  router        pure: Signals + rules -> Plan (rule, reason, candidates, skipped)
  dispatch      the one attempt loop: breaker, bucket, adapter, commit at first content, failover
  streaming     one streamed attempt: hold until first content, commit, move bytes, watch the end
  verify        restart-and-verify: a restarted answer held back until it reproduced the text sent
  balancer      the choice of a deployment: order by strategy, one admission, bucket names
  state/        buckets, breakers, 429 holds and memos behind one async interface: store
                (the interface), bucket (pure), memory (this process; 1/N per worker),
                redis_store (shared, one Lua script per admission), failover (local shares
                while Redis is away), lua/ (the scripts)
  breaker       pure: closed / open / half-open per deployment, the recovery schedule
  errors        the error tree, FailureClass and the policy table
  transport     pooled upstream sessions and exception mapping
  sse           SSE framing: incremental parser and encoders
  rawjson       pure: one top-level string spliced into raw JSON bytes (native passthrough)
  usage         normalised token usage and its cost
  decisions     one decision record per request and the JSON-lines log
  metrics       Prometheus metrics derived from decision records (handed what it reads)
  logs          structured JSON logs
  providers/    one pure adapter per wire protocol: openai, anthropic, gemini
  simulator/    the fake provider fleet used by tests, bench and demo
"""

__version__ = "0.1.0"
