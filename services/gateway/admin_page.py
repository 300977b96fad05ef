"""The /admin dashboard: one self-contained HTML page, admin_page.html beside this module
(no external assets, it must work offline), that polls /admin/scheduler every second and
draws the KV block pool as a grid, one cell per block coloured by the request that owns
it, plus the request and executor tables.

The page is package data (pyproject.toml's `package-data` ships it in the wheel), read
through importlib.resources so that it is found wherever the package is installed, once,
when the gateway imports this module: a missing file fails the gateway at start-up, not
the first visit to /admin.

All data is inserted with textContent, never innerHTML: request ids come from clients'
traffic and must not become markup.
"""

from importlib.resources import files

ADMIN_PAGE_HTML = (files(__package__) / "admin_page.html").read_text(encoding="utf-8")
