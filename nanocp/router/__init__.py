"""The router: validates requests, places them on worker instances, and relays their token streams.

One concern a file: `validation` (what a request may ask), `placement` (the policy interface; footprints, shards and
placements are nanocp.placement), `policies/` (one object per policy), `registry` (which workers exist and answer),
`accounting` (what the router has granted each instance), `admission` (place now, queue, or refuse), `migration`
(a request whose group fails goes on elsewhere), `errors` (a request's failure status), `service` (the gRPC API and
the one request path), `http/` (the OpenAI-compatible HTTP API over that path) and `server` (wiring).
"""

# How often a request may move to another group after its group failed; here, so the CLI reads it without loading
# the router.
DEFAULT_MAX_MIGRATIONS = 2
