"""The client APIs the gateway serves, one module per surface: the mirror of `proxy.providers`
(one module per upstream protocol). Handlers stay thin: decode, route (`routing`), dispatch,
encode."""
