"""Training side of diffusekit: ``diffusekit train unconditional|text-to-image`` and ``diffusekit eval``.

Fashion-MNIST loading (:mod:`.data`), EMA (:mod:`.ema`), the resumable training loop (:mod:`.loop`), loss plots
(:mod:`.plot`), the trainers (:mod:`.unconditional`, :mod:`.text_to_image`) and quality measurement
(:mod:`.evaluate`). Trained models are written in diffusers format with diffusekit's own models and schedulers.
"""
