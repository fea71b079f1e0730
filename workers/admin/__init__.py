"""The Django admin: where the user watches and steers Earmark, one module per page group.

Layer 4 and thin: may import every package below. ``common`` holds what the
pages share (see its docstring); no page module imports another or this package.
Importing the modules here registers their pages with the admin site.
"""
from workers.admin import calibration, jobs, libraries, meta, tokens, tracks  # noqa: F401
