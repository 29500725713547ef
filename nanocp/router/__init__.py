"""The router: validates requests, places them on worker instances, and relays their token streams.

One concern a file: `validation` (what a request may ask), `placement` (the policy interface; footprints, shards and
placements are nanocp.placement), `policies/` (one object per policy), `registry` (which workers exist and answer),
`accounting` (what the router has granted each instance), `admission` (place now, queue, or refuse), `errors` (a
request's failure status), `service` (the gRPC API and the one request path), `http/` (the OpenAI-compatible HTTP
API over that path) and `server` (wiring).
"""
