"""Measuring attention over data: the Stripe Observation (``stripe``), streaming moments
(``moments``), gates per epoch (``recorder``) and their figures (``plots``)."""
