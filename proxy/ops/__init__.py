"""The live operations page: what the gateway is doing now, for people, over one SSE stream.

  live         rolling one-second aggregates and a ring of recent decisions, fed once per
               request by `Gateway.finish` (never per chunk)
  deployments  the one reader of the state store: breakers, 429 holds, bucket levels
  view         `OpsSource` (what the wiring hands the page) and the page's JSON document
  feed         one producer for every open page: a frame a second while anyone listens
  pages        the /dashboard endpoints, behind the admin key
  static/      the page, its script and style, and uPlot (MIT, vendored with its licence)

Nothing here imports the Gateway or the server: the server's wiring hands the page what
it reads (`OpsSource`).
"""
