"""The HTTP layer: wiring and the serving loop (app), the shared edge (edge), the gateway's own
endpoints (admin), browser clients (cors) and --workers (workers). The client APIs themselves
live in `proxy.inbound`, one module per surface."""
