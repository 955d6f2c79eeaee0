"""Deployment routes beyond fx GraphModules: graphs of functional calls with frozen
parameters (``frozen``), ``torch.export`` programs (``export``), the ``torch.compile``
backend (``dynamo``), and the checks of a deployed model (``verify``)."""
