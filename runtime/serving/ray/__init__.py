"""Many replicas behind one address, on Ray Serve: each request routed to a replica that already
holds its adapter.

`resolver.py` finds an adapter's files by name; `replica.py` is the Serve deployment of the
engine (one `AsyncLLM` per replica, adapters as Serve multiplexed models); `front.py` is the
ingress that answers the OpenAI-compatible HTTP routes and the `quadapt.v1.Generation` RPCs
through Serve's proxies, with the single server's own code, and forwards each generation to the
engine deployment under its adapter's name; `launch.py` starts or joins Ray, deploys, and
undeploys on SIGTERM. Everything here needs the `ray` extra (`pip install 'quadapt[ray]'`);
importing this package imports no Ray.
"""
