"""What the app serves, apart from the ``fal.App`` itself (``app.py``).

- :mod:`serving.settings`  fal.toml's strict models and :func:`~serving.settings.load_settings`
- :mod:`serving.schema`    the public request/response models, built from a ``[serving]`` table
- :mod:`serving.http`      the HTTP guards: the request body limit (413) and short 422 answers

Nothing here reads fal.toml or the environment at import; ``app.py`` loads the settings once.
"""
