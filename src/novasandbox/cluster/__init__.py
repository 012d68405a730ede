"""One API over a Ray cluster (``novasandbox serve --ray ADDRESS``): node agents
(``node.py``) own each host's sandboxes through the single-host server; the cluster
server places sandboxes (``placement.py``), routes to them and notices lost nodes
(``registry.py``) behind the same HTTP API (``app.py``). Needs ``ray`` (the ``ray``
extra); nothing outside this package imports it."""
