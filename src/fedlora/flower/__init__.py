"""The Flower runtime: a `ClientApp` and a `ServerApp` that are thin shells over the project's own code.

Nothing here trains, aggregates or evaluates by itself. The ServerApp drives the project's one round
engine (`fedlora.engine.RoundEngine`) over a `FlowerTransport`; the ClientApp answers its requests with
the same `ClientHost` the in-process simulator calls. Flower only carries the messages:

  per round  server --train.global (shared state)--> sampled clients --(shared update)--> server
             Server.aggregate: the server's new state is the global model
             server --train.local (new shared state)--> clients: local phase, local evaluation
             server: evaluation of the global model it holds, metrics.jsonl

Personal components live in each node's `Context.state` and never travel.

Modules: `settings` (run config / node config), `workspace` (what a server or client process builds),
`messages` (message types and record names), `transport` (the engine's requests as messages),
`client_app`, `server_app`, `command` (`fedlora flower simulate`).
"""
