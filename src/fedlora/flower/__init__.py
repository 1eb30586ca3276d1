"""The Flower runtime: a `ClientApp` and a `ServerApp` that are thin shells over the project's own code.

Nothing here trains or aggregates by itself. The server side builds the same objects as the
in-process simulator (`fedlora.simulation.Simulation`: method, `Server`, `Evaluator`) and calls
`Server.aggregate`; the client side calls `FedClient.global_phase` / `FedClient.local_phase`.
Flower only carries the messages:

  per round  server --train.global (shared state)--> sampled clients --(shared update)--> server
             Server.aggregate
             server --train.local (new shared state)--> clients: local phase, local evaluation
             server: global evaluation, metrics.jsonl

Personal components live in each node's `Context.state` and never travel.

Modules: `settings` (run config / node config), `workspace` (builds the simulator's objects),
`messages` (message types and record names), `client_app`, `server_app`, `command`
(`fedlora flower simulate`).
"""
