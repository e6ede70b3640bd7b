"""Reports and the live dashboard of a run: `fedmask report` and `fedmask dashboard`.

``model`` is what a report shows about a task, filled from the store or from a simulation's results;
``plots`` draws it, ``render`` writes it as Markdown and self-contained HTML, ``dashboard`` serves it
live. The simulator's report (``simulator/report.py``) uses the same three modules.
"""
