"""The router's OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (SSE or whole), /v1/models,
/health and the Prometheus /metrics an Inference Gateway's endpoint picker scrapes.

It is a second face of the one request path (RouterServicer.generate): the same validation, placement, tracing and
metrics as gRPC Generate. One concern a file: `schema` (the request bodies), `requests` (a body to GenerateRequests),
`chat_template` (messages to a prompt), `choices` (running a body's choices, stop strings), `responses` (JSON and SSE
bodies), `errors` (OpenAI's error shape and statuses), `app` (the routes), `pool_metrics` (the model-server metrics of
the Inference Extension) and `server` (uvicorn in the router's event loop).
"""
