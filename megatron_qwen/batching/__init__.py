"""Turning datasets into each update's batches: one dataset on disk (``dataset``), which conversation comes next
(``order``), filling rows and collating micro-batches (``rows``), the checks of datasets against a run (``checks``),
and the object the trainer draws each update's batch from (``source``)."""
