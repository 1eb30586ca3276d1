"""The Flower runtime: a `ClientApp` and a `ServerApp` that are thin shells over the project's own code.

Nothing here trains, aggregates or evaluates by itself. The ServerApp drives the project's one round
engine (`fedlora.engine.RoundEngine`) over a `FlowerTransport`; the ClientApp answers its requests with
the same `ClientHost` the in-process simulator calls. Flower only carries the messages:

  round t    server --train.round (shared state S_{t-1})--> each client: first round t-1's local phase
             and evaluations on S_{t-1} (its aggregate), then round t's global phase from S_{t-1}
             <-- one reply: the shared update (sampled clients) and metrics
             Server.aggregate: S_t, the server's new state, is the global model; its evaluation
  after the last round, one closing train.round: the last local phase and evaluations

Personal components live in each node's state directory and never travel.

Modules: `settings` (run config / node config), `workspace` (what a server or client process builds),
`messages` (message types and record names), `transport` (the engine's requests as messages),
`client_app`, `server_app`, `command` (`fedlora flower simulate`).
"""
