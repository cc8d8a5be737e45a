"""``sa3 studio``: a local web page and HTTP API for generating, over one resident pipeline.

A Starlette app served by uvicorn (``server.py``), one static page (``static/``),
jobs run one at a time by a worker thread from a bounded queue (``jobs.py``),
the history in SQLite next to the outputs (``history.py``).
"""
