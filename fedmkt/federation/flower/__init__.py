"""The Flower (`flwr`) deployment backend: parties on separate machines, same protocol.

The server runs the unchanged `FederatedTrainer` inside a Flower ServerApp, with its own real
`Participant` and, for each client, a `RemoteParticipant` that forwards every phase call as a
Flower Message to the client's SuperNode. There the ClientApp rebuilds the client's real
`Participant` (same building code as the in-process backend), restores its state and runs the
same method. Nothing of the method is implemented twice.

  messages.py     what a phase call and its answer look like as Flower records
  proxy.py        RemoteParticipant: the server-side stand-in for a client
  server_app.py   the ServerApp: find one SuperNode per client, then FederatedTrainer.fit()
  client_app.py   the ClientApp: one phase of one client per message, state kept on the node
  submit.py       `fedmkt fit --backend flower`: `flwr run` of the packaged app, then wait
  app/            the Flower App project (pyproject.toml + thin component modules) that
                  `flwr run` builds into a FAB
"""
