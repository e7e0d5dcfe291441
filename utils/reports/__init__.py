"""The Spanish prose of the notebooks: each chapter's findings written from the numbers it computed.

One module per chapter (``utils.reports.data``, ``.memory``, ``.lora``, ``.training``, ``.evaluation``,
``.speed``); each function takes computed tables or results and returns Markdown. Computation lives in the
chapter's own package and never imports from here.
"""
