"""The offline demo (``blip2 demo``): settings, its pipeline on top of `blip2.train` and `blip2.data`, the
demo's own frozen-encoder pretraining, and the HTML report."""
