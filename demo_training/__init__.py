"""How the demo model was trained, and how to train it again.

The ``demo`` source serves a tiny Stable Diffusion pipeline that this project trained to draw one
shape on a plain background; its weights are committed under ``conversion/demo/trained/pipeline/``,
which is all the app needs of it at run time. The code that made them lives here, apart from
``conversion`` (which the app uploads to every fal runner):

- :mod:`.shapes`: the scenes, their caption grammar, drawing, and ``read_picture``, which reads a
  picture back from its pixels (the training report and the tests score what the model draws with it);
- :mod:`.train`: the training run;
- ``report/``: what the run that made the committed weights wrote (``training.json``: the command,
  the commit, the settings, the losses and the held-out scores; ``loss.png``; ``held_out_samples.png``).

``python -m demo_training train`` retrains (about 18 minutes on 2 CPU cores) and writes the pipeline
to ``conversion/demo/trained/pipeline/`` and the report to ``demo_training/report/`` (``--out DIR``
writes both under ``DIR`` instead); ``python -m demo_training images`` asks a running ``make serve``
for the README's pictures.
"""
