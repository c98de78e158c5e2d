"""Single-file checkpoints in the original CompVis / Stability layout (what A1111, ComfyUI and Civitai share).

``keymaps`` holds every key name as data; ``layout`` applies it both ways; ``infer`` reads the architecture from
the shapes; ``checkpoint`` reads and writes the files safely; ``loading`` and ``pipeline`` add ``from_single_file``
and ``save_single_file`` to the model and pipeline classes. See docs/SINGLE_FILE.md.
"""
