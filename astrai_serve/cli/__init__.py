"""The serving commands: `astrai serve` (serve.py), `astrai gateway` (gateway.py) and `astrai generate`
(generate.py), dispatched by `astrai_train.cli`.

Runs in the process the user starts. Only wiring: parse flags (engine_args.py derives one flag per
EngineConfig field), then start the pieces of the other layers: `astrai serve` runs the gRPC core
(core/) in this process with the engine and the REST facade (facade/) as child processes. May import
every other layer of astrai_serve; nothing imports it.
"""
