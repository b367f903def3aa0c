"""``loralab report``: static HTML pages with plots for run, sweep and analysis directories.

``sources`` reads the directories (stdlib + PyYAML, no torch), ``plots`` draws with matplotlib's Agg
backend (imported lazily), ``html`` holds the page primitives, ``pages`` composes the sections and
``commands`` is the ``loralab report PATH... --out DIR`` entry point. A page works from ``file://``:
images are files beside ``index.html`` (or data URIs with ``--embed``); nothing is fetched.
"""
