"""Ray Serve: specserve's FastAPI app as a Ray Serve deployment, one engine per replica
(`specserve ray-serve`, or `serve deploy` with `deploy.yaml`). Needs the `ray` extra."""
