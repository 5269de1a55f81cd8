"""The dashboard Kiln serves at `/`: jobs, a job's steps and candidates, models, deployments.

Server-rendered pages (Jinja2 templates in `templates/`) with a little vendored JavaScript in
`static/` that follows jobs live over their event stream and sends every action to the /v1 API.

- `routes.py`     the pages and the static files
- `views.py`      what a page shows, arranged for its template
- `charts.py`     charts as inline SVG
- `formatting.py` how numbers, times and signatures are written
- `tryit.py`      the starting request of a deployment's "try it" box
- `assets.py`     the static files and their cache-busting URLs
"""

from service.dashboard.routes import router

__all__ = ["router"]
