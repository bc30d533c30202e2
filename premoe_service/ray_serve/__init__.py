"""PreMoe on Ray Serve: many engine replicas, one Redis, each request sent to a replica that holds its task.

Needs the `ray` extra (`pip install -e ".[ray]"`); nothing here is imported by `premoe serve`. `app.build` is the
application a Serve config names; `app.run` is `premoe serve-ray`."""
