"""The Flower (`flwr`) deployment backend: parties on separate machines, same protocol.

The server runs the unchanged `FederatedTrainer` inside a Flower ServerApp, with its own real
`Participant` and, for each client, a `RemoteParticipant` that forwards every phase call as a
Flower Message to the client's SuperNode. There the ClientApp hands the request to the node's
worker, which keeps the client's real `Participant` (same building code as the in-process
backend) between messages, restores its state and runs the same method. Nothing of the method is
implemented twice.

  messages.py     what a phase call and its answer look like as Flower records
  proxy.py        RemoteParticipant: the server-side stand-in for a client; FlowerStages: every
                  client at once, at most two messages per client per round
  discovery.py    which SuperNode serves which client (partition-id), before round 1 and on rejoin
  server_app.py   the ServerApp: find one SuperNode per client, then FederatedTrainer.fit()
  client_app.py   the ClientApp: one phase (and those that follow) of one client per message
  worker.py       the node's long-lived process that keeps the built party between messages
  client_phases.py  what a node does with one request (build or reuse the party, run the phases)
  node.py         what a node owns: its client's private data, model, output folder
  submit.py       `fedmkt fit --backend flower`: `flwr run` of the packaged app, then wait
  local.py        `fedmkt launch-local`: SuperLink + one SuperNode per client on this machine
  control_auth.py the Control API behind the operator's token
  credentials.py  TLS, SuperNode keys and SuperExec secrets for a local federation
  app_trust.py    which Flower apps a node runs (its own fedmkt app, and those it lists)
  polling.py      how often a local SuperNode and SuperExec ask for work
  clientapp_server.py  a node's ClientApp processes forked from one that imported them once
  app/            the Flower App project (pyproject.toml + thin component modules) that
                  `flwr run` builds into a FAB
"""
