"""The project's own tiny text-to-image model: data, tokenizer, training, evaluation, shipped weights.

`python -m inference_server.embedded.train` trains it, `python -m inference_server.embedded.evaluate`
measures it; the trained `StableDiffusionPipeline` folder is `weights/` next to this file.
"""
