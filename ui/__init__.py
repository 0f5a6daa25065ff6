"""The annotation web app (``ui.app``), its label form (``ui.form``), admin tab (``ui.admin``), escaped text
(``ui.render``) and security (``ui.security``, ``ui.throttle``)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before any module here imports gradio
