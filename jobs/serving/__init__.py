"""jobs/serve.py's parts: the request protocol, the model worker, the API routes and the web app
(docs/serving.md)."""
