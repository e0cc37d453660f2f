"""What every app of this project adds to ``fal.App``, so an app file holds only its own model and
endpoints: the two ports checked free before setup() (fal binds them only after it), the request
body limit (413), billable units on every answer, short 422 answers, the documentation of its
server-sent event streams, and the pages a browser opens offline (GET /playground; /docs and /redoc
with their assets served by the app). These are fal's private hooks (``_add_extra_middlewares``,
``_add_extra_routes``), overridden here and nowhere else."""

from __future__ import annotations

from typing import Any, ClassVar

import fal
from fastapi import FastAPI

from .billing import BillableUnits
from .http import RequestBodyLimit, shorten_validation_answers
from .playground import add_playground, serve_docs_offline
from .ports import check_ports_free, serve_ports
from .stream import document_stream


class ServingApp(fal.App):
    """A ``fal.App`` with this project's HTTP conventions; subclasses set the class attributes."""

    max_request_bytes: ClassVar[int] = 1024 * 1024  # a larger body is answered 413
    streams: ClassVar[dict[str, type]] = {}  # path of a server-sent event stream -> its result model

    async def serve(self, **kwargs: Any) -> None:
        """fal's server, once its two ports are known to be free: fal binds them only after setup()."""
        check_ports_free(serve_ports(super().serve, kwargs))
        await super().serve(**kwargs)

    def _add_extra_middlewares(self, app: FastAPI) -> None:
        super()._add_extra_middlewares(app)
        app.add_middleware(RequestBodyLimit, max_bytes=self.max_request_bytes)
        app.add_middleware(BillableUnits)  # outermost: it sees every answer, the body limit's 413 too

    def _add_extra_routes(self, app: FastAPI) -> None:
        super()._add_extra_routes(app)
        # The last hook of fal's _build_app, after it registered its 422 handler: wrap that handler
        # so it keeps fal's format and headers but echoes only short inputs.
        shorten_validation_answers(app)
        for path, result in self.streams.items():
            document_stream(app, path, result)
        add_playground(app)
        serve_docs_offline(app)


# fal keeps an inherited app_name over the name= a subclass gives: this base names no app.
ServingApp.app_name = None
